"""Audio front end: LogMel against librosa, frame counts, decoding of each format and of bad files."""

import numpy as np
import pytest
import soundfile as sf
import torch

from htcl.audio import AudioDecodeError, LogMel, load_audio, mel_batch, mel_filterbank, mel_from_bytes, mel_to_bytes

librosa = pytest.importorskip("librosa")

SR = 16000


def librosa_logmel(wave: np.ndarray) -> np.ndarray:
    """The paper's recipe, as DESIGN.md states it."""
    power = librosa.feature.melspectrogram(
        y=wave, sr=SR, n_fft=2048, hop_length=1536, win_length=2048, window="hann",
        center=True, power=2.0, n_mels=128,
    )
    return np.log(np.maximum(power, 1e-10)), power


def assert_matches_librosa(wave: np.ndarray, name: str) -> None:
    ours = LogMel()(torch.from_numpy(wave))[0].numpy()
    ref, power = librosa_logmel(wave)
    assert ours.shape == ref.shape, name
    live = power > 1e-8 * power.max()  # bins far below the clip's peak are float32 rounding noise
    diff = np.abs(ours - ref)[live]
    assert live.sum() > 1000, f"{name}: too few live bins to compare"
    assert diff.mean() <= 1e-3, f"{name}: mean |log diff| {diff.mean():.2e}"
    assert diff.max() <= 1e-2, f"{name}: max |log diff| {diff.max():.2e}"


def test_filterbank_equals_librosa():
    ours = mel_filterbank(SR, 2048, 128)
    ref = librosa.filters.mel(sr=SR, n_fft=2048, n_mels=128)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-8)
    # Why LogMel can skip most of the matrix: each frequency bin feeds at most two triangles.
    assert (ours > 0).sum(0).max() <= 2


@pytest.mark.parametrize("freqs", [(440.0,), (55.0, 1000.0, 7000.0), (220.0, 3520.0)])
def test_logmel_matches_librosa_on_tones(freqs):
    t = np.arange(7 * SR) / SR
    rng = np.random.default_rng(0)
    wave = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f in freqs) / len(freqs)
    wave = (0.5 * wave + 0.01 * rng.standard_normal(t.size)).astype(np.float32)
    assert_matches_librosa(wave, f"tones {freqs}")


def test_logmel_matches_librosa_on_real_recordings(shared_data):
    clips = sorted((shared_data / "real_clips").glob("*.ogg"))
    assert len(clips) >= 10
    for clip in clips:
        wave = load_audio(clip, SR, max_seconds=30.0)
        assert_matches_librosa(wave, clip.name)


def test_frame_counts_and_mask():
    logmel = LogMel()
    assert (logmel.n_fft, logmel.hop) == (2048, 1536)
    assert logmel.n_frames(120 * SR) == 1251
    assert logmel.n_frames(40 * SR) == 417
    x = torch.zeros(2, 120 * SR)
    x[:, ::100] = 0.1
    assert logmel(x).shape == (2, 128, 1251)
    assert logmel(torch.zeros(40 * SR)).shape == (1, 128, 417)
    mask = logmel.frame_mask(torch.tensor([120 * SR, 40 * SR]), 1251)
    assert mask.sum(1).tolist() == [1251, 417]


def test_logmel_batch_equals_one_by_one():
    rng = np.random.default_rng(1)
    waves = torch.from_numpy(rng.standard_normal((3, 5 * SR)).astype(np.float32))
    logmel = LogMel()
    batched = logmel(waves)
    for i in range(3):
        torch.testing.assert_close(batched[i], logmel(waves[i])[0], rtol=1e-5, atol=1e-4)


def test_logmel_blocks_give_the_whole_song_result(monkeypatch):
    """Songs go through in blocks of frames (CPU_BLOCK_FRAMES); small blocks here, so the first,
    interior and last (zero-padded) blocks and a ragged tail all occur on 2 s songs."""
    import htcl.audio

    rng = np.random.default_rng(4)
    waves = torch.from_numpy(rng.standard_normal((3, 2 * SR + 700)).astype(np.float32))
    logmel = LogMel()
    monkeypatch.setattr(htcl.audio, "CPU_BLOCK_FRAMES", 10 ** 6)  # whole songs at once
    whole = logmel(waves)
    assert whole.shape == (3, 128, 22)
    monkeypatch.setattr(htcl.audio, "CPU_BLOCK_FRAMES", 4)  # 22 frames -> 5 blocks of 4 and one of 2
    blocked = logmel(waves)
    torch.testing.assert_close(blocked, whole, rtol=1e-5, atol=1e-5)
    for i in range(3):  # one song per block: a batch is exactly its songs one at a time
        torch.testing.assert_close(blocked[i], logmel(waves[i])[0], rtol=0, atol=0)


def test_logmel_chunks_large_batches_and_pickles(monkeypatch):
    import pickle

    import htcl.audio

    rng = np.random.default_rng(3)
    waves = torch.from_numpy(rng.standard_normal((5, 2 * SR)).astype(np.float32))
    logmel = LogMel()
    whole = logmel(waves)
    # A frame buffer that holds two songs: the batch goes through in blocks of 2, 2, 1 songs.
    monkeypatch.setattr(htcl.audio, "MAX_WORK_BYTES", 2 * logmel.n_frames(2 * SR) * logmel.n_fft * 4)
    torch.testing.assert_close(logmel(waves), whole, rtol=0, atol=0)
    # Scratch buffers stay behind when the module is pickled (Ray ships UDF state between processes).
    torch.testing.assert_close(pickle.loads(pickle.dumps(logmel))(waves), whole, rtol=0, atol=0)


