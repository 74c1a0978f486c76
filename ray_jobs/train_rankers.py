"""Train the CTR and CVR rankers of the current model version on Feast's point-in-time frame.

    python -m ray_jobs.train_rankers --config configs/demo.yaml [k=v ...]
        [--model-version V] [--online-store redis://127.0.0.1:6379/0]

Reads every impression with its `ranker_v1` features (`get_historical_features`: candidate and
trigger embeddings of the version, song and listener stats as of the impression), trains on the
period before the split (eval.holdout_fraction), reports CTR/CVR AUC on the held-out period, and
saves the rankers with their feature list and model_version to <output_dir>/rankers/<version>/,
where serving loads them.
"""

from __future__ import annotations

import argparse
import time

import pandas as pd

from feature_repo.history import whole_log_frame
from htcl import schema as S
from htcl.arguments import add_config_args
from htcl.layout import Layout
from htcl.pairs import split_time
from htcl.ranking import RankerParams, ranker_auc, train_rankers
from htcl.retrieval import read_embeddings
from ray_jobs.common import parse_args, print_summary, save_resolved_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ray_jobs.train_rankers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p)
    p.add_argument("--model-version", help="embedding version (default: the current one)")
    p.add_argument(
        "--online-store",
        default=None,
        help="whose registry and current version (default: $HTCL_ONLINE_STORE, else SQLite)",
    )
    return p


def main(argv=None) -> int:
    args, cfg = parse_args(build_parser(), argv)
    t0 = time.perf_counter()
    frame, version = whole_log_frame(cfg, args.online_store, args.model_version)
    cut = split_time(frame[S.EVENT_TIMESTAMP], cfg.eval.holdout_fraction)
    ts = pd.to_datetime(frame[S.EVENT_TIMESTAMP], utc=True)
    train, test = frame[ts < cut], frame[ts >= cut]
    _, catalog_vectors, _ = read_embeddings(Layout.of(cfg).embeddings(version))
    rankers = train_rankers(train, catalog_vectors, version, RankerParams(seed=cfg.eval.seed))
    heldout = ranker_auc(rankers, test)
    rankers.info.update({"split_time": str(cut), "heldout": heldout})
    out = rankers.save(Layout.of(cfg).rankers(version))
    save_resolved_config(cfg, out)
    print_summary(
        {
            "model_version": version,
            "rankers": str(out),
            "features": len(rankers.feature_names),
            "train_rows": len(train),
            "heldout_rows": len(test),
            "split_time": str(cut),
            "heldout_ctr_auc": round(heldout["ctr_auc"], 4),
            "heldout_cvr_auc": round(heldout["cvr_auc"], 4),
            "seconds": round(time.perf_counter() - t0, 2),
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
