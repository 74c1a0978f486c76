"""Publish features to Feast: stats from the logs (Ray Data), embeddings of a model version,
apply the repo, materialize incrementally into the online store, switch the current version.

    python -m ray_jobs.materialize --config configs/demo.yaml [k=v ...]
        [--model-version V] [--no-switch] [--online-store redis://127.0.0.1:6379/0]

Offline sources go to <output_dir>/feast/ (song_stats, listener_stats, song_embeddings Parquet),
beside Feast's registry and SQLite online store (or Redis: --online-store / HTCL_ONLINE_STORE).
Idempotent: a second run rewrites identical sources, and materializes nothing new.

Publishes take turns: each holds the data folder's publish lock (feature_repo.store.publish_lock)
from its first read to its last write, and replaces every file by rename. A run repairs what an
interrupted one left: unreadable sources or markers are rebuilt, a registry that does not parse is
set aside, missing views and entities are applied again, and a view not AVAILABLE_ONLINE (stuck
MATERIALIZING, or applied afresh) is materialized again over all time.

A new model version is backfilled next to the old one (embeddings are keyed by song_id and
model_version), materialized, and only then named in `current_model_version`, which readers
(serving, backfill) follow: at every instant, one complete version is current.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
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
    from feature_repo.store import write_atomically

    frame = frame.copy()
    for col in (S.EVENT_TIMESTAMP, "created"):
        frame[col] = pd.to_datetime(frame[col], utc=True).astype("datetime64[us, UTC]")
    table = pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(None)
    write_atomically(path, lambda tmp: pq.write_table(table, tmp))


def _write_text_atomic(path: Path, text: str) -> None:
    from feature_repo.store import write_atomically

    write_atomically(path, lambda tmp: tmp.write_text(text))


def _read_json(path: Path):
    """The JSON in path; None when absent or unreadable (torn by a writer from before atomic writes)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_parquet(path: Path) -> pd.DataFrame | None:
    """The table in path; None when absent or unreadable (a torn file: a footer over missing pages)."""
    if not path.is_file():
        return None
    try:
        return pq.read_table(path).to_pandas()
    except (pa.ArrowException, OSError, ValueError) as e:
        print(f"{path} is unreadable ({e}): rebuilding it", file=sys.stderr, flush=True)
        return None


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


def published_versions(data_dir: Path) -> set[str]:
    """Every version a completed publish put in this data folder, by the markers of its online stores."""
    from feature_repo.store import state_dirs

    versions: set[str] = set()
    for state in state_dirs(data_dir):
        versions |= set(_read_json(state / MATERIALIZED) or [])
        if (state / CURRENT).is_file():
            versions.add((state / CURRENT).read_text().strip())
    return versions


def published_embeddings(cfg, path: Path) -> pd.DataFrame | None:
    """The embeddings source as the last publish wrote it; rebuilt from embeddings/<V>/ of the
    published versions when the file is unreadable."""
    frame = _read_parquet(path)
    if frame is not None or not path.is_file():
        return frame
    root = Path(cfg.output_dir) / "embeddings"
    versions = sorted(v for v in published_versions(path.parent) if any((root / v).glob("*.parquet")))
    return pd.concat([embedding_rows(cfg, v) for v in versions], ignore_index=True) if versions else None


def merge_embeddings(old: pd.DataFrame | None, new: pd.DataFrame) -> pd.DataFrame:
    """Existing versions stay; the given version's rows are replaced. One vector size for all."""
    if old is not None:
        old = old[~old[S.MODEL_VERSION].isin(new[S.MODEL_VERSION].unique())]
        if len(old):
            old_dim, new_dim = len(old[S.EMBEDDING].iloc[0]), len(new[S.EMBEDDING].iloc[0])
            if old_dim != new_dim:
                raise ValueError(
                    f"the feature store holds {old_dim}-float embeddings, model {new[S.MODEL_VERSION].iloc[0]} gives {new_dim}: "
                    f"one feature store holds one vector size; use another output_dir for the new model"
                )
        new = pd.concat([old, new], ignore_index=True)
    return new.sort_values([S.MODEL_VERSION, S.SONG_ID], ignore_index=True)


