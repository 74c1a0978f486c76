"""Publish features to Feast: stats from the logs (Ray Data), embeddings of a model version,
apply the repo, materialize incrementally into the online store, switch the current version.

    python -m ray_jobs.materialize --config configs/demo.yaml [k=v ...]
        [--model-version V] [--no-switch] [--online-store redis://127.0.0.1:6379/0]

Offline sources go to <output_dir>/feast/ (song_stats, listener_stats, song_embeddings Parquet),
beside Feast's registry and SQLite online store (or Redis: --online-store / HTCL_ONLINE_STORE).
Idempotent: a second run rewrites identical sources, and materializes nothing new.

A new model version is backfilled next to the old one (embeddings are keyed by song_id and
model_version), materialized, and only then named in `current_model_version`, which readers
(serving, backfill) follow: at every instant, one complete version is current.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from htcl import schema as S
from htcl.features import listener_stats, song_stats
from ray_jobs.common import add_config_args, add_ray_args, init_ray, parse_args, print_summary, save_resolved_config

EPOCH = pd.Timestamp("1970-01-01", tz="UTC")
CURRENT = "current_model_version"
MATERIALIZED = "materialized_versions.json"
STATS_INPUTS = "stats_inputs.json"  # hashes of the logs the stats files were computed from


def feast_dir(cfg) -> Path:
    return Path(cfg.output_dir) / "feast"


def newest_model_version(cfg) -> str:
    root = Path(cfg.output_dir) / "embeddings"
    versions = sorted((p for p in root.glob("*") if any(p.glob("*.parquet"))), key=lambda p: p.stat().st_mtime)
    if not versions:
        raise FileNotFoundError(f"no embeddings under {root}; run `htcl embed` first")
    return versions[-1].name


def read_current_version(data_dir: str | Path, online_store: str | None = None) -> str | None:
    """The model version readers of this online store use (None before the first publish)."""
    from feature_repo.store import state_dir

    path = state_dir(data_dir, online_store) / CURRENT
    return path.read_text().strip() if path.is_file() else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(frame: pd.DataFrame, path: Path) -> None:
    """Same rows -> same bytes (timestamps normalized, no pandas metadata); never a torn file."""
    frame = frame.copy()
    for col in (S.EVENT_TIMESTAMP, "created"):
        frame[col] = pd.to_datetime(frame[col], utc=True).astype("datetime64[us, UTC]")
    table = pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(None)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _utc(value) -> pd.Timestamp:
    ts = pd.Timestamp(value)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def compute_stats(interactions_path: Path, catalog_path: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """song_stats and listener_stats with Ray Data: one group per song / listener."""
    import ray

    ds = ray.data.read_parquet(str(interactions_path))
    log = ds.select_columns([S.USER_ID, S.REC_SONG_ID, S.CLICKED, S.FAVORED, S.EVENT_TIMESTAMP]).materialize()
    start, end = _utc(log.min(S.EVENT_TIMESTAMP)), _utc(log.max(S.EVENT_TIMESTAMP))
    # Global rates are what every group's smoothed rates shrink towards: one pass over the log.
    counts = log.map_batches(
        lambda b: pd.DataFrame({"n": [len(b)], "clicks": [int(b[S.CLICKED].sum())],
                                "favors": [int((b[S.CLICKED] & b[S.FAVORED]).sum())]}),
        batch_format="pandas",
    ).sum(["n", "clicks", "favors"])
    priors = (counts["sum(clicks)"] / max(counts["sum(n)"], 1), counts["sum(favors)"] / max(counts["sum(clicks)"], 1))
    catalog = pd.read_parquet(catalog_path, columns=[S.SONG_ID, S.GENRE]) if S.GENRE in pq.read_schema(catalog_path).names \
        else pd.DataFrame({S.SONG_ID: [], S.GENRE: []})
    song_genre = dict(zip(catalog[S.SONG_ID].astype(int), catalog[S.GENRE].fillna("").astype(str)))

    # Hash-shuffle into a few partitions per CPU, not Ray's default 200: the tables are small
    # next to the per-partition overhead.
    parts = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    songs = log.groupby(S.REC_SONG_ID, num_partitions=parts).map_groups(
        lambda g: song_stats(g, start, end, priors), batch_format="pandas"
    ).to_pandas()
    listeners = log.groupby(S.USER_ID, num_partitions=parts).map_groups(
        lambda g: listener_stats(g, start, end, song_genre, priors), batch_format="pandas"
    ).to_pandas()
    for frame, key in ((songs, S.SONG_ID), (listeners, S.USER_ID)):
        frame.sort_values([key, S.EVENT_TIMESTAMP], inplace=True, ignore_index=True)
        frame["created"] = frame[S.EVENT_TIMESTAMP]  # deterministic: a rerun writes identical rows
    info = {"log_start": str(start), "log_end": str(end), "global_ctr": round(priors[0], 4), "global_cvr": round(priors[1], 4)}
    return songs, listeners, info


def embedding_rows(cfg, model_version: str) -> pd.DataFrame:
    folder = Path(cfg.output_dir) / "embeddings" / model_version
    if not any(folder.glob("*.parquet")):
        raise FileNotFoundError(f"no embeddings for model_version {model_version!r} in {folder}")
    emb = pq.ParquetDataset(sorted(str(p) for p in folder.glob("*.parquet"))).read().to_pandas()
    if emb[S.MODEL_VERSION].nunique() != 1 or emb[S.MODEL_VERSION].iloc[0] != model_version:
        raise ValueError(f"{folder}: model_version column {sorted(emb[S.MODEL_VERSION].unique())} does not match the folder")
    return pd.DataFrame({
        S.SONG_ID: emb[S.SONG_ID].astype("int64"),
        S.MODEL_VERSION: emb[S.MODEL_VERSION].astype(str),
        S.EMBEDDING: [np.asarray(v, dtype=np.float32) for v in emb[S.EMBEDDING]],
        S.EVENT_TIMESTAMP: EPOCH,  # valid at any time (see feature_repo/definitions.py)
        "created": pd.to_datetime(emb[S.EVENT_TIMESTAMP], utc=True),
    })


def merge_embeddings(path: Path, new: pd.DataFrame) -> pd.DataFrame:
    """Existing versions stay; the given version's rows are replaced. One vector size for all."""
    if path.is_file():
        old = pd.read_parquet(path)
        old = old[~old[S.MODEL_VERSION].isin(new[S.MODEL_VERSION].unique())]
        if len(old):
            old_dim, new_dim = len(old[S.EMBEDDING].iloc[0]), len(new[S.EMBEDDING].iloc[0])
            if old_dim != new_dim:
                raise ValueError(
                    f"{path} holds {old_dim}-float embeddings, model {new[S.MODEL_VERSION].iloc[0]} gives {new_dim}: "
                    f"one feature store holds one vector size; use another output_dir for the new model"
                )
        new = pd.concat([old, new], ignore_index=True)
    return new.sort_values([S.MODEL_VERSION, S.SONG_ID], ignore_index=True)


