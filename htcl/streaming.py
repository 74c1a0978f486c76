"""Per-song inputs read from Parquet shards on demand, so a training worker never holds the catalog.

`ShardReader` is a read-only Mapping song_id -> input (a log-Mel (M, F), a backbone's cached
patch features (C, P)) over a folder of shards:

  - an index song_id -> (shard, row group, row), built once from each shard's song_id column
    alone (an int64 id and a uint32 position a song: 12 bytes, against 320 KB for one of the
    paper's mels);
  - reads by row group, the unit Parquet can read, through an LRU of row groups that keeps at
    most `cache_rows` rows, held as the shard stores them (a mel as float16 bytes); only the rows
    asked for are decoded;
  - every row decoded is checked for NaN and inf (htcl.batching.require_finite names the song),
    so a bad row is refused when it is read, whatever the up-front check did.

`read_ahead` runs the reads of the next batches on a background thread, so Parquet I/O and
decoding overlap the training step. htcl.pipeline.batch_stream uses both: each rank reads the
songs of its own slice of each global batch and nothing else.

Memory per worker: the cache (`cache_rows` rows), plus the decoded rows of the batches in flight
(READ_AHEAD_BATCHES read ahead, the one being built and the one training), plus the index; a row
group larger than `cache_rows` is still read whole and kept alone while it is the newest. The
shards' row groups set the read granularity: every writer of mels/ and features/ cuts its shards
into row groups of htcl.mels.SHARD_ROW_GROUP_ROWS rows.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from htcl import schema as S
from htcl.batching import require_finite

# Batches read ahead by read_ahead's thread: one hides a read behind a step; the second absorbs a
# slow read (a cold row group on a shared file system) without the step waiting.
READ_AHEAD_BATCHES = 2

Decode = Callable[[pa.Table], dict]  # rows of one shard -> {song_id: input}


class ShardReader(Mapping):
    """song_id -> input over Parquet shards, read by row group through a bounded LRU cache.

    files: the shards, in the order whose last row wins a repeated song_id (as read_mels and
    read_features do); columns: what `decode` needs of them (song_id among them); what: names the
    input in the non-finite refusal (check_finite=False: inputs that are not arrays, such as song
    texts, are returned unchecked). Safe to call from two threads (read_ahead's and the caller's).
    """

    def __init__(
        self,
        files: Sequence[str | Path],
        columns: Sequence[str],
        decode: Decode,
        what: str,
        cache_rows: int,
        check_finite: bool = True,
    ):
        if cache_rows < 1:
            raise ValueError(f"cache_rows={cache_rows}: the reader needs at least one row of cache")
        self.files = [Path(f) for f in files]
        self.columns, self.decode, self.what, self.cache_rows = list(columns), decode, what, cache_rows
        self.check_finite = check_finite  # off for inputs that are not numbers (song texts)
        self._cache: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()  # (file, row group) -> rows
        self._lock = threading.Lock()
        self.cached_rows = 0  # rows held in the cache now
        self.peak_cached_rows = 0
        self.row_group_reads = 0  # row groups read from disk (cache misses)
        self.rows_decoded = 0
        self._build_index()

    def _build_index(self) -> None:
        """Sorted song ids and where each row lives: its position in the shards' rows end to end
        (uint32; int64 past 4G rows), from one read of each shard's song_id column, the row groups'
        sizes from the footers. 12 bytes a song, ~33 while building."""
        group_rows = [
            [m.row_group(g).num_rows for g in range(m.num_row_groups)]
            for m in (pq.ParquetFile(path).metadata for path in self.files)
        ]
        # (G+1,) position of each row group's first row, the shards' row groups end to end
        self._group_start = np.cumsum([0] + [n for rows in group_rows for n in rows], dtype=np.int64)
        self._group_file = np.repeat(np.arange(len(self.files), dtype=np.int32), [len(r) for r in group_rows])  # (G,)
        self._file_first_group = np.cumsum([0] + [len(r) for r in group_rows], dtype=np.int64)  # (F+1,)
        total = int(self._group_start[-1])
        ids = np.empty(total, np.int64)
        for f, path in enumerate(self.files):
            start, end = self._group_start[self._file_first_group[f]], self._group_start[self._file_first_group[f + 1]]
            ids[start:end] = pq.ParquetFile(path).read(columns=[S.SONG_ID]).column(0).to_numpy()
        # stable sort, then the last occurrence of each id: a later shard's row wins, as in read_mels
        order = np.argsort(ids, kind="stable")
        ids = ids[order]
        last = np.ones(total, bool)
        last[:-1] = ids[1:] != ids[:-1]
        if not last.all():
            ids, order = ids[last], order[last]
        self.ids = ids  # (n,) int64, ascending
        self._position = order.astype(np.uint32 if total < 2**32 else np.int64)  # (n,)
        release_arrow_memory()

    def _locate(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shard, row group in that shard, row in that group) of the rows at index positions pos."""
        at = self._position[pos].astype(np.int64)
        group = np.searchsorted(self._group_start, at, side="right") - 1
        shard = self._group_file[group]
        return shard, group - self._file_first_group[shard], at - self._group_start[group]

    # --- Mapping: keys come from the index, never from reading inputs -------------------------

    def _positions(self, song_ids: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.ids, song_ids)
        found = pos < len(self.ids)
        found[found] = self.ids[pos[found]] == song_ids[found]
        if not found.all():
            raise KeyError(int(song_ids[~found][0]))
        return pos

    def __contains__(self, song_id) -> bool:
        try:
            pos = np.searchsorted(self.ids, int(song_id))
        except (TypeError, ValueError):
            return False
        return bool(pos < len(self.ids) and self.ids[pos] == int(song_id))

    def __iter__(self) -> Iterator[int]:
        return (int(i) for i in self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, song_id) -> np.ndarray:
        return self.read([song_id])[int(song_id)]

    # --- reading ---------------------------------------------------------------------------

    def _row_group(self, f: int, g: int) -> pa.Table:
        """Shard f's row group g (self.columns), from the cache or from disk."""
        with self._lock:
            table = self._cache.get((f, g))
            if table is not None:
                self._cache.move_to_end((f, g))
                return table
        table = pq.ParquetFile(self.files[f]).read_row_group(g, columns=self.columns)
        with self._lock:
            self.row_group_reads += 1
            if (f, g) not in self._cache:
                self._cache[(f, g)] = table
                self.cached_rows += table.num_rows
            # evict the least recently used, but never the newest: a row group larger than the
            # cache is kept alone, so reading it again costs nothing while it is being used
            while self.cached_rows > self.cache_rows and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self.cached_rows -= old.num_rows
            self.peak_cached_rows = max(self.peak_cached_rows, self.cached_rows)
        return table

    def read(self, song_ids: Iterable[int]) -> dict[int, np.ndarray]:
        """{song_id: input} of these songs (each row group they live in read once); KeyError for a
        song not in the shards, ValueError naming the song for a row holding NaN or inf."""
        wanted = np.unique(np.asarray(list(song_ids), dtype=np.int64))
        pos = self._positions(wanted)
        out: dict[int, np.ndarray] = {}
        # group by (file, row group): one read per row group, rows taken in one go
        shard, group, row = self._locate(pos)
        where = np.stack([shard, group], axis=1)
        for f, g in np.unique(where, axis=0):
            rows = row[(where[:, 0] == f) & (where[:, 1] == g)]
            decoded = self.decode(self._row_group(int(f), int(g)).take(pa.array(rows)))
            if self.check_finite:
                require_finite(decoded, self.what)
            out.update(decoded)
        with self._lock:
            self.rows_decoded += len(out)
        return out

    def require_finite(self) -> None:
        """Refuse, up front, any row with NaN or inf (as htcl.batching.require_finite: the first
        such song named, with its share of bad values, and every bad song counted).

        One pass over every row group, one at a time and not cached: memory is one row group, the
        time is a full read of the shards (seconds for the demo; at the paper's catalog a pass
        over every mel, which is why the training loop runs it on one rank only and every read
        checks its rows anyway)."""
        first: tuple[int, np.ndarray] | None = None
        bad: list[int] = []
        for path in self.files:
            shard = pq.ParquetFile(path)
            for g in range(shard.metadata.num_row_groups):
                for sid, x in self.decode(shard.read_row_group(g, columns=self.columns)).items():
                    if not np.isfinite(x).all():
                        first = first or (sid, x)
                        bad.append(sid)
        if first is not None:
            # require_finite takes its figures from the first bad song's values and only counts
            # the others: they share its array rather than holding one each
            require_finite({first[0]: first[1], **{sid: first[1] for sid in bad}}, self.what)


