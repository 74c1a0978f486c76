"""Publish features to Feast: stats from the logs (Ray Data), embeddings of a model version,
apply the repo, materialize incrementally into the online store, switch the current version.

    python -m ray_jobs.materialize --config configs/demo.yaml [k=v ...]
        [--model-version V] [--no-switch] [--online-store redis://127.0.0.1:6379/0]

Offline sources go to <output_dir>/feast/ (song_stats.parquet, listener_stats.parquet, and the
song_embeddings/ folder: one file per part of embeddings/<V>/, named <V>--<part>.parquet), beside
Feast's registry and SQLite online store (or Redis: --online-store / HTCL_ONLINE_STORE).
Incremental: an embeddings part is converted once (song_embeddings_parts.json records from what),
and an online store receives only the rows of source files it has not received yet
(<state>/materialized_sources.json), so a grown catalog's second publish writes just its new
songs, and a run with nothing new writes no source file and materializes nothing.

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
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from feature_repo.definitions import EPOCH, embedding_source_file
from feature_repo.store import read_current_version, write_current_version
from htcl import schema as S
from htcl.arguments import add_config_args
from htcl.delta import file_fingerprint
from htcl.features import listener_stats, song_stats
from htcl.files import sha256_file, write_atomically
from htcl.layout import Layout
from ray_jobs.common import add_ray_args, init_ray, parse_args, print_summary, save_resolved_config

MATERIALIZED = "materialized_sources.json"  # per online store: the source files it holds, by fingerprint
OFFLINE_PARTS = "song_embeddings_parts.json"  # which embeddings part each source file was made from
LEGACY_EMBEDDINGS_FILE = "song_embeddings.parquet"  # earlier releases' one-file source
STATS_INPUTS = "stats_inputs.json"  # hashes of the logs the stats files were computed from
BUCKET = "_bucket"  # compute_stats' grouping column: a key's hash bucket


def newest_model_version(cfg) -> str:
    root = Layout.of(cfg).embeddings_root
    versions = sorted((p for p in root.glob("*") if any(p.glob("*.parquet"))), key=lambda p: p.stat().st_mtime)
    if not versions:
        raise FileNotFoundError(f"no embeddings under {root}; run `htcl embed` first")
    return versions[-1].name


def _write_atomic(frame: pd.DataFrame, path: Path) -> None:
    """Same rows -> same bytes (timestamps normalized, no pandas metadata); never a torn file."""
    frame = frame.copy()
    for col in (S.EVENT_TIMESTAMP, "created"):
        frame[col] = pd.to_datetime(frame[col], utc=True).astype("datetime64[us, UTC]")
    table = pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(None)
    write_atomically(path, lambda tmp: pq.write_table(table, tmp), fsync=True)


def _write_text_atomic(path: Path, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text), fsync=True)


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
        lambda b: pd.DataFrame(
            {"n": [len(b)], "clicks": [int(b[S.CLICKED].sum())], "favors": [int((b[S.CLICKED] & b[S.FAVORED]).sum())]}
        ),
        batch_format="pandas",
    ).sum(["n", "clicks", "favors"])
    priors = (counts["sum(clicks)"] / max(counts["sum(n)"], 1), counts["sum(favors)"] / max(counts["sum(clicks)"], 1))
    catalog = (
        pd.read_parquet(catalog_path, columns=[S.SONG_ID, S.GENRE])
        if S.GENRE in pq.read_schema(catalog_path).names
        else pd.DataFrame({S.SONG_ID: [], S.GENRE: []})
    )
    song_genre = dict(zip(catalog[S.SONG_ID].astype(int), catalog[S.GENRE].fillna("").astype(str)))

    # A few buckets per CPU (key modulo buckets), each one call of song_stats / listener_stats over
    # all of its keys (both are vectorised over keys): a call per song costs ~65 ms of pandas
    # overhead, hours for a log that touches a million songs.
    parts = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))

    def by_bucket(key: str, stats):
        bucketed = log.map_batches(
            lambda b: b.assign(**{BUCKET: np.asarray(b[key], dtype=np.int64) % parts}), batch_format="pandas"
        )
        return (
            bucketed.groupby(BUCKET, num_partitions=parts)
            .map_groups(lambda g: stats(g.drop(columns=BUCKET)), batch_format="pandas")
            .to_pandas()
        )

    songs = by_bucket(S.REC_SONG_ID, lambda g: song_stats(g, start, end, priors))
    listeners = by_bucket(S.USER_ID, lambda g: listener_stats(g, start, end, song_genre, priors))
    for frame, key in ((songs, S.SONG_ID), (listeners, S.USER_ID)):
        frame.sort_values([key, S.EVENT_TIMESTAMP], inplace=True, ignore_index=True)
        frame["created"] = frame[S.EVENT_TIMESTAMP]  # deterministic: a rerun writes identical rows
    info = {
        "log_start": str(start),
        "log_end": str(end),
        "global_ctr": round(priors[0], 4),
        "global_cvr": round(priors[1], 4),
    }
    return songs, listeners, info


def embedding_rows(part: Path, model_version: str) -> pd.DataFrame:
    """One part of embeddings/<model_version>/ as rows of the Feast source."""
    emb = pq.read_table(part).to_pandas()
    if len(emb) and (emb[S.MODEL_VERSION].nunique() != 1 or emb[S.MODEL_VERSION].iloc[0] != model_version):
        raise ValueError(
            f"{part}: model_version column {sorted(emb[S.MODEL_VERSION].unique())} does not match its folder"
        )
    return pd.DataFrame(
        {
            S.SONG_ID: emb[S.SONG_ID].astype("int64"),
            S.MODEL_VERSION: emb[S.MODEL_VERSION].astype(str),
            S.EMBEDDING: [np.asarray(v, dtype=np.float32) for v in emb[S.EMBEDDING]],
            S.EVENT_TIMESTAMP: pd.Timestamp(EPOCH),  # valid at any time (see feature_repo/definitions.py)
            "created": pd.to_datetime(emb[S.EVENT_TIMESTAMP], utc=True),
        }
    )


def _vector_size(path: Path) -> int | None:
    t = pq.read_table(path, columns=[S.EMBEDDING])
    return len(t.column(0)[0].as_py()) if t.num_rows else None


def sync_offline_embeddings(cfg, data_dir: Path, version: str) -> dict:
    """The embeddings source folder (one file per embeddings part) brought up to date with
    embeddings/<V>/ of `version` and of every version already in it: a part not converted yet or
    rewritten since (an incremental embed dropped its changed songs) is converted again, a part
    that is gone is removed (unless its whole version folder is: published versions stay), a
    source file that is unreadable or altered is rebuilt. Unchanged parts cost a stat each.
    Returns {"written": [names], "removed": [names], "files": n, "rows": n, "dim": D}."""
    from feature_repo.definitions import SONG_EMBEDDINGS

    folder = data_dir / SONG_EMBEDDINGS
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path = data_dir / OFFLINE_PARTS
    manifest: dict = _read_json(manifest_path) or {}
    layout = Layout.of(cfg)
    if not any(layout.embeddings(version).glob("part-*.parquet")):
        raise FileNotFoundError(f"no embeddings for model_version {version!r} in {layout.embeddings(version)}")
    versions = {version} | {e["version"] for e in manifest.values() if isinstance(e, dict) and "version" in e}
    wanted = {
        embedding_source_file(v, part): (v, part)
        for v in sorted(versions)
        for part in sorted(layout.embeddings(v).glob("part-*.parquet"))
    }
    written, removed = [], []
    for name, (v, part) in wanted.items():
        entry, target = manifest.get(name), folder / name
        if (
            isinstance(entry, dict)
            and entry.get("source") == file_fingerprint(part)
            and target.is_file()
            and entry.get("file") == file_fingerprint(target)
        ):
            continue
        _write_atomic(embedding_rows(part, v), target)
        manifest[name] = {"version": v, "source": file_fingerprint(part), "file": file_fingerprint(target)}
        written.append(name)
    for name in sorted(set(manifest) - set(wanted)):
        entry = manifest[name]
        if isinstance(entry, dict) and layout.embeddings(entry.get("version", "")).is_dir():
            (folder / name).unlink(missing_ok=True)
            del manifest[name]
            removed.append(name)
    sizes = {}
    for name, entry in manifest.items():  # one vector size for all versions
        if entry["version"] not in sizes and (folder / name).is_file():
            if (size := _vector_size(folder / name)) is not None:
                sizes[entry["version"]] = size
    if len(set(sizes.values())) > 1:
        new_dim = sizes.get(version)
        other = next(d for v, d in sizes.items() if d != new_dim)
        raise ValueError(
            f"the feature store holds {other}-float embeddings, model {version} gives {new_dim}: "
            f"one feature store holds one vector size; use another output_dir for the new model"
        )
    _write_text_atomic(manifest_path, json.dumps(manifest, indent=1, sort_keys=True))
    legacy = data_dir / LEGACY_EMBEDDINGS_FILE
    if legacy.is_file():  # the one-file source of earlier releases, replaced by the folder
        legacy.unlink()
    files = sorted(folder.glob("*.parquet"))
    return {
        "written": written,
        "removed": removed,
        "files": len(files),
        "rows": sum(pq.read_metadata(f).num_rows for f in files),
        "dim": sizes.get(version),
    }


def materialize(store, state: Path, source_folder: Path, now: datetime) -> dict:
    """Online store up to `now`. Embeddings: only the rows of source files this online store has
    not received yet (store.write_to_online_store), or every file over all time when the view is
    not AVAILABLE_ONLINE (an interrupted publish left it MATERIALIZING, it was applied afresh) or
    this store has no record; stats incrementally."""
    from feast.feature_view import FeatureViewState

    t0 = time.perf_counter()
    done_path = state / MATERIALIZED
    done = _read_json(done_path)
    current = {f.name: file_fingerprint(f) for f in sorted(source_folder.glob("*.parquet"))}
    wrote: dict[str, str] = {}
    embedding_view = store.get_feature_view("song_embedding")
    if not isinstance(done, dict) or embedding_view.state != FeatureViewState.AVAILABLE_ONLINE:
        # Embedding rows are stamped 1970 (valid at any time), which an incremental window never
        # reaches: the whole source is materialized over all time.
        store.materialize(EPOCH, now, feature_views=["song_embedding"])
        why = "no record of this store" if not isinstance(done, dict) else f"was {embedding_view.state.name}"
        wrote["song_embedding"] = f"all {len(current)} source files ({why})"
    else:
        new_files = [name for name, fp in current.items() if done.get(name) != fp]
        if new_files:
            rows = 0
            for name in new_files:  # a file at a time: Feast converts a whole frame to protobufs at once
                frame = pq.read_table(source_folder / name).to_pandas()
                store.write_to_online_store("song_embedding", frame)
                rows += len(frame)
            wrote["song_embedding"] = f"{rows} rows of {len(new_files)} new source files"
    if "song_embedding" in wrote or done != current:
        _write_text_atomic(done_path, json.dumps(current, indent=1, sort_keys=True))
    for view in (S.SONG_STATS_VIEW, S.LISTENER_STATS_VIEW):
        fv = store.get_feature_view(view)
        if fv.materialization_intervals and fv.state == FeatureViewState.AVAILABLE_ONLINE:
            store.materialize_incremental(now, feature_views=[view])
            wrote[view] = f"incremental from {max(e for _, e in fv.materialization_intervals)}"
        else:
            store.materialize(EPOCH, now, feature_views=[view])
            wrote[view] = (
                "all time (first run)" if not fv.materialization_intervals else f"all time (was {fv.state.name})"
            )
    return {"views": wrote, "seconds": round(time.perf_counter() - t0, 2)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ray_jobs.materialize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(p)
    add_ray_args(p)
    p.add_argument("--model-version", help="embeddings/<V> to publish (default: the newest)")
    p.add_argument("--no-switch", action="store_true", help="backfill the version without making it current")
    p.add_argument(
        "--online-store", default=None, help="redis://HOST:PORT[/DB] (default: $HTCL_ONLINE_STORE, else SQLite)"
    )
    return p


def main(argv=None) -> int:
    args, cfg = parse_args(build_parser(), argv)
    from feature_repo.store import publish_lock

    data_dir = Layout.of(cfg).feast
    with publish_lock(data_dir):
        return publish(args, cfg, data_dir)


def publish(args, cfg, data_dir: Path) -> int:
    """The whole publish; the caller holds the data folder's publish lock."""
    from feature_repo.definitions import LISTENER_STATS, SONG_EMBEDDINGS, SONG_STATS
    from feature_repo.store import (
        apply_definitions,
        open_store,
        remove_partial_files,
        repo_config,
        set_aside_unreadable_registry,
        state_dir,
        state_dirs,
    )

    t0 = time.perf_counter()
    state = state_dir(data_dir, args.online_store)
    # What a killed publish may have left: its half-written files, a registry torn by Feast's
    # in-place rewrite (before AtomicFileRegistryStore).
    repaired = {
        "partial_files_removed": [
            name
            for folder in (data_dir, data_dir / SONG_EMBEDDINGS, *state_dirs(data_dir))
            for name in remove_partial_files(folder)
        ]
    }
    if aside := set_aside_unreadable_registry(repo_config(data_dir, args.online_store)):
        repaired["unreadable_registry_moved_to"] = str(aside)
    world = Path(cfg.data.root)
    version = args.model_version or newest_model_version(cfg)
    inputs = [world / "interactions.parquet", world / "catalog.parquet"]
    fingerprint = {str(p): sha256_file(p) for p in inputs}
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
    offline = sync_offline_embeddings(cfg, data_dir, version)
    embed_dim = offline["dim"]

    store = open_store(data_dir, args.online_store)
    # Every run applies every object: one that an interrupted or racing run lost comes back.
    apply_definitions(store, data_dir, embed_dim)
    now = datetime.now(timezone.utc)
    result = materialize(store, state, data_dir / SONG_EMBEDDINGS, now)
    previous = read_current_version(data_dir, args.online_store)
    if not args.no_switch:
        write_current_version(data_dir, args.online_store, version)
    save_resolved_config(cfg, data_dir)
    rows = len(songs) + len(listeners) + offline["rows"]
    print_summary(
        {
            "feature_data": str(data_dir),
            "online_store": type(store.config.online_store).__name__,
            "model_version": version,
            "current_model_version": read_current_version(data_dir, args.online_store),
            "online_state": str(state),
            "previous_model_version": previous,
            "embed_dim": embed_dim,
            "rows": {
                S.SONG_STATS_VIEW: len(songs),
                S.LISTENER_STATS_VIEW: len(listeners),
                "song_embeddings (all versions)": offline["rows"],
            },
            "embedding_source_files": {
                "written": len(offline["written"]),
                "removed": len(offline["removed"]),
                "total": offline["files"],
            },
            **info,
            "materialized": result["views"],
            **({"repaired": repaired} if any(repaired.values()) else {}),
            "materialize_seconds": result["seconds"],
            "rows_per_s_materialize": round(rows / max(result["seconds"], 1e-9), 1),
            "seconds": round(time.perf_counter() - t0, 2),
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
