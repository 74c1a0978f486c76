"""Files replaced whole, and files hashed: the two file chores every step shares.

    write_atomically(path, lambda tmp: pq.write_table(table, tmp))   # readers never see half a file
    sha256_file(path)                                                 # hex digest of the bytes
    sha256_stream(stream)                                             # the same, of a remote file's stream

No model code and no third-party imports: the Feast repo (feature_repo) uses it as well.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Callable

# A file being written is ".<name>.<pid>-<random>.partial" in the target's folder until it is
# renamed to <name>. Hidden, so a listing of a data folder (pyarrow datasets, Feast's dask) skips
# it; one left behind (its writer was killed) is never read, and can be deleted by its suffix.
PARTIAL_SUFFIX = ".partial"


def write_atomically(path: str | Path, write: Callable[[Path], Any], *, fsync: bool = False) -> Path:
    """`write(tmp)` to a name no other writer uses, then renamed over `path`: a reader sees the old
    file or the new one, never a torn one, whoever else is writing. fsync: flush the new file to
    disk before the rename (for files that must survive a machine crash, not only a killed writer).
    The temporary file is removed if `write` raises. The folder must exist. Returns `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")
    try:
        write(tmp)
        if fsync:
            with tmp.open("rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def sha256_file(path: str | Path, h=None) -> str:
    """Hex sha256 of a file's bytes, read 1 MiB at a time; with `h` (a hashlib object), the file's
    bytes are added to it and its digest so far is returned (a hash over several files)."""
    with open(path, "rb") as f:
        return sha256_stream(f, h)


def sha256_stream(stream: BinaryIO, h=None) -> str:
    """sha256_file of what a binary stream holds from where it stands (an open file, a pyarrow.fs
    input stream), read 1 MiB at a time."""
    h = h or hashlib.sha256()
    for chunk in iter(lambda: stream.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()
