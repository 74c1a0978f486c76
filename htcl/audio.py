"""Audio front end: decode -> mono -> resample -> crop, and a batched log-Mel module.

    wave = load_audio("song.flac", sample_rate=16000, max_seconds=120.0)   # (T,) float32
    mel = LogMel()(torch.from_numpy(wave))                                 # (1, 128, F)

`load_audio` decodes only the frames it needs (the first `max_seconds`), with soundfile
(libsndfile: WAV, FLAC, OGG/Vorbis, Opus, MP3) and resamples with soxr. `LogMel` reproduces
`librosa.feature.melspectrogram(center=True, power=2.0)` followed by `np.log(max(x, 1e-10))`
(Slaney Mel scale and norm), checked against librosa in tests/test_audio.py.

Shapes: B batch, T samples, K = n_fft // 2 + 1 frequency bins, M Mel bins, F frames.
"""

from __future__ import annotations

import io
import math
import re
import threading
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch
from torch import nn

LOG_FLOOR = 1e-10  # power floor before the log, as in the paper's librosa recipe
MAX_WORK_BYTES = 64 << 20  # LogMel's frame buffer per block (about six 120 s songs)
CPU_BLOCK_FRAMES = 256  # LogMel's frames per block on CPU: 2 MB of frames, 2 MB of spectrum (cache-sized)
# Decoded samples are nominally within [-1, 1] (PCM always is). Float files can hold anything; a
# peak 60 dB over full scale is a unit mistake (float samples on the int16 scale) or garbage, and
# from ~1e16 up a frame's power overflows float32, so the log-Mel is inf/NaN.
MAX_SAMPLE_MAGNITUDE = 1e3
# Sample rates a real recording uses lie well inside this range; a header outside it is corrupt,
# and resampling from it would cost seconds (2^31-1 Hz) or blow a few samples up to minutes.
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1000, 768_000

# First bytes of the containers libsndfile reads; a file that starts like one but fails to open
# is a broken or unsupported audio file, anything else is not audio at all.
_AUDIO_MAGIC = (
    b"RIFF",
    b"RIFX",
    b"RF64",
    b"fLaC",
    b"OggS",
    b"ID3",
    b"FORM",
    b".snd",
    b"\xff\xfb",
    b"\xff\xf3",
    b"\xff\xf2",
    b"\xff\xfa",
    b"\xff\xe3",
)


class AudioDecodeError(Exception):
    """A file that cannot be used as audio. `reason` is a short machine-readable kind:
    missing, empty, not_audio, unsupported, truncated, corrupt, invalid (NaN/inf samples or a peak
    over MAX_SAMPLE_MAGNITUDE), bad_sample_rate (outside MIN_SAMPLE_RATE..MAX_SAMPLE_RATE)."""

    def __init__(self, path: str | Path, reason: str, cause: str):
        self.path, self.reason, self.cause = str(path), reason, cause
        super().__init__(f"{path}: {reason}: {cause}")


def _open_bytes(path: str) -> tuple[io.BytesIO | str, int]:
    """A local path as is, or a remote URI (s3://, gs://, hdfs://, ...) read through pyarrow.fs."""
    if not path.strip():  # Path("") is the working directory: say what is wrong instead
        raise AudioDecodeError(path, "missing", "no audio_path given")
    if "://" not in path or path.startswith("file://"):
        local = path[len("file://") :] if path.startswith("file://") else path
        p = Path(local)
        if not p.exists():
            raise AudioDecodeError(path, "missing", "no such file")
        if p.is_dir():
            raise AudioDecodeError(path, "not_audio", "is a directory")
        return local, p.stat().st_size
    from pyarrow import fs as pafs

    try:
        filesystem, inner = pafs.FileSystem.from_uri(path)
        with filesystem.open_input_file(inner) as f:
            data = f.read()
    except FileNotFoundError as e:
        raise AudioDecodeError(path, "missing", str(e)) from None
    except Exception as e:  # pyarrow raises OSError/ArrowInvalid for unreachable or unknown schemes
        raise AudioDecodeError(path, "missing", f"cannot read through pyarrow.fs: {e}") from None
    return io.BytesIO(data), len(data)


