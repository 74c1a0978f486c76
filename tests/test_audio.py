"""Audio front end: LogMel against librosa, frame counts, decoding of each format and of bad files."""

import numpy as np
import pytest
import soundfile as sf
import torch

from htcl.audio import AudioDecodeError, LogMel, load_audio, mel_filterbank
from htcl.batching import mel_batch
from htcl.mels import mel_from_bytes, mel_to_bytes

librosa = pytest.importorskip("librosa")

SR = 16000


def librosa_logmel(wave: np.ndarray) -> np.ndarray:
    """The paper's recipe (README, Configs): 128-bin log-Mel, 128 ms window, 96 ms hop at 16 kHz."""
    power = librosa.feature.melspectrogram(
        y=wave,
        sr=SR,
        n_fft=2048,
        hop_length=1536,
        win_length=2048,
        window="hann",
        center=True,
        power=2.0,
        n_mels=128,
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
    monkeypatch.setattr(htcl.audio, "CPU_BLOCK_FRAMES", 10**6)  # whole songs at once
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


# --- poisoned audio: decodable, yet no use as a song ---------------------------------------------


def float_wav(path, wave: np.ndarray, sr: int = SR):
    sf.write(path, wave.astype(np.float32), sr, subtype="FLOAT")
    return path


def wav_claiming_rate(path, claimed_rate: int):
    """A good 16 kHz PCM WAV whose header is then edited to claim another sample rate."""
    import struct

    t = np.arange(3 * SR) / SR
    sf.write(path, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), SR, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    fmt = data.find(b"fmt ")
    data[fmt + 12 : fmt + 16] = struct.pack("<I", claimed_rate)  # fmt chunk: tag, channels, then the rate
    path.write_bytes(bytes(data))
    return path


def test_absurd_amplitude_is_invalid_audio(tmp_path):
    """Float WAVs hold any float32: samples of 1e20 (or a constant 1e38) decode, but their log-Mel
    overflows to inf/NaN; they are bad input, rejected where decoding is, as NaN samples are."""
    t = np.arange(3 * SR) / SR
    cases = {
        "huge.wav": 1e20 * np.sin(2 * np.pi * 440 * t),
        "constant.wav": np.full(3 * SR, 1e38),
        "int16_scaled.wav": 32767 * 0.3 * np.sin(2 * np.pi * 440 * t),  # float samples written on the int16 scale
    }
    for name, wave in cases.items():
        with pytest.raises(AudioDecodeError) as info:
            load_audio(float_wav(tmp_path / name, wave))
        assert info.value.reason == "invalid", f"{name}: {info.value}"
        assert name in str(info.value) and "amplitude" in str(info.value)
    # float audio a little over full scale (a hot master) is still audio
    hot = load_audio(float_wav(tmp_path / "hot.wav", 1.8 * np.sin(2 * np.pi * 440 * t)))
    assert np.abs(hot).max() == pytest.approx(1.8, rel=1e-3)


@pytest.mark.parametrize("rate", [2**31 - 1, 10_000_000, 1])
def test_absurd_sample_rate_is_rejected_before_resampling(tmp_path, rate):
    """A header claiming 2^31-1 Hz cost seconds of resampling per file (issue 13, item 7)."""
    import time

    path = wav_claiming_rate(tmp_path / "lying_rate.wav", rate)
    t0 = time.perf_counter()
    with pytest.raises(AudioDecodeError) as info:
        load_audio(path)
    assert time.perf_counter() - t0 < 0.5
    assert info.value.reason == "bad_sample_rate"
    assert "lying_rate.wav" in str(info.value) and str(rate) in str(info.value)


@pytest.mark.parametrize("rate", [8000, 192000])
def test_unusual_but_real_sample_rates_decode(tmp_path, rate):
    path = wav_claiming_rate(tmp_path / f"at_{rate}.wav", rate)
    assert len(load_audio(path, SR, max_seconds=None)) == pytest.approx(3 * SR * SR / rate, abs=2)


def test_embed_endpoint_answers_422_for_poisoned_audio(tmp_path):
    """/v1/embed through the FastAPI app, the serving backend and the Encoder's own decode step
    (serving/app.py), with a stand-in model: poisoned audio is a 422 naming the body, not a 500."""
    import asyncio
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from htcl.config import AudioConfig
    from htcl.mels import MelExtractor
    from serving.api import ApiSettings, create_api
    from serving.app import Encoder, ServeBackend

    class MeanModel(torch.nn.Module):
        """The mean log-Mel over frames as the embedding: inf in, inf/NaN out, as a real encoder."""

        audio = SimpleNamespace(backbone=None)

        def encode_audio(self, mel, mask):
            return mel.mean(-1)

    encoder = Encoder.func_or_class.__new__(Encoder.func_or_class)  # the replica's class, without Serve
    encoder.cfg, encoder.model, encoder.version = SimpleNamespace(audio=AudioConfig()), MeanModel(), "v"
    encoder.extractor, encoder.n_mels = MelExtractor(AudioConfig()), AudioConfig().n_mels

    class Handle:  # a deployment handle whose calls run the replica's method in the test's event loop
        def __getattr__(self, method):
            async def call(*args):
                return await asyncio.to_thread(getattr(encoder, "_" + method), *args)

            return SimpleNamespace(remote=call)

    app = create_api(ServeBackend(None, None, None, Handle(), timeout_s=30.0), ApiSettings())
    client = TestClient(app, raise_server_exceptions=False)
    t = np.arange(3 * SR) / SR
    good = float_wav(tmp_path / "good.wav", 0.3 * np.sin(2 * np.pi * 440 * t)).read_bytes()
    assert client.post("/v1/embed?k=0", content=good, headers={"content-type": "audio/wav"}).status_code == 200
    for name, wave in {"huge": 1e20 * np.sin(2 * np.pi * 440 * t), "constant": np.full(3 * SR, 1e38)}.items():
        r = client.post(
            "/v1/embed?k=0",
            content=float_wav(tmp_path / f"{name}.wav", wave).read_bytes(),
            headers={"content-type": "audio/wav"},
        )
        assert r.status_code == 422, f"{name}: {r.status_code} {r.text}"
        assert r.json()["error"]["field"] == "body" and "invalid" in r.json()["error"]["message"]
    r = client.post(
        "/v1/embed?k=0",
        content=wav_claiming_rate(tmp_path / "rate.wav", 2**31 - 1).read_bytes(),
        headers={"content-type": "audio/wav"},
    )
    assert r.status_code == 422 and "sample rate" in r.json()["error"]["message"]
