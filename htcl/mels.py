"""Catalog rows -> log-Mel rows, with a quarantine for what cannot be used; the catalog contract
(read_catalog) and the mels/ shard format (MEL_COLUMNS, mel_to_bytes / mel_from_bytes, read_mels).

`MelExtractor` follows Ray Data's class-UDF shape (`__init__` builds LogMel once, `__call__`
transforms a batch), so the Ray preprocess job maps it over the catalog as it is; the local
pipeline calls it in a plain loop.
"""

from __future__ import annotations

import math
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from htcl import schema as S
from htcl.audio import AudioDecodeError, LogMel, load_audio
from htcl.config import AudioConfig
from htcl.streaming import release_arrow_memory

# A song quieter than this RMS everywhere is silence (digital zero or a broken render).
SILENCE_RMS = 1e-4


class MelExtractor:
    """dict of columns (song_id, audio_path) -> {"mels": rows, "quarantine": rows}."""

    def __init__(self, audio_cfg: AudioConfig, min_seconds: float = 2.0, device: str = "cpu"):
        self.cfg = audio_cfg
        self.min_seconds = min_seconds
        self.device = torch.device(device)
        self.logmel = LogMel(audio_cfg.sample_rate, audio_cfg.n_mels, audio_cfg.win_ms, audio_cfg.hop_ms).to(
            self.device
        )

    def extract_one(self, song_id: int, path: str, input_hash: str | None = None) -> tuple[dict | None, dict | None]:
        """(mel row, None) or (None, quarantine row), either stamped with the file's input_hash.
        Never raises: a bad file is a quarantine row with its reason, and so is any other
        exception (`unexpected`), so one song can never cost the others their rows."""
        try:
            good, bad = self._extract(song_id, path)
        except Exception as e:
            msg = f"{path}: {type(e).__name__}: {e} | {traceback.format_exc(limit=-3)}"
            good, bad = None, self.quarantine_row(song_id, path, "extract", "unexpected", msg)
        row = good if good is not None else bad
        row[S.INPUT_HASH] = input_hash
        return good, bad

    def _extract(self, song_id: int, path: str) -> tuple[dict | None, dict | None]:
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
        if not np.isfinite(mel).all():  # load_audio bounds the samples; this guards whatever slips past
            msg = f"{path}: log-Mel has non-finite values ({np.isfinite(mel).mean():.1%} finite)"
            return None, self.quarantine_row(song_id, path, "validate", "invalid", msg)
        return {S.SONG_ID: int(song_id), S.N_FRAMES: int(mel.shape[1]), S.MEL: mel_to_bytes(mel)}, None

    @staticmethod
    def quarantine_row(song_id, path, stage, error_type, message, input_hash: str | None = None) -> dict:
        return {
            S.SONG_ID: int(song_id),
            S.AUDIO_PATH: str(path),
            S.STAGE: stage,
            S.ERROR_TYPE: error_type,
            S.MESSAGE: message,
            S.INPUT_HASH: input_hash,
        }

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[dict]]:
        mels, quarantine = [], []
        hashes = batch[S.INPUT_HASH] if S.INPUT_HASH in batch else [None] * len(batch[S.SONG_ID])
        for song_id, path, input_hash in zip(batch[S.SONG_ID], batch[S.AUDIO_PATH], hashes):
            row, bad = self.extract_one(song_id, path, input_hash)
            (mels if row is not None else quarantine).append(row if row is not None else bad)
        return {"mels": mels, "quarantine": quarantine}


class CatalogError(ValueError):
    """A catalog that breaks the data contract: the message names the file, and the row and column
    where one is to blame."""


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_INTEGER_TEXT = re.compile(r"^\s*[+-]?\d+\s*$")


