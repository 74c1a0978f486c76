"""Log-Mel throughput, single thread, on 120 s songs at 16 kHz (the paper's input).

Rows, all in the same run on the same waveforms:
  librosa   librosa.feature.melspectrogram + log (the reference the tests compare against)
  naive     torch.stft + dense (M, K) Mel matmul + log (what one writes first)
  LogMel    htcl.audio.LogMel
  floor     a bare torch.fft.rfft over the already framed and windowed signal: no framing, no
            power, no Mel, no log; no log-Mel can be cheaper than this
Goals (issue 2): LogMel >= 2x librosa and <= 1.5x the floor.

Batch section: LogMel on (B, T) batches of the same songs, ms per song at B = 1, 2, 4, 8 (best
of the repeats of one call each, the batch sizes taking turns), next to the same module with its CPU
frame blocks switched off
(CPU_BLOCK_FRAMES huge: whole batches per step, as LogMel did before; shows why blocks exist).
Goal: per-song cost flat in the batch, batch 8 <= 1.2x batch 1.

    python benchmarks/bench_mel.py [--songs 4] [--repeats 7] [--out benchmarks/results/bench_mel.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy/torch load their thread pools
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import htcl.audio  # noqa: E402
from htcl.audio import LogMel  # noqa: E402

SR, SECONDS, N_FFT, HOP, N_MELS = 16000, 120, 2048, 1536, 128
BATCHES = (1, 2, 4, 8)
BATCH_GOAL = 1.2  # LogMel ms/song at batch 8 over batch 1


def songs(n: int) -> list[np.ndarray]:
    """Tones + noise + a slow envelope, so no bin is trivially zero."""
    rng = np.random.default_rng(0)
    t = np.arange(SR * SECONDS) / SR
    out = []
    for _ in range(n):
        f = rng.uniform(80, 4000, 4)
        x = sum(np.sin(2 * np.pi * fi * t) for fi in f) * (1 + 0.5 * np.sin(2 * np.pi * 0.1 * t))
        out.append((0.1 * x + 0.05 * rng.standard_normal(t.size)).astype(np.float32))
    return out


def best_ms_per_song(fn, waves, repeats: int) -> float:
    """Best of `repeats` passes over all songs (the least disturbed by other processes)."""
    for w in waves[:1]:
        fn(w)  # warm-up: plans, allocator
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for w in waves:
            fn(w)
        best = min(best, (time.perf_counter() - t0) / len(waves))
    return best * 1000


def batch_rows(logmel: LogMel, waves: list[np.ndarray], repeats: int) -> dict[str, list[float]]:
    """ms per song at each of BATCHES (best of `repeats` calls on one (B, T) batch, over B), for
    LogMel as is and with its CPU blocks switched off. The batch sizes take turns within each
    repeat, so a busy spell on the machine hits all of them alike."""
    stacked = torch.from_numpy(np.stack(waves[: max(BATCHES)]))
    out = {}
    for name, block in (("LogMel", htcl.audio.CPU_BLOCK_FRAMES), ("LogMel, no CPU blocks", 1 << 30)):
        saved, htcl.audio.CPU_BLOCK_FRAMES = htcl.audio.CPU_BLOCK_FRAMES, block
        try:
            best = {b: float("inf") for b in BATCHES}
            for b in BATCHES:
                logmel(stacked[:b])  # warm-up: plans, allocator, scratch buffers
            for _ in range(repeats):
                for b in BATCHES:
                    t0 = time.perf_counter()
                    logmel(stacked[:b])
                    best[b] = min(best[b], (time.perf_counter() - t0) / b * 1000)
            out[name] = [best[b] for b in BATCHES]
        finally:
            htcl.audio.CPU_BLOCK_FRAMES = saved
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--songs", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bench_mel.json"))
    args = ap.parse_args(argv)
    import librosa
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    all_waves = songs(max(args.songs, max(BATCHES)))  # the batch section needs 8; the first ones are the same
    waves = all_waves[: args.songs]
    tensors = [torch.from_numpy(w) for w in waves]
    logmel = LogMel()
    window = torch.hann_window(N_FFT)
    dense_fb = logmel.fb  # (M, K)

    def run_librosa(w):
        p = librosa.feature.melspectrogram(y=w, sr=SR, n_fft=N_FFT, hop_length=HOP, n_mels=N_MELS, power=2.0)
        return np.log(np.maximum(p, 1e-10))

    def run_naive(x):
        spec = torch.stft(x, N_FFT, HOP, window=window, center=True, pad_mode="constant", return_complex=True)
        return torch.log(torch.clamp(dense_fb @ spec.abs().square(), min=1e-10))

    framed = [
        (torch.nn.functional.pad(x, (N_FFT // 2, N_FFT // 2)).unfold(0, N_FFT, HOP) * window).contiguous()
        for x in tensors
    ]

    with torch.inference_mode(), threadpool_limits(1):
        results = {
            "librosa": best_ms_per_song(run_librosa, waves, args.repeats),
            "naive torch.stft + dense Mel": best_ms_per_song(run_naive, tensors, args.repeats),
            "LogMel": best_ms_per_song(logmel, tensors, args.repeats),
            "floor: rfft of framed signal": best_ms_per_song(torch.fft.rfft, framed, args.repeats),
        }
        assert logmel(tensors[0]).shape == (1, N_MELS, 1251)
        batched = batch_rows(logmel, all_waves, args.repeats)
    ref, floor = results["librosa"], results["floor: rfft of framed signal"]
    rows = [
        {
            "method": k,
            "ms_per_song": round(v, 2),
            "speedup_vs_librosa": round(ref / v, 2),
            "x_floor": round(v / floor, 2),
        }
        for k, v in results.items()
    ]
    ours = results["LogMel"]
    batch_table = [
        {
            "method": k,
            **{f"batch_{b}": round(v, 2) for b, v in zip(BATCHES, ms)},
            "batch_8_over_1": round(ms[-1] / ms[0], 2),
        }
        for k, ms in batched.items()
    ]
    ratio = batched["LogMel"][-1] / batched["LogMel"][0]
    goals = {
        "LogMel >= 2x librosa": ref / ours >= 2.0,
        "LogMel <= 1.5x floor": ours / floor <= 1.5,
        f"LogMel batch 8 <= {BATCH_GOAL}x batch 1 (ms/song)": ratio <= BATCH_GOAL,
    }

    print(
        f"log-Mel of {SECONDS} s at {SR} Hz ({N_MELS} bins, n_fft {N_FFT}, hop {HOP}), 1 thread, "
        f"best of {args.repeats} over {args.songs} songs"
    )
    print(f"{'method':<32}{'ms/song':>10}{'vs librosa':>12}{'x floor':>9}")
    for r in rows:
        print(f"{r['method']:<32}{r['ms_per_song']:>10}{r['speedup_vs_librosa']:>11}x{r['x_floor']:>9}")
    print(f"\nLogMel on (B, T) batches of the same songs, ms per song, best of {args.repeats} calls")
    print(f"{'method':<32}" + "".join(f"{'B=' + str(b):>9}" for b in BATCHES) + f"{'B8/B1':>8}")
    for r in batch_table:
        print(f"{r['method']:<32}" + "".join(f"{r[f'batch_{b}']:>9}" for b in BATCHES) + f"{r['batch_8_over_1']:>7}x")
    print(f"(goal: B8/B1 <= {BATCH_GOAL}x)")
    for goal, ok in goals.items():
        print(f"goal {goal}: {'met' if ok else 'NOT met'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "bench_mel",
                "torch": torch.__version__,
                "librosa": librosa.__version__,
                "machine": platform.machine(),
                "threads": 1,
                "songs": args.songs,
                "repeats": args.repeats,
                "rows": rows,
                "batch": {
                    "songs_per_batch": list(BATCHES),
                    "cpu_block_frames": htcl.audio.CPU_BLOCK_FRAMES,
                    "goal_batch_8_over_1": BATCH_GOAL,
                    "rows": batch_table,
                },
                "goals": goals,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
