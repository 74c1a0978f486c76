"""Ray Data: the locked towers' features of every song -> features/<tower>-<hash>/ (a cache).

    python -m ray_jobs.features --config configs/demo.yaml [key=value ...] [--force]
    ray job submit --working-dir . -- python -m ray_jobs.features --config configs/demo.yaml

For each tower the config locks (model.audio_backbone: the pretrained tagger's per-patch
features; model.text_trainable false: the BERT's pooled output), an actor pool runs the tower
(htcl.towers.BackboneFeatures / TextFeatures, loaded once per actor) over the songs that are not
cached yet or whose input (audio bytes, song text) changed; cached rows of unchanged songs are
kept, rows of changed songs replaced. A cache folder is named by the hash of the tower's weights
and config, so another tower never reuses it. A file the tagger cannot decode goes to
quarantine/ with stage "features", and the job goes on.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Sequence

import pyarrow as pa

from htcl import schema as S
from htcl.arguments import add_features_args
from htcl.config import Config
from htcl.mels import read_catalog_or_refuse
from htcl.pipeline import catalog_path, finish_features, plan_features, tower_udf
from ray_jobs.common import (
    add_ray_args,
    default_workers,
    init_ray,
    job_banner,
    limit_torch_threads,
    parse_args,
    print_summary,
)

# One row per input song: the feature columns are null for a quarantined song, the quarantine
# columns null for a good one (a Ray Data batch is one table).
RESULT_SCHEMA = pa.schema(
    [
        (S.SONG_ID, pa.int64()),
        ("input_hash", pa.string()),
        ("shape", pa.list_(pa.int32())),
        ("feature", pa.binary()),
        (S.AUDIO_PATH, pa.string()),
        (S.STAGE, pa.string()),
        (S.ERROR_TYPE, pa.string()),
        (S.MESSAGE, pa.string()),
    ]
)


class TowerUDF:
    """Ray Data class UDF: the tower is built once per actor; input rows -> result rows."""

    def __init__(self, cfg: Config, tower: str, torch_threads: int = 1):
        limit_torch_threads(torch_threads)
        self.udf = tower_udf(cfg, tower)

    def __call__(self, batch: dict) -> pa.Table:
        out = self.udf({k: list(v) for k, v in batch.items()})
        rows = out["features"] + out["quarantine"]
        return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def run(cfg: Config, catalog=None, force: bool = False, workers: int | None = None, batch_size: int = 4) -> dict:
    import ray

    workers = default_workers(workers)
    summary: dict = {"workers": workers}
    for plan in plan_features(cfg, catalog, force):
        t0 = time.perf_counter()
        rows, quarantine = [], []
        if len(plan.todo):
            ds = ray.data.from_pandas(plan.todo, override_num_blocks=max(1, math.ceil(len(plan.todo) / batch_size)))
            ds = ds.map_batches(
                TowerUDF,
                fn_constructor_kwargs={"cfg": cfg, "tower": plan.tower},
                batch_size=batch_size,
                compute=ray.data.ActorPoolStrategy(size=min(workers, math.ceil(len(plan.todo) / batch_size))),
                num_cpus=1,
            )
            for r in ds.iter_rows():
                if r["feature"] is not None:
                    rows.append({k: r[k] for k in (S.SONG_ID, "input_hash", "shape", "feature")})
                else:
                    quarantine.append({k: r[k] for k in (S.SONG_ID, S.AUDIO_PATH, S.STAGE, S.ERROR_TYPE, S.MESSAGE)})
        summary[plan.tower] = finish_features(cfg, plan, rows, quarantine, time.perf_counter() - t0)
        print(
            f"features {plan.spec['tower']}: {summary[plan.tower]['computed']} computed, "
            f"{summary[plan.tower]['kept']} kept -> {plan.directory}",
            flush=True,
        )
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ray_jobs.features", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_features_args(p)
    add_ray_args(p)
    p.add_argument("--batch-size", type=int, default=4, help="songs per UDF call (default: %(default)s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args, cfg = parse_args(build_parser(), argv)
    # checked before Ray starts, as in the preprocess job: a refusal is a plain exit 1
    if read_catalog_or_refuse(Path(args.catalog or catalog_path(cfg)), "features") is None:
        return 1
    started = init_ray(args.num_cpus)
    job_banner("features")
    try:
        summary = run(cfg, args.catalog, args.force, args.workers, args.batch_size)
    finally:
        if started:
            import ray

            ray.shutdown()
    print_summary(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
