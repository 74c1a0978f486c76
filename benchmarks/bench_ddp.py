"""What DDP costs or saves against the old flat gradient all-reduce: 2 gloo processes on CPU.

The same training step in the same two processes, two ways of averaging the gradients over ranks:

  ddp   htcl.training.data_parallel: the stage's forward through DistributedDataParallel, whose
        reducer all-reduces each ~25 MB gradient bucket as soon as backward has filled it (on a
        background thread), so communication overlaps the rest of the backward;
  flat  the removed htcl.distributed.average_gradients: after backward returns, every gradient
        concatenated into one tensor, one all-reduce, copied back (no overlap).

Step = gathered-embedding loss (htcl.training.GLOBAL_LOSSES), backward, [flat all-reduce],
gradient clipping, AdamW: htcl.training.train's step without data loading. Inputs are random
log-Mel (the config's song length) and random token ids (model.text_max_length), built once.
The model is configs/demo.yaml's from-scratch audio encoder with the MiniLM text tower trained
(model.audio_backbone=none model.text_trainable=true): the largest gradient the demo trains
(~27 M parameters, ~110 MB per all-reduce). Modes alternate (ddp, flat, flat, ddp, ...) over
--repeats; each timing is the median step of --steps after a barrier per step. Also timed alone:
the flat all-reduce (what overlap could at best hide) and, for reference, one process's backward.

    python benchmarks/bench_ddp.py [--stages pretrain finetune] [--batch 16] [--steps 4]
        [--repeats 3] [--threads 1] [--out benchmarks/results/bench_train_ddp.json]

On 2 cores shared by both ranks (one torch thread each), gloo's communication thread competes
with the backward for the same cores, so little overlap gain is expected; on GPUs (nccl, its own
streams) the overlap is where multi-worker speed comes from.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORLD = 2
MODES = ("ddp", "flat")


def flat_all_reduce(parameters) -> None:
    """The removed htcl.distributed.average_gradients: average .grad over ranks in one flat
    all-reduce after backward."""
    grads = [p.grad for p in parameters if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def bench_config(overrides=()):
    from htcl.config import load_config

    return load_config(
        REPO / "configs" / "demo.yaml", ["model.audio_backbone=none", "model.text_trainable=true", *overrides]
    )


def local_batch(cfg, stage: str, n: int, seed: int) -> dict[str, torch.Tensor]:
    """Random inputs for n songs: log-Mel (n, M, F) at the config's song length, token ids (n, L)."""
    g = torch.Generator().manual_seed(seed)
    hop = round(cfg.audio.sample_rate * cfg.audio.hop_ms / 1000)
    frames = 1 + int(cfg.audio.sample_rate * cfg.audio.max_seconds) // hop
    length = cfg.model.text_max_length

    def mel():
        return torch.randn(n, cfg.audio.n_mels, frames, generator=g) * 5 - 6, torch.ones(n, frames, dtype=torch.bool)

    def text():
        return torch.randint(1000, 30000, (n, length), generator=g), torch.ones(n, length, dtype=torch.long)

    if stage == "pretrain":
        (m, mm), (ids, att) = mel(), text()
        return {"mel": m, "mel_mask": mm, "input_ids": ids, "attention_mask": att}
    (tm, tmm), (rm, rmm), (ids, att) = mel(), mel(), text()
    return {
        "trigger_mel": tm,
        "trigger_mask": tmm,
        "rec_mel": rm,
        "rec_mask": rmm,
        "rec_input_ids": ids,
        "rec_attention_mask": att,
    }


