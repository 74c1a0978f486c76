"""Preprocess throughput (songs/s) on the same files, three ways, in one run:

1. single: one process, `MelExtractor.extract_one` in a plain loop (torch at 1 thread)
2. pool:   a multiprocessing pool of --workers processes, one extractor each (torch at 1 thread)
3. ray:    the Ray Data job (`ray_jobs.preprocess.run`) on a local Ray instance with
           --workers CPUs: actor pool of --workers, writes mels/ + quarantine/ Parquet shards

Each way decodes, resamples to 16 kHz, crops to audio.max_seconds and computes the log-Mel of
every file and writes Parquet. The Ray figure is end to end for the job (actor start-up, the
streaming run, the writes); starting the Ray instance itself (`ray.init`) is timed apart, since a
cluster is started once for many jobs. Files: --files N synthetic 30 s 44.1 kHz stereo FLACs
(tones + noise, generated into a temp dir), or --audio-dir DIR for real clips; each file appears
--repeat times in the catalog under distinct song_ids (decoding dominates; the page cache makes
reading the same file again cheap, as it is for a fresh file on a warm disk).

    python benchmarks/bench_preprocess.py [--files 60] [--repeat 4] [--workers 2] [--config configs/demo.yaml]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from htcl import schema as S  # noqa: E402
from htcl.config import load_config  # noqa: E402
from htcl.layout import Layout  # noqa: E402
from htcl.mels import MelExtractor, write_table  # noqa: E402


def synth(args) -> str:
    path, seed, seconds, sr = args
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = rng.uniform(80, 800)
    left = sum(0.2 / k * np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6)) for k in range(1, 5))
    env = 1 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.5, 4) * t)
    wave = np.stack([left * env, np.roll(left, 441) * env], 1) + 0.02 * rng.standard_normal((t.size, 2))
    sf.write(path, wave.astype(np.float32), sr, subtype="PCM_16")
    return path


def make_files(directory: Path, n: int, seconds: float = 30.0, sr: int = 44100) -> list[str]:
    jobs = [(str(directory / f"song_{i:04d}.flac"), i, seconds, sr) for i in range(n)]
    with mp.get_context("spawn").Pool(min(2, os.cpu_count() or 1)) as pool:
        return pool.map(synth, jobs)


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def write_results(rows, out: Path) -> None:
    mels = [r for r, _ in rows if r is not None]
    bad = [b for _, b in rows if b is not None]
    if mels:
        write_table(mels, S.MELS_SCHEMA, Layout(out).mels / "part-00000.parquet")
    if bad:
        write_table(bad, S.QUARANTINE_SCHEMA, Layout(out).quarantine / "part-00000.parquet")


def run_single(cfg, items, out: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): CPU well under wall means a contended machine."""
    import torch

    torch.set_num_threads(1)
    t0, c0 = time.perf_counter(), time.process_time()
    ex = MelExtractor(cfg.audio)
    rows = [ex.extract_one(sid, p) for sid, p in items]
    write_results(rows, out)
    return time.perf_counter() - t0, time.process_time() - c0


_EX = None


def _init_worker(audio_cfg):
    global _EX
    import torch

    torch.set_num_threads(1)
    _EX = MelExtractor(audio_cfg)


def _extract(item):
    return _EX.extract_one(*item)


def run_pool(cfg, items, out: Path, workers: int) -> float:
    t0 = time.perf_counter()  # includes starting the workers, as the Ray figure includes its actors
    with mp.get_context("forkserver").Pool(workers, initializer=_init_worker, initargs=(cfg.audio,)) as pool:
        rows = pool.map(_extract, items, chunksize=4)
    write_results(rows, out)
    return time.perf_counter() - t0