def _song_id(value) -> int | None:
    """A catalog cell as a song id: an integer (or a whole float, or digits, as CSV readers give
    them) within int64; None for anything else (text, fractions, NaN, booleans)."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        number = int(value)
    elif isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        number = int(value)
    elif isinstance(value, str) and _INTEGER_TEXT.match(value):
        number = int(value)
    else:
        return None
    return number if INT64_MIN <= number <= INT64_MAX else None


def _song_ids(column: pd.Series, path: Path) -> np.ndarray:
    """The song_id column as int64, or CatalogError naming the first bad rows. Checked before any
    work starts: a song without a usable id cannot even be quarantined (ids are int64 there)."""
    if pd.api.types.is_integer_dtype(column.dtype) and not column.isna().any():  # the usual case, vectorised
        fits = column.dtype != np.uint64 or bool((column.to_numpy() <= INT64_MAX).all())
        if fits:
            return column.to_numpy(dtype=np.int64)
    ids = [_song_id(v) for v in column.tolist()]
    bad = [i for i, v in enumerate(ids) if v is None]
    if bad:
        shown = ", ".join(f"data row {i + 1}: {column.iloc[i]!r}" for i in bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise CatalogError(
            f"{path}: column {S.SONG_ID!r} must hold integers (int64); {len(bad)} row(s) do not "
            f"({shown}; data rows count from 1, the header not included)"
        )
    return np.asarray(ids, dtype=np.int64)


def resolve_audio_path(value: str, catalog_dir: Path) -> str:
    """Where a catalog's audio_path points: a URI (s3://, file://, ...) or an absolute path as it
    is, `~` expanded, and a relative path against the folder of the catalog file, never against
    the working directory (which a job on a cluster does not share with whoever wrote the catalog)."""
    if not value or "://" in value or os.path.isabs(value):
        return value
    expanded = os.path.expanduser(value)
    return expanded if os.path.isabs(expanded) else os.path.normpath(catalog_dir / expanded)


def read_catalog(path: str | Path) -> pd.DataFrame:
    """A catalog table (Parquet or CSV), checked against the contract before any work starts.

    Raises CatalogError naming the file, and the column and data row(s) at fault, for a missing
    column, a song_id that is not an int64 integer, and a song_id given twice. Returns song_id as
    int64, audio_path with relative paths resolved against the catalog file's folder (a missing or
    empty one stays "", which decoding quarantines as missing: that song alone is lost), and the
    text columns as strings ("" when missing)."""
    path = Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"catalog not found: {path}")
    df = pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
    missing = S.missing_columns(df.columns, S.CATALOG_REQUIRED)
    if missing:
        raise CatalogError(f"{path}: catalog is missing column(s) {missing}")
    df = df.reset_index(drop=True)
    df[S.SONG_ID] = _song_ids(df[S.SONG_ID], path)
    repeated = df[S.SONG_ID].duplicated(keep=False)
    if repeated.any():
        rows = np.flatnonzero(repeated.to_numpy())
        dup = int(df[S.SONG_ID].iloc[rows[0]])
        at = [int(i) + 1 for i in rows if df[S.SONG_ID].iloc[i] == dup]
        raise CatalogError(
            f"{path}: song_id {dup} appears more than once (data rows {', '.join(map(str, at))}; "
            f"column {S.SONG_ID!r}); {int(df[S.SONG_ID].duplicated().sum())} repeated id(s) in all"
        )
    folder = path.parent
    df[S.AUDIO_PATH] = [
        resolve_audio_path("" if p is None or p != p else str(p).strip(), folder) for p in df[S.AUDIO_PATH].tolist()
    ]
    for col in S.CATALOG_TEXT:
        df[col] = df[col].fillna("").astype(str)
    return df


# Rows per Parquet row group in every shard a training worker reads (mels/, features/): the
# streaming reader (htcl.streaming) reads a whole row group to get one row, so a group is what one
# cache miss costs (32 paper-size mels: ~10 MB). pyarrow's default (1Mi rows) made a locally
# preprocessed catalog one group, held whole by every worker.
SHARD_ROW_GROUP_ROWS = 32


CATALOG_CHUNK_ROWS = 65_536  # rows per chunk of catalog_chunks: a few MB of text columns


def catalog_chunks(path: str | Path, columns: list[str]) -> Iterator[pd.DataFrame]:
    """The catalog's `columns` (song_id among them), a chunk of rows at a time, as read_catalog
    returns them (song_id int64, text columns str, "" when missing): what a reader that needs a
    few columns of every song reads instead of the whole table. A catalog read_catalog refuses
    is refused with read_catalog's own error (its data-row numbers count over the whole file),
    repeated song ids included."""
    path = Path(path).absolute()
    seen: list[np.ndarray] = []
    try:
        if path.suffix == ".csv":
            chunks = pd.read_csv(path, usecols=columns, chunksize=CATALOG_CHUNK_ROWS)
        else:
            batches = pq.ParquetFile(path).iter_batches(CATALOG_CHUNK_ROWS, columns=columns)
            chunks = (b.to_pandas() for b in batches)
        for chunk in chunks:
            chunk = chunk[columns].reset_index(drop=True)  # in the order asked (CSV reads file order)
            chunk[S.SONG_ID] = _song_ids(chunk[S.SONG_ID], path)
            for col in set(S.CATALOG_TEXT) & set(columns):
                chunk[col] = chunk[col].fillna("").astype(str)
            seen.append(chunk[S.SONG_ID].to_numpy())
            yield chunk
        ids = np.concatenate(seen) if seen else np.zeros(0, np.int64)
        if len(np.unique(ids)) != len(ids):
            raise CatalogError(f"{path}: repeated song_id")
    except (ValueError, KeyError, OSError):  # CatalogError, a missing column, an unreadable file
        read_catalog(path)  # raises the error that names the rows at fault
        raise


def catalog_ids_by_artist(path: str | Path, choose: Callable[[list[str]], set[str]]) -> tuple[np.ndarray, np.ndarray]:
    """Every catalog song's id and whether its artist is one of choose(every distinct artist), as
    read_catalog gives them ("" for a missing artist): (ids (n,) int64 in file order, chosen (n,)
    bool). A Parquet catalog with an integer song_id and a string artist column is read with Arrow
    in two passes of a chunk at a time (the distinct names, then a vectorised membership test):
    only the distinct names become Python strings, and 9 bytes a song are kept. Any other catalog
    goes through catalog_chunks. Refused as read_catalog refuses it."""
    path = Path(path).absolute()
    try:
        shard = pq.ParquetFile(path) if path.suffix != ".csv" else None
    except (OSError, ValueError):
        shard = None  # not Parquet: catalog_chunks refuses it as read_catalog does
    fields = {f.name: f.type for f in shard.schema_arrow} if shard is not None else {}
    id_type, artist_type = fields.get(S.SONG_ID, pa.null()), fields.get(S.ARTIST, pa.null())
    if not (
        pa.types.is_integer(id_type)
        and id_type != pa.uint64()
        and (pa.types.is_string(artist_type) or pa.types.is_large_string(artist_type))
    ):
        names: set[str] = set()
        for chunk in catalog_chunks(path, [S.SONG_ID, S.ARTIST]):
            names.update(chunk[S.ARTIST].unique().tolist())
        chosen = choose(sorted(names))
        ids, marks = [], []
        for chunk in catalog_chunks(path, [S.SONG_ID, S.ARTIST]):
            ids.append(chunk[S.SONG_ID].to_numpy())
            marks.append(chunk[S.ARTIST].isin(chosen).to_numpy())
        return np.concatenate(ids), np.concatenate(marks)

    def chunks(columns: list[str]):  # one thread: Arrow's per-thread buffers cost more than they save here
        return shard.iter_batches(CATALOG_CHUNK_ROWS, columns=columns, use_threads=False)

    names = set()
    for batch in chunks([S.ARTIST]):
        names.update("" if a is None else a for a in pc.unique(batch.column(0)).to_pylist())
    chosen = pa.array(sorted(choose(sorted(names))), pa.string())
    ids, marks = [], []
    for batch in chunks([S.SONG_ID, S.ARTIST]):
        if batch.column(0).null_count:
            read_catalog(path)  # raises, naming the rows without an id
        ids.append(batch.column(0).to_numpy().astype(np.int64))
        marks.append(pc.is_in(pc.fill_null(batch.column(1), ""), value_set=chosen).to_numpy(zero_copy_only=False))
    ids_all = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    if len(np.unique(ids_all)) != len(ids_all):
        read_catalog(path)  # raises, naming the repeated song_id's rows
    release_arrow_memory()  # the columns' read buffers
    return ids_all, np.concatenate(marks) if marks else np.zeros(0, bool)


def read_catalog_or_refuse(path: str | Path, command: str) -> pd.DataFrame | None:
    """read_catalog as a command's first step: the table, or None after one line on stderr naming
    the command, the file and the cause (the caller exits 1 before any work: nothing is lost)."""
    try:
        return read_catalog(path)
    except (ValueError, OSError) as e:  # CatalogError, no such file, a file pyarrow/pandas cannot read
        print(f"{command}: {e}", file=sys.stderr, flush=True)
        return None


def write_table(rows: list[dict], schema: pa.Schema, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=SHARD_ROW_GROUP_ROWS)
    return path


# --- the mels/ shard format ----------------------------------------------------------------

MEL_COLUMNS = [S.SONG_ID, S.N_FRAMES, S.MEL]  # what a reader of mels/ needs of its shards


def mel_to_bytes(mel: np.ndarray) -> bytes:
    """(M, F) -> float16 bytes, C order (the `mel` column of mels/)."""
    return np.ascontiguousarray(mel, dtype=np.float16).tobytes()


def mel_from_bytes(data: bytes, n_mels: int, n_frames: int) -> np.ndarray:
    """float16 bytes -> (M, F) float32; errors name the expected and actual sizes."""
    arr = np.frombuffer(data, dtype=np.float16)
    if arr.size != n_mels * n_frames:
        raise ValueError(f"mel bytes hold {arr.size} values, expected n_mels*n_frames = {n_mels}*{n_frames}")
    return arr.reshape(n_mels, n_frames).astype(np.float32)


def mel_shards(directory: str | Path) -> list[Path]:
    """The mel shards under `directory`, in name order (a later shard's row wins a repeated song_id)."""
    directory = Path(directory)
    files = sorted(directory.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no mel shards (*.parquet) in {directory}; run preprocess first")
    return files


def mels_from_table(table: pa.Table, n_mels: int = 128) -> dict[int, np.ndarray]:
    """Rows of a mel shard (MEL_COLUMNS; a whole file or any slice of it) -> {song_id: (n_mels, F) float32}."""
    t = table.select(MEL_COLUMNS).to_pydict()
    return {int(sid): mel_from_bytes(b, n_mels, nf) for sid, nf, b in zip(t[S.SONG_ID], t[S.N_FRAMES], t[S.MEL])}


def read_mels(directory: str | Path, n_mels: int = 128) -> dict[int, np.ndarray]:
    """All mel shards under `directory` -> {song_id: (n_mels, F) float32}."""
    out: dict[int, np.ndarray] = {}
    for f in mel_shards(directory):
        out.update(mels_from_table(pq.read_table(f, columns=MEL_COLUMNS), n_mels))
    return out
