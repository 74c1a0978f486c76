"""What a grown or changed catalog needs recomputed, and the rows it makes stale.

Every derived table (mels/, quarantine/, a tower's features/, embeddings/<version>/) records, per
song, the hash of the input it was computed from (`input_hash`: the audio file's sha256 for audio
steps, carried forward from mels or features into embeddings). A step's work is then the songs
whose current input hash differs from the recorded one (new songs have none), and before it
appends their new rows it rewrites the shards that hold their old rows without them, so a song
has one row per table whatever the number of runs. A run with nothing new reads the hash columns
and writes nothing.

The order makes an interrupted run safe: stale rows are dropped first, so a song whose new row was
not written yet is simply missing, and the next run computes it.
"""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from htcl import schema as S
from htcl.files import write_atomically

UNREADABLE = "unreadable"  # the input hash of a file that cannot be read: retried once it can


def recorded_hashes(*directories: Path) -> dict[int, str | None]:
    """song_id -> input_hash of every row in these folders' shards (None where a shard predates the
    column: such a song counts as changed once, and is recomputed)."""
    out: dict[int, str | None] = {}
    for directory in directories:
        for f in sorted(Path(directory).glob("*.parquet")):
            names = pq.read_schema(f).names
            columns = [S.SONG_ID] + ([S.INPUT_HASH] if S.INPUT_HASH in names else [])
            t = pq.read_table(f, columns=columns)
            ids = t.column(S.SONG_ID).to_pylist()
            hashes = t.column(S.INPUT_HASH).to_pylist() if S.INPUT_HASH in names else [None] * len(ids)
            out.update(zip(ids, hashes))
    return out


def new_or_changed(inputs: pd.DataFrame, recorded: Mapping[int, str | None]) -> pd.DataFrame:
    """The rows of `inputs` (song_id, input_hash, ...) whose recorded hash is missing or differs."""
    if not len(inputs):
        return inputs
    todo = [recorded.get(int(s)) != h for s, h in zip(inputs[S.SONG_ID], inputs[S.INPUT_HASH])]
    return inputs[np.asarray(todo, dtype=bool)].reset_index(drop=True)


def drop_stale_rows(directory: Path, current: Mapping[int, str], row_group_size: int | None = None) -> int:
    """Rewrite each shard of `directory` without the rows of songs in `current` whose recorded hash
    is not their current one (songs absent from `current` keep their rows). A shard left empty is
    removed. Each rewrite is a temp file renamed over the shard. Returns the rows dropped."""
    dropped = 0
    for f in sorted(Path(directory).glob("*.parquet")):
        names = pq.read_schema(f).names
        columns = [S.SONG_ID] + ([S.INPUT_HASH] if S.INPUT_HASH in names else [])
        keys = pq.read_table(f, columns=columns)
        ids = keys.column(S.SONG_ID).to_pylist()
        hashes = keys.column(S.INPUT_HASH).to_pylist() if S.INPUT_HASH in names else [None] * len(ids)
        keep = [int(s) not in current or current[int(s)] == h for s, h in zip(ids, hashes)]
        if all(keep):
            continue
        dropped += len(keep) - sum(keep)
        if not any(keep):
            f.unlink()
            continue
        write_shard_atomic(pq.read_table(f).filter(pa.array(keep)), f, row_group_size)
    return dropped


def write_shard_atomic(table: pa.Table, path: Path, row_group_size: int | None = None) -> None:
    """Write a Parquet shard under a hidden temp name, then rename it (htcl.files.write_atomically):
    a reader (and a dataset listing, which skips "."-names) never sees half a shard."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: pq.write_table(table, tmp, row_group_size=row_group_size))


def file_fingerprint(path: Path) -> list[int]:
    """[bytes, mtime_ns]: changes whenever a file is rewritten (the writers here rename a new file
    over the old), without reading it."""
    st = Path(path).stat()
    return [st.st_size, st.st_mtime_ns]


def hash_files(paths: Iterable[str], hash_file, threads: int = 8) -> list[str]:
    """hash_file(path) for every path, on a few threads (hashlib releases the GIL on large reads);
    UNREADABLE for a path that cannot be read (missing, no permission): decoding quarantines it."""

    def one(path: str) -> str:
        try:
            return hash_file(path)
        except OSError:
            return UNREADABLE

    paths = list(paths)
    if len(paths) < 2 * threads:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, paths, chunksize=16))


def new_shard_name() -> str:
    """part-<time>-<random>.parquet: unique across runs and writers, ordered by time."""
    import time

    return f"part-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet"
