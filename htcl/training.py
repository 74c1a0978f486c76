"""Training: one plain loop for both stages over any iterable of batches (torchtune style).

Batches are dicts of tensors:
  stage 1: mel (B, M, F), mel_mask (B, F), input_ids (B, L), attention_mask (B, L)
  stage 2: trigger_mel, trigger_mask, rec_mel, rec_mask, rec_input_ids, rec_attention_mask
With a backbone model, "mel" holds the tagger's cached pooled patch features (B, C, P) and the
masks are (B, P); with a locked text tower, text_features (B, H) (rec_text_features in stage 2)
replace the token ids.
The loop knows nothing of Ray: the Ray Train job passes its dataset shard as `batches`, and
`on_log` / `on_checkpoint` callbacks to report metrics and checkpoints. With a process group
initialized, `train` wraps the stage's forward (StageEmbeddings: batch -> embeddings) in DDP
itself, so callers pass and checkpoint the bare model.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from htcl.config import Config, TrainConfig, config_from_dict, save_config, to_dict
from htcl.distributed import all_reduce_mean, gather_ids, gather_with_grad, is_distributed, rank_and_world
from htcl.files import write_atomically
from htcl.losses import in_batch_top1, info_nce, stage2_loss
from htcl.model import HTCLModel

STAGES = ("pretrain", "finetune")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _no_weight_decay(name: str, p: nn.Parameter) -> bool:
    # open_clip's rule: no decay on biases, norms, embeddings/positions and the logit scale.
    return p.ndim < 2 or "logit_scale" in name or name.endswith(".pos") or name.endswith(".cls")


def build_optimizer(model: HTCLModel, tcfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with separate groups: the pre-trained BERT at text_lr, the pretrained audio
    backbone's top at backbone_lr, the rest at lr; decay split. Locked parameters are left out."""
    part_of = {id(p): part for part, params in model.parameter_groups().items() for p in params}
    lrs = {"text": tcfg.text_lr, "backbone": tcfg.backbone_lr, "other": tcfg.lr}
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (part_of[id(p)], not _no_weight_decay(name, p))
        groups.setdefault(key, []).append(p)
    param_groups = [
        {
            "name": f"{part}{'' if decay else '_no_decay'}",
            "params": params,
            "lr": lrs[part],
            "weight_decay": tcfg.weight_decay if decay else 0.0,
        }
        for (part, decay), params in sorted(groups.items())
    ]
    for g in param_groups:
        g["initial_lr"] = g["lr"]
    return torch.optim.AdamW(param_groups, betas=tcfg.betas, eps=tcfg.eps)


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Linear warmup to 1 over warmup_steps, then cosine decay to min_lr_ratio at max_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * factor


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full fp32. "auto" = bf16 on GPU, fp32 on CPU."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
    if precision not in table:
        raise ValueError(f"train.precision={precision!r}: expected auto, bf16, fp16 or fp32")
    return table[precision]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def encode_text(model: HTCLModel, batch: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
    """Text embeddings from a locked tower's cached features (`<prefix>text_features`, (B, H))
    when the batch has them, else from token ids through the BERT."""
    if f"{prefix}text_features" in batch:
        return model.encode_text_features(batch[f"{prefix}text_features"])
    return model.encode_text(batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"])


def _local(x: torch.Tensor) -> torch.Tensor:
    return x


def stage1_embeddings(model: HTCLModel, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's stage-1 embeddings and the logit scale: every parameter the loss uses."""
    return {
        "audio": model.encode_audio(batch["mel"], batch["mel_mask"]),  # (B, D)
        "text": encode_text(model, batch),  # (B, D)
        "scale": model.scale(),  # ()
    }


def stage1_global_loss(
    z: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], tcfg: TrainConfig, gather: bool = True
):
    """Audio-text InfoNCE over the global batch (gather=False: over this rank's batch alone,
    no collective: validation). Returns (loss, metrics)."""
    g = gather_with_grad if gather else _local
    z_audio, z_text = g(z["audio"]), g(z["text"])  # (world*B, D)
    loss = info_nce(z_audio.float(), z_text.float(), z["scale"])
    metrics = {"loss_at": loss.detach(), "top1_at": in_batch_top1(z_audio, z_text)}
    return loss, metrics


def stage2_embeddings(model: HTCLModel, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's ⟨trigger audio, rec audio, rec text, rec fused⟩ embeddings and the logit
    scale. The audio encoder runs twice (trigger and rec): one forward, one backward per step.
    Trigger first, then rec, then text: the order dropout draws its masks in (a fixed seed's run)."""
    z_ta = model.encode_audio(batch["trigger_mel"], batch["trigger_mask"])  # (B, D)
    z_ra = model.encode_audio(batch["rec_mel"], batch["rec_mask"])  # (B, D)
    z_rt = encode_text(model, batch, "rec_")  # (B, D)
    return {
        "trigger_audio": z_ta,
        "rec_audio": z_ra,
        "rec_text": z_rt,
        "rec_fused": model.fuse(z_ra, z_rt),  # (B, D)
        "scale": model.scale(),  # ()
    }


def stage2_global_loss(
    z: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], tcfg: TrainConfig, gather: bool = True
):
    """Weighted L_aa + L_af + L_at over the global batch (gather: as stage1_global_loss)."""
    g, gi = (gather_with_grad, gather_ids) if gather else (_local, _local)
    z_ta, z_ra, z_rt, z_rf = (g(z[k]).float() for k in ("trigger_audio", "rec_audio", "rec_text", "rec_fused"))
    ids = {}
    if "trigger_ids" in batch:  # (B,) song ids: repeated songs are not negatives
        ids = {"trigger_ids": gi(batch["trigger_ids"]), "rec_ids": gi(batch["rec_ids"])}
    pref = tcfg.pref_logit_scale if tcfg.pref_logit_scale > 0 else None
    loss, parts = stage2_loss(
        z_ta, z_ra, z_rf, z_rt, z["scale"], w_aa=tcfg.w_aa, w_af=tcfg.w_af, w_at=tcfg.w_at, pref_logit_scale=pref, **ids
    )
    metrics = {k: v.detach() for k, v in parts.items()}
    metrics["top1_aa"] = in_batch_top1(z_ta, z_ra)
    metrics["top1_at"] = in_batch_top1(z_ra, z_rt)
    return loss, metrics


EMBEDDINGS = {"pretrain": stage1_embeddings, "finetune": stage2_embeddings}
GLOBAL_LOSSES = {"pretrain": stage1_global_loss, "finetune": stage2_global_loss}


def stage1_forward(model: HTCLModel, batch: dict[str, torch.Tensor], tcfg: TrainConfig, gather: bool = True):
    """Audio-text InfoNCE: stage1_embeddings then stage1_global_loss. Returns (loss, metrics)."""
    return stage1_global_loss(stage1_embeddings(model, batch), batch, tcfg, gather)


def stage2_forward(model: HTCLModel, batch: dict[str, torch.Tensor], tcfg: TrainConfig, gather: bool = True):
    """⟨trigger audio, rec audio, rec text⟩ triplets: stage2_embeddings then stage2_global_loss."""
    return stage2_global_loss(stage2_embeddings(model, batch), batch, tcfg, gather)


FORWARDS = {"pretrain": stage1_forward, "finetune": stage2_forward}


class StageEmbeddings(nn.Module):
    """A stage's whole forward as one module: batch -> this rank's embeddings and logit scale.

    What DDP wraps: every parameter the loss touches is used inside this one forward call, so
    DDP's reducer is prepared for the step's single backward, and it all-reduces each gradient
    bucket as soon as backward has filled it (overlapping communication with the rest of the
    backward). The gather and the loss run outside, on the returned embeddings.
    """

    def __init__(self, model: HTCLModel, stage: str):
        super().__init__()
        if stage not in EMBEDDINGS:
            raise ValueError(f"stage={stage!r}: expected one of {STAGES}")
        self.model = model
        self.stage = stage

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return EMBEDDINGS[self.stage](self.model, batch)


def data_parallel(model: HTCLModel, stage: str, device: torch.device | str = "cpu") -> nn.Module:
    """The stage's forward module, wrapped in DistributedDataParallel when a process group with
    more than one rank is initialized (gloo on CPU, nccl on GPU); unwrapped otherwise.

    DDP averages the gradients over ranks, which with gathered embeddings gives exactly the
    one-process gradient over the global batch (htcl.distributed). Settings, and why:
      static_graph=True: every step uses the same parameters, but some trainable ones never get
        a gradient (stage 1 never runs the fusion layer; the BERT's pooler is computed but we pool
        its hidden states ourselves; musicnn's tag layer when backbone_train_top). Without it DDP
        would wait for them forever; find_unused_parameters=True would also work but walks the
        autograd graph every step, where a static graph records the unused set once (step 1).
        Globally unused parameters keep grad None, as without DDP (so AdamW skips them).
      forward_sync_buffers=False: no buffer changes in training (the locked tagger's batch norm
        stays in eval mode; the BERT's buffers are constants), so rank 0's are sent once, when DDP
        is built, not before every forward.
    The wrapped model stays `model` (checkpoints save it, no "module." prefixes).
    """
    device = torch.device(device)
    net = StageEmbeddings(model, stage)
    if not is_distributed():
        return net
    device_ids = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    )
    return nn.parallel.DistributedDataParallel(
        net, device_ids=device_ids, forward_sync_buffers=False, static_graph=True
    )


@torch.no_grad()
def validate(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    tcfg: TrainConfig,
    stage: str,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """The stage's loss and metrics on fixed held-out batches, averaged over them, as
    {"val_loss", "val_<metric>"}: eval mode (no dropout, so no RNG is drawn), no gradient, no
    collective (each rank scores every batch itself), then back to the mode it was in."""
    device = torch.device(device)
    net = unwrap(model)
    was_training = net.training
    net.eval()
    sums: dict[str, float] = {}
    try:
        for batch in batches:
            with autocast(device, amp_dtype):
                loss, metrics = FORWARDS[stage](net, to_device(batch, device), tcfg, gather=False)
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
    finally:
        net.train(was_training)
    return {f"val_{k}": v / len(batches) for k, v in sums.items()} if batches else {}


@dataclass
class TrainState:
    model: HTCLModel
    optimizer: torch.optim.Optimizer
    step: int = 0  # optimizer steps done


def unwrap(model: nn.Module) -> HTCLModel:
    """The HTCLModel inside DDP and/or StageEmbeddings (or the model itself)."""
    while not isinstance(model, HTCLModel):
        if isinstance(model, StageEmbeddings):
            model = model.model
        elif isinstance(getattr(model, "module", None), nn.Module):  # DDP
            model = model.module
        else:
            break
    return model


def train(
    state: TrainState,
    batches: Iterable[dict[str, torch.Tensor]],
    tcfg: TrainConfig,
    stage: str,
    *,
    device: torch.device | str = "cpu",
    on_log: Callable[[dict], None] | None = None,
    on_checkpoint: Callable[[TrainState], None] | None = None,
    val_batches: Sequence[dict[str, torch.Tensor]] = (),
    on_best: Callable[[TrainState], None] | None = None,
    best_val_loss: float = math.inf,
) -> TrainState:
    """Run optimizer steps from state.step until tcfg.max_steps or the batches run out.

    With a process group initialized (Ray Train), the stage's forward runs through
    DistributedDataParallel (`data_parallel`): embeddings are gathered with their gradient and
    DDP averages the gradients over ranks, bucket by bucket while backward still runs; state.model
    stays the bare model (what checkpoints save).
    `on_log(metrics)` is called every log_every steps on every rank; `on_checkpoint(state)`
    every checkpoint_every steps and at the end. With `val_batches`, each log record also has
    `validate`'s val_loss, val_<metric> (every rank computes them, alone); `on_best(state)` is
    called when val_loss falls below the best so far (`best_val_loss`: a resumed run's).
    """
    if stage not in FORWARDS:
        raise ValueError(f"stage={stage!r}: expected one of {STAGES}")
    device = torch.device(device)
    model = unwrap(state.model)
    net = data_parallel(model, stage, device)  # batch -> this rank's embeddings (one DDP forward)
    global_loss = GLOBAL_LOSSES[stage]
    amp_dtype = resolve_precision(tcfg.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    max_log_scale = math.log(model.cfg.logit_scale_max)
    _, world = rank_and_world()

    model.train()
    t_last, samples_since = time.perf_counter(), 0
    last_saved = state.step
    for batch in batches:
        if state.step >= tcfg.max_steps:
            break
        batch = to_device(batch, device)
        set_lr(state.optimizer, lr_factor(state.step, tcfg.warmup_steps, tcfg.max_steps, tcfg.min_lr_ratio))
        with autocast(device, amp_dtype):
            loss, metrics = global_loss(net(batch), batch, tcfg)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{stage}: non-finite loss {loss.item()} at step {state.step}")
        state.optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # under DDP, returns with the gradients averaged over ranks
        scaler.unscale_(state.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        scaler.step(state.optimizer)
        scaler.update()
        with torch.no_grad():  # open_clip clamps the stored log scale to [0, log(max)]
            model.logit_scale.clamp_(0, max_log_scale)
        state.step += 1
        samples_since += next(iter(batch.values())).shape[0] * world

        if state.step % tcfg.log_every == 0 or state.step == tcfg.max_steps:
            now = time.perf_counter()
            record = {
                "stage": stage,
                "step": state.step,
                "loss": all_reduce_mean(loss.detach()).item(),
                **{k: (all_reduce_mean(v).item() if torch.is_tensor(v) else v) for k, v in metrics.items()},
                "logit_scale": model.scale().item(),
                "lr": state.optimizer.param_groups[0]["lr"],
                "lr_text": _group_lr(state.optimizer, "text"),
                "grad_norm": float(grad_norm),
                "samples_per_s": samples_since / max(now - t_last, 1e-9),
            }
            if val_batches:
                record.update(validate(model, val_batches, tcfg, stage, device, amp_dtype))
            t_last, samples_since = time.perf_counter(), 0  # the validation's time is no training time
            if on_log is not None:
                on_log(record)
            if on_best is not None and record.get("val_loss", math.inf) < best_val_loss:
                best_val_loss = record["val_loss"]
                on_best(state)
        if on_checkpoint is not None and tcfg.checkpoint_every > 0 and state.step % tcfg.checkpoint_every == 0:
            on_checkpoint(state)
            last_saved = state.step
    if on_checkpoint is not None and last_saved != state.step:
        on_checkpoint(state)
    return state


def _group_lr(optimizer: torch.optim.Optimizer, prefix: str) -> float | None:
    for g in optimizer.param_groups:
        if g.get("name", "").startswith(prefix):
            return g["lr"]
    return None


# --- checkpoints ---------------------------------------------------------------------------


LOCKED_TEXT_PREFIX = "text.bert."


def save_checkpoint(path: str | Path, state: TrainState, cfg: Config, stage: str) -> Path:
    """One file with model, optimizer, step, stage and the resolved config; config.yaml beside it.

    Written to a temporary name and renamed (htcl.files.write_atomically), so a crash mid-write
    never leaves a torn checkpoint.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = unwrap(state.model)
    weights = model.state_dict()
    text_tower = None
    if not model.text.trainable:
        # A locked BERT never changes: the checkpoint names it by its tower hash instead of
        # carrying its weights (MiniLM: 88 MB of each checkpoint), and loading checks the hash.
        from htcl.towers import text_tower_spec, tower_hash

        weights = {k: v for k, v in weights.items() if not k.startswith(LOCKED_TEXT_PREFIX)}
        text_tower = tower_hash(text_tower_spec(cfg.model))
    payload = {
        "model": weights,
        "optimizer": state.optimizer.state_dict(),
        "step": state.step,
        "stage": stage,
        "config": to_dict(cfg),
        "locked_towers": model.locked_towers(),
        "locked_text_tower": text_tower,  # tower hash of the locked BERT, whose weights are left out
        "rng": rng_state(),  # so a resumed run draws the same dropout masks as an unbroken one
    }
    write_atomically(path, lambda tmp: torch.save(payload, tmp))
    save_config(cfg, path.parent / "config.yaml")
    return path


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resume(path: str | Path, tcfg: TrainConfig, map_location="cpu") -> tuple[TrainState, Config, str]:
    """Model, optimizer, step and RNG state from a checkpoint: training continues as if unbroken."""
    model, cfg, ckpt = model_from_checkpoint(path, map_location)
    model.train()
    optimizer = build_optimizer(model, tcfg)
    optimizer.load_state_dict(ckpt["optimizer"])
    if "rng" in ckpt:
        set_rng_state(ckpt["rng"])
    return TrainState(model, optimizer, step=ckpt["step"]), cfg, ckpt["stage"]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location=map_location, weights_only=False)


def model_from_checkpoint(path: str | Path, map_location="cpu") -> tuple[HTCLModel, Config, dict]:
    """Rebuild the model from the config stored inside the checkpoint and load its weights."""
    ckpt = load_checkpoint(path, map_location)
    cfg = config_from_dict(ckpt["config"])
    model = HTCLModel(cfg.model, cfg.audio)
    locked_text = ckpt.get("locked_text_tower")
    if locked_text is not None:  # the BERT comes from model.text_model: it must be the one trained with
        from htcl.towers import text_tower_spec, tower_hash

        found = tower_hash(text_tower_spec(cfg.model))
        if found != locked_text:
            raise ValueError(
                f"{path}: trained with a locked text tower of hash {locked_text[:16]}, but "
                f"model.text_model={cfg.model.text_model!r} is {found[:16]}; point it at the same BERT"
            )
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=locked_text is None)
    if unexpected or any(not k.startswith(LOCKED_TEXT_PREFIX) for k in missing):
        raise ValueError(f"{path}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.eval()
    return model, cfg, ckpt


class JsonlLogger:
    """Appends one JSON object per call; also echoes a short progress line."""

    def __init__(self, path: str | Path, echo: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.echo = echo

    def __call__(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.echo:
            keys = [k for k in record if k.startswith(("loss", "top1", "val_loss"))]
            shown = " ".join(f"{k}={record[k]:.4f}" for k in keys)
            print(
                f"[{record['stage']}] step {record['step']} {shown} scale={record['logit_scale']:.1f} "
                f"{record['samples_per_s']:.1f} samples/s",
                flush=True,
            )


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def cycle(batches_fn: Callable[[int], Iterable[dict]]) -> Iterator[dict]:
    """Endless batches: calls batches_fn(epoch) for epoch 0, 1, 2, ... (reshuffled per epoch)."""
    epoch = 0
    while True:
        empty = True
        for b in batches_fn(epoch):
            empty = False
            yield b
        if empty:
            raise ValueError("the training data yields no batch (fewer rows than one batch?)")
        epoch += 1
