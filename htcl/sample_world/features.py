"""Plain audio features for the structure checks: log-Mel statistics, loudness, rhythm.

Deliberately simple (numpy only, no learned model): if genre, language and the hidden taste factors
are predictable from these, they are audible in the waveform and not only asserted in a table.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

N_FFT = 1024
HOP = 512
N_MELS = 64
TEMPO_BINS = 24  # log-spaced beat periods from 0.25 s to 2 s
N_CEPS = 20


@lru_cache(maxsize=4)
def _mel_filterbank(sample_rate: int, n_fft: int = N_FFT, n_mels: int = N_MELS) -> np.ndarray:
    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10 ** (np.asarray(m) / 2595.0) - 1.0)

    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(30.0), hz_to_mel(sample_rate / 2), n_mels + 2))
    lower, center, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs[None, :] - lower) / (center - lower)
    falling = (upper - freqs[None, :]) / (upper - center)
    return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)  # (n_mels, n_fft/2+1)


def log_mel(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """(n_mels, frames) natural-log Mel power."""
    return np.log(_mel_filterbank(sample_rate) @ _power_spectrogram(audio).T + 1e-10)


@lru_cache(maxsize=4)
def _chroma_map(sample_rate: int, n_fft: int = N_FFT) -> np.ndarray:
    """(12, n_fft/2+1) 0/1 map of FFT bins between 60 Hz and 2 kHz to pitch classes (C = 0)."""
    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    out = np.zeros((12, len(freqs)), dtype=np.float32)
    band = (freqs >= 60) & (freqs <= 2000)
    pitch_class = np.round(12 * np.log2(freqs[band] / 440.0) + 69).astype(int) % 12
    out[pitch_class, np.flatnonzero(band)] = 1.0
    return out


def tonic_chroma(power: np.ndarray, sample_rate: int) -> np.ndarray:
    """Pitch-class energy profile rolled so that its strongest class comes first (key-invariant)."""
    chroma = _chroma_map(sample_rate) @ power.sum(axis=0)  # (12,)
    chroma = chroma / (chroma.sum() + 1e-10)
    return np.roll(chroma, -int(np.argmax(chroma)))


def _power_spectrogram(audio: np.ndarray) -> np.ndarray:
    if len(audio) < N_FFT:
        audio = np.pad(audio, (0, N_FFT - len(audio)))
    n_frames = 1 + (len(audio) - N_FFT) // HOP
    idx = np.arange(N_FFT)[None, :] + HOP * np.arange(n_frames)[:, None]
    frames = audio[idx] * np.hanning(N_FFT).astype(np.float32)
    return np.abs(np.fft.rfft(frames, axis=1)) ** 2  # (frames, n_fft/2+1)


def _median_filter(x: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Running median of width `size` (odd) along `axis`, edges padded by reflection."""
    half = size // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (half, half)
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(x, pad, mode="reflect"), size, axis=axis)
    return np.median(windows, axis=-1)


def _cepstrum(log_mel: np.ndarray, n: int = N_CEPS) -> np.ndarray:
    """(n, frames) DCT-II of log-Mel columns (MFCC-like)."""
    m = log_mel.shape[0]
    dct = np.cos(np.pi / m * (np.arange(m)[None, :] + 0.5) * np.arange(n)[:, None])
    return dct @ log_mel


def residual_features(mel_power: np.ndarray) -> np.ndarray:
    """Log-Mel and cepstral statistics of what is neither sustained nor percussive.

    Median filtering along time keeps sustained (harmonic) content, along frequency percussive
    onsets (the usual harmonic/percussive split); what exceeds both is fast-moving, formant-like
    energy, which is where a voice lives in a mix with instruments.
    """
    sustained = _median_filter(mel_power, 17, axis=1)
    percussive = _median_filter(mel_power, 9, axis=0)
    residual = np.log(np.maximum(mel_power - np.maximum(sustained, percussive), 0.0) + 1e-10)
    cep = _cepstrum(residual)
    return np.concatenate([residual.mean(axis=1), residual.std(axis=1), cep.mean(axis=1), cep.std(axis=1)])


def key_profile_features(chroma: np.ndarray) -> np.ndarray:
    """Best correlation of a pitch-class profile with the Krumhansl-Kessler major and minor key
    profiles (over the 12 keys), and their difference: audio key finding, no score needed."""
    from htcl.sample_world.midi import KEY_PROFILE_MAJOR, KEY_PROFILE_MINOR

    if not np.any(chroma > 0):
        return np.zeros(3)
    best = [
        max(np.corrcoef(chroma, np.roll(p, k))[0, 1] for k in range(12)) for p in (KEY_PROFILE_MAJOR, KEY_PROFILE_MINOR)
    ]
    return np.array([best[0], best[1], best[0] - best[1]])


def audio_features(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """A fixed-length float32 vector: Mel mean/std/flux per band, loudness, rhythm, tonic chroma,
    key-profile fit, and the statistics of the non-sustained, non-percussive residual."""
    power = _power_spectrogram(audio.astype(np.float32))
    mel = np.log(_mel_filterbank(sample_rate) @ power.T + 1e-10)  # (M, F)
    power_db = 10 * np.log10(np.exp(mel).sum(axis=0) + 1e-10)  # (F,)
    active = power_db > power_db.max() - 60  # ignore padding silence
    if active.sum() < 4:
        active[:] = True
    mel_a = mel[:, active]
    flux = np.maximum(np.diff(mel, axis=1), 0.0).mean(axis=0)  # (F-1,) onset strength
    frame_rate = sample_rate / HOP
    tempo_hist = np.zeros(TEMPO_BINS)
    env = flux - flux.mean()
    if len(env) > 4:
        ac = np.correlate(env, env, mode="full")[len(env) - 1 :]
        ac = ac / (ac[0] + 1e-9)
        periods = np.geomspace(0.25, 2.0, TEMPO_BINS + 1)
        for b in range(TEMPO_BINS):
            lo = int(periods[b] * frame_rate)
            hi = max(int(periods[b + 1] * frame_rate), lo + 1)
            if lo < len(ac):
                tempo_hist[b] = ac[lo : min(hi, len(ac))].max()
    spectrum = np.exp(mel_a)
    centroid = (spectrum * np.arange(N_MELS)[:, None]).sum(axis=0) / (spectrum.sum(axis=0) + 1e-10)
    return np.concatenate(
        [
            mel_a.mean(axis=1),
            mel_a.std(axis=1),
            np.abs(np.diff(mel_a, axis=1)).mean(axis=1),
            np.percentile(power_db[active], [10, 50, 90]),
            [power_db[active].std(), flux.mean(), flux.std(), centroid.mean(), centroid.std()],
            tempo_hist,
            tonic_chroma(power, sample_rate),
            key_profile_features(_chroma_map(sample_rate) @ power.sum(axis=0)),
            residual_features(np.exp(mel_a)),
        ]
    ).astype(np.float32)
