"""Ray Data batch inference: mels/ (or a backbone's cached features) + a checkpoint -> embeddings/<model_version>/.

    python -m ray_jobs.embed --config configs/demo.yaml [key=value ...] [--checkpoint P]
    ray job submit --working-dir . -- python -m ray_jobs.embed --config configs/demo.yaml

The same result as `htcl.pipeline.run_embed` (to float tolerance: padding never changes an
embedding, so batch composition does not matter), computed by an actor pool: each actor loads
the checkpoint once and embeds batches of mels. With GPUs in the cluster (or --gpu), each actor
takes one GPU and the pool has one actor per GPU; otherwise one single-threaded actor per CPU.

Output: embeddings/<model_version>/part-*.parquet (Ray Data's write_parquet) with htcl.schema.embeddings_schema(D)
(song_id, embedding list<float32>[D], model_version, event_timestamp) and _config.yaml beside it;
model_version = htcl.pipeline.model_version(checkpoint). A rerun for the same version replaces
that version's shards (no duplicate rows).
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.datasource import FilenameProvider

from htcl import schema as S
from htcl.config import Config
from htcl.pipeline import out_path
from ray_jobs.common import (
    add_config_args,
    add_ray_args,
    default_workers,
    init_ray,
    job_banner,
    limit_torch_threads,
    parse_args,
    print_summary,
    save_resolved_config,
)


class PartFilenames(FilenameProvider):
    """part-<write uuid>-<task>.parquet, so `embeddings/<version>/part-*.parquet` finds the shards
    of either pipeline (the local one writes part-0.parquet)."""

    def __init__(self):
        super().__init__(file_format="parquet")

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{write_uuid}-{task_index:06d}.parquet"


class EmbedUDF:
    """Ray Data class UDF: loads the model once per actor; mel rows -> embedding rows."""

    def __init__(self, checkpoint: str, version: str, event_timestamp: datetime, n_mels: int,
                 use_gpu: bool = False, torch_threads: int = 1):
        import torch

        from htcl.training import model_from_checkpoint

        limit_torch_threads(torch_threads)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model, _, _ = model_from_checkpoint(checkpoint, map_location="cpu")
        self.model.to(self.device).eval()
        self.version, self.ts, self.n_mels = version, event_timestamp, n_mels
        self.schema = S.embeddings_schema(self.model.cfg.embed_dim)

    def __call__(self, batch: dict) -> pa.Table:
        import torch

        from htcl.audio import mel_batch, mel_from_bytes
        from htcl.towers import FEATURE, SHAPE, feature_from_row

        ids = [int(i) for i in batch[S.SONG_ID]]
        if FEATURE in batch:  # a backbone model: the locked tagger's cached patch features (C, P)
            mels = [feature_from_row(shape, b) for shape, b in zip(batch[SHAPE], batch[FEATURE])]
        else:
            mels = [mel_from_bytes(b, self.n_mels, int(n)) for b, n in zip(batch[S.MEL], batch[S.N_FRAMES])]
        mel, mask = mel_batch(mels)  # (B, M, F), (B, F)
        with torch.no_grad():
            emb = self.model.encode_audio(torch.as_tensor(mel, device=self.device),
                                          torch.as_tensor(mask, device=self.device))
        emb = emb.float().cpu().numpy().astype(np.float32)  # (B, D)
        return pa.table(
            {
                S.SONG_ID: pa.array(ids, pa.int64()),
                S.EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), emb.shape[1]),
                S.MODEL_VERSION: pa.array([self.version] * len(ids), pa.string()),
                S.EVENT_TIMESTAMP: pa.array([self.ts] * len(ids), pa.timestamp("us", tz="UTC")),
            },
            schema=self.schema,
        )


def detect_gpu(flag: bool | None) -> bool:
    """--gpu / --no-gpu, else: GPUs in the cluster."""
    if flag is not None:
        return flag
    from ray_jobs.common import cluster_resources

    return cluster_resources().get("GPU", 0) > 0


def run(cfg: Config, checkpoint: str | Path | None = None, workers: int | None = None,
        batch_size: int = 64, use_gpu: bool | None = None) -> dict:
    import ray

    from htcl.pipeline import model_version

    from htcl.pipeline import run_dir_name

    checkpoint = Path(checkpoint or out_path(cfg, run_dir_name(cfg, "finetune"), "model.pt")).resolve()
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    from htcl.config import config_from_dict
    from htcl.towers import FEATURE, SHAPE, audio_tower_spec, tower_dir
    from htcl.training import load_checkpoint

    ckpt_cfg = config_from_dict(load_checkpoint(checkpoint)["config"])
    if ckpt_cfg.model.audio_backbone == "none":
        inputs_dir, columns = out_path(cfg, "mels"), [S.SONG_ID, S.N_FRAMES, S.MEL]
    else:  # the same tower's cached features that training read
        inputs_dir = tower_dir(cfg.output_dir, audio_tower_spec(ckpt_cfg.model, ckpt_cfg.audio))
        columns = [S.SONG_ID, SHAPE, FEATURE]
    shards = sorted(str(p.resolve()) for p in inputs_dir.glob("*.parquet"))
    if not shards:
        raise FileNotFoundError(f"no input shards (*.parquet) in {inputs_dir}; run preprocess (and features) first")
    version = model_version(checkpoint)
    out_dir = out_path(cfg, "embeddings", version)
    for f in out_dir.glob("*.parquet"):  # a rerun replaces this version, never duplicates it
        f.unlink()
    use_gpu = detect_gpu(use_gpu)
    workers = default_workers(workers, use_gpu)
    now = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    # Reading is light: it must not wait for a CPU the actors hold.
    ds = ray.data.read_parquet(shards, ray_remote_args={"num_cpus": 0}).select_columns(columns)
    ds = ds.map_batches(
        EmbedUDF,
        fn_constructor_kwargs={"checkpoint": str(checkpoint), "version": version, "event_timestamp": now,
                               "n_mels": cfg.audio.n_mels, "use_gpu": use_gpu},
        batch_size=batch_size,
        # Autoscaling from 1: the file listing before the read takes a CPU, and a fixed pool that
        # holds every CPU of a small node would starve it (a deadlock on 2 cores).
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers),
        num_cpus=1,
        num_gpus=1 if use_gpu else 0,
    )
    ds.write_parquet(str(out_dir), filename_provider=PartFilenames(), ray_remote_args={"num_cpus": 0})
    elapsed = time.perf_counter() - t0
    save_resolved_config(cfg, out_dir, "_config.yaml")  # "_": Parquet readers skip it
    rows = sum(pq.read_metadata(f).num_rows for f in out_dir.glob("*.parquet"))
    # The matching index of this version, beside the embeddings (serving loads it by version).
    from htcl.pipeline import build_index

    index_dir = build_index(cfg, out_dir)
    return {
        "checkpoint": str(checkpoint),
        "model_version": version,
        "songs": rows,
        "workers": workers,
        "gpu": use_gpu,
        "seconds": round(elapsed, 2),
        "songs_per_s": round(rows / elapsed, 2) if elapsed > 0 and rows else None,
        "embeddings": str(out_dir),
        "index": str(index_dir),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ray_jobs.embed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--checkpoint", help="default: the config's stage-2 checkpoint (<output_dir>/finetune[_<backbone>]/model.pt)")
    add_ray_args(p)
    p.add_argument("--batch-size", type=int, default=64, help="songs per forward pass (default: %(default)s)")
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="one GPU per actor (default: when the cluster has GPUs)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args, cfg = parse_args(build_parser(), argv)
    started = init_ray(args.num_cpus)
    job_banner("embed")
    try:
        summary = run(cfg, args.checkpoint, args.workers, args.batch_size, args.gpu)
    finally:
        if started:
            import ray

            ray.shutdown()
    print_summary(summary)
    print(f"embeddings: {summary['embeddings']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
