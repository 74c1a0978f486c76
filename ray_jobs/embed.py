"""Ray Data batch inference: mels/ (or a backbone's cached features) + a checkpoint -> embeddings/<model_version>/.

    python -m ray_jobs.embed --config configs/demo.yaml [key=value ...] [--checkpoint P] [--force]
    ray job submit --working-dir . -- python -m ray_jobs.embed --config configs/demo.yaml

The same result as `htcl.pipeline.run_embed` (to float tolerance: padding never changes an
embedding, so batch composition does not matter), computed by an actor pool: each actor loads
the checkpoint once and embeds batches of inputs. With GPUs in the cluster (or --gpu), each actor
takes one GPU and the pool has one actor per GPU; otherwise one single-threaded actor per CPU.

Output: embeddings/<model_version>/part-*.parquet with htcl.schema.embeddings_schema(D) (song_id,
embedding list<float32>[D], model_version, event_timestamp, input_hash) and _config.yaml beside
it; model_version = htcl.pipeline.model_version(checkpoint); then index/<model_version>/.
Incremental (htcl.pipeline.plan_embed): only the songs not in this version yet, or whose input
hash changed since, are embedded and appended as new parts (a changed song's old row is dropped
first); the index is rebuilt only when rows changed, so a rerun with nothing new does no work.
--force re-embeds every song. The summary's "nodes" counts the songs each Ray node embedded.
"""

from __future__ import annotations

import argparse
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data.block import BlockAccessor
from ray.data.datasource import Datasink

from htcl import schema as S
from htcl.arguments import add_embed_args
from htcl.config import Config
from htcl.delta import new_shard_name, write_shard_atomic
from htcl.layout import Layout
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

# An input block is one actor task and one output file: a few per actor, so every actor (and every
# node) has work and a slow one is not waited on long; and at most this many bytes of mels, so a
# block stays small in the object store (a paper-size mel is 320 KB: 200 songs).
BLOCKS_PER_ACTOR = 4
MAX_BLOCK_BYTES = 64 * 1024**2