def _head(source: io.BytesIO | str) -> bytes:
    if isinstance(source, io.BytesIO):
        return source.getvalue()[:16]
    with open(source, "rb") as f:
        return f.read(16)


_WAV_DATA_SIZE = re.compile(r"^data : (\d+) \(should be (\d+)\)", re.MULTILINE)


def _header_claims_more(extra_info: str) -> str | None:
    """libsndfile shrinks a truncated WAV/AIFF to the bytes present and notes the header's size in
    its log ('data : 705600 (should be 235170)'); that note is our only sign of truncation there.
    Streamed WAVs write a placeholder size (0 or 0xFFFFFFFF), which is not truncation."""
    m = _WAV_DATA_SIZE.search(extra_info or "")
    if not m:
        return None
    claimed, present = int(m.group(1)), int(m.group(2))
    if claimed > present and claimed not in (0, 0xFFFFFFFF, 0x7FFFFFFF, 0xFFFFFFFF - 8):
        return f"header promises {claimed} data bytes, file holds {present}"
    return None


def load_audio(path: str | Path, sample_rate: int = 16000, max_seconds: float | None = 120.0) -> np.ndarray:
    """Decode the first `max_seconds` of a file to mono float32 at `sample_rate`: (T,).

    Raises AudioDecodeError (path, reason, cause) for anything it cannot decode.
    """
    path = str(path)
    source, size = _open_bytes(path)
    if size == 0:
        raise AudioDecodeError(path, "empty", "0 bytes")
    try:
        f = sf.SoundFile(source)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        head = _head(source)
        reason = "unsupported" if head.startswith(_AUDIO_MAGIC) else "not_audio"
        raise AudioDecodeError(path, reason, f"soundfile cannot open it ({e})") from None
    with f:
        native_sr, container = f.samplerate, f.format
        if not MIN_SAMPLE_RATE <= native_sr <= MAX_SAMPLE_RATE:  # before reading or resampling anything
            raise AudioDecodeError(
                path,
                "bad_sample_rate",
                f"header claims a sample rate of {native_sr} Hz, outside {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz",
            )
        short = _header_claims_more(f.extra_info)
        if short:
            raise AudioDecodeError(path, "truncated", short)
        wanted = f.frames if max_seconds is None else min(f.frames, int(math.ceil(max_seconds * native_sr)))
        try:
            # (n, channels): read just the frames we keep, not the whole song
            data = f.read(frames=wanted, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as e:
            raise AudioDecodeError(path, "truncated", f"decoding stopped: {e}") from None
    if data.shape[0] == 0:
        raise AudioDecodeError(path, "truncated", f"no decodable audio frames in {size} bytes")
    # libsndfile reports the header's frame count (FLAC STREAMINFO, MP3 Xing/Info, Vorbis
    # granule); fewer frames read means the data stops early. MP3 counts without a Xing
    # header are estimates from the file size, hence a little slack for MP3.
    slack = int(0.01 * wanted) + 2304 if container == "MP3" else 0
    if data.shape[0] + slack < wanted:
        raise AudioDecodeError(path, "truncated", f"{data.shape[0]} of {wanted} frames readable")
    # max and -min propagate NaN and need no |data| copy: one check for NaN, inf and absurd peaks
    peak = max(float(data.max()), -float(data.min()))
    if not np.isfinite(peak):
        raise AudioDecodeError(path, "invalid", "NaN or infinite samples")
    if peak > MAX_SAMPLE_MAGNITUDE:
        raise AudioDecodeError(
            path,
            "invalid",
            f"absurd amplitude: peak sample magnitude {peak:.3g} over "
            f"{MAX_SAMPLE_MAGNITUDE:g} (audio samples are expected within [-1, 1])",
        )
    channels = data.shape[1]
    # (n, C) @ (C,) -> (n,): the mean over channels through BLAS; numpy's mean(axis=1) over a
    # 2-wide inner axis is ~10x slower (bench_frontend: 143 ms vs 11 ms per 120 s of stereo).
    wave = data @ np.full(channels, 1.0 / channels, dtype=np.float32) if channels > 1 else data[:, 0]
    if native_sr != sample_rate:
        wave = soxr.resample(wave, native_sr, sample_rate, quality="HQ")
    if max_seconds is not None:
        wave = wave[: int(round(max_seconds * sample_rate))]
    return np.ascontiguousarray(wave, dtype=np.float32)


# --- Mel filterbank (librosa's Slaney defaults, in numpy: no librosa at run time) ---------------


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney Mel scale: linear below 1 kHz, logarithmic above (librosa htk=False)."""
    hz = np.asarray(hz, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    mel = hz / f_sp
    log_part = min_log_mel + np.log(np.maximum(hz, min_log_hz) / min_log_hz) / logstep
    return np.where(hz >= min_log_hz, log_part, mel)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), f_sp * mel)


def mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None
) -> np.ndarray:
    """(M, K) triangular filters with Slaney area normalization, as librosa.filters.mel."""
    fmax = sample_rate / 2 if fmax is None else fmax
    fft_freqs = np.fft.rfftfreq(n_fft, d=1.0 / sample_rate)  # (K,)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))  # (M + 2,)
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]  # (M + 2, K)
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))  # (M, K)
    weights *= (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]
    return weights.astype(np.float32)


class LogMel(nn.Module):
    """Waveform (T,) or (B, T) -> natural-log Mel power (B, M, F), batched, on any device.

    Defaults are the paper's: 128 bins, 128 ms Hann window, 96 ms hop; at 16 kHz n_fft = 2048,
    hop = 1536, and 120 s (1,920,000 samples) give 1 + T // hop = 1251 centered frames.

    Not differentiable (a fixed front end). Written out rather than through torch.stft so every
    step runs on a contiguous (B, F, K) layout in scratch buffers reused between calls, and the
    Mel projection skips the zeros of the filterbank: each frequency bin feeds at most two
    neighbouring triangles, so the (K, M) matrix is ~98% zeros. Groups of `group` consecutive
    filters touch one short contiguous band of bins each; one small dense matmul per group does
    ~8x fewer multiply-adds than the full matrix (benchmarks/bench_mel.py).

    Work goes block by block, each block a few songs times a few frames (`_plan`). On CPU a
    block is at most CPU_BLOCK_FRAMES frames (one song's part, or several short songs), so the
    frames, the spectrum and the power of a block stay in cache and the spectrum (the one
    buffer torch.fft allocates itself) stays below glibc's 32 MiB mmap threshold. Whole batches
    at once cost 2-3x per song at batch 8: every rfft output over 32 MiB (batch >= 4) is a
    fresh mmap that page-faults in on each call, and 80 MB buffers stream through DRAM at every
    step (benchmarks/bench_mel.py, "batch" rows). Interior blocks frame the waveform in place;
    only the first and last blocks of a song go through a zero-padded copy (center=True).
    A long song goes through the same blocks whatever the batch, so batched output equals one
    song at a time bit for bit; short songs share blocks and may differ in the last float bit.
    """

    def __init__(
        self, sample_rate: int = 16000, n_mels: int = 128, win_ms: float = 128.0, hop_ms: float = 96.0, group: int = 16
    ):
        super().__init__()
        self.sample_rate, self.n_mels = sample_rate, n_mels
        self.n_fft = int(round(sample_rate * win_ms / 1000))
        self.hop = int(round(sample_rate * hop_ms / 1000))
        self.register_buffer("window", torch.hann_window(self.n_fft, periodic=True), persistent=False)
        fb = mel_filterbank(sample_rate, self.n_fft, n_mels)  # (M, K)
        self.register_buffer("fb", torch.from_numpy(fb), persistent=False)
        # (lo, hi) bin band of each filter group and its dense (hi - lo, g) block of the matrix
        self.bands: list[tuple[int, int]] = []
        for i, m0 in enumerate(range(0, n_mels, group)):
            sub = fb[m0 : m0 + group]  # (g, K)
            live = np.flatnonzero(sub.any(axis=0))
            lo, hi = (int(live[0]), int(live[-1]) + 1) if live.size else (0, 1)
            self.bands.append((lo, hi))
            self.register_buffer(f"block{i}", torch.from_numpy(np.ascontiguousarray(sub[:, lo:hi].T)), persistent=False)
        self._work = threading.local()  # scratch buffers, one set per calling thread

    def __getstate__(self):  # picklable (Ray ships modules between processes): scratch stays behind
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("_work", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._work = threading.local()

    def n_frames(self, n_samples: int) -> int:
        """Frames for a waveform of n_samples (centered framing)."""
        return 1 + n_samples // self.hop

    def frame_mask(self, lengths: torch.Tensor, n_frames: int) -> torch.Tensor:
        """(B,) sample counts -> (B, F) bool, True where a frame's center lies inside the song."""
        valid = 1 + torch.div(lengths, self.hop, rounding_mode="floor")
        return torch.arange(n_frames, device=lengths.device)[None, :] < valid[:, None]

    def _buffer(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A scratch tensor kept between calls, grown when too small: fresh 10 MB allocations per
        song cost more in page faults than the FFT itself (measured: ~9,000 minor faults and 3x
        the time per 120 s song)."""
        work = self._work.__dict__
        n = math.prod(shape)
        buf = work.get(name)
        if buf is None or buf.numel() < n or buf.device != like.device:
            buf = work[name] = torch.empty(n, dtype=torch.float32, device=like.device)
        return buf[:n].view(shape)

    def _plan(self, n_songs: int, n_frames: int, device: torch.device) -> tuple[int, int]:
        """(songs, frames) per block: at most MAX_WORK_BYTES of frames, and on CPU at most
        CPU_BLOCK_FRAMES frames (cache-sized); a GPU wants few, large launches instead."""
        rows = max(1, MAX_WORK_BYTES // (self.n_fft * 4))
        if device.type == "cpu":
            rows = min(rows, CPU_BLOCK_FRAMES)
        if rows >= n_frames:
            return min(n_songs, rows // n_frames), n_frames
        return 1, rows

    def _block(self, wave: torch.Tensor, f0: int, f1: int, out: torch.Tensor) -> None:
        """Frames f0:f1 of the songs wave (s, T) -> their log-Mel into out (s, M, f1 - f0)."""
        s, n_samples = wave.shape
        half = self.n_fft // 2
        a, b = f0 * self.hop - half, (f1 - 1) * self.hop + half  # the block's samples, [a, b) of the song
        if a >= 0 and b <= n_samples:
            src = wave[:, a:b]  # inside the song: frame the waveform itself
        else:  # center=True with zero padding, as librosa >= 0.10
            src = self._buffer("padded", (s, b - a), wave)
            lo, hi = max(a, 0), min(b, n_samples)
            src[:, : lo - a] = 0
            src[:, hi - a :] = 0
            src[:, lo - a : hi - a] = wave[:, lo:hi]
        view = src.unfold(-1, self.n_fft, self.hop)  # (s, f, n_fft), overlapping views
        frames = torch.mul(view, self.window, out=self._buffer("frames", tuple(view.shape), wave))
        spec = torch.view_as_real(torch.fft.rfft(frames))  # (s, f, K, 2)
        spec.square_()
        power = torch.add(spec[..., 0], spec[..., 1], out=self._buffer("power", tuple(spec.shape[:-1]), wave))
        mel = torch.cat(
            [power[..., lo:hi] @ getattr(self, f"block{i}") for i, (lo, hi) in enumerate(self.bands)], dim=-1
        )  # (s, f, M): |X|^2 projected band by band
        out.copy_(torch.log_(mel.clamp_(min=LOG_FLOOR)).transpose(1, 2))

    @torch.no_grad()
    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if wave.dim() == 1:
            wave = wave[None]
        if wave.dim() != 2:
            raise ValueError(f"LogMel expects (T,) or (B, T) waveforms, got shape {tuple(wave.shape)}")
        wave = wave.float()
        B, n_samples = wave.shape
        n_frames = self.n_frames(n_samples)
        songs, frames = self._plan(B, n_frames, wave.device)
        out = torch.empty(B, self.n_mels, n_frames, device=wave.device)
        for i in range(0, B, songs):
            for f0 in range(0, n_frames, frames):
                f1 = min(f0 + frames, n_frames)
                self._block(wave[i : i + songs], f0, f1, out[i : i + songs, :, f0:f1])
        return out
