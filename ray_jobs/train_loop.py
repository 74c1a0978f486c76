"""Ray Train glue shared by both stages: TorchTrainer over htcl.training.train.

Written against Ray Train V2 (the default in Ray 2.60: `RAY_TRAIN_V2_ENABLED` unset means on).
What V2 means here:
  - a lost worker (FailureConfig(max_failures)) restarts the whole worker group and every
    worker calls `train_loop_per_worker` again; `ray.train.get_checkpoint()` then returns the
    latest checkpoint reported in this run (None on a fresh start);
  - a driver that died is resumed by building the trainer again with the same
    RunConfig(storage_path, name) (no `Trainer.restore` in V2): pass the same `--run-name`
    (Ray's documented behaviour; the tests here exercise worker loss, not driver loss);
  - `ray.train.report` is a barrier every rank must reach the same number of times, only rank
    0's metrics are kept, and the checkpoint directories of all ranks are merged into one.
    We report only at checkpoints; per-step metrics go to metrics.jsonl from rank 0;
  - a reported checkpoint counts once the controller has collected every rank's report, on
    its next poll of the workers (every 2 s): a worker lost inside that window sends the run
    back to the checkpoint before (or to step 0), which the resume logic handles the same way.

Data: every worker reads from `output_dir` (a path all nodes see: a shared filesystem on a
multi-node cluster) and builds its own slice of each global batch from row indices split by rank
(htcl.pipeline.batch_stream), not from a Ray Data shard. Why: the contrastive batch must be the
same global batch whatever the world size (each rank exactly batch_size/world rows, rank-ordered,
so 2 workers compute the loss of 1 process over the same rows), and a resumed run must restart at
the exact batch of its checkpoint step; a streaming Ray Data split gives neither (uneven shards,
order not tied to the step). The audio inputs (mels, or a backbone's cached features) are not
loaded: a per-rank reader (htcl.streaming.ShardReader) indexes the shards' song_id columns and
reads only the rows of the rank's own slice, by Parquet row group, through an LRU of
`<stage>.reader_cache_rows` rows, READ_AHEAD_BATCHES slices ahead on a background thread; so a
worker's audio memory is the cache and the batches in flight, not the catalog (README,
"Running on a Ray cluster", has the measured figures). Song texts (and a locked text tower's cached
features) are still loaded whole: small beside the audio. The up-front NaN/inf check reads every
shard once, on the driver (`fit`), one row group at a time; workers check each row they read.

Besides the outputs of htcl.pipeline.run_train, the stage directory gets resumes.jsonl (one
line per restart from a checkpoint), metrics_discarded.jsonl (the log lines of steps that a
failed attempt did past its last checkpoint; metrics.jsonl keeps every step exactly once) and
workers.jsonl: one line per rank per (re)start of the worker group, written by that rank,
{"rank", "world_size", "node_id" (the Ray node's hex id), "pid", "start_step" (0 on a fresh start,
else the checkpoint's step), "time"}: which node each rank ran on in each attempt. A fresh start
empties it first (rank 0, then a barrier); each rank appends one line under 512 bytes with a single
O_APPEND write (whole lines on a local file system; on NFS appends from two hosts may interleave).

Placement: Ray's default PACK (the workers on as few nodes as fit). `--placement-strategy SPREAD`
(fit(placement_strategy=...)) asks for one worker per node where it can, and still runs where it
cannot: after a node is lost, the restarted group fits on what is left if that has the CPUs.
STRICT_SPREAD instead waits until there are as many nodes as workers.

Checkpoint directory (one per checkpoint step, merged over ranks):
    model.pt          htcl.training.save_checkpoint (model, optimizer, step, rank 0's RNG, config)
    config.yaml       beside it
    rng-rank<r>.pt    rank r's torch/numpy/python RNG state (r >= 1), so dropout resumes exactly
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from htcl.arguments import add_train_args, config_overrides
from htcl.config import (
    Config,
    ConfigError,
    TrainConfig,
    config_from_dict,
    load_config,
    replace,
    save_config,
    to_dict,
)
from htcl.files import write_atomically
from htcl.layout import CHECKPOINT, Layout
from htcl.pipeline import (
    TrainingSplit,
    batch_stream,
    init_model,
    run_dir_name,
    stage_config,
    training_rows,
    validation_batches,
)
from htcl.text import SongTokenizer
from htcl.training import (
    JsonlLogger,
    TrainState,
    build_optimizer,
    read_jsonl,
    resume,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    train,
)

METRICS = "metrics.jsonl"
RESUMES = "resumes.jsonl"  # one line per restart from a checkpoint: when, from which step
DISCARDED = "metrics_discarded.jsonl"  # log lines of steps redone after a restart
BEST = "best.pt"  # train.save_best: the lowest validation loss so far (rank 0 writes it)
WORKERS = "workers.jsonl"  # one line per rank per (re)start: which node and process ran it
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # of a Ray placement group


# --- inside each worker --------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerContext:
    """Who a training worker is in this attempt: what a batch wrapper (fit's batch_wrapper) is given."""

    rank: int
    world_size: int
    start_step: int  # 0 on a fresh start, else the step of the checkpoint resumed from
    run_dir: Path  # the stage directory: metrics.jsonl and the other logs


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train

    cfg = config_from_dict(config["cfg"])
    stage = config["stage"]
    tcfg = stage_config(cfg, stage)
    run_dir = Path(config["run_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = _device_and_threads(tcfg.use_gpu)
    print(f"[{stage}] worker rank {rank}/{world} pid {os.getpid()} on {device}, {torch.get_num_threads()} threads")

    seed_everything(tcfg.seed)  # every rank builds the same initial model
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = _resume_state(checkpoint, tcfg, rank, device)
        if rank == 0:
            dropped = _record_resume(run_dir, state.step, world)
            print(f"[{stage}] resumed from checkpoint at step {state.step} ({dropped} log lines past it dropped)")
    else:
        state = _fresh_state(cfg, stage, tcfg, config.get("init_from"), rank)
        if rank == 0:
            _clear_run_logs(run_dir)
    if world > 1:  # rank 0 has emptied workers.jsonl on a fresh start before any rank writes to it
        import ray.train.collective

        ray.train.collective.barrier()
    node = _record_worker(run_dir, rank, world, state.step)["node_id"]
    print(f"[{stage}] rank {rank}/{world} on node {node} from step {state.step}")
    if device.type != "cpu":
        _move_to(state, device)
    worker = WorkerContext(rank, world, state.step, run_dir)
    _train_worker(
        cfg,
        stage,
        tcfg,
        state,
        worker,
        device,
        config.get("batch_wrapper"),
        config.get("batch_wrapper_args"),
        Path(config["split"]),
    )


def _device_and_threads(use_gpu: bool) -> torch.device:
    """This worker's GPU (Ray sets CUDA_VISIBLE_DEVICES), or the CPU with as many torch threads as
    CPUs Ray gave this worker (not all of the node's)."""
    import ray

    if use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if device.type == "cpu":
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if cpus:
            torch.set_num_threads(max(1, int(cpus)))
    return device


def _rank_seed(seed: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def _seed_other_rank(seed: int, rank: int, step: int = 0) -> None:
    """Ranks > 0 draw their own dropout masks (rank 0 keeps the one-process stream): seeded from
    the rank, and from the step when there is no saved state to restore."""
    seed_everything(_rank_seed(seed, rank) + step)


def _fresh_state(cfg: Config, stage: str, tcfg: TrainConfig, init_from: str | None, rank: int) -> TrainState:
    """The initial model (the same on every rank: seeded before) and its optimizer; then this rank's RNG."""
    model = init_model(cfg, stage, init_from)
    state = TrainState(model, build_optimizer(model, tcfg))
    if rank > 0:
        _seed_other_rank(tcfg.seed, rank)
    return state


def _resume_state(checkpoint, tcfg: TrainConfig, rank: int, device: torch.device) -> TrainState:
    """Model, optimizer, step and this rank's RNG from a Ray Train checkpoint (module docstring)."""
    with checkpoint.as_directory() as d:
        state, _, _ = resume(Path(d) / CHECKPOINT, tcfg, map_location=device)  # sets rank 0's RNG
        if rank > 0:
            _restore_rank_rng(Path(d), rank, tcfg.seed, state.step)
    return state


def _restore_rank_rng(checkpoint_dir: Path, rank: int, seed: int, step: int) -> None:
    """Rank r's RNG from rng-rank<r>.pt; a rank the checkpoint had not (resumed with more workers
    than it was saved with) is seeded from its rank and the step."""
    rng_file = checkpoint_dir / f"rng-rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        _seed_other_rank(seed, rank, step)


def _clear_run_logs(run_dir: Path) -> None:
    """A fresh start (rank 0): the logs of an earlier run of this stage directory go."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in (METRICS, RESUMES, DISCARDED, BEST, WORKERS):
        (run_dir / name).unlink(missing_ok=True)


def _record_resume(run_dir: Path, step: int, world: int) -> int:
    """A restart from the checkpoint at `step` (rank 0): metrics.jsonl cut back to it, one line
    in resumes.jsonl. Returns how many log lines were past it."""
    dropped = _truncate_metrics(run_dir, step)
    record = {"step": step, "world_size": world, "dropped_log_lines": dropped, "time": time.time()}
    with (run_dir / RESUMES).open("a") as f:
        f.write(json.dumps(record) + "\n")
    return dropped


def _truncate_metrics(run_dir: Path, step: int) -> int:
    """Keep only the records up to `step` (the checkpoint resumed from) in metrics.jsonl.

    The records past it (steps the failed attempt did but the checkpoint does not hold) move
    to metrics_discarded.jsonl, so the log shows every step once and nothing is lost silently.
    Returns how many records moved.
    """
    path = run_dir / METRICS
    records = read_jsonl(path)
    kept = [r for r in records if r["step"] <= step]
    dropped = [r for r in records if r["step"] > step]
    if dropped:
        with (run_dir / DISCARDED).open("a") as f:
            f.writelines(json.dumps({**r, "discarded_on_resume_from": step}) + "\n" for r in dropped)
    write_atomically(path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in kept)))
    return len(dropped)


def _record_worker(run_dir: Path, rank: int, world: int, start_step: int) -> dict:
    """Append this rank's line to workers.jsonl (one write, O_APPEND: ranks append concurrently)."""
    from ray_jobs.common import current_node_id

    record = {
        "rank": rank,
        "world_size": world,
        "node_id": current_node_id(),
        "pid": os.getpid(),
        "start_step": start_step,
        "time": time.time(),
    }
    fd = os.open(run_dir / WORKERS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)
    return record


def _move_to(state: TrainState, device: torch.device) -> None:
    """Model and optimizer state onto the device (resume() loads both on the CPU)."""
    state.model.to(device)
    for st in state.optimizer.state.values():
        for k, v in st.items():
            if torch.is_tensor(v) and k != "step":  # AdamW keeps its step count on the CPU
                st[k] = v.to(device)


def _wrap_batches(batches: Iterator[dict], wrapper: str | None, args: dict | None, worker: WorkerContext):
    """`module:function` (fit's batch_wrapper) imported and applied: function(batches, worker, **args)."""
    if not wrapper:
        return batches
    module, _, name = wrapper.partition(":")
    return getattr(importlib.import_module(module), name)(batches, worker, **(args or {}))


def _train_worker(
    cfg: Config,
    stage: str,
    tcfg: TrainConfig,
    state: TrainState,
    worker: WorkerContext,
    device: torch.device,
    batch_wrapper: str | None,
    batch_wrapper_args: dict | None,
    split_path: Path,
) -> None:
    """htcl.training.train from state.step on this rank's slice of each global batch; rank 0 logs
    and keeps the best model; every rank reports at each checkpoint (module docstring)."""
    rank, run_dir = worker.rank, worker.run_dir
    # fit() checked the inputs (reads check every row again) and planned the rows
    rows = training_rows(cfg, stage, verbose=False, check_inputs=False, split=TrainingSplit.load(split_path))
    tokenizer = SongTokenizer(cfg.model)
    batches = batch_stream(
        rows, tokenizer, tcfg.batch_size, tcfg.seed, start_step=state.step, rank=rank, world=worker.world_size
    )
    batches = _wrap_batches(batches, batch_wrapper, batch_wrapper_args, worker)

    # Every rank scores the same validation batches on its own (no collective); rank 0 logs.
    val_batches = validation_batches(rows, tokenizer, tcfg.batch_size, tcfg.val_max_rows)
    on_best, best_val_loss = None, float("inf")
    if rank == 0 and tcfg.save_best:
        on_best = lambda s: save_checkpoint(run_dir / BEST, s, cfg, stage)  # noqa: E731
        logged = [r["val_loss"] for r in read_jsonl(run_dir / METRICS) if "val_loss" in r]  # a resumed run's best
        best_val_loss = min(logged, default=float("inf"))

    last: dict[str, Any] = {}  # the latest log record: its losses go with the next checkpoint's report
    logger = JsonlLogger(run_dir / METRICS) if rank == 0 else None

    def on_log(record: dict) -> None:
        last.clear()
        last.update(record)
        if logger is not None:
            logger(record)

    train(
        state,
        batches,
        tcfg,
        stage,
        device=device,
        on_log=on_log,
        on_checkpoint=lambda s: _report_checkpoint(s, cfg, stage, rank, last),
        val_batches=val_batches,
        on_best=on_best,
        best_val_loss=best_val_loss,
    )


def _report_checkpoint(state: TrainState, cfg: Config, stage: str, rank: int, last: dict[str, Any]) -> None:
    """ray.train.report of this rank's part of the checkpoint at state.step: model.pt from rank 0,
    rng-rank<r>.pt from the others (Ray merges the directories), with the latest losses."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as d:
        if rank == 0:
            save_checkpoint(Path(d) / CHECKPOINT, state, cfg, stage)
        else:
            torch.save(rng_state(), Path(d) / f"rng-rank{rank}.pt")
        metrics = {"step": state.step, **{k: v for k, v in last.items() if k.startswith(("loss", "top1", "val_"))}}
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d), checkpoint_dir_name=f"step-{state.step:08d}")


# --- on the driver -------------------------------------------------------------------------


def absolute_paths(cfg: Config) -> Config:
    """output_dir and data.root as absolute paths: workers may run in another directory."""
    return replace(
        cfg,
        output_dir=str(Path(cfg.output_dir).expanduser().resolve()),
        data=replace(cfg.data, root=str(Path(cfg.data.root).expanduser().resolve())),
    )


@dataclass
class FitResult:
    checkpoint: Path  # <output_dir>/<stage dir>/model.pt
    run_dir: Path
    storage: Path  # Ray Train's run folder (all checkpoints kept)
    run_name: str
    seconds: float


def fit(
    cfg: Config,
    stage: str,
    init_from: str | Path | None = None,
    *,
    run_name: str | None = None,
    resources_per_worker: dict | None = None,
    placement_strategy: str = "PACK",
    batch_wrapper: str | None = None,
    batch_wrapper_args: dict | None = None,
) -> FitResult:
    """Train one stage with Ray Train; writes the same outputs as htcl.pipeline.run_train.

    placement_strategy: of the workers' placement group (PLACEMENT_STRATEGIES; module docstring).
    batch_wrapper: "module:function", imported in each worker, which wraps that worker's batch
        iterator: function(batches, worker: WorkerContext, **batch_wrapper_args) -> batches. The
        batches are this rank's slices, from the step the attempt starts at. An extension point for
        what watches or interrupts training from inside a worker (tests/fault_injection.py kills
        one); the module must be importable on every worker (from the job's working_dir or
        PYTHONPATH). No command-line flag or config key sets it.
    """
    if placement_strategy not in PLACEMENT_STRATEGIES:
        raise ValueError(f"placement_strategy={placement_strategy!r}: one of {', '.join(PLACEMENT_STRATEGIES)}")
    if batch_wrapper is not None and ":" not in batch_wrapper:
        raise ValueError(f"batch_wrapper={batch_wrapper!r}: expected 'module:function'")
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = absolute_paths(cfg)
    tcfg = stage_config(cfg, stage)
    run_dir = Layout.of(cfg).run(run_dir_name(cfg, stage))
    run_dir.mkdir(parents=True, exist_ok=True)
    if stage == "finetune":
        init_from = Path(init_from or Layout.of(cfg).checkpoint(run_dir_name(cfg, "pretrain"))).expanduser().resolve()
        if not init_from.is_file():
            raise FileNotFoundError(
                f"stage-1 checkpoint not found: {init_from} (run pretrain first or pass --init-from)"
            )
    if tcfg.batch_size % tcfg.num_workers:
        raise ValueError(
            f"{stage}.batch_size={tcfg.batch_size} must be divisible by {stage}.num_workers={tcfg.num_workers}"
        )
    # Here, once, not in every worker: a NaN/inf input or a stale text feature refused before any
    # worker starts, naming the song (workers still check every row they read), and the rows
    # planned, which workers load: they never read the catalog or the interaction log.
    split_path = training_rows(cfg, stage).split().save(Layout.of(cfg).training_split(run_dir.name))
    run_name = run_name or f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    storage = Layout.of(cfg).ray_train
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": to_dict(cfg),
            "stage": stage,
            "run_dir": str(run_dir),
            "split": str(split_path),
            "init_from": str(init_from) if init_from else None,
            "batch_wrapper": batch_wrapper,
            "batch_wrapper_args": batch_wrapper_args,
        },
        scaling_config=ScalingConfig(
            num_workers=tcfg.num_workers,
            use_gpu=tcfg.use_gpu,
            resources_per_worker=resources_per_worker,
            placement_strategy=placement_strategy,
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=tcfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    t0 = time.perf_counter()
    result = trainer.fit()  # raises TrainingFailedError once max_failures is spent
    seconds = time.perf_counter() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"{stage}: the run reported no checkpoint ({result.path})")
    ckpt_path = run_dir / CHECKPOINT
    with result.checkpoint.as_directory() as d:
        write_atomically(ckpt_path, lambda tmp: shutil.copyfile(Path(d) / CHECKPOINT, tmp))
    save_config(cfg, run_dir / "config.yaml")
    from htcl.plots import plot_training_curves

    plot_training_curves([run_dir / METRICS], run_dir / "training_curves.png")
    return FitResult(ckpt_path, run_dir, storage / run_name, run_name, seconds)


# --- command line --------------------------------------------------------------------------


def build_parser(stage: str, doc: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m ray_jobs.{stage}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_train_args(p, stage)
    p.add_argument(
        "--run-name",
        help="Ray Train run name (default: <stage dir>-<time>); "
        "the same name again resumes that run from its last checkpoint",
    )
    p.add_argument(
        "--placement-strategy",
        choices=PLACEMENT_STRATEGIES,
        default="PACK",
        help="Ray placement of the workers (default: %(default)s); SPREAD: one per node where it can",
    )
    return p


def main(stage: str, argv: Sequence[str] | None = None, doc: str | None = None) -> Path:
    """Parse `--config C [overrides]` (+ finetune's options), train, print and return model.pt's path.

    A bad config or override exits with status 2 and the reason on stderr (as argparse does).
    """
    args = build_parser(stage, doc).parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        cfg = load_config(args.config, config_overrides(args))
    except ConfigError as e:
        print(f"{stage}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    result = fit(
        cfg, stage, getattr(args, "init_from", None), run_name=args.run_name, placement_strategy=args.placement_strategy
    )
    print(f"{stage} checkpoint: {result.checkpoint}  (Ray Train run {result.run_name}, {result.seconds:.1f} s)")
    # Where each rank ran in each attempt (workers.jsonl, in the order the ranks started).
    placed = [{k: r[k] for k in ("start_step", "rank", "node_id")} for r in read_jsonl(result.run_dir / WORKERS)]
    print(f"{stage} workers: {json.dumps(placed)}", flush=True)
    return result.checkpoint