def materialize(store, state: Path, versions: set[str], now: datetime) -> dict:
    """Online store up to `now`: embeddings when the source holds a version not yet materialized,
    stats incrementally; any view that is not AVAILABLE_ONLINE (an interrupted publish left it
    MATERIALIZING, or it was applied afresh) over all time."""
    from feast.feature_view import FeatureViewState

    t0 = time.perf_counter()
    done_path = state / MATERIALIZED
    done = set(_read_json(done_path) or [])
    wrote: dict[str, str] = {}
    embedding_view = store.get_feature_view("song_embedding")
    if not versions <= done or embedding_view.state != FeatureViewState.AVAILABLE_ONLINE:
        # Embedding rows are stamped 1970 (valid at any time), which an incremental window never
        # reaches: the source (every version in it) is materialized over all time.
        store.materialize(EPOCH.to_pydatetime(), now, feature_views=["song_embedding"])
        _write_text_atomic(done_path, json.dumps(sorted(versions)))
        why = f"new {sorted(versions - done)}" if not versions <= done else f"was {embedding_view.state.name}"
        wrote["song_embedding"] = f"versions {sorted(versions)} ({why})"
    for view in ("song_stats", "listener_stats"):
        fv = store.get_feature_view(view)
        if fv.materialization_intervals and fv.state == FeatureViewState.AVAILABLE_ONLINE:
            store.materialize_incremental(now, feature_views=[view])
            wrote[view] = f"incremental from {max(e for _, e in fv.materialization_intervals)}"
        else:
            store.materialize(EPOCH.to_pydatetime(), now, feature_views=[view])
            wrote[view] = "all time (first run)" if not fv.materialization_intervals else f"all time (was {fv.state.name})"
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
    from feature_repo.store import publish_lock

    data_dir = feast_dir(cfg)
    with publish_lock(data_dir):
        return publish(args, cfg, data_dir)


def publish(args, cfg, data_dir: Path) -> int:
    """The whole publish; the caller holds the data folder's publish lock."""
    from feature_repo.definitions import LISTENER_STATS, SONG_EMBEDDINGS, SONG_STATS
    from feature_repo.store import (apply_definitions, open_store, remove_partial_files, repo_config,
                                    set_aside_unreadable_registry, state_dir, state_dirs)

    t0 = time.perf_counter()
    state = state_dir(data_dir, args.online_store)
    # What a killed publish may have left: its half-written files, a registry torn by Feast's
    # in-place rewrite (before AtomicFileRegistryStore).
    repaired = {"partial_files_removed": [name for folder in (data_dir, *state_dirs(data_dir))
                                          for name in remove_partial_files(folder)]}
    if aside := set_aside_unreadable_registry(repo_config(data_dir, args.online_store)):
        repaired["unreadable_registry_moved_to"] = str(aside)
    world = Path(cfg.data.root)
    version = args.model_version or newest_model_version(cfg)
    inputs = [world / "interactions.parquet", world / "catalog.parquet"]
    fingerprint = {str(p): _sha256(p) for p in inputs}
    stats_paths = [data_dir / SONG_STATS, data_dir / LISTENER_STATS]
    stamp = _read_json(data_dir / STATS_INPUTS)
    reused = [_read_parquet(p) for p in stats_paths] if stamp and stamp.get("inputs") == fingerprint else [None]
    if all(frame is not None for frame in reused):
        # Same logs as the last run: the stats would come out byte for byte the same.
        songs, listeners = reused
        info = {**stamp["info"], "stats": "inputs unchanged: reused"}
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
        _write_text_atomic(data_dir / STATS_INPUTS, json.dumps({"inputs": fingerprint, "info": info}, indent=2))
        info = {**info, "stats": "computed with Ray Data"}
    embeddings_path = data_dir / SONG_EMBEDDINGS
    embeddings = merge_embeddings(published_embeddings(cfg, embeddings_path), embedding_rows(cfg, version))
    _write_atomic(embeddings, embeddings_path)
    embed_dim = len(embeddings[S.EMBEDDING].iloc[0])

    store = open_store(data_dir, args.online_store)
    # Every run applies every object: one that an interrupted or racing run lost comes back.
    apply_definitions(store, data_dir, embed_dim)
    now = datetime.now(timezone.utc)
    result = materialize(store, state, set(embeddings[S.MODEL_VERSION]), now)
    previous = read_current_version(data_dir, args.online_store)
    if not args.no_switch:
        _write_text_atomic(state / CURRENT, version + "\n")  # readers see the old or the new name
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
        **({"repaired": repaired} if any(repaired.values()) else {}),
        "materialize_seconds": result["seconds"],
        "rows_per_s_materialize": round(rows / max(result["seconds"], 1e-9), 1),
        "seconds": round(time.perf_counter() - t0, 2),
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
