"""Reference outputs of musicnn's own TensorFlow code, for the parity test of htcl/musicnn.py.

Run ONCE, by hand, in a throwaway virtualenv OUTSIDE the project (TensorFlow never goes into the
project's environment nor into CI):

    python3 -m venv /tmp/tfvenv
    /tmp/tfvenv/bin/pip install tensorflow-cpu==2.15.1 'numpy<2' librosa==0.11.0 soundfile soxr
    /tmp/tfvenv/bin/pip install --no-deps musicnn==0.1.0
    /tmp/tfvenv/bin/python scripts/musicnn_reference.py      # writes tests/data/musicnn_reference.npz

What it stores, for every clip (3 deterministic synthetic clips made below with numpy, plus 2 real
clips from /work/shared/data/real_clips when that folder exists; the audio itself is never stored):

  power16/<clip>             musicnn's front end before its log: librosa's Mel power rounded to
                             float16 exactly as musicnn.extractor.batch_data does (its log-Mel is
                             log10(10000 * power16 + 1), computed in float32 under numpy 1.x)
  <model>/<clip>/pooled      (P, 1506) per-patch input of the backend's first batch norm
                             (max and mean over time interleaved per channel)
  <model>/<clip>/penultimate (P, 200)  the bn_dense tensor
  <model>/<clip>/logits      (P, n_tags)
  <model>/<clip>/taggram     (P, n_tags) sigmoid of the logits
  wave/<clip>                a checksum of the waveform (sum, sum of squares, length)

The network outputs come from running the graph tensors ourselves on the non-overlapping 187-frame
patches of musicnn's own batch_data() (not from extractor()'s 'penultimate' field, which is stale:
for every batch after the first its loop unpacks the new values into other names (backend_,
midend1_, ...) and appends the FIRST batch's penultimate_/cnn1_/cnn2_/cnn3_ again).

This module imports only numpy at the top so the test can reuse `synthetic_clips()`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

SR = 16000
N_FRAMES = 187
REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "data" / "musicnn_reference.npz"
REAL_DIR = Path("/work/shared/data/real_clips")
REAL_CLIPS = {  # name -> file; cropped to the first REAL_SECONDS after librosa.load(sr=16000)
    "real_vibeace": "Kevin_MacLeod_-_Vibe_Ace.hq.ogg",
    "real_choice": "admiralbob77_-_Choice_-_Drum-bass.hq.ogg",
}
REAL_SECONDS = 12
MODELS = ("MSD_musicnn", "MTT_musicnn")


def synthetic_clips() -> dict[str, np.ndarray]:
    """Three deterministic ~10 s float32 clips at 16 kHz: chords with harmonics, noise and
    drum-like clicks. Pure numpy with a fixed seed (the test regenerates them and checks the
    stored checksums)."""
    rng = np.random.default_rng(20190101)
    out = {}
    specs = [  # name, seconds, chord roots (Hz), beat period (s), noise level, gain
        ("synth_chord", 10.0, [220.0, 261.63, 329.63], 0.5, 0.02, 0.25),
        ("synth_drums", 10.3, [110.0, 146.83, 174.61, 220.0], 0.25, 0.01, 0.3),
        ("synth_pad", 9.7, [392.0, 493.88, 587.33], 1.0, 0.05, 0.1),
    ]
    for name, seconds, roots, beat, noise, gain in specs:
        n = int(round(seconds * SR))
        t = np.arange(n, dtype=np.float64) / SR
        x = np.zeros(n)
        for k, f0 in enumerate(roots):
            vib = 1.0 + 0.002 * np.sin(2 * np.pi * (4.0 + k) * t)
            for h in range(1, 7):  # harmonics, decaying
                x += (0.6**h) * np.sin(2 * np.pi * f0 * h * vib * t + k)
        x *= 0.5 + 0.5 * np.sin(2 * np.pi * 0.2 * t) ** 2  # slow envelope
        clicks = np.zeros(n)
        burst = int(0.08 * SR)
        env = np.exp(-np.arange(burst) / (0.012 * SR))
        kick = np.sin(2 * np.pi * np.cumsum(np.linspace(150, 50, burst)) / SR) * env
        for i, start in enumerate(range(0, n - burst, int(beat * SR))):
            clicks[start : start + burst] += 0.8 * rng.standard_normal(burst) * env * (i % 2) + 1.5 * kick * (
                (i + 1) % 2
            )
        x = gain * (x / np.abs(x).max()) + 0.3 * clicks + noise * rng.standard_normal(n)
        out[name] = x.astype(np.float32)
    return out


def wave_checksum(y: np.ndarray) -> np.ndarray:
    y = y.astype(np.float64)
    return np.array([y.sum(), (y * y).sum(), y.size], dtype=np.float64)


def real_clips_one(name: str) -> np.ndarray:
    """Real clip `name` as musicnn reads it: librosa.load(sr=16000), cropped to REAL_SECONDS."""
    import librosa

    y, _ = librosa.load(str(REAL_DIR / REAL_CLIPS[name]), sr=SR)
    return y[: REAL_SECONDS * SR]


def real_clips() -> dict[str, np.ndarray]:
    if not REAL_DIR.is_dir():
        return {}
    return {name: real_clips_one(name) for name in REAL_CLIPS}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)

    import librosa
    import musicnn
    import soundfile as sf
    import tensorflow as tf
    from musicnn import configuration as config
    from musicnn import extractor, models

    tf.compat.v1.disable_eager_execution()
    pkg = Path(musicnn.__file__).parent
    clips = {**synthetic_clips(), **real_clips()}
    store: dict[str, np.ndarray] = {
        "clip_names": np.array(list(clips)),
        "versions": np.array(
            [f"tensorflow {tf.__version__}", f"numpy {np.__version__}", f"librosa {librosa.__version__}"]
        ),
    }
    mels = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, y in clips.items():
            path = os.path.join(tmp, name + ".wav")
            sf.write(path, y, SR, subtype="FLOAT")  # float WAV at 16 kHz: librosa.load gives y back exactly
            batch, audio_rep = extractor.batch_data(path, N_FRAMES, N_FRAMES)  # musicnn's own front end
            # its power before the log, recovered exactly as the float16 it was rounded to
            p = librosa.feature.melspectrogram(
                y=librosa.load(path, sr=SR)[0],
                sr=SR,
                hop_length=config.FFT_HOP,
                n_fft=config.FFT_SIZE,
                n_mels=config.N_MELS,
            ).T.astype(np.float16)
            assert np.array_equal(np.log10(10000 * p + 1), audio_rep)
            store[f"power16/{name}"] = p
            store[f"wave/{name}"] = wave_checksum(y)
            mels[name] = batch
            print(f"{name}: {y.size / SR:.2f} s, mel {audio_rep.shape}, patches {batch.shape}", flush=True)

    for model in MODELS:
        labels = config.MTT_LABELS if "MTT" in model else config.MSD_LABELS
        tf.compat.v1.reset_default_graph()
        with tf.name_scope("model"):
            x = tf.compat.v1.placeholder(tf.float32, [None, N_FRAMES, config.N_MELS])
            is_training = tf.compat.v1.placeholder(tf.bool)
            y, *_, penultimate = models.define_model(x, is_training, model, len(labels))
            taggram = tf.nn.sigmoid(y)
        g = tf.compat.v1.get_default_graph()
        pooled = g.get_tensor_by_name("model/flatten/Reshape:0")  # input of the backend's first BN
        sess = tf.compat.v1.Session()
        tf.compat.v1.train.Saver().restore(sess, str(pkg / model) + "/")
        for name, batch in mels.items():
            outs = sess.run([pooled, penultimate, y, taggram], feed_dict={x: batch, is_training: False})
            for key, v in zip(("pooled", "penultimate", "logits", "taggram"), outs):
                store[f"{model}/{name}/{key}"] = np.asarray(v, dtype=np.float32)
            print(
                f"{model} {name}: pooled {outs[0].shape}, top tag "
                f"{labels[int(outs[3].mean(0).argmax())]} ({outs[3].mean(0).max():.3f})",
                flush=True,
            )
        sess.close()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **store)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
