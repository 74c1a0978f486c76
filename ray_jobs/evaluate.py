"""The comparison table: every embedding variant on the held-out (later) period.

    python -m ray_jobs.evaluate --config configs/demo.yaml [k=v ...] [--online-store URL] [--out DIR]
                                [--embeddings NAME=PATH ...]

Variants: a random-init encoder, mel statistics, stage 1 (pretrain/), HTCL (finetune/) and
HTCL_w_CF (finetune_cf/), whichever checkpoints exist. Semantics by linear probes, matching by
hit-rate@K, ranking by CTR/CVR AUC of rankers trained on Feast's point-in-time frame (stats as of
each impression; each variant's embeddings swapped in by song id). --embeddings NAME=PATH adds an
external embedding table (Parquet/CSV: song_id, embedding) as a row of its own. Writes results.json,
results.md and the plots to <output_dir>/evaluation/ and prints the table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from feature_repo.history import whole_log_frame
from htcl.arguments import add_evaluate_args, external_embeddings
from htcl.pipeline import run_evaluate
from ray_jobs.common import parse_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ray_jobs.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_evaluate_args(p)
    p.add_argument(
        "--online-store",
        default=None,
        help="whose registry and current version (default: $HTCL_ONLINE_STORE, else SQLite)",
    )
    p.add_argument("--out", help="report folder (default: <output_dir>/evaluation)")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args, cfg = parse_args(parser, argv)
    external = external_embeddings(parser, args.embeddings)
    t0 = time.perf_counter()
    frame, _ = whole_log_frame(cfg, args.online_store)
    results = run_evaluate(cfg, frame, args.out, external=external)
    print()
    print(Path(results["paths"]["markdown"]).read_text())
    print(f"evaluation: {results['paths']['markdown']} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
