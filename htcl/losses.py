"""Contrastive losses: pure functions of embeddings (no parameters, no state).

Inputs are L2-normalized (B, D) embeddings and an already exponentiated logit scale, the same
convention as open_clip's ClipLoss. With several workers, gather embeddings first
(`htcl.distributed.gather_with_grad`) so the negatives are global.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(
    a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, not_negative: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric InfoNCE: (CE(s·a·bᵀ, diag) + CE(s·b·aᵀ, diag)) / 2. Row i of a pairs with row i of b.

    not_negative: optional (B, B) bool, True where b_j must not count as a negative of a_i
    (the same song twice in one batch: pushing it away from itself teaches nothing but noise).
    Those logits leave the softmax in both directions; the diagonal always stays.
    """
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(
            f"info_nce expects two (B, D) tensors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    logits = logit_scale * a @ b.T  # (B, B)
    labels = torch.arange(a.shape[0], device=a.device)
    if not_negative is not None:
        drop = not_negative & ~torch.eye(a.shape[0], dtype=torch.bool, device=a.device)
        logits = logits.masked_fill(drop, float("-inf"))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def same_song_mask(trigger_ids: torch.Tensor, rec_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, B) bool: True where column j is no negative for row i.

    With only trigger_ids (audio-text pairs of one song list): j shows the same song as i.
    With both (trigger i against recommended j): j's recommended song is i's, or j's trigger is
    i's (so j's song is also a favored partner of i's trigger), or j's song is i's trigger itself.
    """
    t = trigger_ids
    if rec_ids is None:
        return t[:, None] == t[None, :]
    r = rec_ids
    return (r[:, None] == r[None, :]) | (t[:, None] == t[None, :]) | (t[:, None] == r[None, :])


def stage2_loss(
    trigger_audio: torch.Tensor,
    rec_audio: torch.Tensor,
    rec_fused: torch.Tensor,
    rec_text: torch.Tensor,
    logit_scale: torch.Tensor,
    w_aa: float = 1.0,
    w_af: float = 1.0,
    w_at: float = 1.0,
    trigger_ids: torch.Tensor | None = None,
    rec_ids: torch.Tensor | None = None,
    pref_logit_scale: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = w_aa·L_aa(z_Ta, z_Ra) + w_af·L_af(z_Ta, z_Rf) + w_at·L_at(z_Ra, z_Rt).

    L_aa pulls a trigger towards the song its listener favored; L_af does the same against the
    fused (audio + text) view; L_at keeps the stage-1 audio-text alignment so semantics survive.
    With the song ids given, repeated songs in the batch are not negatives (`same_song_mask`):
    in a small catalog a batch of favor pairs repeats songs often, and each repeat would
    otherwise push a song away from its own copy.
    pref_logit_scale: the scale of the two preference losses (L_aa, L_af); None = logit_scale
    (why a separate one: TrainConfig.pref_logit_scale).
    Returns the weighted total and each unweighted part.
    """
    pref = logit_scale if pref_logit_scale is None else pref_logit_scale
    pair_mask = rec_mask = None
    if trigger_ids is not None and rec_ids is not None:
        pair_mask, rec_mask = same_song_mask(trigger_ids, rec_ids), same_song_mask(rec_ids)
    parts = {
        "loss_aa": info_nce(trigger_audio, rec_audio, pref, pair_mask),
        "loss_af": info_nce(trigger_audio, rec_fused, pref, pair_mask),
        "loss_at": info_nce(rec_audio, rec_text, logit_scale, rec_mask),
    }
    total = w_aa * parts["loss_aa"] + w_af * parts["loss_af"] + w_at * parts["loss_at"]
    return total, parts


@torch.no_grad()
def in_batch_top1(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of rows of a whose nearest row of b (by dot product) is its own pair."""
    pred = (a @ b.T).argmax(dim=1)
    return (pred == torch.arange(a.shape[0], device=a.device)).float().mean().item()
