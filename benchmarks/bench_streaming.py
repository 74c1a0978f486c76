"""Memory and throughput of one training rank's audio reads: the catalog loaded whole vs streamed.

Synthetic log-Mel shards (random float16 (128, --frames), written by htcl.mels.write_table in
files of --rows-per-group rows, one row group each, as the Ray preprocess job writes them with
--rows-per-file) for catalogs of --songs songs. For each, fresh processes (peak RSS only grows,
so every figure needs its own process), in the same run and on the same files:

  imports    the same imports and nothing else: the floor every figure is taken above
  load-all   htcl.mels.read_mels into a dict, then batch_stream over it (how training read
             before issue 14)
  stream     htcl.pipeline's ShardReader (cache of --cache-rows rows) under batch_stream: the
             index of song ids, then only this rank's rows, read by row group, read ahead

each taking --steps batches of rank 0 of --world at global --batch (stage 1, no tokenizer: the
audio side alone). Reported: peak RSS above `imports` (MB), its ratio stream / load-all, the
time to index or load, rows/s of the batches after it, and the streamed run's row-group reads.
Goal (issue 14): the streamed rank's memory flat in the catalog's size, bounded by cache +
batches; load-all grows with it.

    python benchmarks/bench_streaming.py [--songs 1024 4096 8192] [--cache-rows 256] [--frames 313]
        [--rows-per-group 128 16] [--batch 32] [--world 2] [--steps 48]
        [--out benchmarks/results/bench_streaming.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy/torch load their thread pools
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

N_MELS = 128
SEED = 0


def write_catalog(directory: Path, songs: int, frames: int, rows_per_group: int) -> None:
    """mels/ shards of rows_per_group rows (one row group each) of random float16 log-Mel."""
    from htcl import schema as S
    from htcl.mels import mel_to_bytes, write_table

    rng = np.random.default_rng(SEED)
    for start in range(0, songs, rows_per_group):
        rows = [
            {
                S.SONG_ID: i,
                S.N_FRAMES: frames,
                S.MEL: mel_to_bytes(rng.normal(-6, 2, (N_MELS, frames)).astype(np.float32)),
            }
            for i in range(start, min(songs, start + rows_per_group))
        ]
        write_table(rows, S.MELS_SCHEMA, directory / f"part-{start // rows_per_group:06d}.parquet")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(spec: dict) -> dict:
    """One measurement in this (fresh) process."""
    from htcl.mels import MEL_COLUMNS, mel_shards, mels_from_table, read_mels
    from htcl.pipeline import TrainingRows, batch_stream
    from htcl.streaming import ShardReader

    if spec["mode"] == "imports":
        return {"peak_rss_mb": peak_rss_mb()}
    t0 = time.perf_counter()
    if spec["mode"] == "load-all":
        mels = read_mels(spec["dir"], N_MELS)
    else:
        mels = ShardReader(
            mel_shards(spec["dir"]), MEL_COLUMNS, lambda t: mels_from_table(t, N_MELS), "bench", spec["cache_rows"]
        )
    ready_s = time.perf_counter() - t0
    ids = np.arange(spec["songs"])
    rows = TrainingRows("pretrain", mels, {int(i): "" for i in ids}, ids)
    stream = batch_stream(rows, None, spec["batch"], SEED, rank=0, world=spec["world"])
    next(stream)  # the first batch waits for the first read; time the steady state
    t0 = time.perf_counter()
    for _ in range(spec["steps"]):
        batch = next(stream)
    seconds = time.perf_counter() - t0
    per_rank = spec["batch"] // spec["world"]
    assert batch["mel"].shape[:2] == (per_rank, N_MELS)
    out = {"peak_rss_mb": peak_rss_mb(), "ready_s": ready_s, "rows_per_s": spec["steps"] * per_rank / seconds}
    if isinstance(mels, ShardReader):
        out.update(
            row_group_reads=mels.row_group_reads, peak_cached_rows=mels.peak_cached_rows, rows_decoded=mels.rows_decoded
        )
    stream.close()
    return out


def measure(spec: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{spec}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--songs", type=int, nargs="+", default=[1024, 4096, 8192])
    p.add_argument("--cache-rows", type=int, default=256)
    p.add_argument("--frames", type=int, default=313, help="mel frames a song (313: demo's 30 s; paper 1251)")
    p.add_argument("--rows-per-group", type=int, nargs="+", default=[128, 16])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bench_streaming.json"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    base = {"batch": args.batch, "world": args.world, "steps": args.steps, "cache_rows": args.cache_rows}
    imports = measure({**base, "mode": "imports"})["peak_rss_mb"]
    row_mb = N_MELS * args.frames * 4 / 2**20  # decoded float32
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_streaming-") as tmp:
        for n in args.songs:
            for g, rows_per_group in enumerate(args.rows_per_group):
                directory = Path(tmp, f"n{n}-g{rows_per_group}")
                write_catalog(directory, n, args.frames, rows_per_group)
                spec = {**base, "songs": n, "dir": str(directory)}
                if g == 0:  # loading everything does not depend on the row groups
                    loaded = measure({**spec, "mode": "load-all"})
                streamed = measure({**spec, "mode": "stream"})
                results.append(
                    {
                        "songs": n,
                        "catalog_over_cache": n / args.cache_rows,
                        "rows_per_group": rows_per_group,
                        "load_all_mb": loaded["peak_rss_mb"] - imports,
                        "stream_mb": streamed["peak_rss_mb"] - imports,
                        "stream_over_load_all": (streamed["peak_rss_mb"] - imports) / (loaded["peak_rss_mb"] - imports),
                        "load_s": loaded["ready_s"],
                        "index_s": streamed["ready_s"],
                        "load_all_rows_per_s": loaded["rows_per_s"],
                        "stream_rows_per_s": streamed["rows_per_s"],
                        "stream_over_load_all_rows_per_s": streamed["rows_per_s"] / loaded["rows_per_s"],
                        "row_group_reads": streamed["row_group_reads"],
                        "peak_cached_rows": streamed["peak_cached_rows"],
                    }
                )
                shutil.rmtree(directory)  # before the next catalog: /tmp holds one at a time

    print(
        f"\none rank of {args.world}, global batch {args.batch}, {args.steps} steps; log-Mel (128, {args.frames}) "
        f"= {row_mb:.2f} MB float32 a song; cache {args.cache_rows} rows; peak RSS above the imports "
        f"({imports:.0f} MB)\n"
    )
    head = (
        "songs",
        "x cache",
        "rows/group",
        "load-all MB",
        "stream MB",
        "stream/load",
        "load s",
        "index s",
        "load rows/s",
        "stream rows/s",
        "rg reads",
    )
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in results:
        print(
            f"| {r['songs']} | {r['catalog_over_cache']:.0f} | {r['rows_per_group']} | {r['load_all_mb']:.0f} | "
            f"{r['stream_mb']:.0f} | {r['stream_over_load_all']:.3f} | {r['load_s']:.2f} | {r['index_s']:.3f} | "
            f"{r['load_all_rows_per_s']:.0f} | {r['stream_rows_per_s']:.0f} | {r['row_group_reads']} |"
        )
    print(f"\n(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "bench_streaming",
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
                "load_average": os.getloadavg()[0],
                "imports_peak_rss_mb": imports,
                "mel_frames": args.frames,
                "row_mb_float32": row_mb,
                **base,
                "results": results,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