def _worker(rank: int, port: int, args, out_path: str) -> None:
    from htcl.model import HTCLModel
    from htcl.training import GLOBAL_LOSSES, StageEmbeddings, build_optimizer, data_parallel, seed_everything

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(args.threads)
    cfg = bench_config(args.set)
    results = {"runs": [], "flat_all_reduce_s": {}, "params": {}}
    try:
        for stage in args.stages:
            tcfg = getattr(cfg, stage)
            seed_everything(0)
            model = HTCLModel(cfg.model, cfg.audio).train()
            optimizer = build_optimizer(model, tcfg)
            batch = local_batch(cfg, stage, args.batch // WORLD, seed=rank)
            nets = {"ddp": data_parallel(model, stage), "flat": StageEmbeddings(model, stage)}
            assert isinstance(nets["ddp"], torch.nn.parallel.DistributedDataParallel)
            loss_of = GLOBAL_LOSSES[stage]

            def step(mode: str) -> dict:
                t0 = time.perf_counter()
                loss, _ = loss_of(nets[mode](batch), batch, tcfg)
                t1 = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                t2 = time.perf_counter()
                if mode == "flat":
                    flat_all_reduce(model.parameters())
                t3 = time.perf_counter()
                torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
                optimizer.step()
                t4 = time.perf_counter()
                return {"step_s": t4 - t0, "forward_s": t1 - t0, "backward_s": t2 - t1, "all_reduce_s": t3 - t2}

            for mode in MODES:  # warmup (DDP's static graph records its unused parameters on step 1)
                for _ in range(args.warmup):
                    dist.barrier()
                    step(mode)
            for rep in range(args.repeats):
                for mode in MODES if rep % 2 == 0 else MODES[::-1]:
                    parts = []
                    for _ in range(args.steps):
                        dist.barrier()
                        parts.append(step(mode))
                    median = {k: float(np.median([p[k] for p in parts])) for k in parts[0]}
                    results["runs"].append(
                        {"stage": stage, "mode": mode, "repeat": rep, **median, "load_1min": os.getloadavg()[0]}
                    )
            # The flat all-reduce alone, on the last step's gradients (what overlap could hide).
            times = []
            for _ in range(args.steps):
                dist.barrier()
                t0 = time.perf_counter()
                flat_all_reduce(model.parameters())
                times.append(time.perf_counter() - t0)
            results["flat_all_reduce_s"][stage] = float(np.median(times))
            with_grad = [p for p in model.parameters() if p.grad is not None]
            results["params"][stage] = {
                "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "with_grad": sum(p.numel() for p in with_grad),
                "gradient_mb": round(sum(p.numel() * p.element_size() for p in with_grad) / 2**20, 1),
            }
            nets = None  # free both wrappers before the next stage builds its own
        if rank == 0:
            torch.save(results, out_path)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", nargs="+", choices=("pretrain", "finetune"), default=["pretrain", "finetune"])
    ap.add_argument("--batch", type=int, default=16, help="global batch (each rank half)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per run (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per mode first")
    ap.add_argument("--repeats", type=int, default=3, help="runs per mode, order alternated")
    ap.add_argument(
        "--threads", type=int, default=max(1, (os.cpu_count() or 2) // WORLD), help="torch threads per rank"
    )
    ap.add_argument("--set", nargs="*", default=[], help="config overrides (dotted), e.g. audio.max_seconds=10")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bench_train_ddp.json"))
    args = ap.parse_args(argv)
    if args.batch % WORLD:
        ap.error(f"--batch must be divisible by {WORLD}")

    load_before = os.getloadavg()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_ddp_") as tmp:
        out_path = str(Path(tmp) / "rank0.pt")
        mp.spawn(_worker, args=(free_port(), args, out_path), nprocs=WORLD, join=True)
        results = torch.load(out_path, weights_only=False)
    load_after = os.getloadavg()

    rows = []
    for stage in args.stages:
        row = {
            "stage": stage,
            **results["params"][stage],
            "flat_all_reduce_alone_s": round(results["flat_all_reduce_s"][stage], 4),
        }
        for mode in MODES:
            mine = [r for r in results["runs"] if (r["stage"], r["mode"]) == (stage, mode)]
            row[mode] = {
                k: round(float(np.median([r[k] for r in mine])), 4)
                for k in ("step_s", "forward_s", "backward_s", "all_reduce_s")
            }
            row[mode]["runs_step_s"] = [round(r["step_s"], 4) for r in mine]
        row["ddp_over_flat_step"] = round(row["ddp"]["step_s"] / row["flat"]["step_s"], 3)
        rows.append(row)

    header = (
        f"{'stage':<10}{'mode':<6}{'step s':>9}{'fwd s':>8}{'bwd s':>8}{'all-red s':>10}"
        f"{'samples/s':>11}  runs (step s)"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        for mode in MODES:
            m = row[mode]
            print(
                f"{row['stage']:<10}{mode:<6}{m['step_s']:>9.3f}{m['forward_s']:>8.3f}{m['backward_s']:>8.3f}"
                f"{m['all_reduce_s']:>10.3f}{args.batch / m['step_s']:>11.2f}  {m['runs_step_s']}"
            )
        print(
            f"{row['stage']:<10}ddp/flat step time {row['ddp_over_flat_step']:.3f}; flat all-reduce alone "
            f"{row['flat_all_reduce_alone_s']:.3f} s for {row['gradient_mb']} MB of gradients "
            f"({row['with_grad']:,} of {row['trainable']:,} trainable parameters get one)"
        )
    print(
        f"median over {args.repeats} runs x {args.steps} steps (modes alternated), global batch {args.batch}, "
        f"{WORLD} gloo ranks x {args.threads} thread(s); ddp's all-reduce runs inside its backward"
    )
    print(
        f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f} on {os.cpu_count()} cores; "
        f"{time.perf_counter() - t_start:.0f} s in all"
    )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "bench_ddp",
                "command": "python benchmarks/bench_ddp.py " + " ".join(sys.argv[1:] if argv is None else argv),
                "torch": torch.__version__,
                "machine": platform.machine(),
                "cpu_count": os.cpu_count(),
                "world": WORLD,
                "threads_per_rank": args.threads,
                "global_batch": args.batch,
                "config": "configs/demo.yaml model.audio_backbone=none model.text_trainable=true " + " ".join(args.set),
                "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
                "note": (
                    "median step time (forward with gathered embeddings, backward, all-reduce, clip, AdamW; no data "
                    "loading) per mode; ddp's all-reduce is inside its backward_s, flat's is all_reduce_s"
                ),
                "rows": rows,
                "runs": results["runs"],
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
