"""Feast online lookups and materialization, in process: SQLite (default) and Redis (127.0.0.1:6379).

For each online store: materialize N songs' embeddings (D floats) and stats, then time
`get_online_features` for 1 and for 100 songs, for the `matching_v1` embedding and for the full
`ranker_v1` service (candidate + trigger embeddings, song and listener stats).
Goals (issue 5): p99 < 10 ms for 1 entity and < 50 ms for 100.

    python benchmarks/bench_feast.py [--songs 5000] [--dim 128] [--requests 300] [--redis redis://127.0.0.1:6379/14]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from feature_repo.definitions import EPOCH, SONG_EMBEDDINGS, embedding_source_file  # noqa: E402
from feature_repo.store import apply_definitions, open_store  # noqa: E402
from htcl import schema as S  # noqa: E402
from htcl.features import listener_stats, song_stats  # noqa: E402


def write_sources(data: Path, songs: int, dim: int, users: int) -> int:
    """Offline sources as the materialize job writes them; returns the number of rows."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((songs, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    now = pd.Timestamp.now(tz="UTC").floor("s")
    emb = pd.DataFrame(
        {
            S.SONG_ID: np.arange(1, songs + 1),
            S.MODEL_VERSION: "bench",
            S.EMBEDDING: list(vectors),
            S.EVENT_TIMESTAMP: pd.Timestamp(EPOCH),
            "created": now,
        }
    )
    n = songs * 5
    t0 = now - pd.Timedelta(days=20)
    clicked = rng.random(n) < 0.3
    log = pd.DataFrame(
        {
            S.USER_ID: rng.integers(1, users + 1, n),
            S.REC_SONG_ID: rng.integers(1, songs + 1, n),
            S.CLICKED: clicked,
            S.FAVORED: clicked & (rng.random(n) < 0.5),
            S.EVENT_TIMESTAMP: t0 + pd.to_timedelta(np.sort(rng.integers(0, 19 * 86400, n)), unit="s"),
        }
    )
    start, end = log[S.EVENT_TIMESTAMP].min(), log[S.EVENT_TIMESTAMP].max()
    tables = {
        "song_embeddings": emb,
        "song_stats": song_stats(log, start, end),
        "listener_stats": listener_stats(log, start, end),
    }
    for name, frame in tables.items():
        if name != "song_embeddings":
            frame["created"] = frame[S.EVENT_TIMESTAMP]
            frame.to_parquet(data / f"{name}.parquet", index=False)
        else:  # a folder of files, one per embeddings part (ray_jobs.materialize)
            (data / SONG_EMBEDDINGS).mkdir(parents=True, exist_ok=True)
            frame.to_parquet(
                data / SONG_EMBEDDINGS / embedding_source_file("bench", Path("part-0.parquet")), index=False
            )
    return sum(len(f) for f in tables.values())


def percentiles(fn, requests: int) -> dict:
    fn()  # warm-up: connections, registry cache
    times = []
    for _ in range(requests):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return {"p50_ms": round(float(np.percentile(times, 50)), 2), "p99_ms": round(float(np.percentile(times, 99)), 2)}


def redis_up(url: str) -> bool:
    from urllib.parse import urlparse

    p = urlparse(url)
    try:
        with socket.create_connection((p.hostname, p.port or 6379), timeout=1):
            return True
    except OSError:
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--songs", type=int, default=5000)
    ap.add_argument("--users", type=int, default=500)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/14", help="Redis URL (its database is flushed)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bench_feast.json"))
    args = ap.parse_args(argv)
    rng = np.random.default_rng(1)
    rows, materialize_rows = [], {}
    with tempfile.TemporaryDirectory(prefix="htcl_bench_feast_") as tmp:
        data = Path(tmp)
        n_rows = write_sources(data, args.songs, args.dim, args.users)
        backends = [("sqlite", "")]
        if redis_up(args.redis):
            from urllib.parse import urlparse

            import redis

            p = urlparse(args.redis)
            redis.Redis(host=p.hostname, port=p.port or 6379, db=int(p.path.strip("/") or 0)).flushdb()
            backends.append(("redis", args.redis))
        else:
            print(f"no Redis server at {args.redis}: SQLite only")
        for name, url in backends:
            store = open_store(data, url)
            apply_definitions(store, data, args.dim)
            t0 = time.perf_counter()
            store.materialize(EPOCH, pd.Timestamp.now(tz="UTC").to_pydatetime())
            seconds = time.perf_counter() - t0
            materialize_rows[name] = {
                "rows": n_rows,
                "seconds": round(seconds, 2),
                "rows_per_s": round(n_rows / seconds, 1),
            }
            ranker = store.get_feature_service("ranker_v1")
            for n in (1, 100):

                def emb_lookup():
                    ids = rng.integers(1, args.songs + 1, n)
                    return store.get_online_features(
                        features=["song_embedding:embedding"],
                        entity_rows=[{S.SONG_ID: int(i), S.MODEL_VERSION: "bench"} for i in ids],
                    ).to_dict()

                def ranker_lookup():
                    ids = rng.integers(1, args.songs + 1, n)
                    trig, user = int(rng.integers(1, args.songs + 1)), int(rng.integers(1, args.users + 1))
                    return store.get_online_features(
                        features=ranker,
                        full_feature_names=True,
                        entity_rows=[
                            {S.SONG_ID: int(i), S.TRIGGER_SONG_ID: trig, S.USER_ID: user, S.MODEL_VERSION: "bench"}
                            for i in ids
                        ],
                    ).to_dict()

                got = emb_lookup()
                assert all(v is not None and len(v) == args.dim for v in got["embedding"])
                rows.append(
                    {
                        "store": name,
                        "features": "song_embedding",
                        "entities": n,
                        **percentiles(emb_lookup, args.requests),
                    }
                )
                rows.append(
                    {"store": name, "features": "ranker_v1", "entities": n, **percentiles(ranker_lookup, args.requests)}
                )

    print(
        f"Feast online lookups, in process: {args.songs} songs x {args.dim} floats, {args.requests} requests each "
        f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"
    )
    print(f"{'store':<8}{'features':<16}{'entities':>9}{'p50 ms':>9}{'p99 ms':>9}")
    for r in rows:
        print(f"{r['store']:<8}{r['features']:<16}{r['entities']:>9}{r['p50_ms']:>9}{r['p99_ms']:>9}")
    for name, m in materialize_rows.items():
        print(f"materialize into {name}: {m['rows']} rows in {m['seconds']} s = {m['rows_per_s']} rows/s")
    goals = {
        f"{r['store']} {r['features']} x{r['entities']}: p99 < {10 if r['entities'] == 1 else 50} ms": r["p99_ms"]
        < (10 if r["entities"] == 1 else 50)
        for r in rows
    }
    for goal, ok in goals.items():
        print(f"goal {goal}: {'met' if ok else 'NOT met'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "bench_feast",
                "machine": platform.machine(),
                "songs": args.songs,
                "dim": args.dim,
                "requests": args.requests,
                "load_average": os.getloadavg()[0],
                "rows": rows,
                "materialize": materialize_rows,
                "goals": goals,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
