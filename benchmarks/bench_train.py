"""Training step throughput on CPU, two modes.

--mode towers (default): locked towers with cached features, in ONE process, torch threads = 2.
htcl.training.train over htcl.pipeline.batch_stream (data building included) at configs/demo.yaml
sizes (batch 32, 30 s songs) on a synthetic world (random-word texts, random log-Mel), for:

  paper+text   model.audio_backbone=none model.text_trainable=true: today's demo step (the paper's
               audio encoder on log-Mel (128, 313), the MiniLM text tower trained at text_lr)
  paper+cached model.text_trainable=false: the BERT locked, its pooled output cached with
               htcl.pipeline.run_features (the real BERT, once); only the text projection trains
  backbone     model.audio_backbone=musicnn_msd model.text_trainable=false: random (1506, 10)
               cached musicnn patch features per song written into the tower folder (the tagger's
               lower layers never run in training), the same cached text features

and stage 2 (finetune, random <trigger, rec> pairs) for paper+text vs backbone. Configs are
interleaved and their order alternated over --repeats; each timing runs
max(--steps, --min-seconds / warmup step time) steps after --warmup untimed ones; samples/s is
the best repeat. Ratios: paper+cached / paper+text (goal >= 4x), backbone / paper+text (goal >=
10x). Also a per-step split (data, audio fwd/bwd, text fwd/bwd, loss and optimizer; manual timing,
median of --split-reps) per config and a torch.profiler top-ops table of the cached configs' steps.
Writes the "towers" key of --out (the Ray mode's keys are kept).

    python benchmarks/bench_train.py [--mode towers] [--steps 10] [--min-seconds 8] [--repeats 2]
        [--split-reps 5] [--no-stage2] [--threads 2]

--mode ray: Ray Train stage-1 throughput: samples/s of the whole training step with 1 and 2
workers (model.audio_backbone=none, model.text_trainable=true pinned: the step the Ray results
were measured on).

The real job (ray_jobs.train_loop.fit: TorchTrainer, gloo, gather-with-grad, gradient
all-reduce, batches built from mels and texts by each worker) on a synthetic world: random
log-Mel spectrograms at the config's song length and random-word song texts. The model is the
config's (demo: 4-layer, 256-wide audio Transformer on 30 s = 313 frames, the bundled MiniLM
text encoder over 96 tokens). Each run trains warmup + steps optimizer steps at the config's
global batch; samples/s is measured over the last `steps` steps from metrics.jsonl (global
samples over the sum of step times), so Ray start-up and the first steps are not counted.

On CPU the machine's cores are split over the workers (1 worker x all cores, 2 workers x half
each), so the ratio says what data parallelism over gloo costs or gains on one machine. On a
GPU (when torch.cuda.is_available()) it also measures the paper config in bf16 on all visible
GPUs, one worker each.

    python benchmarks/bench_train.py --mode ray [--steps 8] [--warmup 2] [--workers 1 2] [--repeats 2]
        [--out benchmarks/results/bench_train.json]

--mode gpu: the paper config (configs/paper.yaml: 120 s songs = 1251 frames, 12-layer 768-wide
audio Transformer, MiniLM trained over 256 tokens; model.audio_backbone=none) on ONE GPU,
htcl.training.train stage-1 steps on device-resident random batches (--gpu-batch songs), fp32
against bf16 autocast (train.precision). Attention runs through F.scaled_dot_product_attention
(nn.MultiheadAttention in the audio encoder, the BERT's "sdpa" implementation); each row lists
the SDPA kernels one step ran (torch.profiler: flash / efficient / cudnn / math) and whether the
step runs with the fused kernels alone. Without CUDA it prints one line, writes
{"skipped": true} (unless --out already holds a measured result) and exits 0.

    python benchmarks/bench_train.py --mode gpu [--gpu-batch 64] [--precisions fp32 bf16]
        [--min-seconds 8] [--repeats 2] [--out benchmarks/results/bench_train_gpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from htcl import schema as S  # noqa: E402
from htcl.config import load_config  # noqa: E402
from htcl.layout import Layout  # noqa: E402
from htcl.mels import mel_to_bytes, write_table  # noqa: E402
from htcl.model import HTCLModel  # noqa: E402

WORDS = (
    "amber river night dance golden echo silver rain heart city fire ocean dream light shadow "
    "storm velvet midnight summer winter neon forest crystal thunder"
).split()


def frames_for(cfg) -> int:
    hop = round(cfg.audio.sample_rate * cfg.audio.hop_ms / 1000)
    return 1 + int(cfg.audio.sample_rate * cfg.audio.max_seconds) // hop


def write_synthetic_world(root: Path, cfg, songs: int, seed: int = 0) -> None:
    """catalog.parquet (random-word texts) and mels/ (random log-Mel) for `songs` songs."""
    rng = np.random.default_rng(seed)
    n_frames = frames_for(cfg)
    words = lambda k: " ".join(rng.choice(WORDS, k))  # noqa: E731
    catalog = pd.DataFrame(
        {
            S.SONG_ID: np.arange(1, songs + 1, dtype=np.int64),
            S.AUDIO_PATH: [f"synthetic/{i}.flac" for i in range(1, songs + 1)],
            S.TITLE: [words(3) for _ in range(songs)],
            S.ARTIST: [words(2) for _ in range(songs)],
            S.TAGS: [", ".join(rng.choice(WORDS, 4)) for _ in range(songs)],
            S.LYRICS: [words(60) for _ in range(songs)],
        }
    )
    (root / "world").mkdir(parents=True, exist_ok=True)
    catalog.to_parquet(root / "world" / "catalog.parquet")
    rows = [
        {
            S.SONG_ID: i,
            S.N_FRAMES: n_frames,
            S.MEL: mel_to_bytes((rng.standard_normal((cfg.audio.n_mels, n_frames)) * 5 - 6).astype(np.float32)),
        }
        for i in range(1, songs + 1)
    ]
    write_table(rows, S.MELS_SCHEMA, Layout(root / "out").mels / "part-00000.parquet")


def measure(root: Path, config: str, workers: int, steps: int, warmup: int, use_gpu: bool, extra=()) -> dict:
    from ray_jobs.train_loop import fit

    cfg = load_config(
        REPO / "configs" / f"{config}.yaml",
        [
            f"output_dir={root / 'out'}",
            f"data.root={root / 'world'}",
            f"pretrain.max_steps={warmup + steps}",
            "pretrain.log_every=1",
            "pretrain.checkpoint_every=0",
            "pretrain.warmup_steps=1",
            f"pretrain.num_workers={workers}",
            f"pretrain.use_gpu={use_gpu}",
            "model.audio_backbone=none",
            "model.text_trainable=true",
            *extra,
        ],
    )
    if use_gpu:
        resources = None  # one GPU per worker; Ray's default CPU share
    else:
        resources = {"CPU": max(1, (os.cpu_count() or 1) // workers)}
    result = fit(cfg, "pretrain", resources_per_worker=resources)
    log = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in log if r["step"] > warmup]
    batch = cfg.pretrain.batch_size
    seconds = sum(batch / r["samples_per_s"] for r in timed)
    per_step = sorted(r["samples_per_s"] for r in timed)
    shutil.rmtree(result.storage, ignore_errors=True)
    return {
        "config": config,
        "device": torch.cuda.get_device_name() if use_gpu else "cpu",
        "precision": cfg.pretrain.precision if use_gpu else "fp32",
        "workers": workers,
        "cpus_per_worker": resources["CPU"] if resources else None,
        "global_batch": batch,
        "local_batch": batch // workers,
        "frames": frames_for(cfg),
        "steps_timed": len(timed),
        "samples_per_s": round(len(timed) * batch / seconds, 3),
        "step_samples_per_s_min_median_max": [
            round(per_step[0], 3),
            round(per_step[len(per_step) // 2], 3),
            round(per_step[-1], 3),
        ],
        "final_loss": round(log[-1]["loss"], 4),
        "run_seconds": round(result.seconds, 1),
    }


# --- towers mode: in-process steps of the paper / locked-text / backbone configs ---------------

TOWER_CONFIGS = {
    # name: (model.audio_backbone, model.text_trainable)
    "paper+text": ("none", True),
    "paper+cached": ("none", False),
    "backbone": ("musicnn_msd", False),
}
GOALS = {"paper+cached": 4.0, "backbone": 10.0}  # x over paper+text


def tower_config(root: Path, name: str):
    backbone, text_trainable = TOWER_CONFIGS[name]
    return load_config(
        REPO / "configs" / "demo.yaml",
        [
            f"output_dir={root / 'out'}",
            f"data.root={root / 'world'}",
            f"model.audio_backbone={backbone}",
            f"model.text_trainable={str(text_trainable).lower()}",
            "pretrain.checkpoint_every=0",
            "finetune.checkpoint_every=0",
        ],
    )


def write_tower_caches(root: Path, songs: int, seed: int = 1) -> dict:
    """The text cache through the real BERT (run_features), the musicnn cache as random
    (POOLED_DIM, patches) features per song (only the tagger's top runs in training)."""
    from htcl.musicnn import PATCH_FRAMES, POOLED_DIM
    from htcl.pipeline import run_features
    from htcl.towers import audio_tower_spec, feature_row, tower_dir, write_features, write_tower_spec

    t0 = time.perf_counter()
    run_features(tower_config(root, "paper+cached"))
    text_s = time.perf_counter() - t0
    cfg = tower_config(root, "backbone")
    # musicnn: 16 kHz, hop 256 -> 62.5 frames/s; one patch = PATCH_FRAMES frames
    n_patches = max(1, int(cfg.audio.max_seconds * 16000 / 256) // PATCH_FRAMES)
    spec = audio_tower_spec(cfg.model, cfg.audio)
    directory = tower_dir(cfg.output_dir, spec)
    rng = np.random.default_rng(seed)
    write_features(
        [
            feature_row(i, "synthetic", rng.standard_normal((POOLED_DIM, n_patches)).astype(np.float32))
            for i in range(1, songs + 1)
        ],
        directory,
    )
    write_tower_spec(directory, spec)
    return {"text_cache_seconds": round(text_s, 1), "audio_patches": n_patches, "audio_feature_dim": POOLED_DIM}


class Bench:
    """One config's model, optimizer and endless batch stream for a stage."""

    def __init__(self, root: Path, name: str, stage: str, songs: int):
        from htcl.pipeline import TrainingRows, batch_stream, stage_config, training_rows
        from htcl.text import SongTokenizer
        from htcl.training import TrainState, build_optimizer, seed_everything

        self.name, self.stage = name, stage
        self.cfg = cfg = tower_config(root, name)
        self.tcfg = stage_config(cfg, stage)
        seed_everything(0)
        rows = training_rows(cfg, "pretrain", verbose=False)
        if stage == "finetune":  # random <trigger, rec> pairs: the step's cost, not its data
            rng = np.random.default_rng(0)
            ids = rows.trigger
            rows = TrainingRows(
                "finetune",
                rows.mels,
                rows.texts,
                rng.choice(ids, 4 * len(ids)),
                rng.choice(ids, 4 * len(ids)),
                text_features=rows.text_features,
            )
        self.rows = rows
        self.tokenizer = SongTokenizer(cfg.model)
        self.model = HTCLModel(cfg.model, cfg.audio)
        self.state = TrainState(self.model, build_optimizer(self.model, self.tcfg))
        self.stream = batch_stream(rows, self.tokenizer, self.tcfg.batch_size, self.tcfg.seed)
        self.batch = self.tcfg.batch_size
        self.trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.step_s = None  # from the warmup

    def run(self, n: int) -> float:
        """n training steps through htcl.training.train; returns the seconds they took."""
        import dataclasses
        import itertools

        from htcl.training import train

        tcfg = dataclasses.replace(self.tcfg, max_steps=10**9, log_every=10**9, checkpoint_every=0)
        t0 = time.perf_counter()
        train(self.state, itertools.islice(self.stream, n), tcfg, self.stage)
        return time.perf_counter() - t0


def median_time(fn, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def step_split(b: Bench, reps: int = 3) -> dict:
    """Seconds per part of one stage-1 step (median of reps): batch building, the audio
    encoder's forward / backward, the text path's forward / backward (a fixed random direction
    as the loss, so each backward is its own tower's), the whole step, and the remainder."""
    from htcl.pipeline import make_batch
    from htcl.training import encode_text, stage1_forward

    model, rows = b.model, b.rows
    model.train()
    idx = np.arange(b.batch)
    batch = make_batch(rows, idx, b.tokenizer)
    data_s = median_time(lambda: make_batch(rows, idx, b.tokenizer), reps)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(b.batch, b.cfg.model.embed_dim, generator=g)

    def fwd_bwd(f):
        fwd, bwd = [], []
        for _ in range(reps):
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            z = f()
            t1 = time.perf_counter()
            (z * w).sum().backward()
            t2 = time.perf_counter()
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
        return float(np.median(fwd)), float(np.median(bwd))

    a_f, a_b = fwd_bwd(lambda: model.encode_audio(batch["mel"], batch["mel_mask"]))
    t_f, t_b = fwd_bwd(lambda: encode_text(model, batch))

    def whole():
        loss, _ = stage1_forward(model, batch, b.tcfg)
        b.state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), b.tcfg.grad_clip)
        b.state.optimizer.step()

    opt_s = median_time(b.state.optimizer.step, reps)  # grads of the last whole() / fwd_bwd
    step_s = median_time(whole, reps)
    model.zero_grad(set_to_none=True)
    r = lambda x: round(x, 4)  # noqa: E731
    return {
        "data_s": r(data_s),
        "audio_fwd_s": r(a_f),
        "audio_bwd_s": r(a_b),
        "text_fwd_s": r(t_f),
        "text_bwd_s": r(t_b),
        "optimizer_step_s": r(opt_s),
        "fwd_bwd_opt_step_s": r(step_s),
        "rest_s": r(step_s - a_f - a_b - t_f - t_b - opt_s),
    }


def profile_top(b: Bench, steps: int = 5, top: int = 8) -> list[dict]:
    """torch.profiler over `steps` training steps: the ops with the most self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        total = b.run(steps)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    spent = sum(e.self_cpu_time_total for e in events) or 1
    rows = [
        {
            "op": e.key,
            "self_cpu_ms_per_step": round(e.self_cpu_time_total / 1000 / steps, 2),
            "share": round(e.self_cpu_time_total / spent, 3),
            "calls_per_step": round(e.count / steps, 1),
        }
        for e in events[:top]
    ]
    # the optimizer's own label (AdamW over per-parameter tensors): its total, children included
    rows += [
        {
            "op": f"(total) {e.key}",
            "self_cpu_ms_per_step": round(e.cpu_time_total / 1000 / steps, 2),
            "share": round(e.cpu_time_total / spent, 3),
            "calls_per_step": round(e.count / steps, 1),
        }
        for e in events
        if e.key.startswith("Optimizer.step")
    ]
    return rows + [
        {
            "op": "(wall per step, profiled)",
            "self_cpu_ms_per_step": round(total / steps * 1000, 2),
            "share": None,
            "calls_per_step": None,
        }
    ]


def main_towers(args) -> int:
    torch.set_num_threads(args.threads)
    min_steps = args.steps or 10
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_train_towers_") as tmp:
        root = Path(tmp)
        write_synthetic_world(root, tower_config(root, "paper+text"), args.songs)
        cache = write_tower_caches(root, args.songs)
        plan = [(n, "pretrain") for n in TOWER_CONFIGS]
        if not args.no_stage2:
            plan += [("paper+text", "finetune"), ("backbone", "finetune")]
        benches = {key: Bench(root, key[0], key[1], args.songs) for key in plan}
        for b in benches.values():  # warmup; its step time sizes the timed runs
            b.step_s = b.run(args.warmup) / args.warmup
            b.n = int(min(args.max_timed_steps, max(min_steps, np.ceil(args.min_seconds / b.step_s))))
            print(f"warmup {b.name:<13}{b.stage:<9} {b.step_s:.3f} s/step -> {b.n} timed steps", flush=True)
        runs = []
        for rep in range(args.repeats):
            for key in plan if rep % 2 == 0 else plan[::-1]:
                b = benches[key]
                seconds = b.run(b.n)
                runs.append(
                    {
                        "config": b.name,
                        "stage": b.stage,
                        "repeat": rep,
                        "steps": b.n,
                        "samples_per_s": round(b.n * b.batch / seconds, 3),
                        "step_s": round(seconds / b.n, 4),
                        "load_1min": round(os.getloadavg()[0], 2),
                    }
                )
                print(
                    f"  {b.name:<13}{b.stage:<9} rep {rep}: {runs[-1]['samples_per_s']:>9.2f} samples/s "
                    f"({runs[-1]['step_s']:.3f} s/step, load {runs[-1]['load_1min']})",
                    flush=True,
                )
        splits = {f"{n}/pretrain": step_split(benches[(n, "pretrain")], reps=args.split_reps) for n in TOWER_CONFIGS}
        profiles = {
            f"{n}/pretrain": profile_top(benches[(n, "pretrain")], steps=5) for n in ("paper+cached", "backbone")
        }
    load_after = os.getloadavg()

    rows = []
    for key in plan:
        b = benches[key]
        mine = [r for r in runs if (r["config"], r["stage"]) == key]
        best = max(r["samples_per_s"] for r in mine)
        rows.append(
            {
                "config": b.name,
                "stage": b.stage,
                "audio_backbone": b.cfg.model.audio_backbone,
                "text_trainable": b.cfg.model.text_trainable,
                "backbone_train_top": b.cfg.model.backbone_train_top,
                "batch": b.batch,
                "trainable_params": b.trainable,
                "steps_timed": b.n,
                "samples_per_s": best,
                "step_s": round(b.batch / best, 4),
                "runs_samples_per_s": [r["samples_per_s"] for r in mine],
            }
        )
    for stage in ("pretrain", "finetune"):
        base = next((r for r in rows if r["stage"] == stage and r["config"] == "paper+text"), None)
        for r in rows:
            if base is not None and r["stage"] == stage:
                r["ratio_vs_paper+text"] = round(r["samples_per_s"] / base["samples_per_s"], 2)
                goal = GOALS.get(r["config"]) if stage == "pretrain" else None
                r["goal"] = goal
                r["goal_met"] = None if goal is None else bool(r["ratio_vs_paper+text"] >= goal)

    header = (
        f"{'config':<14}{'stage':<10}{'backbone':<13}{'text':<11}{'trainable':>11}{'steps':>6}"
        f"{'s/step':>8}{'samples/s':>11}{'ratio':>8}{'goal':>7}  met"
    )
    print()
    print(header)
    print("-" * len(header))
    for r in rows:
        goal = f">={r['goal']:g}x" if r.get("goal") else ""
        met = "" if r.get("goal_met") is None else ("yes" if r["goal_met"] else "NO")
        print(
            f"{r['config']:<14}{r['stage']:<10}{r['audio_backbone']:<13}"
            f"{'trainable' if r['text_trainable'] else 'cached':<11}{r['trainable_params']:>11,}{r['steps_timed']:>6}"
            f"{r['step_s']:>8.3f}{r['samples_per_s']:>11.2f}{str(r.get('ratio_vs_paper+text', '')):>8}{goal:>7}  {met}"
        )
    print(
        f"samples/s: best of {args.repeats} (order alternated), batch 32, torch threads {args.threads}; "
        "ratio: over paper+text of the same stage"
    )
    print(f"\nper-step split, stage 1 (s, median of {args.split_reps}; audio/text bwd = that tower's backward alone):")
    cols = [
        "data_s",
        "audio_fwd_s",
        "audio_bwd_s",
        "text_fwd_s",
        "text_bwd_s",
        "optimizer_step_s",
        "fwd_bwd_opt_step_s",
        "rest_s",
    ]
    names = ["data", "audio fwd", "audio bwd", "text fwd", "text bwd", "optim", "whole step", "rest"]
    print(f"{'config':<24}" + "".join(f"{c:>11}" for c in names))
    for k, sp in splits.items():
        print(f"{k:<24}" + "".join(f"{sp[c]:>11.4f}" for c in cols))
    for k, prof in profiles.items():
        print(f"\ntop ops by self CPU time, {k} (torch.profiler, 5 steps):")
        for e in prof:
            share = "" if e["share"] is None else f"{e['share']:.1%}"
            calls = "" if e["calls_per_step"] is None else e["calls_per_step"]
            print(f"  {e['op'][:44]:<45}{e['self_cpu_ms_per_step']:>9.2f} ms/step {share:>7} {calls:>7}")
    print(
        f"\nload average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f} on {os.cpu_count()} cores; "
        f"{time.perf_counter() - t_start:.0f} s in all"
    )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    previous["towers"] = {
        "mode": "towers",
        "command": "python benchmarks/bench_train.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": args.threads,
        "songs": args.songs,
        "frames": frames_for(tower_config(Path(tmp), "paper+text")),
        "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "note": (
            "in-process htcl.training.train over htcl.pipeline.batch_stream (batch building, forward, "
            "backward, clipping, AdamW); samples/s = best of the repeats; stage 2 on random pairs"
        ),
        "cache": cache,
        "rows": rows,
        "runs": runs,
        "step_split_s": splits,
        "profile_top_ops": profiles,
    }
    out.write_text(json.dumps(previous, indent=2))
    print(f"wrote {out} (key 'towers')")
    return 0


# --- gpu mode: the paper config on one GPU, fp32 vs bf16 autocast ------------------------------

ATTENTION_OPS = {  # aten op -> SDPA backend
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "cpu_flash",
}


def gpu_batch(cfg, batch: int, device: torch.device, seed: int) -> dict:
    """Random paper-sized stage-1 inputs on the device: log-Mel (B, 128, 1251) with a quarter of
    the songs 60 s shorter (padding masks as real batches have), token ids (B, text_max_length)."""
    g = torch.Generator().manual_seed(seed)
    n_frames, length = frames_for(cfg), cfg.model.text_max_length
    mask = torch.ones(batch, n_frames, dtype=torch.bool)
    mask[::4, n_frames // 2 :] = False
    att = torch.ones(batch, length, dtype=torch.long)
    att[1::2, length // 2 :] = 0
    return {
        k: v.to(device)
        for k, v in {
            "mel": torch.randn(batch, cfg.audio.n_mels, n_frames, generator=g) * 5 - 6,
            "mel_mask": mask,
            "input_ids": torch.randint(1000, 30000, (batch, length), generator=g),
            "attention_mask": att,
        }.items()
    }


def attention_backends(state, batches, tcfg, device) -> dict:
    """Which SDPA kernels one training step runs (torch.profiler's aten ops), and whether the step
    also runs with the fused kernels alone (sdpa_kernel without the math fallback)."""
    import dataclasses

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    from htcl.training import train

    one = dataclasses.replace(tcfg, max_steps=state.step + 1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        train(state, batches[:1], one, "pretrain", device=device)
    calls = {ATTENTION_OPS[e.key]: e.count for e in prof.key_averages() if e.key in ATTENTION_OPS}
    fused_only = None
    if device.type == "cuda":
        one = dataclasses.replace(tcfg, max_steps=state.step + 1)
        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
                train(state, batches[:1], one, "pretrain", device=device)
            fused_only = "ok"
        except RuntimeError as e:
            fused_only = f"failed: {str(e).splitlines()[0][:200]}"
    return {"sdpa_calls_per_step": calls, "fused_kernels_only_step": fused_only}


def main_gpu(args) -> int:
    """samples/s of htcl.training.train on the paper config, fp32 vs bf16 autocast, one device;
    a one-line skip (exit 0, JSON {"skipped": true}) without CUDA unless --device cpu asks for a
    smoke run of the same code on the CPU."""
    import dataclasses

    from htcl.training import TrainState, build_optimizer, seed_everything, train

    out = Path(args.out or REPO / "benchmarks" / "results" / "bench_train_gpu.json")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        reason = f"no CUDA device (torch {torch.__version__}, torch.cuda.is_available() False)"
        previous = json.loads(out.read_text()) if out.is_file() else {}
        if previous.get("rows"):  # never overwrite a measured result with a skip
            print(f"bench_train --mode gpu: skipped, {reason}; kept the measured {out}")
            return 0
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps(
                {
                    "benchmark": "bench_train",
                    "mode": "gpu",
                    "skipped": True,
                    "reason": reason,
                    "torch": torch.__version__,
                    "command": "python benchmarks/bench_train.py " + " ".join(sys.argv[1:]),
                },
                indent=2,
            )
        )
        print(f"bench_train --mode gpu: skipped, {reason}; wrote {out}")
        return 0

    cfg = load_config(
        REPO / "configs" / "paper.yaml", ["model.audio_backbone=none", "model.text_trainable=true", *args.set]
    )
    batch = args.gpu_batch
    batches = [gpu_batch(cfg, batch, device, seed) for seed in range(2)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows, t_start = [], time.perf_counter()
    for precision in args.precisions:
        tcfg = dataclasses.replace(
            cfg.pretrain,
            batch_size=batch,
            precision=precision,
            max_steps=10**9,
            log_every=10**9,
            checkpoint_every=0,
            warmup_steps=1,
        )
        seed_everything(0)
        model = HTCLModel(cfg.model, cfg.audio).to(device)
        state = TrainState(model, build_optimizer(model, tcfg))
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

        def run(n: int) -> float:
            sync()
            t0 = time.perf_counter()
            train(state, (batches[i % 2] for i in range(n)), tcfg, "pretrain", device=device)
            sync()
            return time.perf_counter() - t0

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        warm_s = run(args.warmup) / args.warmup
        n = int(min(args.max_timed_steps, max(args.steps or 10, np.ceil(args.min_seconds / warm_s))))
        seconds = min(run(n) for _ in range(args.repeats))
        row = {
            "config": "paper",
            "device": name,
            "precision": precision,
            "batch": batch,
            "frames": frames_for(cfg),
            "text_tokens": cfg.model.text_max_length,
            "steps_timed": n,
            "step_s": round(seconds / n, 4),
            "samples_per_s": round(n * batch / seconds, 2),
            "peak_memory_gb": (
                round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None
            ),
            **attention_backends(state, batches, tcfg, device),
        }
        rows.append(row)
        print(
            f"  {precision}: {row['samples_per_s']} samples/s ({row['step_s']} s/step), "
            f"SDPA {row['sdpa_calls_per_step']}, fused only: {row['fused_kernels_only_step']}",
            flush=True,
        )
        state = model = None  # free them before the next precision builds its own
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = rows[0]["samples_per_s"]
    for r in rows:
        r["ratio_vs_first"] = round(r["samples_per_s"] / base, 2)

    header = (
        f"{'device':<24}{'prec':<6}{'batch':>6}{'s/step':>9}{'samples/s':>11}{'ratio':>7}{'peak GB':>9}  SDPA kernels"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['device'][:23]:<24}{r['precision']:<6}{r['batch']:>6}{r['step_s']:>9.4f}{r['samples_per_s']:>11.2f}"
            f"{r['ratio_vs_first']:>7}{str(r['peak_memory_gb']):>9}  {r['sdpa_calls_per_step']}"
        )
    print(
        f"paper config (audio_backbone=none, text trained), stage 1, 1 device; best of {args.repeats}; "
        f"{time.perf_counter() - t_start:.0f} s in all"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "bench_train",
                "mode": "gpu",
                "skipped": False,
                "command": "python benchmarks/bench_train.py " + " ".join(sys.argv[1:]),
                "torch": torch.__version__,
                "cuda": torch.version.cuda,
                "device": name,
                "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                "tf32_cudnn": torch.backends.cudnn.allow_tf32,
                "note": (
                    "htcl.training.train (forward, backward, clip, AdamW) on device-resident random batches: "
                    "no data loading; sdpa_calls_per_step from torch.profiler's aten ops of one step"
                ),
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("towers", "ray", "gpu"), default="towers")
    ap.add_argument(
        "--steps", type=int, default=None, help="timed steps per run (ray: 8; towers: at least this many, default 10)"
    )
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="ray: worker counts")
    ap.add_argument("--repeats", type=int, default=2, help="runs per worker count / config, order alternated")
    ap.add_argument("--songs", type=int, default=128, help="synthetic songs (demo: 4 batches of 32)")
    ap.add_argument("--gpu-batch", type=int, default=64, help="ray, gpu: paper-config global batch on GPU")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], help="gpu: train.precision values")
    ap.add_argument("--device", default="cuda", help="gpu: cuda (skips without one) or cpu (a smoke run)")
    ap.add_argument("--set", nargs="*", default=[], help="gpu: config overrides (dotted) on configs/paper.yaml")
    ap.add_argument("--min-seconds", type=float, default=8.0, help="towers, gpu: each timing runs at least this long")
    ap.add_argument("--max-timed-steps", type=int, default=400, help="towers, gpu: cap on steps per timing")
    ap.add_argument("--threads", type=int, default=2, help="towers: torch.set_num_threads")
    ap.add_argument("--no-stage2", action="store_true", help="towers: skip the finetune rows")
    ap.add_argument("--split-reps", type=int, default=5, help="towers: repeats of each part of the per-step split")
    ap.add_argument(
        "--out", default=None, help="default benchmarks/results/bench_train.json (gpu: bench_train_gpu.json)"
    )
    args = ap.parse_args(argv)
    if args.mode == "gpu":
        return main_gpu(args)
    args.out = args.out or str(REPO / "benchmarks" / "results" / "bench_train.json")
    if args.mode == "towers":
        return main_towers(args)
    args.steps = args.steps or 8
    return main_ray(args)


def main_ray(args) -> int:
    import ray

    load_before = os.getloadavg()
    # A Ray instance of our own (never another one on this machine); workers import this checkout.
    ray.init(
        address="local",
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        demo_root = Path(tmp) / "demo"
        write_synthetic_world(demo_root, load_config(REPO / "configs" / "demo.yaml"), args.songs)
        # On a shared machine the load drifts: alternate the order (1, 2, 2, 1, ...) and average.
        runs = []
        for rep in range(args.repeats):
            for w in args.workers if rep % 2 == 0 else args.workers[::-1]:
                runs.append(
                    {
                        **measure(demo_root, "demo", w, args.steps, args.warmup, use_gpu=False),
                        "repeat": rep,
                        "load_1min": round(os.getloadavg()[0], 2),
                    }
                )
        for w in args.workers:
            mine = [r for r in runs if r["workers"] == w]
            rows.append(
                {
                    **mine[0],
                    "samples_per_s": round(float(np.mean([r["samples_per_s"] for r in mine])), 3),
                    "runs_samples_per_s": [r["samples_per_s"] for r in mine],
                    "steps_timed": sum(r["steps_timed"] for r in mine),
                }
            )
        base = rows[0]["samples_per_s"]
        for r in rows:
            r["ratio"] = round(r["samples_per_s"] / base, 3)
        if torch.cuda.is_available():
            paper_root = Path(tmp) / "paper"
            n_gpu = torch.cuda.device_count()
            batch = args.gpu_batch - args.gpu_batch % n_gpu
            write_synthetic_world(paper_root, load_config(REPO / "configs" / "paper.yaml"), batch * 2)
            gpu = measure(
                paper_root,
                "paper",
                n_gpu,
                args.steps,
                args.warmup,
                use_gpu=True,
                extra=[f"pretrain.batch_size={batch}", "pretrain.precision=bf16"],
            )
            gpu["ratio"] = None
            rows.append(gpu)
            runs.append(gpu)
    ray.shutdown()
    load_after = os.getloadavg()

    header = (
        f"{'config':<7}{'device':<22}{'prec':<6}{'workers':>8}{'cpu/w':>6}{'batch':>7}{'local':>6}"
        f"{'frames':>7}{'steps':>6}{'samples/s':>11}{'ratio':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['config']:<7}{r['device'][:21]:<22}{r['precision']:<6}{r['workers']:>8}{str(r['cpus_per_worker']):>6}"
            f"{r['global_batch']:>7}{r['local_batch']:>6}{r['frames']:>7}{r['steps_timed']:>6}"
            f"{r['samples_per_s']:>11}{str(r['ratio']):>7}"
        )
    print(
        "samples/s: mean over runs (order alternated); ratio: over the 1-worker CPU row (same global batch, same cores)"
    )
    for r in rows:
        if "runs_samples_per_s" in r:
            print(f"  {r['workers']} worker(s), each run: {r['runs_samples_per_s']}")
    print(f"load average (1 min) before {load_before[0]:.1f}, after {load_after[0]:.1f} on {os.cpu_count()} cores")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    out.write_text(
        json.dumps(
            {
                **({"towers": previous["towers"]} if "towers" in previous else {}),
                "benchmark": "bench_train",
                "torch": torch.__version__,
                "ray": ray.__version__,
                "machine": platform.machine(),
                "cpu_count": os.cpu_count(),
                "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
                "note": "samples/s of full training steps (data, forward, backward, all-reduce, AdamW) "
                "over the timed steps",
                "rows": rows,
                "runs": runs,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
