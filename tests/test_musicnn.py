"""htcl.musicnn against musicnn's own TensorFlow code (references made once by
scripts/musicnn_reference.py in a TF virtualenv outside the project; see that script)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from htcl import musicnn as M

REPO = Path(__file__).resolve().parents[1]
REF_PATH = REPO / "tests" / "data" / "musicnn_reference.npz"
sys.path.insert(0, str(REPO / "scripts"))
import musicnn_reference as R  # noqa: E402  (numpy only at import)

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("musicnn") is None, reason="pip install --no-deps musicnn==0.1.0 (make install does)"
)
TOL = 1e-4
ERRS: dict[str, list[float]] = {}  # worst errors seen, printed by test_report_errors (pytest -s)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The network runs patch by patch; one thread is fastest for these small tests and does not
    suffer from other processes on the machine (OpenMP barriers under contention)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ref():
    return np.load(REF_PATH)


@pytest.fixture(scope="module")
def models():
    return {name: M.Musicnn(name) for name in M.MUSICNN_MODELS}


def ref_mel(ref, clip) -> np.ndarray:
    """musicnn's log-Mel, from the stored float16 power (as batch_data computes it)."""
    return np.log10(10000 * ref[f"power16/{clip}"].astype(np.float32) + 1)


def clip_names(ref, real: bool) -> list[str]:
    return [str(c) for c in ref["clip_names"] if str(c).startswith("real_") == real]


def check_outputs(out: dict, ref, folder: str, clip: str) -> dict[str, float]:
    errs = {}
    for key in ("taggram", "penultimate", "logits", "pooled"):
        want = ref[f"{folder}/{clip}/{key}"]
        got = out[key].detach().numpy()
        assert got.shape == want.shape, (key, got.shape, want.shape)
        # The pooled features reach ~100 and go through 5 convolutions and batch norms with scales
        # up to ~30: float32 summation order (oneDNN vs TF's Eigen/oneDNN) leaves ~1e-5 relative
        # there, so they are compared relative to max(1, |value|) at 3e-4. The outputs the port is
        # for (tag probabilities, penultimate features, logits) are held to 1e-4 absolute.
        scale = np.maximum(1.0, np.abs(want)) if key == "pooled" else 1.0
        errs[key] = float((np.abs(got - want) / scale).max())
        ERRS.setdefault(key, []).append(errs[key])
        assert errs[key] <= (3 * TOL if key == "pooled" else TOL), (folder, clip, key, errs[key])
    return errs


# ---------------------------------------------------------------------------------------------
def test_checkpoint_reader_reads_every_variable():
    for name, folder in M.MUSICNN_MODELS.items():
        prefix = M.checkpoint_prefix(name)
        assert prefix.name == folder
        w = M.read_tf_checkpoint(prefix)
        shapes = M.checkpoint_shapes(50)
        for k, s in shapes.items():
            assert w[k].shape == s and w[k].dtype == np.float32, (k, w[k].shape, s)
            assert np.isfinite(w[k]).all()
        # the rest are the optimizer's slots (same shapes as their variables) and beta powers
        for k in set(w) - set(shapes):
            base = k.rsplit("/Adam", 1)[0]
            assert k in ("beta1_power", "beta2_power") or w[k].shape == shapes[base], k
        # every byte of the data file belongs to exactly one tensor
        total = sum(v.nbytes for v in w.values())
        assert total == Path(str(prefix) + "/.data-00000-of-00001").stat().st_size


def test_checkpoint_prefix_errors():
    with pytest.raises(ValueError):
        M.checkpoint_prefix("musicnn_big")


def test_mel_filterbank_is_librosas():
    librosa = pytest.importorskip("librosa")
    np.testing.assert_array_equal(M.mel_filterbank(), librosa.filters.mel(sr=16000, n_fft=512, n_mels=96))


