"""The vocal line: espeak-ng reads the lyrics in the artist's language and voice.

espeak-ng (Debian package `espeak-ng`) is a formant synthesizer: the result is speech rather than
singing, but its phonemes, rhythm and prosody are those of the language, which is what makes the
language audible in the mix.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import numpy as np
import soundfile as sf
import soxr

ESPEAK = "espeak-ng"


class VocalError(RuntimeError):
    pass


def espeak_available() -> bool:
    return shutil.which(ESPEAK) is not None


def synthesize(
    lines: list[str], voice: str, pitch: int, speed: int, sample_rate: int, timeout: float = 60.0
) -> np.ndarray:
    """Mono float32 speech at `sample_rate`; each lyric line becomes one phrase."""
    text = ". ".join(line.strip() for line in lines) + "."
    fd, wav = tempfile.mkstemp(suffix=".wav", prefix="htcl_vocal_")
    os.close(fd)
    try:
        cmd = [ESPEAK, "-v", voice, "-p", str(pitch), "-s", str(speed), "-g", "4", "-w", wav, text]
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout)
        if proc.returncode != 0:
            raise VocalError(f"espeak-ng failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[:300]}")
        audio, sr = sf.read(wav, dtype="float32", always_2d=True)
    finally:
        os.unlink(wav)
    audio = audio.mean(axis=1)
    if sr != sample_rate:
        audio = soxr.resample(audio, sr, sample_rate).astype(np.float32)
    return audio


def mix_vocals(music: np.ndarray, vocal: np.ndarray, sample_rate: int, start_s: float, level_db: float) -> np.ndarray:
    """Lay `vocal` over `music` from `start_s`, at `level_db` relative to the music's RMS."""
    out = music.copy()
    start = min(int(start_s * sample_rate), max(len(out) - 1, 0))
    seg = vocal[: len(out) - start]
    if len(seg) == 0:
        return out
    music_rms = float(np.sqrt(np.mean(music**2))) + 1e-4
    voiced = seg[np.abs(seg) > 1e-3]
    vocal_rms = float(np.sqrt(np.mean(voiced**2))) if len(voiced) else 1.0
    gain = music_rms / max(vocal_rms, 1e-4) * 10 ** (level_db / 20)
    out[start : start + len(seg)] += gain * seg
    return out
