"""Training batches from per-song mels and texts (the dict layouts training.py documents).

Used by the local pipeline and by the Ray Train loop alike: Ray only decides which rows a
worker sees; these functions turn rows into tensors.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch


def mel_batch(mels: list[np.ndarray], n_frames: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pad (M, F_i) mels to (B, M, F) with F = n_frames or the longest; mask (B, F) True = real frame.

    Longer mels are cropped to n_frames when it is given.
    """
    if not mels:
        raise ValueError("mel_batch needs at least one mel")
    n_mels = mels[0].shape[0]
    width = n_frames or max(m.shape[1] for m in mels)
    out = np.zeros((len(mels), n_mels, width), dtype=np.float32)
    mask = np.zeros((len(mels), width), dtype=bool)
    for i, m in enumerate(mels):
        if m.shape[0] != n_mels:
            raise ValueError(f"mel {i} has {m.shape[0]} bins, expected {n_mels}")
        f = min(m.shape[1], width)
        out[i, :, :f] = m[:, :f]
        mask[i, :f] = True
    return out, mask


def require_finite(inputs: Mapping[int, np.ndarray], what: str) -> None:
    """Refuse, naming the song, a per-song input (a mel, a cached feature) holding NaN or inf: one
    such row turns every batch it joins into a non-finite loss, or quietly into garbage weights."""
    bad = [sid for sid, x in inputs.items() if not np.isfinite(x).all()]
    if bad:
        first = inputs[bad[0]]
        share = 1.0 - float(np.isfinite(first).mean())
        raise ValueError(
            f"{what}: song_id {bad[0]} has NaN or inf values ({share:.1%} of its {first.size} values)"
            + (f"; {len(bad)} songs in all: {sorted(bad)[:20]}" if len(bad) > 1 else "")
            + ". Training refuses it: recompute it (`htcl preprocess --force`, or `htcl features --force` for a "
            "backbone's cached features; decoding now quarantines audio that overflows) or drop the song."
        )


def stage1_batch(mels: Sequence[np.ndarray], texts: Sequence[str], tokenizer) -> dict[str, torch.Tensor]:
    """mels: (M, F_i) each; texts: one string per song -> mel (B, M, F), mel_mask (B, F), ids (B, L)."""
    mel, mask = mel_batch(list(mels))
    tok = tokenizer(list(texts)) if tokenizer is not None else {}  # None: a locked tower's features instead
    return {"mel": torch.as_tensor(mel), "mel_mask": torch.as_tensor(mask), **tok}


def stage2_batch(
    trigger_mels: Sequence[np.ndarray],
    rec_mels: Sequence[np.ndarray],
    rec_texts: Sequence[str],
    tokenizer,
    trigger_ids: Sequence[int] | None = None,
    rec_ids: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """The stage-2 batch; with song ids, also trigger_ids (B,) and rec_ids (B,) int64 for
    the loss's same-song mask."""
    t_mel, t_mask = mel_batch(list(trigger_mels))
    r_mel, r_mask = mel_batch(list(rec_mels))
    tok = tokenizer(list(rec_texts)) if tokenizer is not None else {}
    ids = {}
    if trigger_ids is not None and rec_ids is not None:
        ids = {
            "trigger_ids": torch.as_tensor(np.asarray(trigger_ids, dtype=np.int64)),
            "rec_ids": torch.as_tensor(np.asarray(rec_ids, dtype=np.int64)),
        }
    return {
        **ids,
        "trigger_mel": torch.as_tensor(t_mel),
        "trigger_mask": torch.as_tensor(t_mask),
        "rec_mel": torch.as_tensor(r_mel),
        "rec_mask": torch.as_tensor(r_mask),
        **{f"rec_{k}": v for k, v in tok.items()},  # rec_input_ids, rec_attention_mask
    }


def epoch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Row indices of one epoch, shuffled by (seed, epoch), in full batches only.

    Full batches keep every rank's local batch the same size (gather_with_grad needs it) and
    every contrastive batch the same difficulty.
    """
    if n < batch_size:
        raise ValueError(f"{n} rows cannot fill one batch of {batch_size}; lower batch_size")
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return [perm[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
