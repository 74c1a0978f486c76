"""Matching index: recall@100 of the matching index against exact search, build time, query
latency, and the same for an exact (brute-force) index as the reference, in one run. The index is
the kind `htcl embed` builds for --n songs (HNSW up to htcl.retrieval.HNSW_MAX_SONGS, the IVF with
an HNSW quantizer above), or the one --kind names.

Two kinds of 100k x D unit vectors:
- `clustered`: embedding-like, around 1,000 directions with spread (what trained embeddings look
  like: songs group by genre, artist, taste);
- `uniform`: isotropic Gaussian directions, the hardest case for graph search (no structure).

    python benchmarks/bench_retrieval.py [--n 100000] [--dim 128] [--queries 1000] [--k 100]
        [--kind hnsw|ivf_hnsw] [--out benchmarks/results/bench_retrieval.json]

Goal (issue 6): recall@100 >= 0.95 against exact search on 100k vectors.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from htcl.retrieval import (  # noqa: E402
    HNSW,
    IVF_HNSW,
    AnnIndex,
    HnswParams,
    IvfParams,
    exact_search,
    index_kind,
    normalize,
    recall_at_k,
)


def vectors(kind: str, n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        return normalize(rng.standard_normal((n, dim)).astype(np.float32))
    centers = rng.standard_normal((1000, dim)).astype(np.float32)
    x = centers[rng.integers(0, 1000, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return normalize(x)


def latency_ms(fn, queries: np.ndarray, k: int) -> tuple[float, float]:
    """p50 and p99 of one query at a time, in ms."""
    times = []
    for q in queries:
        t0 = time.perf_counter()
        fn(q[None], k)
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--kind", choices=[HNSW, IVF_HNSW], help="index kind (default: the one embed builds for --n)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bench_retrieval.json"))
    args = p.parse_args(argv)
    import faiss

    kind_built = args.kind or index_kind(args.n)
    rows = []
    for kind in ("clustered", "uniform"):
        x = vectors(kind, args.n, args.dim)
        ids = np.arange(args.n, dtype=np.int64) + 1
        rng = np.random.default_rng(1)
        # queries: catalog songs (a trigger is a song of the catalog), as /similar asks
        queries = x[rng.choice(args.n, args.queries, replace=False)]
        t0 = time.perf_counter()
        index = AnnIndex.build(ids, x, "bench", kind=kind_built)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        exact = ids[exact_search(x, queries, args.k)]
        exact_batch_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        approx, _ = index.search(queries, args.k)
        index_batch_s = time.perf_counter() - t0
        recall = recall_at_k(approx, exact)
        flat = faiss.IndexFlatIP(args.dim)
        flat.add(x)
        h50, h99 = latency_ms(index.search, queries[:200], args.k)
        e50, e99 = latency_ms(lambda q, k: flat.search(q, k), queries[:200], args.k)
        rows.append(
            {
                "vectors": kind,
                "index_kind": kind_built,
                "n": args.n,
                "dim": args.dim,
                "k": args.k,
                "recall_at_k": round(recall, 4),
                "build_s": round(build_s, 1),
                "index_p50_ms": round(h50, 3),
                "index_p99_ms": round(h99, 3),
                "exact_p50_ms": round(e50, 3),
                "exact_p99_ms": round(e99, 3),
                "index_batch_qps": round(args.queries / index_batch_s, 1),
                "exact_batch_qps": round(args.queries / exact_batch_s, 1),
                "goal_recall_0.95_met": bool(recall >= 0.95),
            }
        )
        print(f"{kind}: recall@{args.k} {recall:.4f}, build {build_s:.1f} s", flush=True)
    print()
    print(
        f"| vectors | index | recall@{args.k} | build s | index p50 / p99 ms | exact p50 / p99 ms "
        "| index batch q/s | exact batch q/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['vectors']} | {r['index_kind']} | {r['recall_at_k']:.4f} | {r['build_s']} | "
            f"{r['index_p50_ms']} / {r['index_p99_ms']} | {r['exact_p50_ms']} / {r['exact_p99_ms']} | "
            f"{r['index_batch_qps']} | {r['exact_batch_qps']} |"
        )
    result = {
        "benchmark": "bench_retrieval",
        "params": HnswParams().__dict__ if kind_built == HNSW else IvfParams().__dict__,
        "rows": rows,
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "faiss": faiss.__version__,
        "command": "python benchmarks/bench_retrieval.py " + " ".join(argv or sys.argv[1:]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
