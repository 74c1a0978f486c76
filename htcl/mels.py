"""Catalog rows -> log-Mel rows, with a quarantine for what cannot be used.

`MelExtractor` follows Ray Data's class-UDF shape (`__init__` builds LogMel once, `__call__`
transforms a batch), so the Ray preprocess job maps it over the catalog as it is; the local
pipeline calls it in a plain loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from htcl import schema as S
from htcl.audio import AudioDecodeError, LogMel, load_audio, mel_from_bytes, mel_to_bytes
from htcl.config import AudioConfig

# A song quieter than this RMS everywhere is silence (digital zero or a broken render).
SILENCE_RMS = 1e-4


class MelExtractor:
    """dict of columns (song_id, audio_path) -> {"mels": rows, "quarantine": rows}."""

    def __init__(self, audio_cfg: AudioConfig, min_seconds: float = 2.0, device: str = "cpu"):
        self.cfg = audio_cfg
        self.min_seconds = min_seconds
        self.device = torch.device(device)
        self.logmel = LogMel(audio_cfg.sample_rate, audio_cfg.n_mels, audio_cfg.win_ms, audio_cfg.hop_ms).to(self.device)

    def extract_one(self, song_id: int, path: str) -> tuple[dict | None, dict | None]:
        """(mel row, None) or (None, quarantine row). Never raises for a bad file."""
        try:
            wave = load_audio(path, self.cfg.sample_rate, self.cfg.max_seconds)
        except AudioDecodeError as e:
            return None, self.quarantine_row(song_id, path, "decode", e.reason, str(e))
        seconds = len(wave) / self.cfg.sample_rate
        if seconds < self.min_seconds:
            msg = f"{path}: {seconds:.2f} s of audio, shorter than min_seconds={self.min_seconds}"
            return None, self.quarantine_row(song_id, path, "validate", "too_short", msg)
        rms = float(np.sqrt(np.mean(np.square(wave, dtype=np.float64))))
        if not np.isfinite(rms) or rms < SILENCE_RMS:
            msg = f"{path}: silent (RMS {rms:.2e} < {SILENCE_RMS:.0e})"
            return None, self.quarantine_row(song_id, path, "validate", "silent", msg)
        with torch.no_grad():
            mel = self.logmel(torch.from_numpy(wave).to(self.device))[0].cpu().numpy()  # (M, F)
        return {S.SONG_ID: int(song_id), S.N_FRAMES: int(mel.shape[1]), S.MEL: mel_to_bytes(mel)}, None

    @staticmethod
    def quarantine_row(song_id, path, stage, error_type, message) -> dict:
        return {S.SONG_ID: int(song_id), S.AUDIO_PATH: str(path), S.STAGE: stage,
                S.ERROR_TYPE: error_type, S.MESSAGE: message}

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[dict]]:
        mels, quarantine = [], []
        for song_id, path in zip(batch[S.SONG_ID], batch[S.AUDIO_PATH]):
            row, bad = self.extract_one(song_id, path)
            (mels if row is not None else quarantine).append(row if row is not None else bad)
        return {"mels": mels, "quarantine": quarantine}


def read_catalog(path: str | Path) -> pd.DataFrame:
    """A catalog table (Parquet or CSV), checked against the contract; errors name the column."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"catalog not found: {path}")
    df = pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
    missing = S.missing_columns(df.columns, S.CATALOG_REQUIRED)
    if missing:
        raise ValueError(f"{path}: catalog is missing column(s) {missing}")
    if df[S.SONG_ID].duplicated().any():
        dup = df.loc[df[S.SONG_ID].duplicated(), S.SONG_ID].iloc[0]
        raise ValueError(f"{path}: song_id {dup} appears more than once")
    for col in S.CATALOG_TEXT:
        df[col] = df[col].fillna("").astype(str)
    return df


def write_table(rows: list[dict], schema: pa.Schema, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def read_mels(directory: str | Path, n_mels: int = 128) -> dict[int, np.ndarray]:
    """All mel shards under `directory` -> {song_id: (n_mels, F) float32}."""
    directory = Path(directory)
    files = sorted(directory.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no mel shards (*.parquet) in {directory}; run preprocess first")
    out: dict[int, np.ndarray] = {}
    for f in files:
        t = pq.read_table(f, columns=[S.SONG_ID, S.N_FRAMES, S.MEL]).to_pydict()
        for sid, nf, b in zip(t[S.SONG_ID], t[S.N_FRAMES], t[S.MEL]):
            out[int(sid)] = mel_from_bytes(b, n_mels, nf)
    return out
