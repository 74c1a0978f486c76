"""Contrastive losses: pure functions of embeddings (no parameters, no state).

Inputs are L2-normalized (B, D) embeddings and an already exponentiated logit scale, the same
convention as open_clip's ClipLoss. With several workers, gather embeddings first
(`htcl.distributed.gather_with_grad`) so the negatives are global.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: (CE(s·a·bᵀ, diag) + CE(s·b·aᵀ, diag)) / 2. Row i of a pairs with row i of b."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"info_nce expects two (B, D) tensors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    logits = logit_scale * a @ b.T  # (B, B)
    labels = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def stage2_loss(
    trigger_audio: torch.Tensor,
    rec_audio: torch.Tensor,
    rec_fused: torch.Tensor,
    rec_text: torch.Tensor,
    logit_scale: torch.Tensor,
    w_aa: float = 1.0,
    w_af: float = 1.0,
    w_at: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = w_aa·L_aa(z_Ta, z_Ra) + w_af·L_af(z_Ta, z_Rf) + w_at·L_at(z_Ra, z_Rt).

    L_aa pulls a trigger towards the song its listener favored; L_af does the same against the
    fused (audio + text) view; L_at keeps the stage-1 audio-text alignment so semantics survive.
    Returns the weighted total and each unweighted part.
    """
    parts = {
        "loss_aa": info_nce(trigger_audio, rec_audio, logit_scale),
        "loss_af": info_nce(trigger_audio, rec_fused, logit_scale),
        "loss_at": info_nce(rec_audio, rec_text, logit_scale),
    }
    total = w_aa * parts["loss_aa"] + w_af * parts["loss_af"] + w_at * parts["loss_at"]
    return total, parts


@torch.no_grad()
def in_batch_top1(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of rows of a whose nearest row of b (by dot product) is its own pair."""
    pred = (a @ b.T).argmax(dim=1)
    return (pred == torch.arange(a.shape[0], device=a.device)).float().mean().item()
