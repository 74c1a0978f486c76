"""A synthetic world to serve, for the tests and bench_serve: everything `build_app` reads, made
the way the pipeline makes it, without training.

    write_world(out, songs=100_000, dim=128, versions={"v1": vectors, ...}, current="v1")

writes, under `out` (an htcl output_dir):
    embeddings/<V>/part-0.parquet   as `htcl embed` writes them (one part)
    feast/                          offline sources, registry and SQLite (or Redis) online store,
                                    materialized; `current_model_version` = current
    index/<V>/                      matching index (htcl.retrieval)
    rankers/<V>/                    XGBoost CTR/CVR trained on the online ranker_v1 features of a
                                    synthetic impression log (a little signal: clicks favour
                                    similar songs)
and the log itself (interactions.parquet, catalog.parquet) under `out/world`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from htcl import schema as S
from htcl.layout import Layout


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_embeddings(out: Path, version: str, song_ids: np.ndarray, vectors: np.ndarray, made_at) -> Path:
    path = Layout(out).embeddings(version) / "part-0.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            S.SONG_ID: pa.array(song_ids, pa.int64()),
            S.EMBEDDING: pa.FixedSizeListArray.from_arrays(
                pa.array(vectors.reshape(-1), pa.float32()), vectors.shape[1]
            ),
            S.MODEL_VERSION: pa.array([version] * len(song_ids)),
            S.EVENT_TIMESTAMP: pa.array([made_at] * len(song_ids), pa.timestamp("us", tz="UTC")),
            S.INPUT_HASH: pa.nulls(len(song_ids), pa.string()),  # no audio behind synthetic vectors
        }
    ).cast(S.embeddings_schema(vectors.shape[1]))
    pq.write_table(table, path)
    return path


def write_world(
    out: Path,
    versions: dict[str, np.ndarray],
    current: str,
    users: int = 50,
    impressions: int | None = None,
    online_store: str = "",
    ranker_rows: int = 3000,
    seed: int = 0,
    n_estimators: int = 30,
) -> dict:
    """versions: model_version -> (songs, D) unit vectors for song ids 1..songs."""
    from feature_repo.definitions import EPOCH, LISTENER_STATS, SONG_EMBEDDINGS, SONG_STATS, embedding_source_file
    from feature_repo.store import apply_definitions, open_store, write_current_version
    from htcl.features import listener_stats, song_stats
    from htcl.ranking import RankerParams, train_rankers
    from htcl.retrieval import AnnIndex

    out = Path(out)
    layout = Layout(out)
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    first = next(iter(versions.values()))
    songs, dim = first.shape
    ids = np.arange(1, songs + 1, dtype=np.int64)
    now = pd.Timestamp.now(tz="UTC").floor("s")
    world = out / "world"
    world.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({S.SONG_ID: ids, S.GENRE: rng.choice(["rock", "pop", "folk"], songs)}).to_parquet(
        world / "catalog.parquet"
    )

    # An impression log whose clicks favour candidates near the trigger (in the current version).
    n = impressions or max(2000, 3 * songs)
    vec = versions[current]
    trig, cand = rng.integers(1, songs + 1, n), rng.integers(1, songs + 1, n)
    cos = np.einsum("nd,nd->n", vec[trig - 1], vec[cand - 1])
    clicked = rng.random(n) < 1 / (1 + np.exp(-(4 * cos - 1)))
    log = pd.DataFrame(
        {
            S.USER_ID: rng.integers(1, users + 1, n),
            S.TRIGGER_SONG_ID: trig,
            S.REC_SONG_ID: cand,
            S.CLICKED: clicked,
            S.FAVORED: clicked & (rng.random(n) < 0.4),
            S.EVENT_TIMESTAMP: now
            - pd.Timedelta(days=20)
            + pd.to_timedelta(np.sort(rng.integers(0, 19 * 86400, n)), unit="s"),
        }
    )
    log.to_parquet(world / "interactions.parquet")

    feast = layout.feast
    feast.mkdir(parents=True, exist_ok=True)
    (feast / SONG_EMBEDDINGS).mkdir(exist_ok=True)
    for v, x in versions.items():
        part = write_embeddings(out, v, ids, x, now)
        pd.DataFrame(
            {
                S.SONG_ID: ids,
                S.MODEL_VERSION: v,
                S.EMBEDDING: list(x),
                S.EVENT_TIMESTAMP: pd.Timestamp(EPOCH),
                "created": now,
            }
        ).to_parquet(feast / SONG_EMBEDDINGS / embedding_source_file(v, part), index=False)
        AnnIndex.build(ids, x, v).save(layout.index(v))
    start, end = log[S.EVENT_TIMESTAMP].min(), log[S.EVENT_TIMESTAMP].max()
    genre = dict(zip(ids.tolist(), pd.read_parquet(world / "catalog.parquet")[S.GENRE]))
    for file, frame in (
        (SONG_STATS, song_stats(log, start, end)),
        (LISTENER_STATS, listener_stats(log, start, end, genre)),
    ):
        frame["created"] = frame[S.EVENT_TIMESTAMP]
        frame.to_parquet(feast / file, index=False)
    store = open_store(feast, online_store)
    apply_definitions(store, feast, dim)
    store.materialize(EPOCH, pd.Timestamp.now(tz="UTC").to_pydatetime())
    write_current_version(feast, online_store, current)

    # Rankers per version, on the online ranker_v1 features of the log's last rows (served = trained on).
    service = store.get_feature_service("ranker_v1")
    sample = log.tail(ranker_rows)
    for v, x in versions.items():
        rows = [
            {S.SONG_ID: int(c), S.TRIGGER_SONG_ID: int(t), S.USER_ID: int(u), S.MODEL_VERSION: v}
            for c, t, u in zip(sample[S.REC_SONG_ID], sample[S.TRIGGER_SONG_ID], sample[S.USER_ID])
        ]
        frame = pd.DataFrame(
            store.get_online_features(features=service, entity_rows=rows, full_feature_names=True).to_dict()
        )
        frame[S.CLICKED] = sample[S.CLICKED].to_numpy()
        frame[S.FAVORED] = sample[S.FAVORED].to_numpy()
        train_rankers(frame, x, v, RankerParams(n_estimators=n_estimators, n_jobs=min(2, os.cpu_count() or 1))).save(
            layout.rankers(v)
        )
    return {
        "out": out,
        "world": world,
        "songs": songs,
        "dim": dim,
        "users": users,
        "versions": list(versions),
        "current": current,
        "seconds": round(time.perf_counter() - t0, 1),
    }
