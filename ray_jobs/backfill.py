"""The rankers' point-in-time training frame: each impression with its features as they were.

    python -m ray_jobs.backfill --config configs/demo.yaml --start 2026-01-01 --end 2026-02-01
        [--model-version V] [--out PATH]

Reads the similar-songs impressions with start <= event_timestamp < end, and joins each with the
`ranker_v1` feature service through Feast's `get_historical_features`: the candidate's and the
trigger's embeddings (of the current model version unless --model-version), the candidate's
song_stats and the listener's listener_stats as of the impression's timestamp, never later.
Writes <output_dir>/backfill/ranker_frame_<start>_<end>.parquet (full feature names,
`view__feature`) and prints the row count and where it went.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

from feature_repo.history import entity_frame, historical_frame
from feature_repo.store import read_current_version
from htcl.arguments import add_config_args
from htcl.layout import Layout
from ray_jobs.common import parse_args, print_summary, save_resolved_config


def _timestamp(value: str, name: str) -> pd.Timestamp:
    try:
        ts = pd.Timestamp(value)
    except ValueError:
        raise SystemExit(
            f"backfill: --{name} {value!r} is not a date or timestamp (e.g. 2026-01-31 or 2026-01-31T12:00Z)"
        )
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ray_jobs.backfill", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(p)
    p.add_argument("--start", required=True, help="first impression time included (UTC unless given)")
    p.add_argument("--end", required=True, help="first impression time excluded")
    p.add_argument("--model-version", help="embedding version (default: the current one)")
    p.add_argument(
        "--online-store",
        default=None,
        help="whose registry and current model version to use (default: $HTCL_ONLINE_STORE, else SQLite)",
    )
    p.add_argument("--out", help="output Parquet (default: <output_dir>/backfill/ranker_frame_<start>_<end>.parquet)")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args, cfg = parse_args(parser, argv)
    from feature_repo.store import open_store

    start, end = _timestamp(args.start, "start"), _timestamp(args.end, "end")
    if end <= start:
        parser.exit(2, f"backfill: --end {end} must be after --start {start}\n")
    data_dir = Layout.of(cfg).feast
    version = args.model_version or read_current_version(data_dir, args.online_store)
    if not version:
        parser.exit(2, f"backfill: no current model version in {data_dir}; run `htcl materialize` first\n")
    t0 = time.perf_counter()
    interactions = pd.read_parquet(Path(cfg.data.root) / "interactions.parquet")
    entities = entity_frame(interactions, start, end, version)
    if entities.empty:
        print(f"backfill: no impressions in [{start}, {end})", file=sys.stderr)
        return 1
    frame = historical_frame(open_store(data_dir, args.online_store), entities)
    out = (
        Path(args.out)
        if args.out
        else Layout.of(cfg).backfill / f"ranker_frame_{start:%Y%m%dT%H%M}_{end:%Y%m%dT%H%M}.parquet"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(out, index=False)
    save_resolved_config(cfg, out.parent)
    print_summary(
        {
            "rows": len(frame),
            "columns": len(frame.columns),
            "model_version": version,
            "start": str(start),
            "end": str(end),
            "frame": str(out),
            "seconds": round(time.perf_counter() - t0, 2),
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
