"""2 gloo processes through DDP give the same loss, gradients and trained weights as one process
over the whole batch (htcl.distributed's gather-with-grad + htcl.training.data_parallel)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from htcl.config import config_from_dict, replace
from htcl.distributed import gather_with_grad
from htcl.model import HTCLModel
from htcl.training import GLOBAL_LOSSES, TrainState, build_optimizer, data_parallel, save_checkpoint, train

B_GLOBAL, M, FRAMES, L = 8, 128, 120, 12
WORLD = 2
STAGES = ("pretrain", "finetune")
# text trained (BERT's pooler: trainable but unused) and text locked (BERT without grad, cached
# features in the batch); in both, stage 1 never uses the fusion layer.
VARIANTS = {"text_trained": ["model.text_trainable=true"], "text_locked": ["model.text_trainable=false"]}


def make_global_batch(text_width=None):
    g = torch.Generator().manual_seed(123)
    mel = lambda: torch.randn(B_GLOBAL, M, FRAMES, generator=g) * 5 - 6  # noqa: E731
    mask = torch.ones(B_GLOBAL, FRAMES, dtype=torch.bool)
    mask[::3, 90:] = False  # some shorter songs
    ids = torch.randint(1000, 5000, (B_GLOBAL, L), generator=g)
    att = torch.ones(B_GLOBAL, L, dtype=torch.long)
    att[1::2, 8:] = 0
    batch = {
        "mel": mel(),
        "mel_mask": mask,
        "input_ids": ids,
        "attention_mask": att,
        "trigger_mel": mel(),
        "trigger_mask": mask.roll(1, 0),
        "rec_mel": mel(),
        "rec_mask": mask,
        "rec_input_ids": ids.roll(2, 0),
        "rec_attention_mask": att,
    }
    if text_width is not None:  # a locked tower's cached pooled BERT output (B, H_text)
        batch["text_features"] = torch.randn(B_GLOBAL, text_width, generator=g)
        batch["rec_text_features"] = batch["text_features"].roll(2, 0)
    return batch


def make_model(*extra):
    from conftest import TINY_MODEL

    cfg = config_from_dict({}, TINY_MODEL + list(extra))
    torch.manual_seed(0)
    model = HTCLModel(cfg.model, cfg.audio)
    return model, cfg


def local_slice(batch, rank):
    per = B_GLOBAL // WORLD
    return {k: v[rank * per : (rank + 1) * per] for k, v in batch.items()}


def run_steps(variant, rank=None):
    """Loss and parameter gradients of each stage on this rank's slice of the global batch
    (rank None: the whole batch, one process), through data_parallel as train() runs them."""
    model, cfg = make_model(*VARIANTS[variant])
    model.eval()  # no dropout: ranks and the single process must see identical activations
    locked = not cfg.model.text_trainable
    batch = make_global_batch(model.text.bert.config.hidden_size if locked else None)
    if rank is not None:
        batch = local_slice(batch, rank)
    out = {}
    for stage in STAGES:
        net = data_parallel(model, stage)
        out[f"{stage}_ddp"] = isinstance(net, torch.nn.parallel.DistributedDataParallel)
        model.zero_grad(set_to_none=True)
        loss, _ = GLOBAL_LOSSES[stage](net(batch), batch, getattr(cfg, stage))
        loss.backward()
        out[stage] = {
            "loss": loss.detach(),
            "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None},
        }
        del net  # its reducer's hooks go with it; the next stage gets its own DDP
    return out


def run_training(bert_dir, ckpt_dir, rank=None):
    """train() for 3 stage-1 steps then 2 stage-2 steps (rank None: one process, whole batch);
    returns the final weights, and rank 0 / the single process saves each stage's checkpoint."""
    model, cfg = make_model(f"model.text_model={bert_dir}", "model.text_trainable=true")
    batch = make_global_batch()
    if rank is not None:
        batch = local_slice(batch, rank)
    for stage, steps in (("pretrain", 3), ("finetune", 2)):
        tcfg = replace(
            getattr(cfg, stage), max_steps=steps, warmup_steps=1, log_every=1, checkpoint_every=0, batch_size=B_GLOBAL
        )
        state = TrainState(model, build_optimizer(model, tcfg))
        save = (
            (lambda s, stage=stage: save_checkpoint(os.path.join(ckpt_dir, stage, "model.pt"), s, cfg, stage))
            if rank in (None, 0)
            else None
        )
        train(state, [batch] * steps, tcfg, stage, on_checkpoint=save)
        assert state.model is model  # train() wraps internally; the state keeps the bare model
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank, port, job, args, out_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        if job == "gradients":
            result = {variant: run_steps(variant, rank) for variant in VARIANTS}
            # gather_with_grad is rank-ordered
            z = gather_with_grad(torch.full((2, 3), float(rank)))
            result["gather_order"] = z[:, 0].tolist()
        else:
            result = run_training(*args, rank=rank)
        if rank == 0:
            torch.save(result, out_path)
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(job, args, tmp_path):
    out_path = tmp_path / f"{job}_rank0.pt"
    mp.spawn(_worker, args=(free_port(), job, args, str(out_path)), nprocs=WORLD, join=True)
    return torch.load(out_path, weights_only=False)


