"""A 2-process gloo run gives the same loss and gradients as one process over the whole batch."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from htcl.config import config_from_dict
from htcl.distributed import average_gradients, gather_with_grad
from htcl.model import HTCLModel
from htcl.training import stage1_forward, stage2_forward

B_GLOBAL, M, FRAMES, L = 8, 128, 120, 12
WORLD = 2


def make_global_batch():
    g = torch.Generator().manual_seed(123)
    mel = lambda: torch.randn(B_GLOBAL, M, FRAMES, generator=g) * 5 - 6  # noqa: E731
    mask = torch.ones(B_GLOBAL, FRAMES, dtype=torch.bool)
    mask[::3, 90:] = False  # some shorter songs
    ids = torch.randint(1000, 5000, (B_GLOBAL, L), generator=g)
    att = torch.ones(B_GLOBAL, L, dtype=torch.long)
    att[1::2, 8:] = 0
    return {
        "mel": mel(), "mel_mask": mask, "input_ids": ids, "attention_mask": att,
        "trigger_mel": mel(), "trigger_mask": mask.roll(1, 0), "rec_mel": mel(), "rec_mask": mask,
        "rec_input_ids": ids.roll(2, 0), "rec_attention_mask": att,
    }


def make_model():
    from conftest import TINY_MODEL

    cfg = config_from_dict({}, TINY_MODEL)
    torch.manual_seed(0)
    model = HTCLModel(cfg.model, cfg.audio)
    model.eval()  # no dropout: ranks and the single process must see identical activations
    return model, cfg


def run_steps(model, cfg, batch):
    """Loss and parameter gradients of each stage on `batch` (this rank's slice)."""
    out = {}
    for name, forward, tcfg in (("pretrain", stage1_forward, cfg.pretrain), ("finetune", stage2_forward, cfg.finetune)):
        model.zero_grad(set_to_none=True)
        loss, _ = forward(model, batch, tcfg)
        loss.backward()
        average_gradients(model.parameters())
        out[name] = {
            "loss": loss.detach(),
            "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None},
        }
    return out


def _worker(rank, port, out_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model, cfg = make_model()
        full = make_global_batch()
        per = B_GLOBAL // WORLD
        local = {k: v[rank * per : (rank + 1) * per] for k, v in full.items()}
        result = run_steps(model, cfg, local)
        # gather_with_grad is rank-ordered
        z = gather_with_grad(torch.full((2, 3), float(rank)))
        result["gather_order"] = z[:, 0].tolist()
        if rank == 0:
            torch.save(result, out_path)
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_gather_equals_single_process(tmp_path):
    out_path = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(free_port(), str(out_path)), nprocs=WORLD, join=True)
    dist_result = torch.load(out_path, weights_only=False)

    torch.set_num_threads(1)
    model, cfg = make_model()
    single = run_steps(model, cfg, make_global_batch())

    assert dist_result["gather_order"] == [0.0, 0.0, 1.0, 1.0]
    for stage in ("pretrain", "finetune"):
        d, s = dist_result[stage], single[stage]
        assert abs(d["loss"].item() - s["loss"].item()) <= 1e-5, stage
        assert d["grads"].keys() == s["grads"].keys()
        assert len(s["grads"]) > 10
        worst = max((d["grads"][n] - s["grads"][n]).abs().max().item() for n in s["grads"])
        assert worst <= 1e-5, f"{stage}: max gradient difference {worst}"
    # stage 2 trains the fusion layer, stage 1 does not touch it
    assert any(n.startswith("fusion") for n in single["finetune"]["grads"])
    assert not any(n.startswith("fusion") for n in single["pretrain"]["grads"])
