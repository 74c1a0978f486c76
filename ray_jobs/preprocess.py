"""Ray Data preprocess: catalog -> decode -> resample -> crop -> log-Mel -> mels/ + quarantine/.

    python -m ray_jobs.preprocess --config configs/demo.yaml [key=value ...] [--catalog P] [--force]
    ray job submit --working-dir . -- python -m ray_jobs.preprocess --config configs/demo.yaml

The same work as `htcl.pipeline.run_preprocess`, spread over an actor pool: each actor builds one
`htcl.mels.MelExtractor` (LogMel once) and runs it on small batches with one torch thread.
Outputs, under cfg.output_dir (the layout the local pipeline writes and its readers read):

    mels/*.parquet        song_id, n_frames, mel (float16 bytes)    htcl.schema.MELS_SCHEMA
    quarantine/*.parquet  song_id, audio_path, stage, error_type, message
    mels/_config.yaml     the resolved config ("_": Parquet dataset readers skip it)

A file that cannot be used becomes one quarantine row with its reason (missing, empty, not_audio,
unsupported, truncated, invalid (NaN/inf or absurd samples), bad_sample_rate from decoding;
too_short, silent, invalid (a non-finite log-Mel) from validation; `unexpected` for any other
exception) and the job goes on. A song longer than audio.max_seconds is not bad:
only its first max_seconds are decoded, so it lands in mels/ with the frames of max_seconds.
A catalog that breaks the contract (a missing column, a song_id that is not an integer, a
song_id twice) is refused before Ray starts: exit status 1 and one line naming the file, row and
column. Relative audio_path values are relative to the catalog file's folder.
A rerun on a grown or changed catalog computes only the songs that are new or whose audio file
changed (by song_id and the file's sha256, recorded in each row's input_hash): their old rows are
dropped first, the new ones appended; a rerun with nothing new computes nothing (htcl.delta).
--force recomputes everything. The summary's "nodes" counts the songs each Ray node handled.
Both tables are written shard by shard as results stream in (MelsDatasink), so an interrupted
job keeps what it finished and the rerun does the rest.
"""

from __future__ import annotations

import argparse
import math
import time
import traceback
import uuid
from pathlib import Path
from typing import Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from ray.data.block import BlockAccessor
from ray.data.datasource import Datasink

from htcl import schema as S
from htcl.arguments import add_preprocess_args
from htcl.config import AudioConfig, Config
from htcl.delta import write_shard_atomic
from htcl.layout import Layout
from htcl.mels import SHARD_ROW_GROUP_ROWS, MelExtractor, read_catalog, read_catalog_or_refuse
from htcl.pipeline import catalog_path, plan_preprocess
from ray_jobs.common import (
    NODE_ID,
    add_ray_args,
    count_by_node,
    current_node_id,
    default_workers,
    init_ray,
    job_banner,
    limit_torch_threads,
    parse_args,
    print_summary,
    save_resolved_config,
)

# One row per input song: the mel columns are null for a quarantined song, the quarantine
# columns null for a good one. Split into the two tables after the map.
RESULT_SCHEMA = pa.schema(
    [
        (S.SONG_ID, pa.int64()),
        (S.N_FRAMES, pa.int32()),
        (S.MEL, pa.binary()),
        (S.AUDIO_PATH, pa.string()),
        (S.STAGE, pa.string()),
        (S.ERROR_TYPE, pa.string()),
        (S.MESSAGE, pa.string()),
        (S.INPUT_HASH, pa.string()),
        (NODE_ID, pa.string()),
    ]
)


class MelUDF:
    """Ray Data class UDF: builds the extractor once per actor; batch of catalog rows -> result rows."""

    def __init__(self, audio_cfg: AudioConfig, min_seconds: float = 2.0, torch_threads: int = 1):
        limit_torch_threads(torch_threads)
        self.extractor = MelExtractor(audio_cfg, min_seconds=min_seconds)

    def __call__(self, batch: dict) -> pa.Table:
        rows = []
        node = current_node_id()
        hashes = batch[S.INPUT_HASH] if S.INPUT_HASH in batch else [None] * len(batch[S.SONG_ID])
        for song_id, path, input_hash in zip(batch[S.SONG_ID], batch[S.AUDIO_PATH], hashes):
            song_id, path = int(song_id), str(path)
            try:
                good, bad = self.extractor.extract_one(song_id, path, input_hash)
            except Exception as e:  # a bug or a decoder surprise must not stop the job
                msg = f"{path}: {type(e).__name__}: {e} | {traceback.format_exc(limit=-3)}"
                good, bad = None, MelExtractor.quarantine_row(song_id, path, "extract", "unexpected", msg, input_hash)
            rows.append({**(good if good is not None else bad), S.AUDIO_PATH: path, NODE_ID: node})
        return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


MELS_COLUMNS = S.MELS_SCHEMA.names
QUARANTINE_COLUMNS = S.QUARANTINE_SCHEMA.names


def mel_rows(table: pa.Table) -> pa.Table:
    return table.filter(pc.is_valid(table[S.MEL])).select(MELS_COLUMNS).cast(S.MELS_SCHEMA)


def quarantine_rows(table: pa.Table) -> pa.Table:
    return table.filter(pc.is_null(table[S.MEL])).select(QUARANTINE_COLUMNS).cast(S.QUARANTINE_SCHEMA)


