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

import numpy as np
import pandas as pd

from htcl import schema as S
from ray_jobs.common import add_config_args, parse_args, print_summary, save_resolved_config
from ray_jobs.materialize import feast_dir, read_current_version

IMPRESSION_ID = "impression_id"


def _timestamp(value: str, name: str) -> pd.Timestamp:
    try:
        ts = pd.Timestamp(value)
    except ValueError:
        raise SystemExit(f"backfill: --{name} {value!r} is not a date or timestamp (e.g. 2026-01-31 or 2026-01-31T12:00Z)")
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def entity_frame(interactions: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp, model_version: str) -> pd.DataFrame:
    """Impressions in [start, end) as Feast entity rows: the candidate is `song_id`.

    `impression_id` (the row's position in the log) keeps repeated identical impressions apart:
    Feast 0.67 drops entity rows that are exact duplicates of each other.
    """
    ts = pd.to_datetime(interactions[S.EVENT_TIMESTAMP], utc=True)
    keep = (ts >= start) & (ts < end)
    rows = interactions[keep].rename(columns={S.REC_SONG_ID: S.SONG_ID})
    rows = rows.assign(**{IMPRESSION_ID: np.flatnonzero(keep.to_numpy()), S.MODEL_VERSION: model_version})
    return rows.reset_index(drop=True)


def historical_frame(store, entities: pd.DataFrame, service: str = "ranker_v1") -> pd.DataFrame:
    """Feast's point-in-time join of the service's features onto every entity row, in log order.

    One get_historical_features call per feature view of the service, each over the distinct
    (join keys, timestamp) of that view, merged back onto every impression. Asking for the whole
    service at once loses rows in Feast 0.67's file store: it de-duplicates after each view on
    the join keys seen so far, so two impressions of one song at the same instant by different
    listeners collapse into one (dask.py, _drop_duplicates).
    """
    frame = entities.assign(**{S.EVENT_TIMESTAMP: pd.to_datetime(entities[S.EVENT_TIMESTAMP], utc=True)})
    for projection in store.get_feature_service(service).feature_view_projections:
        view = store.get_feature_view(projection.name)
        own_keys = [entity_column.name for entity_column in view.entity_columns]
        keys = [projection.join_key_map.get(k, k) for k in own_keys]  # columns of the entity frame
        distinct = frame[keys + [S.EVENT_TIMESTAMP]].drop_duplicates(ignore_index=True)
        asked = distinct.rename(columns=dict(zip(keys, own_keys)))
        refs = [f"{projection.name}:{f.name}" for f in projection.features]
        got = store.get_historical_features(entity_df=asked, features=refs, full_feature_names=True).to_df()
        got[S.EVENT_TIMESTAMP] = pd.to_datetime(got[S.EVENT_TIMESTAMP], utc=True)
        alias = projection.name_to_use()
        got = got.rename(columns={**dict(zip(own_keys, keys)),
                                  **{f"{projection.name}__{f.name}": f"{alias}__{f.name}" for f in projection.features}})
        before = len(frame)
        frame = frame.merge(got, on=keys + [S.EVENT_TIMESTAMP], how="left", validate="many_to_one", indicator=True)
        lost = frame["_merge"] != "both"
        if lost.any() or len(frame) != before:
            # Losing training rows silently would bias the rankers: fail and say which.
            raise RuntimeError(
                f"{alias}: get_historical_features returned no row for {int(lost.sum())} of {before} impressions, "
                f"e.g. {frame.loc[lost, keys + [S.EVENT_TIMESTAMP]].head(3).to_dict('records')}"
            )
        frame = frame.drop(columns="_merge")
    return frame.sort_values(IMPRESSION_ID, ignore_index=True)


def whole_log_frame(cfg, online_store: str | None = None, model_version: str | None = None) -> tuple[pd.DataFrame, str]:
    """Every impression of the log with its ranker_v1 features from Feast, and the model version.

    What train-rankers and evaluate read; they split it in time themselves.
    """
    from feature_repo.store import open_store

    data_dir = feast_dir(cfg)
    version = model_version or read_current_version(data_dir, online_store)
    if not version:
        raise SystemExit(f"no current model version in {data_dir}; run `htcl materialize` first")
    interactions = pd.read_parquet(Path(cfg.data.root) / "interactions.parquet")
    ts = pd.to_datetime(interactions[S.EVENT_TIMESTAMP], utc=True)
    entities = entity_frame(interactions, ts.min(), ts.max() + pd.Timedelta(microseconds=1), version)
    t0 = time.perf_counter()
    frame = historical_frame(open_store(data_dir, online_store), entities)
    print(f"backfill: {len(frame)} impressions with ranker_v1 features from Feast in {time.perf_counter() - t0:.1f} s",
          flush=True)
    return frame, version


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.backfill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--start", required=True, help="first impression time included (UTC unless given)")
    parser.add_argument("--end", required=True, help="first impression time excluded")
    parser.add_argument("--model-version", help="embedding version (default: the current one)")
    parser.add_argument("--online-store", default=None,
                        help="whose registry and current model version to use (default: $HTCL_ONLINE_STORE, else SQLite)")
    parser.add_argument("--out", help="output Parquet (default: <output_dir>/backfill/ranker_frame_<start>_<end>.parquet)")
    args, cfg = parse_args(parser, argv)
    from feature_repo.store import open_store

    start, end = _timestamp(args.start, "start"), _timestamp(args.end, "end")
    if end <= start:
        parser.exit(2, f"backfill: --end {end} must be after --start {start}\n")
    data_dir = feast_dir(cfg)
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
    out = Path(args.out) if args.out else Path(cfg.output_dir) / "backfill" / (
        f"ranker_frame_{start:%Y%m%dT%H%M}_{end:%Y%m%dT%H%M}.parquet")
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(out, index=False)
    save_resolved_config(cfg, out.parent)
    print_summary({"rows": len(frame), "columns": len(frame.columns), "model_version": version,
                   "start": str(start), "end": str(end), "frame": str(out), "seconds": round(time.perf_counter() - t0, 2)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