def materialize(store, state: Path, model_version: str, now: datetime) -> dict:
    """Online store up to `now`: new embedding versions in full, stats incrementally."""
    t0 = time.perf_counter()
    done_path = state / MATERIALIZED
    done = set(json.loads(done_path.read_text())) if done_path.is_file() else set()
    wrote: dict[str, str] = {}
    if model_version not in done:
        # Embedding rows are stamped 1970 (valid at any time), which an incremental window never
        # reaches: a new version is materialized over all time, once.
        store.materialize(EPOCH.to_pydatetime(), now, feature_views=["song_embedding"])
        done.add(model_version)
        done_path.write_text(json.dumps(sorted(done)))
        wrote["song_embedding"] = f"version {model_version}"
    for view in ("song_stats", "listener_stats"):
        fv = store.get_feature_view(view)
        if fv.materialization_intervals:
            store.materialize_incremental(now, feature_views=[view])
            wrote[view] = f"incremental from {max(e for _, e in fv.materialization_intervals)}"
        else:
            store.materialize(EPOCH.to_pydatetime(), now, feature_views=[view])
            wrote[view] = "all time (first run)"
    return {"views": wrote, "seconds": round(time.perf_counter() - t0, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.materialize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    add_ray_args(parser)
    parser.add_argument("--model-version", help="embeddings/<V> to publish (default: the newest)")
    parser.add_argument("--no-switch", action="store_true", help="backfill the version without making it current")
    parser.add_argument("--online-store", default=None, help="redis://HOST:PORT[/DB] (default: $HTCL_ONLINE_STORE, else SQLite)")
    args, cfg = parse_args(parser, argv)
    from feature_repo.store import apply_definitions, open_store, state_dir

    t0 = time.perf_counter()
    data_dir = feast_dir(cfg)
    data_dir.mkdir(parents=True, exist_ok=True)
    world = Path(cfg.data.root)
    version = args.model_version or newest_model_version(cfg)
    inputs = [world / "interactions.parquet", world / "catalog.parquet"]
    fingerprint = {str(p): _sha256(p) for p in inputs}
    stats_paths = [data_dir / "song_stats.parquet", data_dir / "listener_stats.parquet"]
    stamp = data_dir / STATS_INPUTS
    if all(p.is_file() for p in stats_paths) and stamp.is_file() and json.loads(stamp.read_text())["inputs"] == fingerprint:
        # Same logs as the last run: the stats would come out byte for byte the same.
        songs, listeners = (pd.read_parquet(p) for p in stats_paths)
        info = {**json.loads(stamp.read_text())["info"], "stats": "inputs unchanged: reused"}
    else:
        started = init_ray(args.num_cpus, quiet=True)
        try:
            songs, listeners, info = compute_stats(*inputs)
        finally:
            if started:
                import ray

                ray.shutdown()
        _write_atomic(songs, stats_paths[0])
        _write_atomic(listeners, stats_paths[1])
        stamp.write_text(json.dumps({"inputs": fingerprint, "info": info}, indent=2))
        info = {**info, "stats": "computed with Ray Data"}
    embeddings = merge_embeddings(data_dir / "song_embeddings.parquet", embedding_rows(cfg, version))
    _write_atomic(embeddings, data_dir / "song_embeddings.parquet")
    embed_dim = len(embeddings[S.EMBEDDING].iloc[0])

    store = open_store(data_dir, args.online_store)
    apply_definitions(store, data_dir, embed_dim)
    now = datetime.now(timezone.utc)
    state = state_dir(data_dir, args.online_store)
    result = materialize(store, state, version, now)
    previous = read_current_version(data_dir, args.online_store)
    if not args.no_switch:
        tmp = state / (CURRENT + ".tmp")
        tmp.write_text(version + "\n")
        os.replace(tmp, state / CURRENT)  # atomic: readers see the old or the new name
    save_resolved_config(cfg, data_dir)
    rows = len(songs) + len(listeners) + int((embeddings[S.MODEL_VERSION] == version).sum())
    print_summary({
        "feature_data": str(data_dir),
        "online_store": type(store.config.online_store).__name__,
        "model_version": version,
        "current_model_version": read_current_version(data_dir, args.online_store),
        "online_state": str(state),
        "previous_model_version": previous,
        "embed_dim": embed_dim,
        "rows": {"song_stats": len(songs), "listener_stats": len(listeners),
                 "song_embeddings (all versions)": len(embeddings)},
        **info,
        "materialized": result["views"],
        "materialize_seconds": result["seconds"],
        "rows_per_s_materialize": round(rows / max(result["seconds"], 1e-9), 1),
        "seconds": round(time.perf_counter() - t0, 2),
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