class MelsDatasink(Datasink):
    """Splits each write task's result rows into a mels/ shard and a quarantine/ shard.

    One streaming Ray Data run writes both tables (Ray Data has no two-output map), shard by
    shard as results arrive, so memory stays bounded and an interrupted job keeps the shards it
    finished. Each write task returns its counts; the driver sums them in on_write_complete.
    """

    def __init__(self, mels_dir: Path, quarantine_dir: Path, rows_per_file: int):
        self.mels_dir, self.quarantine_dir = Path(mels_dir), Path(quarantine_dir)
        self.rows_per_file = rows_per_file
        self.run_id = uuid.uuid4().hex[:12]
        self.result: dict = {"processed": 0, "quarantined": 0, "reasons": {}, "files": [], "nodes": {}}

    @property
    def supports_distributed_writes(self) -> bool:
        return False  # local output paths: write on the driver's node, where output_dir is

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def write(self, blocks, ctx) -> dict:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return {"processed": 0, "quarantined": 0, "reasons": {}, "files": [], "nodes": {}}
        table = pa.concat_tables(tables).cast(RESULT_SCHEMA)
        name = f"part-{self.run_id}-{ctx.task_idx:06d}.parquet"
        good, bad = mel_rows(table), quarantine_rows(table)
        files = []
        # Quarantine first: if the task dies between the two writes, its good songs are redone
        # on the next run rather than silently missing.
        if bad.num_rows:
            write_shard_atomic(bad, self.quarantine_dir / name, SHARD_ROW_GROUP_ROWS)
            files.append(str(self.quarantine_dir / name))
        if good.num_rows:
            write_shard_atomic(good, self.mels_dir / name, SHARD_ROW_GROUP_ROWS)
            files.append(str(self.mels_dir / name))
        reasons: dict[str, int] = {}
        for r in bad.column(S.ERROR_TYPE).to_pylist():
            reasons[r] = reasons.get(r, 0) + 1
        nodes = count_by_node(table.column(NODE_ID).to_pylist())
        return {
            "processed": good.num_rows,
            "quarantined": bad.num_rows,
            "reasons": reasons,
            "files": files,
            "nodes": nodes,
        }

    def on_write_complete(self, write_result) -> None:
        for r in write_result.write_returns:
            self.result["processed"] += r["processed"]
            self.result["quarantined"] += r["quarantined"]
            self.result["files"] += r["files"]
            for k, v in r["reasons"].items():
                self.result["reasons"][k] = self.result["reasons"].get(k, 0) + v
            for k, v in r["nodes"].items():
                self.result["nodes"][k] = self.result["nodes"].get(k, 0) + v


def run(
    cfg: Config,
    catalog: str | Path | None = None,
    force: bool = False,
    workers: int | None = None,
    batch_size: int = 4,
    rows_per_file: int = 128,
    min_seconds: float = 2.0,
    catalog_table: pd.DataFrame | None = None,
) -> dict:
    """Preprocess every catalog song not done yet on the connected Ray cluster; returns the summary.
    catalog_table: the catalog as read_catalog returned it, when the caller has read it already."""
    import ray

    catalog = Path(catalog or catalog_path(cfg))
    # checked against the contract on the driver (relative paths resolved); only ids, paths and
    # the files' hashes travel
    df = read_catalog(catalog) if catalog_table is None else catalog_table
    mels_dir, q_dir = Layout.of(cfg).mels, Layout.of(cfg).quarantine
    plan = plan_preprocess(cfg, df, force)
    todo = plan.todo
    workers = default_workers(workers)
    sink = MelsDatasink(mels_dir, q_dir, rows_per_file)
    t0 = time.perf_counter()
    if len(todo):
        # One block per batch, so the actors take songs a small batch at a time (balanced load).
        ds = ray.data.from_pandas(todo, override_num_blocks=max(1, math.ceil(len(todo) / batch_size)))
        ds = ds.map_batches(
            MelUDF,
            fn_constructor_kwargs={"audio_cfg": cfg.audio, "min_seconds": min_seconds},
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=min(workers, len(todo))),
            num_cpus=1,
        )
        # Writing a shard is light I/O; it must not wait for a CPU the actors hold.
        ds.write_datasink(sink, ray_remote_args={"num_cpus": 0})
    elapsed = time.perf_counter() - t0
    save_resolved_config(cfg, mels_dir, "_config.yaml")  # "_": Parquet readers of mels/ skip it
    return {
        "catalog": str(catalog),
        **plan.summary(),
        "skipped_already_done": len(df) - len(todo),
        "processed": sink.result["processed"],
        "quarantined": sink.result["quarantined"],
        "quarantine_reasons": sink.result["reasons"],
        "nodes": sink.result["nodes"],
        "workers": workers,
        "seconds": round(elapsed, 2),
        "songs_per_s": round(len(todo) / elapsed, 2) if elapsed > 0 and len(todo) else None,
        "mels": str(mels_dir),
        "quarantine": str(q_dir),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ray_jobs.preprocess", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_preprocess_args(p)
    add_ray_args(p)
    p.add_argument("--batch-size", type=int, default=4, help="songs per UDF call (default: %(default)s)")
    p.add_argument(
        "--rows-per-file", type=int, default=128, help="songs per output shard (at least; default: %(default)s)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args, cfg = parse_args(build_parser(), argv)
    catalog = Path(args.catalog or catalog_path(cfg))
    # The catalog is checked before Ray starts: a refusal is then a plain exit 1, with no Ray
    # instance to tear down while the exception unwinds (that teardown could abort the process).
    table = read_catalog_or_refuse(catalog, "preprocess")
    if table is None:
        return 1
    started = init_ray(args.num_cpus)
    job_banner("preprocess")
    try:
        summary = run(cfg, catalog, args.force, args.workers, args.batch_size, args.rows_per_file, catalog_table=table)
    finally:
        if started:
            import ray

            ray.shutdown()
    print_summary(summary)
    print(
        f"preprocess: {summary['processed']} processed, {summary['quarantined']} quarantined, "
        f"{summary['songs_per_s']} songs/s -> {summary['mels']}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
