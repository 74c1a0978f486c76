"""Global negatives across workers: gather embeddings from every rank with their gradient.

Every rank then computes the same loss over the global batch. `torch.distributed.nn.all_gather`
sums the incoming gradients in backward, so each rank's local embeddings receive
world_size × dL/dz; DistributedDataParallel's gradient averaging over ranks divides that back out,
and the parameter gradient equals that of one process over the concatenated batch (tested in
tests/test_distributed.py). The DDP wrapping itself is htcl.training.data_parallel.
This is open_clip's `--gather-with-grad` without `--local-loss`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B_local, D) on each rank -> (world_size * B_local, D), rank-ordered, differentiable.

    Every rank must pass the same B_local (drop the last uneven batch).
    """
    if not is_distributed():
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def gather_ids(x: torch.Tensor) -> torch.Tensor:
    """(B_local,) integer ids on each rank -> (world_size * B_local,), rank-ordered (no gradient)."""
    if not is_distributed():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (metrics only; no gradient)."""
    if not is_distributed():
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / dist.get_world_size()