def rows_per_block(rows: int, workers: int, batch_size: int, bytes_per_row: float) -> int:
    """Input rows per block for `rows` songs on `workers` actors: BLOCKS_PER_ACTOR blocks an actor,
    fewer rows where MAX_BLOCK_BYTES binds, a whole number of batches, at least one."""
    by_share = math.ceil(rows / (BLOCKS_PER_ACTOR * max(workers, 1)))
    by_bytes = int(MAX_BLOCK_BYTES // max(bytes_per_row, 1.0))
    batches = max(1, min(math.ceil(by_share / batch_size), by_bytes // batch_size))
    return batches * batch_size


class EmbedUDF:
    """Ray Data class UDF: loads the model once per actor; input rows -> embedding rows (with the
    node that computed them, for the summary; the sink drops that column)."""

    def __init__(
        self,
        checkpoint: str,
        version: str,
        event_timestamp: datetime,
        n_mels: int,
        use_gpu: bool = False,
        torch_threads: int = 1,
    ):
        import torch

        from htcl.training import model_from_checkpoint

        limit_torch_threads(torch_threads)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model, _, _ = model_from_checkpoint(checkpoint, map_location="cpu")
        self.model.to(self.device).eval()
        self.version, self.ts, self.n_mels = version, event_timestamp, n_mels
        self.schema = S.embeddings_schema(self.model.cfg.embed_dim).append(pa.field(NODE_ID, pa.string()))
        self.node = current_node_id()

    def __call__(self, batch: dict) -> pa.Table:
        from htcl.mels import mel_from_bytes
        from htcl.pipeline import embed_mels
        from htcl.towers import FEATURE, SHAPE, feature_from_row

        ids = [int(i) for i in batch[S.SONG_ID]]
        if FEATURE in batch:  # a backbone model: the locked tagger's cached patch features (C, P)
            mels = [feature_from_row(shape, b) for shape, b in zip(batch[SHAPE], batch[FEATURE])]
        else:
            mels = [mel_from_bytes(b, self.n_mels, int(n)) for b, n in zip(batch[S.MEL], batch[S.N_FRAMES])]
        # the whole Ray batch in one forward pass, padded to its longest input
        emb = embed_mels(self.model, mels, batch_size=max(1, len(mels)), device=self.device)  # (B, D) float32
        return pa.table(
            {
                S.SONG_ID: pa.array(ids, pa.int64()),
                S.EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), emb.shape[1]),
                S.MODEL_VERSION: pa.array([self.version] * len(ids), pa.string()),
                S.EVENT_TIMESTAMP: pa.array([self.ts] * len(ids), pa.timestamp("us", tz="UTC")),
                S.INPUT_HASH: pa.array([str(h) for h in batch[S.INPUT_HASH]], pa.string()),
                NODE_ID: pa.array([self.node] * len(ids), pa.string()),
            },
            schema=self.schema,
        )


class EmbeddingsDatasink(Datasink):
    """Each write task's rows -> one new part of embeddings/<version>/ (temp file, then rename),
    without the node column; the driver sums the rows per node in on_write_complete."""

    def __init__(self, out_dir: Path, dim: int):
        self.out_dir, self.schema = Path(out_dir), S.embeddings_schema(dim)
        self.result: dict = {"rows": 0, "nodes": {}, "files": []}

    @property
    def supports_distributed_writes(self) -> bool:
        return False  # a local output path: write on the driver's node, where output_dir is

    def write(self, blocks, ctx) -> dict:
        tables = [t for t in (BlockAccessor.for_block(b).to_arrow() for b in blocks) if t.num_rows]
        if not tables:
            return {"rows": 0, "nodes": {}, "files": []}
        table = pa.concat_tables(tables)
        nodes = count_by_node(table.column(NODE_ID).to_pylist())
        path = self.out_dir / new_shard_name()
        write_shard_atomic(table.select(self.schema.names).cast(self.schema), path)
        return {"rows": table.num_rows, "nodes": nodes, "files": [str(path)]}

    def on_write_complete(self, write_result) -> None:
        for r in write_result.write_returns:
            self.result["rows"] += r["rows"]
            self.result["files"] += r["files"]
            for k, v in r["nodes"].items():
                self.result["nodes"][k] = self.result["nodes"].get(k, 0) + v


def detect_gpu(flag: bool | None) -> bool:
    """--gpu / --no-gpu, else: GPUs in the cluster."""
    if flag is not None:
        return flag
    from ray_jobs.common import cluster_resources

    return cluster_resources().get("GPU", 0) > 0


def default_checkpoint(cfg: Config, checkpoint: str | Path | None) -> Path:
    from htcl.pipeline import run_dir_name

    return Path(checkpoint or Layout.of(cfg).checkpoint(run_dir_name(cfg, "finetune"))).resolve()


def up_to_date(cfg: Config, plan) -> bool:
    """Nothing to embed, no row dropped, and the index built from the parts there are: no work."""
    from htcl.pipeline import index_is_current

    return not plan.todo and not plan.replaced_rows and index_is_current(cfg, plan.out_dir)


def summary_without_work(cfg: Config, plan) -> dict:
    rows = sum(pq.read_metadata(f).num_rows for f in plan.out_dir.glob("*.parquet"))
    return {
        "checkpoint": str(plan.checkpoint),
        "model_version": plan.version,
        **plan.summary(),
        "embedded": 0,
        "nodes": {},
        "files_written": 0,
        "songs": rows,
        "workers": 0,
        "gpu": None,
        "seconds": 0.0,
        "songs_per_s": None,
        "embeddings": str(plan.out_dir),
        "index": str(Layout.of(cfg).index(plan.version)),
        "index_rebuilt": False,
    }


def run(
    cfg: Config,
    checkpoint: str | Path | None = None,
    workers: int | None = None,
    batch_size: int = 64,
    use_gpu: bool | None = None,
    force: bool = False,
    plan=None,
) -> dict:
    """Embed what plan_embed finds new or changed on the connected Ray cluster (plan: one already
    made for this checkpoint); returns the summary."""
    import ray

    from htcl.pipeline import build_index, index_is_current, plan_embed

    plan = plan or plan_embed(cfg, default_checkpoint(cfg, checkpoint), force)
    use_gpu = detect_gpu(use_gpu)
    workers = default_workers(workers, use_gpu)
    now = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    sink = None
    if plan.todo:
        sink = EmbeddingsDatasink(plan.out_dir, plan.model_cfg.embed_dim)
        # Reading is light: it must not wait for a CPU the actors hold.
        ds = ray.data.read_parquet([str(f) for f in plan.shards], num_cpus=0).select_columns(plan.columns)
        shard_meta = [pq.read_metadata(f) for f in plan.shards]
        shard_rows = sum(m.num_rows for m in shard_meta)
        shard_bytes = sum(m.row_group(i).total_byte_size for m in shard_meta for i in range(m.num_row_groups))
        if shard_rows > len(plan.todo):  # some rows there are done
            todo_ids = pa.array(list(plan.todo), pa.int64())
            ds = ds.map_batches(
                lambda t: t.filter(pc.is_in(t[S.SONG_ID], value_set=todo_ids)), batch_format="pyarrow", num_cpus=0
            )
        # Ray Data reads a small catalog as one block, which would leave every actor but one idle
        # (and the cluster's other nodes unused); one block a batch would make a task and a file a batch.
        block_rows = rows_per_block(len(plan.todo), workers, batch_size, shard_bytes / max(shard_rows, 1))
        ds = ds.repartition(target_num_rows_per_block=block_rows)
        ds = ds.map_batches(
            EmbedUDF,
            fn_constructor_kwargs={
                "checkpoint": str(plan.checkpoint),
                "version": plan.version,
                "event_timestamp": now,
                "n_mels": cfg.audio.n_mels,
                "use_gpu": use_gpu,
            },
            batch_size=batch_size,
            # All but one actor from the start (so a cluster's nodes all take part), up to `workers`:
            # the file listing before the read takes a CPU, and a pool that holds every CPU of a
            # small node from the start would starve it (a deadlock on 2 cores).
            compute=ray.data.ActorPoolStrategy(min_size=max(1, workers - 1), max_size=workers),
            num_cpus=1,
            num_gpus=1 if use_gpu else 0,
            # over every node, not packed on the driver's first: batch inference scales with nodes
            scheduling_strategy="SPREAD",
        )
        ds.write_datasink(sink, ray_remote_args={"num_cpus": 0})
        save_resolved_config(cfg, plan.out_dir, "_config.yaml")  # "_": Parquet readers skip it
    elapsed = time.perf_counter() - t0
    rows = sum(pq.read_metadata(f).num_rows for f in plan.out_dir.glob("*.parquet"))
    # The matching index of this version, beside the embeddings (serving loads it by version):
    # rebuilt when rows changed, so it holds the new songs; left alone when nothing did.
    rebuilt = bool(plan.todo or plan.replaced_rows or not index_is_current(cfg, plan.out_dir))
    index_dir = build_index(cfg, plan.out_dir) if rebuilt else Layout.of(cfg).index(plan.version)
    return {
        "checkpoint": str(plan.checkpoint),
        "model_version": plan.version,
        **plan.summary(),
        "embedded": sink.result["rows"] if sink else 0,
        "nodes": sink.result["nodes"] if sink else {},
        "files_written": len(sink.result["files"]) if sink else 0,
        "songs": rows,
        "workers": workers,
        "gpu": use_gpu,
        "seconds": round(elapsed, 2),
        "songs_per_s": round(len(plan.todo) / elapsed, 2) if elapsed > 0 and plan.todo else None,
        "embeddings": str(plan.out_dir),
        "index": str(index_dir),
        "index_rebuilt": rebuilt,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ray_jobs.embed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_embed_args(p)
    add_ray_args(p)
    p.add_argument("--batch-size", type=int, default=64, help="songs per forward pass (default: %(default)s)")
    p.add_argument(
        "--gpu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one GPU per actor (default: when the cluster has GPUs)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args, cfg = parse_args(build_parser(), argv)
    from htcl.pipeline import plan_embed

    # Planned before Ray starts: a catalog with nothing new costs a read of the hash columns only.
    plan = plan_embed(cfg, default_checkpoint(cfg, args.checkpoint), args.force)
    if up_to_date(cfg, plan):
        print_summary(summary_without_work(cfg, plan))
        print(f"embeddings: {plan.out_dir} (up to date: nothing new or changed)", flush=True)
        return 0
    started = init_ray(args.num_cpus)
    job_banner("embed")
    try:
        summary = run(cfg, workers=args.workers, batch_size=args.batch_size, use_gpu=args.gpu, plan=plan)
    finally:
        if started:
            import ray

            ray.shutdown()
    print_summary(summary)
    print(f"embeddings: {summary['embeddings']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