def test_log_mel_matches_musicnn(ref):
    clips = R.synthetic_clips()
    for clip in clip_names(ref, real=False):
        y = clips[clip]
        np.testing.assert_allclose(R.wave_checksum(y), ref[f"wave/{clip}"], rtol=1e-9)
        want = ref_mel(ref, clip)
        got = M.log_mel(torch.from_numpy(y))[0].numpy()
        assert got.shape == want.shape == (1 + y.size // M.HOP, M.N_MELS)
        err = np.abs(got - want)
        # The Mel power is the same to float32 rounding (another BLAS sums it in another order);
        # where that lands on the other side of a float16 rounding boundary (a few in 1e4) the
        # float16 power differs by one float16 step, i.e. <= ~4.3e-4 after the log.
        bad = err > TOL
        p_ours = M._round_float16(M.mel_power(torch.from_numpy(y))[0]).numpy().astype(np.float16)
        p_ref = ref[f"power16/{clip}"]
        steps = np.abs(p_ours[bad].view(np.int16).astype(np.int32) - p_ref[bad].view(np.int16).astype(np.int32))
        assert (steps == 1).all(), steps
        assert bad.mean() < 1e-3 and err.max() < 5e-4, (clip, bad.sum(), err.max())


def test_network_matches_musicnn_on_its_own_mel(ref, models):
    for name, model in models.items():
        folder = M.MUSICNN_MODELS[name]
        from musicnn import configuration  # TF-free module of the package

        assert model.tags == (configuration.MSD_LABELS if "MSD" in folder else configuration.MTT_LABELS)
        for clip in [str(c) for c in ref["clip_names"]]:
            p, mask = M.patches(torch.from_numpy(ref_mel(ref, clip))[None])
            with torch.no_grad():
                out = model(p[0])
            assert out["pooled"].shape[1] == M.POOLED_DIM == 1506
            assert out["penultimate"].shape[1] == M.PENULTIMATE_DIM
            check_outputs(out, ref, folder, clip)


def test_end_to_end_from_waveform(ref, models):
    clips = R.synthetic_clips()
    for clip in clip_names(ref, real=False):
        p, mask = M.patches(M.log_mel(torch.from_numpy(clips[clip])))
        assert mask.all()
        for name, model in models.items():
            with torch.no_grad():
                check_outputs(model(p[0]), ref, M.MUSICNN_MODELS[name], clip)


@pytest.mark.skipif(not R.REAL_DIR.is_dir(), reason="real clips not on this machine")
def test_end_to_end_real_clips(ref, models):
    for clip in clip_names(ref, real=True):
        y = R.real_clips_one(clip)
        p, _ = M.patches(M.log_mel(torch.from_numpy(y)))
        for name, model in models.items():
            with torch.no_grad():
                check_outputs(model(p[0]), ref, M.MUSICNN_MODELS[name], clip)


def test_tags_and_shapes(models):
    assert models["musicnn_msd"].tags[:3] == ["rock", "pop", "alternative"]
    assert models["musicnn_mtt"].tags[:3] == ["guitar", "classical", "slow"]
    for model in models.values():
        assert len(model.tags) == 50
        assert isinstance(model.backend, torch.nn.Module)
        assert (
            sum(p.numel() for p in model.backend.parameters()) == 1506 * 2 + 1506 * 200 + 200 + 200 * 2 + 200 * 50 + 50
        )


def test_backend_is_trainable():
    model = M.Musicnn("musicnn_msd", pretrained=False)
    x = torch.randn(3, M.PATCH_FRAMES, M.N_MELS).abs()
    with torch.no_grad():
        pooled = model.pooled(x)
    model.backend.train()
    loss = model.logits(model.penultimate(pooled)).sum()
    loss.backward()
    assert model.backend.dense.weight.grad is not None
    assert model.backend.bn_pool.weight.grad is not None


def test_patches_short_and_odd_lengths():
    mel = torch.arange(400 * 96, dtype=torch.float32).reshape(1, 400, 96)
    p, mask = M.patches(mel)
    assert p.shape == (1, 2, 187, 96) and mask.tolist() == [[True, True]]  # 26-frame tail dropped
    assert torch.equal(p[0, 1], mel[0, 187:374])
    p, mask = M.patches(mel[:, :374])
    assert p.shape == (1, 2, 187, 96) and mask.all()
    p, mask = M.patches(mel[:, :373])
    assert p.shape == (1, 1, 187, 96) and mask.all()
    # shorter than one patch (< ~3 s): repeat-padded to one patch
    p, mask = M.patches(mel[:, :50])
    assert p.shape == (1, 1, 187, 96) and mask.all()
    assert torch.equal(p[0, 0, :50], mel[0, :50]) and torch.equal(p[0, 0, 50:100], mel[0, :50])
    assert torch.equal(p[0, 0, 150:187], mel[0, :37])
    # a padded batch with per-song lengths
    batch = torch.cat([mel, mel], 0)
    p, mask = M.patches(batch, lengths=[400, 200])
    assert p.shape == (2, 2, 187, 96) and mask.tolist() == [[True, True], [True, False]]
    assert (p[1, 1] == 0).all()
    p, mask = M.patches(batch, lengths=[400, 100])
    assert mask.tolist() == [[True, True], [True, False]]
    assert torch.equal(p[1, 0, 100:187], mel[0, :87])
    # a 2 s waveform gives one patch
    mel2 = M.log_mel(torch.zeros(2 * M.SAMPLE_RATE))
    assert mel2.shape == (1, 1 + 2 * M.SAMPLE_RATE // M.HOP, 96)
    assert M.patches(mel2)[0].shape == (1, 1, 187, 96)


def test_batched_log_mel_equals_per_song():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(3, 5 * M.SAMPLE_RATE + 123, generator=g) * 0.2
    batched = M.log_mel(y)
    for i in range(3):
        assert torch.equal(batched[i], M.log_mel(y[i])[0])
    assert M.log_mel(y[0]).shape == (1, 1 + y.shape[1] // M.HOP, 96)


def test_round_float16_no_overflow():
    x = torch.tensor([0.0, 1e-7, 3e-5, 0.1, 1.0, 1000.3, 65504.0, 65519.0, 1e5, 3.3e6])
    r = M._round_float16(x)
    small = x <= 65504
    assert torch.equal(r[small], x[small].half().float())
    assert torch.isfinite(r).all()
    assert (torch.abs(r[~small] - x[~small]) / x[~small] <= 2**-11).all()


def test_clip_features():
    y = torch.from_numpy(R.synthetic_clips()["synth_chord"])
    f = M.clip_features(torch.stack([y, y]))
    assert f["pooled"].shape == (2, M.POOLED_DIM) and f["penultimate"].shape == (2, 200)
    assert f["taggram"].shape == (2, 50) and f["mask"].shape == (2, 3)
    assert torch.allclose(f["taggram"][0], f["patch_taggram"][0].mean(0))


def test_report_errors():
    """Last: prints the worst parity errors of the tests above (visible with pytest -s)."""
    for key, v in ERRS.items():
        print(f"musicnn parity, worst {key} error: {max(v):.3g} over {len(v)} comparisons")