def release_arrow_memory() -> None:
    """Hand the memory Arrow's pool holds but no longer uses back to the system: after a large
    read (an index over every shard, a catalog's columns) it would otherwise stay in this
    process's footprint, unusable by anything but Arrow."""
    pa.default_memory_pool().release_unused()


Item = TypeVar("Item")


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


_DONE = object()  # the items ran out


def read_ahead(
    read: Callable[[Item], dict], items: Iterable[Item], depth: int = READ_AHEAD_BATCHES
) -> Iterator[tuple[Item, dict]]:
    """(item, read(item)) for each item, in order, read up to `depth` items ahead on a daemon
    thread. An error in `read` is raised here, at the item it failed on; closing the generator
    (or dropping it) stops the thread and waits for it (at most the read in progress)."""
    results: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(value) -> bool:
        while not stop.is_set():
            try:
                results.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put((item, read(item))):
                    return
            put(_DONE)
        except BaseException as e:  # handed to the consumer, raised there
            put(_Failed(e))

    thread = threading.Thread(target=work, name="htcl-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            got = results.get()
            if got is _DONE:
                return
            if isinstance(got, _Failed):
                raise got.error
            yield got
    finally:
        stop.set()
        # Wait for a read in progress to end: a process that exits while this thread is inside
        # pyarrow's C++ reader aborts ("terminate called without an active exception").
        thread.join()
