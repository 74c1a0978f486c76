"""Ray Train stage-1 throughput: samples/s of the whole training step with 1 and 2 workers.

The real job (ray_jobs.train_loop.fit: TorchTrainer, gloo, gather-with-grad, gradient
all-reduce, batches built from mels and texts by each worker) on a synthetic world: random
log-Mel spectrograms at the config's song length and random-word song texts. The model is the
config's (demo: 4-layer, 256-wide audio Transformer on 30 s = 313 frames, the bundled MiniLM
text encoder over 96 tokens). Each run trains warmup + steps optimizer steps at the config's
global batch; samples/s is measured over the last `steps` steps from metrics.jsonl (global
samples over the sum of step times), so Ray start-up and the first steps are not counted.

On CPU the machine's cores are split over the workers (1 worker x all cores, 2 workers x half
each), so the ratio says what data parallelism over gloo costs or gains on one machine. On a
GPU (when torch.cuda.is_available()) it also measures the paper config in bf16 on all visible
GPUs, one worker each.

    python benchmarks/bench_train.py [--steps 8] [--warmup 2] [--workers 1 2] [--repeats 2]
        [--out benchmarks/results/bench_train.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from htcl import schema as S  # noqa: E402
from htcl.audio import mel_to_bytes  # noqa: E402
from htcl.config import load_config  # noqa: E402
from htcl.mels import write_table  # noqa: E402

WORDS = ("amber river night dance golden echo silver rain heart city fire ocean dream light shadow "
         "storm velvet midnight summer winter neon forest crystal thunder").split()


def frames_for(cfg) -> int:
    hop = round(cfg.audio.sample_rate * cfg.audio.hop_ms / 1000)
    return 1 + int(cfg.audio.sample_rate * cfg.audio.max_seconds) // hop


def write_synthetic_world(root: Path, cfg, songs: int, seed: int = 0) -> None:
    """catalog.parquet (random-word texts) and mels/ (random log-Mel) for `songs` songs."""
    rng = np.random.default_rng(seed)
    n_frames = frames_for(cfg)
    words = lambda k: " ".join(rng.choice(WORDS, k))  # noqa: E731
    catalog = pd.DataFrame({
        S.SONG_ID: np.arange(1, songs + 1, dtype=np.int64),
        S.AUDIO_PATH: [f"synthetic/{i}.flac" for i in range(1, songs + 1)],
        S.TITLE: [words(3) for _ in range(songs)],
        S.ARTIST: [words(2) for _ in range(songs)],
        S.TAGS: [", ".join(rng.choice(WORDS, 4)) for _ in range(songs)],
        S.LYRICS: [words(60) for _ in range(songs)],
    })
    (root / "world").mkdir(parents=True, exist_ok=True)
    catalog.to_parquet(root / "world" / "catalog.parquet")
    rows = [{S.SONG_ID: i, S.N_FRAMES: n_frames,
             S.MEL: mel_to_bytes((rng.standard_normal((cfg.audio.n_mels, n_frames)) * 5 - 6).astype(np.float32))}
            for i in range(1, songs + 1)]
    write_table(rows, S.MELS_SCHEMA, root / "out" / "mels" / "part-00000.parquet")


def measure(root: Path, config: str, workers: int, steps: int, warmup: int, use_gpu: bool, extra=()) -> dict:
    from ray_jobs.train_loop import fit

    cfg = load_config(REPO / "configs" / f"{config}.yaml", [
        f"output_dir={root / 'out'}", f"data.root={root / 'world'}",
        f"pretrain.max_steps={warmup + steps}", "pretrain.log_every=1", "pretrain.checkpoint_every=0",
        "pretrain.warmup_steps=1", f"pretrain.num_workers={workers}", f"pretrain.use_gpu={use_gpu}", *extra,
    ])
    if use_gpu:
        resources = None  # one GPU per worker; Ray's default CPU share
    else:
        resources = {"CPU": max(1, (os.cpu_count() or 1) // workers)}
    result = fit(cfg, "pretrain", resources_per_worker=resources)
    log = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in log if r["step"] > warmup]
    batch = cfg.pretrain.batch_size
    seconds = sum(batch / r["samples_per_s"] for r in timed)
    per_step = sorted(r["samples_per_s"] for r in timed)
    shutil.rmtree(result.storage, ignore_errors=True)
    return {
        "config": config,
        "device": torch.cuda.get_device_name() if use_gpu else "cpu",
        "precision": cfg.pretrain.precision if use_gpu else "fp32",
        "workers": workers,
        "cpus_per_worker": resources["CPU"] if resources else None,
        "global_batch": batch,
        "local_batch": batch // workers,
        "frames": frames_for(cfg),
        "steps_timed": len(timed),
        "samples_per_s": round(len(timed) * batch / seconds, 3),
        "step_samples_per_s_min_median_max": [round(per_step[0], 3), round(per_step[len(per_step) // 2], 3),
                                              round(per_step[-1], 3)],
        "final_loss": round(log[-1]["loss"], 4),
        "run_seconds": round(result.seconds, 1),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=2, help="runs per worker count, order alternated")
    ap.add_argument("--songs", type=int, default=128, help="synthetic songs (demo: 4 batches of 32)")
    ap.add_argument("--gpu-batch", type=int, default=64, help="paper-config global batch on GPU")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bench_train.json"))
    args = ap.parse_args(argv)

    import ray

    load_before = os.getloadavg()
    # A Ray instance of our own (never another one on this machine); workers import this checkout.
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        demo_root = Path(tmp) / "demo"
        write_synthetic_world(demo_root, load_config(REPO / "configs" / "demo.yaml"), args.songs)
        # On a shared machine the load drifts: alternate the order (1, 2, 2, 1, ...) and average.
        runs = []
        for rep in range(args.repeats):
            for w in (args.workers if rep % 2 == 0 else args.workers[::-1]):
                runs.append({**measure(demo_root, "demo", w, args.steps, args.warmup, use_gpu=False),
                             "repeat": rep, "load_1min": round(os.getloadavg()[0], 2)})
        for w in args.workers:
            mine = [r for r in runs if r["workers"] == w]
            rows.append({**mine[0], "samples_per_s": round(float(np.mean([r["samples_per_s"] for r in mine])), 3),
                         "runs_samples_per_s": [r["samples_per_s"] for r in mine],
                         "steps_timed": sum(r["steps_timed"] for r in mine)})
        base = rows[0]["samples_per_s"]
        for r in rows:
            r["ratio"] = round(r["samples_per_s"] / base, 3)
        if torch.cuda.is_available():
            paper_root = Path(tmp) / "paper"
            n_gpu = torch.cuda.device_count()
            batch = args.gpu_batch - args.gpu_batch % n_gpu
            write_synthetic_world(paper_root, load_config(REPO / "configs" / "paper.yaml"), batch * 2)
            gpu = measure(paper_root, "paper", n_gpu, args.steps, args.warmup, use_gpu=True,
                          extra=[f"pretrain.batch_size={batch}", "pretrain.precision=bf16"])
            gpu["ratio"] = None
            rows.append(gpu)
            runs.append(gpu)
    ray.shutdown()
    load_after = os.getloadavg()

    header = (f"{'config':<7}{'device':<22}{'prec':<6}{'workers':>8}{'cpu/w':>6}{'batch':>7}{'local':>6}"
              f"{'frames':>7}{'steps':>6}{'samples/s':>11}{'ratio':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['config']:<7}{r['device'][:21]:<22}{r['precision']:<6}{r['workers']:>8}{str(r['cpus_per_worker']):>6}"
              f"{r['global_batch']:>7}{r['local_batch']:>6}{r['frames']:>7}{r['steps_timed']:>6}"
              f"{r['samples_per_s']:>11}{str(r['ratio']):>7}")
    print("samples/s: mean over runs (order alternated); ratio: over the 1-worker CPU row (same global batch, same cores)")
    for r in rows:
        if "runs_samples_per_s" in r:
            print(f"  {r['workers']} worker(s), each run: {r['runs_samples_per_s']}")
    print(f"load average (1 min) before {load_before[0]:.1f}, after {load_after[0]:.1f} on {os.cpu_count()} cores")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "bench_train", "torch": torch.__version__, "ray": ray.__version__,
        "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "note": "samples/s of full training steps (data, forward, backward, all-reduce, AdamW) over the timed steps",
        "rows": rows,
        "runs": runs,
    }, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