def test_mel_bytes_roundtrip_and_batch_padding():
    rng = np.random.default_rng(2)
    a, b = rng.normal(-5, 2, (128, 10)).astype(np.float32), rng.normal(-5, 2, (128, 4)).astype(np.float32)
    back = mel_from_bytes(mel_to_bytes(a), 128, 10)
    np.testing.assert_allclose(back, a, rtol=1e-3, atol=1e-2)
    with pytest.raises(ValueError, match="n_mels\\*n_frames"):
        mel_from_bytes(mel_to_bytes(a), 128, 11)
    mel, mask = mel_batch([a, b])
    assert mel.shape == (2, 128, 10) and mask.sum(1).tolist() == [10, 4]
    assert np.all(mel[1, :, 4:] == 0)
    cropped, mask = mel_batch([a, b], n_frames=6)
    assert cropped.shape == (2, 128, 6) and mask.sum(1).tolist() == [6, 4]


# --- decoding ------------------------------------------------------------------------------


def stereo_tone(sr: int, seconds: float) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    left = 0.4 * np.sin(2 * np.pi * 440 * t)
    right = 0.4 * np.sin(2 * np.pi * 660 * t)
    return np.stack([left, right], axis=1).astype(np.float32)  # (n, 2)


@pytest.mark.parametrize(
    "ext,fmt,subtype",
    [("wav", "WAV", "PCM_16"), ("flac", "FLAC", "PCM_16"), ("ogg", "OGG", "VORBIS"), ("mp3", "MP3", "MPEG_LAYER_III")],
)
def test_decodes_each_format_from_44k1_stereo(tmp_path, ext, fmt, subtype):
    path = tmp_path / f"song.{ext}"
    sf.write(path, stereo_tone(44100, 3.0), 44100, format=fmt, subtype=subtype)
    wave = load_audio(path, sample_rate=SR, max_seconds=120.0)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) - 3 * SR) <= 0.05 * SR  # MP3 adds encoder delay/padding
    # mono downmix of 440 Hz + 660 Hz at 0.4 each: RMS = 0.2 (lossy codecs a little off)
    assert np.sqrt(np.mean(wave[SR // 2 : 2 * SR] ** 2)) == pytest.approx(0.2, rel=0.1)
    spectrum = np.abs(np.fft.rfft(wave[: 2 * SR]))
    peaks = sorted(np.argsort(spectrum)[-2:] / 2)  # 2 s window -> bin / 2 Hz
    assert peaks == pytest.approx([440, 660], abs=2)


def test_crops_to_max_seconds(tmp_path):
    path = tmp_path / "long.flac"
    sf.write(path, stereo_tone(44100, 5.0), 44100)
    assert len(load_audio(path, SR, max_seconds=2.0)) == 2 * SR
    assert len(load_audio(path, SR, max_seconds=None)) == 5 * SR


def test_reads_file_uri(tmp_path):
    path = tmp_path / "song.flac"
    sf.write(path, stereo_tone(16000, 1.0), 16000)
    np.testing.assert_array_equal(load_audio(f"file://{path}"), load_audio(path))


def truncated(tmp_path, ext, fmt):
    good = tmp_path / f"good.{ext}"
    sf.write(good, stereo_tone(44100, 4.0), 44100, format=fmt)
    load_audio(good)  # the whole file decodes
    bad = tmp_path / f"truncated.{ext}"
    data = good.read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    return bad


def test_bad_files_raise_named_errors(tmp_path):
    cases = {}
    (tmp_path / "empty.wav").write_bytes(b"")
    cases["empty.wav"] = "empty"
    (tmp_path / "noise.wav").write_bytes(np.random.default_rng(0).bytes(5000))
    cases["noise.wav"] = "not_audio"
    (tmp_path / "notes.mp3").write_text("these are lyrics, not audio\n" * 50)
    cases["notes.mp3"] = "not_audio"
    (tmp_path / "header_only.flac").write_bytes(b"fLaC" + b"\x00" * 40)
    cases["header_only.flac"] = "unsupported"
    cases["missing.flac"] = "missing"
    cases[truncated(tmp_path, "flac", "FLAC").name] = "truncated"
    cases[truncated(tmp_path, "wav", "WAV").name] = "truncated"
    cases[truncated(tmp_path, "mp3", "MP3").name] = "truncated"
    cases[truncated(tmp_path, "ogg", "OGG").name] = "truncated"
    for name, reason in cases.items():
        with pytest.raises(AudioDecodeError) as info:
            load_audio(tmp_path / name)
        assert info.value.reason == reason, f"{name}: {info.value}"
        assert name in str(info.value)


def test_wrong_extension_still_decodes(tmp_path):
    # The container, not the file name, decides: a FLAC named .mp3 is fine.
    path = tmp_path / "actually_flac.mp3"
    sf.write(path, stereo_tone(44100, 1.0), 44100, format="FLAC")
    assert len(load_audio(path, SR)) == SR
