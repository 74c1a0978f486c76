"""The audio front end end to end, single thread: 44.1 kHz stereo file -> (128, 1251) log-Mel.

Per format (FLAC, MP3, WAV), on the same files, in one run:
  decode whole file   soundfile reading every frame (what a naive loader does) — the reference
  htcl front end      htcl.audio.load_audio (decodes only the first 120 s, downmix, soxr HQ
                      resample) + htcl.audio.LogMel, with the share of each step
  librosa             librosa.load(sr=16000) + melspectrogram + log, as the issue names it (it
                      decodes and resamples the whole file), and the same with duration=120
The songs are 240 s long (a typical song; the model reads the first 120 s).
Goals (issue 2): front end <= 1.4x the decode alone, and >= 1.5x librosa end to end.

    python benchmarks/bench_frontend.py [--songs 2] [--seconds 240] [--repeats 3]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import soxr  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from htcl.audio import LogMel, load_audio  # noqa: E402

SR_IN, SR, MAX_SECONDS = 44100, 16000, 120.0
FORMATS = {"FLAC": ("flac", "PCM_16"), "MP3": ("mp3", "MPEG_LAYER_III"), "WAV": ("wav", "PCM_16")}


def write_songs(folder: Path, n: int, seconds: float) -> dict[str, list[Path]]:
    rng = np.random.default_rng(0)
    t = np.arange(int(SR_IN * seconds)) / SR_IN
    files = {fmt: [] for fmt in FORMATS}
    for i in range(n):
        f = rng.uniform(80, 3000, (2, 3))
        stereo = np.stack([sum(np.sin(2 * np.pi * fi * t) for fi in f[c]) for c in range(2)], axis=1)
        stereo = (0.15 * stereo + 0.02 * rng.standard_normal(stereo.shape)).astype(np.float32)
        for fmt, (ext, subtype) in FORMATS.items():
            path = folder / f"song{i}.{ext}"
            sf.write(path, stereo, SR_IN, format=fmt, subtype=subtype)
            files[fmt].append(path)
    return files


def best(fn, paths, repeats) -> float:
    """Best-of-repeats mean seconds per file."""
    fn(paths[0])  # warm-up
    out = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for p in paths:
            fn(p)
        out = min(out, (time.perf_counter() - t0) / len(paths))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--songs", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=240.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bench_frontend.json"))
    args = ap.parse_args(argv)
    import librosa
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    logmel = LogMel()
    n_keep = int(MAX_SECONDS * SR_IN)

    def decode_whole(p):
        return sf.read(p, dtype="float32", always_2d=True)[0]

    def decode_needed(p):
        with sf.SoundFile(p) as f:
            return f.read(frames=min(f.frames, n_keep), dtype="float32", always_2d=True)

    def ours(p):
        return logmel(torch.from_numpy(load_audio(p, SR, MAX_SECONDS)))

    def librosa_path(p, duration=None):
        y, _ = librosa.load(p, sr=SR, mono=True, duration=duration)
        m = librosa.feature.melspectrogram(y=y, sr=SR, n_fft=2048, hop_length=1536, n_mels=128, power=2.0)
        return np.log(np.maximum(m[:, :1251], 1e-10))

    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="htcl_bench_frontend_") as tmp,
        threadpool_limits(1),
        torch.inference_mode(),
    ):
        print(f"writing {args.songs} x {len(FORMATS)} files of {args.seconds:.0f} s, 44.1 kHz stereo ...", flush=True)
        files = write_songs(Path(tmp), args.songs, args.seconds)
        for fmt, paths in files.items():
            stereo = decode_needed(paths[0])
            mono = stereo @ np.full(2, 0.5, dtype=np.float32)
            wave = soxr.resample(mono, SR_IN, SR, quality="HQ")
            steps = {
                "decode first 120 s": best(decode_needed, paths, args.repeats),
                "downmix": best(lambda _: stereo @ np.full(2, 0.5, dtype=np.float32), paths, args.repeats),
                "resample (soxr HQ)": best(lambda _: soxr.resample(mono, SR_IN, SR, quality="HQ"), paths, args.repeats),
                "LogMel": best(lambda _: logmel(torch.from_numpy(wave)), paths, args.repeats),
            }
            whole = best(decode_whole, paths, args.repeats)
            total = best(ours, paths, args.repeats)
            ref = best(librosa_path, paths, args.repeats)  # as users call it: the whole file
            ref_cropped = best(lambda p: librosa_path(p, MAX_SECONDS), paths, args.repeats)
            assert ours(paths[0]).shape == (1, 128, 1251)
            rows.append(
                {
                    "format": fmt,
                    "decode_whole_ms": round(whole * 1000, 1),
                    "htcl_frontend_ms": round(total * 1000, 1),
                    "librosa_ms": round(ref * 1000, 1),
                    "librosa_duration120_ms": round(ref_cropped * 1000, 1),
                    "frontend_x_decode_whole": round(total / whole, 2),
                    "speedup_vs_librosa": round(ref / total, 2),
                    "speedup_vs_librosa_duration120": round(ref_cropped / total, 2),
                    "step_ms": {k: round(v * 1000, 1) for k, v in steps.items()},
                    "step_share": {k: round(v / sum(steps.values()), 3) for k, v in steps.items()},
                }
            )

    print(
        f"\nfront end per {args.seconds:.0f} s 44.1 kHz stereo song -> first {MAX_SECONDS:.0f} s as (128, 1251) "
        f"log-Mel; 1 thread; best of {args.repeats} over {args.songs} songs"
    )
    print(
        f"{'format':<7}{'decode whole':>14}{'htcl':>9}{'librosa':>10}{'(120 s)':>10}{'htcl/decode':>13}"
        f"{'vs librosa':>12}{'(120 s)':>9}   step shares"
    )
    for r in rows:
        shares = ", ".join(f"{k} {v:.0%}" for k, v in r["step_share"].items())
        print(
            f"{r['format']:<7}{r['decode_whole_ms']:>12}ms{r['htcl_frontend_ms']:>7}ms{r['librosa_ms']:>8}ms"
            f"{r['librosa_duration120_ms']:>8}ms{r['frontend_x_decode_whole']:>12}x{r['speedup_vs_librosa']:>11}x"
            f"{r['speedup_vs_librosa_duration120']:>8}x   {shares}"
        )
    goals = {f"{r['format']}: front end <= 1.4x decode": r["frontend_x_decode_whole"] <= 1.4 for r in rows}
    goals.update({f"{r['format']}: >= 1.5x librosa": r["speedup_vs_librosa"] >= 1.5 for r in rows})
    for goal, ok in goals.items():
        print(f"goal {goal}: {'met' if ok else 'NOT met'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "bench_frontend",
                "torch": torch.__version__,
                "librosa": librosa.__version__,
                "soundfile": sf.__version__,
                "libsndfile": sf.__libsndfile_version__,
                "machine": platform.machine(),
                "threads": 1,
                "songs": args.songs,
                "seconds": args.seconds,
                "rows": rows,
                "goals": goals,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