def run_ray(cfg, catalog: Path, workers: int) -> tuple[float, float, dict]:
    import ray

    from ray_jobs.common import init_ray
    from ray_jobs.preprocess import run

    t0 = time.perf_counter()
    init_ray(num_cpus=workers, quiet=True)
    init_s = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        summary = run(cfg, catalog, force=True, workers=workers)
        return time.perf_counter() - t0, init_s, summary
    finally:
        ray.shutdown()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=60, help="distinct synthetic files (default: %(default)s)")
    p.add_argument(
        "--repeat",
        type=int,
        default=4,
        help="catalog rows per file (distinct song_ids), so start-up costs amortize (default: %(default)s)",
    )
    p.add_argument("--audio-dir", help="use these audio files instead of synthetic ones")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bench_preprocess.json"))
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_pre_") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        if args.audio_dir:
            files = sorted(
                str(f) for f in Path(args.audio_dir).iterdir() if f.suffix.lower() in (".flac", ".wav", ".ogg", ".mp3")
            )
            source = f"{len(files)} files from {args.audio_dir}"
        else:
            (tmp / "audio").mkdir()
            files = make_files(tmp / "audio", args.files)
            source = f"{len(files)} synthetic 30 s 44.1 kHz stereo FLAC"
        source += f", each {args.repeat}x in the catalog ({len(files) * args.repeat} songs)"
        print(f"{source} ready in {time.perf_counter() - t0:.1f} s", flush=True)
        files = [f for _ in range(args.repeat) for f in files]
        items = list(enumerate(files, start=1))
        catalog = tmp / "catalog.parquet"
        pd.DataFrame(
            {"song_id": [i for i, _ in items], "audio_path": files, "title": "", "artist": "", "lyrics": "", "tags": ""}
        ).to_parquet(catalog)
        n = len(items)
        cfg = load_config(args.config, [f"output_dir={tmp / 'ray_out'}"])

        results = {}
        load = {"before_single": loadavg()}
        secs, cpu = run_single(cfg, items, tmp / "single_out")
        results["single"] = {"seconds": round(secs, 2), "songs_per_s": round(n / secs, 2), "cpu_seconds": round(cpu, 2)}
        print(f"single  {n / secs:7.2f} songs/s", flush=True)
        load["before_pool"] = loadavg()
        secs = run_pool(cfg, items, tmp / "pool_out", args.workers)
        results["pool"] = {"seconds": round(secs, 2), "songs_per_s": round(n / secs, 2), "workers": args.workers}
        print(f"pool    {n / secs:7.2f} songs/s", flush=True)
        load["before_ray"] = loadavg()
        secs, init_s, summary = run_ray(cfg, catalog, args.workers)
        load["after_ray"] = loadavg()
        assert summary["processed"] + summary["quarantined"] == n, summary
        results["ray"] = {
            "seconds": round(secs, 2),
            "songs_per_s": round(n / secs, 2),
            "workers": args.workers,
            "ray_init_seconds": round(init_s, 2),
            "processed": summary["processed"],
            "quarantined": summary["quarantined"],
        }
        print(f"ray     {n / secs:7.2f} songs/s (ray.init {init_s:.1f} s not included)", flush=True)

    single = results["single"]["songs_per_s"]
    pool = results["pool"]["songs_per_s"]
    ray_rate = results["ray"]["songs_per_s"]
    report = {
        "benchmark": "preprocess",
        "files": source,
        "config": os.path.relpath(args.config, REPO),
        "max_seconds": cfg.audio.max_seconds,
        "cpus": os.cpu_count(),
        "load_average_1min": load,  # other jobs shared the machine; > cpus means contention
        "platform": platform.platform(),
        "results": results,
        "ray_vs_single": round(ray_rate / single, 2),
        "ray_vs_pool": round(ray_rate / pool, 2),
        "goal": "ray >= 1.6x single and within 20% of pool",
        "goal_met": bool(ray_rate >= 1.6 * single and ray_rate >= 0.8 * pool),
    }
    print()
    print(f"{'way':8} {'songs/s':>8} {'seconds':>8} {'vs single':>10}")
    for name, r in results.items():
        print(f"{name:8} {r['songs_per_s']:8.2f} {r['seconds']:8.2f} {r['songs_per_s'] / single:9.2f}x")
    print(
        f"ray / pool = {report['ray_vs_pool']:.2f}; goal met: {report['goal_met']}; "
        f"single loop used {results['single']['cpu_seconds']} CPU s in {results['single']['seconds']} s wall; "
        f"1-min load average {load} on {os.cpu_count()} CPUs"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