@pytest.mark.slow
def test_two_process_ddp_gradients_equal_single_process(tmp_path):
    dist_result = spawn("gradients", (), tmp_path)
    torch.set_num_threads(1)
    assert dist_result["gather_order"] == [0.0, 0.0, 1.0, 1.0]
    for variant in VARIANTS:
        single = run_steps(variant)
        for stage in STAGES:
            d, s = dist_result[variant][stage], single[stage]
            assert dist_result[variant][f"{stage}_ddp"] and not single[f"{stage}_ddp"]
            assert abs(d["loss"].item() - s["loss"].item()) <= 1e-5, (variant, stage)
            # The same parameters have a gradient: DDP leaves the unused ones (fusion in stage 1,
            # the BERT's pooler) at None, as one process does.
            assert d["grads"].keys() == s["grads"].keys(), (variant, stage)
            assert len(s["grads"]) > 10
            worst = max((d["grads"][n] - s["grads"][n]).abs().max().item() for n in s["grads"])
            assert worst <= 1e-5, f"{variant}/{stage}: max gradient difference {worst}"
        # stage 2 trains the fusion layer, stage 1 does not touch it
        assert any(n.startswith("fusion") for n in single["finetune"]["grads"])
        assert not any(n.startswith("fusion") for n in single["pretrain"]["grads"])
        assert any(n.startswith("text.bert.") for n in single["pretrain"]["grads"]) == (variant == "text_trained")
        assert not any("pooler" in n for n in single["pretrain"]["grads"])


@pytest.mark.slow
def test_two_process_train_equals_single_process_and_saves_the_bare_model(tmp_path):
    """train() itself (DDP inside), both stages, AdamW steps: the same weights as one process,
    and the checkpoints hold the bare model's keys (no "module." prefix) and load."""
    from conftest import write_tiny_bert

    from htcl.training import model_from_checkpoint

    bert = write_tiny_bert(tmp_path / "bert", dropout=0.0)  # train() runs in train mode
    dist_weights = spawn("training", (str(bert), str(tmp_path / "ddp")), tmp_path)
    torch.set_num_threads(1)
    single_weights = run_training(str(bert), str(tmp_path / "single"))

    assert dist_weights.keys() == single_weights.keys()
    worst = max((dist_weights[k].float() - single_weights[k].float()).abs().max().item() for k in single_weights)
    assert worst <= 1e-5, f"max weight difference after 5 steps: {worst}"
    init, _ = make_model(f"model.text_model={bert}")
    moved = [k for k in single_weights if not torch.equal(single_weights[k], init.state_dict()[k])]
    assert any(k.startswith("fusion") for k in moved) and any(k.startswith("audio.") for k in moved)
    for stage in STAGES:
        ckpt = torch.load(tmp_path / "ddp" / stage / "model.pt", weights_only=False)
        assert set(ckpt["model"]) == set(single_weights), stage
        model, _, _ = model_from_checkpoint(tmp_path / "ddp" / stage / "model.pt")
        assert ckpt["step"] == (3 if stage == "pretrain" else 2)
    for k, v in model.state_dict().items():  # the finetune checkpoint is the final weights
        assert torch.equal(v, dist_weights[k]), k
