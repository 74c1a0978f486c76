"""musicnn backbone cost: the PyTorch port (htcl.musicnn) against musicnn's own TensorFlow code.

CPU-seconds (time.process_time, so every thread counts) per 30 s clip at 16 kHz, one thread:
  port   log-Mel + patches (htcl.musicnn.log_mel / patches) and the network (Musicnn on the
         clip's 10 patches in one batch), for musicnn_msd and musicnn_mtt
  TF     musicnn's own front end (librosa, extractor.batch_data's code) and its TF graph, session
         with one intra-op and one inter-op thread, all patches in one run (musicnn's extractor
         runs one patch per session call, which is slower still)
and the per-song cost of the batched log_mel at batch 1/2/4/8 (goal: batch 8 <= 1.2x batch 1).
Goal: the port's CPU-seconds per clip <= TF's.

TF never enters the project's environment: its row comes from a separate run of this same script
in a throwaway TF virtualenv (see scripts/musicnn_reference.py for how to make one), which writes
benchmarks/results/bench_backbone_tf.json; the port's run reads that file when it is there:

    /tmp/tfvenv/bin/python benchmarks/bench_backbone.py --tf     # once, outside the project venv
    .venv/bin/python benchmarks/bench_backbone.py [--clips 3] [--repeats 5]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy/torch/TF load their thread pools
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SR, SECONDS, PATCH = 16000, 30, 187
MODELS = {"musicnn_msd": "MSD_musicnn", "musicnn_mtt": "MTT_musicnn"}


def clips(n: int) -> list[np.ndarray]:
    """Tones + noise + clicks + a slow envelope, 30 s each."""
    rng = np.random.default_rng(0)
    t = np.arange(SR * SECONDS) / SR
    out = []
    for _ in range(n):
        f = rng.uniform(80, 4000, 4)
        x = sum(np.sin(2 * np.pi * fi * t) for fi in f) * (1 + 0.5 * np.sin(2 * np.pi * 0.1 * t))
        clicks = (rng.random(t.size) < 2e-4) * rng.standard_normal(t.size) * 5
        out.append((0.1 * x + 0.05 * rng.standard_normal(t.size) + clicks).astype(np.float32))
    return out


def best_cpu_s(fn, items, repeats: int) -> float:
    """Best of `repeats` passes over all items of process_time per item (warm-up first)."""
    fn(items[0])
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        for it in items:
            fn(it)
        best = min(best, (time.process_time() - t0) / len(items))
    return best


def run_tf(args) -> int:
    import librosa
    import musicnn
    import tensorflow as tf
    from musicnn import configuration as config
    from musicnn import models

    tf.compat.v1.disable_eager_execution()
    waves = clips(args.clips)

    def front(y):  # musicnn.extractor.batch_data, on an array instead of a file
        rep = librosa.feature.melspectrogram(
            y=y, sr=SR, hop_length=config.FFT_HOP, n_fft=config.FFT_SIZE, n_mels=config.N_MELS
        ).T
        rep = np.log10(10000 * rep.astype(np.float16) + 1)
        n = rep.shape[0] // PATCH
        return rep[: n * PATCH].reshape(n, PATCH, config.N_MELS)

    rows = {}
    mels = [front(y) for y in waves]
    rows["TF front end (librosa)"] = best_cpu_s(front, waves, args.repeats)
    for key, folder in MODELS.items():
        labels = config.MTT_LABELS if "MTT" in folder else config.MSD_LABELS
        tf.compat.v1.reset_default_graph()
        with tf.name_scope("model"):
            x = tf.compat.v1.placeholder(tf.float32, [None, PATCH, config.N_MELS])
            is_training = tf.compat.v1.placeholder(tf.bool)
            y = tf.nn.sigmoid(models.define_model(x, is_training, folder, len(labels))[0])
        sess = tf.compat.v1.Session(
            config=tf.compat.v1.ConfigProto(intra_op_parallelism_threads=1, inter_op_parallelism_threads=1)
        )
        tf.compat.v1.train.Saver().restore(sess, str(Path(musicnn.__file__).parent / folder) + "/")
        net = best_cpu_s(lambda m: sess.run(y, feed_dict={x: m, is_training: False}), mels, args.repeats)
        rows[f"TF {key} network"] = net
        rows[f"TF {key} total"] = net + rows["TF front end (librosa)"]
        sess.close()
    for k, v in rows.items():
        print(f"{k:<36}{v:>9.3f} CPU-s/clip")
    out = Path(args.out or RESULTS / "bench_backbone_tf.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "bench_backbone --tf",
                "tensorflow": tf.__version__,
                "numpy": np.__version__,
                "librosa": librosa.__version__,
                "machine": platform.machine(),
                "threads": 1,
                "clips": args.clips,
                "repeats": args.repeats,
                "cpu_s_per_clip": {k: round(v, 4) for k, v in rows.items()},
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0


def run_port(args) -> int:
    import torch

    sys.path.insert(0, str(REPO))
    from htcl import musicnn as M

    torch.set_num_threads(1)
    waves = [torch.from_numpy(y) for y in clips(args.clips)]
    rows: dict[str, float] = {}
    with torch.inference_mode():
        front = lambda y: M.patches(M.log_mel(y))[0][0]  # noqa: E731
        pats = [front(y) for y in waves]
        assert pats[0].shape == (SECONDS * SR // 256 // PATCH, PATCH, M.N_MELS)
        rows["port front end (log_mel + patches)"] = best_cpu_s(front, waves, args.repeats)
        for key in MODELS:
            model = M.Musicnn(key)
            net = best_cpu_s(model, pats, args.repeats)
            rows[f"port {key} network"] = net
            rows[f"port {key} total"] = net + rows["port front end (log_mel + patches)"]
        batch_rows = {}
        for b in (1, 2, 4, 8):
            batch = torch.stack([waves[i % len(waves)] for i in range(b)])
            batch_rows[b] = best_cpu_s(M.log_mel, [batch], args.repeats) / b
    tf_path = RESULTS / "bench_backbone_tf.json"
    tf_rows = json.loads(tf_path.read_text())["cpu_s_per_clip"] if tf_path.exists() else {}

    print(
        f"musicnn on {SECONDS} s clips at {SR} Hz, 1 thread, CPU-seconds per clip (process_time), "
        f"best of {args.repeats} over {args.clips} clips"
    )
    print(f"{'row':<40}{'CPU-s/clip':>11}{'TF':>9}{'port/TF':>9}")
    table = []
    for k, v in rows.items():
        tfk = k.replace("port ", "TF ").replace("front end (log_mel + patches)", "front end (librosa)")
        tv = tf_rows.get(tfk)
        ratio = v / tv if tv else None
        table.append(
            {
                "row": k,
                "cpu_s_per_clip": round(v, 4),
                "tf_cpu_s_per_clip": tv,
                "port_over_tf": None if ratio is None else round(ratio, 3),
            }
        )
        print(f"{k:<40}{v:>11.3f}{'' if tv is None else f'{tv:.3f}':>9}{'' if ratio is None else f'{ratio:.2f}x':>9}")
    print("batched log_mel, per-song ms:")
    base = batch_rows[1]
    for b, v in batch_rows.items():
        print(f"  batch {b}: {v * 1000:7.2f} ms/song ({v / base:.2f}x batch 1)")
    goals = {"batched log_mel: batch 8 <= 1.2x batch 1 per song": batch_rows[8] / base <= 1.2}
    for key in MODELS:
        tv = tf_rows.get(f"TF {key} total")
        if tv:
            goals[f"port {key} total <= TF"] = rows[f"port {key} total"] <= tv
    for g, ok in goals.items():
        print(f"goal {g}: {'met' if ok else 'NOT met'}")
    out = Path(args.out or RESULTS / "bench_backbone.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "bench_backbone",
                "torch": torch.__version__,
                "machine": platform.machine(),
                "threads": 1,
                "clips": args.clips,
                "repeats": args.repeats,
                "rows": table,
                "log_mel_batched_ms_per_song": {str(b): round(v * 1000, 3) for b, v in batch_rows.items()},
                "tf_results": str(tf_path.relative_to(REPO)) if tf_rows else None,
                "goals": goals,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tf", action="store_true", help="measure musicnn's TF code (run under the TF venv)")
    ap.add_argument("--clips", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    return run_tf(args) if args.tf else run_port(args)


if __name__ == "__main__":
    raise SystemExit(main())
