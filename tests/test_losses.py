import math

import pytest
import torch
import torch.nn.functional as F

from htcl.losses import in_batch_top1, info_nce, stage2_loss


def naive_info_nce(a, b, s):
    """Per-row reference: -log softmax of the positive, both directions, averaged."""
    B = a.shape[0]
    total = 0.0
    for i in range(B):
        row = [s * float(a[i] @ b[j]) for j in range(B)]
        col = [s * float(b[i] @ a[j]) for j in range(B)]
        total += -(row[i] - math.log(sum(math.exp(x) for x in row)))
        total += -(col[i] - math.log(sum(math.exp(x) for x in col)))
    return total / (2 * B)


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def test_info_nce_matches_naive_reference():
    a, b = unit(7, 5, seed=1), unit(7, 5, seed=2)
    s = torch.tensor(3.7, dtype=torch.float64)
    assert info_nce(a, b, s).item() == pytest.approx(naive_info_nce(a, b, 3.7), abs=1e-10)


def test_info_nce_is_symmetric_and_low_for_aligned_pairs():
    a, b = unit(16, 8, seed=3), unit(16, 8, seed=4)
    s = torch.tensor(10.0, dtype=torch.float64)
    assert info_nce(a, b, s).item() == pytest.approx(info_nce(b, a, s).item())
    assert info_nce(a, a, torch.tensor(100.0, dtype=torch.float64)) < 0.1 < info_nce(a, b, s)


def test_info_nce_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        info_nce(unit(4, 3), unit(5, 3), torch.tensor(1.0))


def test_stage2_loss_parts_and_weights():
    ta, ra, rf, rt = (unit(6, 4, seed=i) for i in range(4))
    s = torch.tensor(5.0, dtype=torch.float64)
    total, parts = stage2_loss(ta, ra, rf, rt, s, w_aa=0.5, w_af=2.0, w_at=1.5)
    assert parts["loss_aa"].item() == pytest.approx(naive_info_nce(ta, ra, 5.0))
    assert parts["loss_af"].item() == pytest.approx(naive_info_nce(ta, rf, 5.0))
    assert parts["loss_at"].item() == pytest.approx(naive_info_nce(ra, rt, 5.0))
    expected = 0.5 * parts["loss_aa"] + 2.0 * parts["loss_af"] + 1.5 * parts["loss_at"]
    assert total.item() == pytest.approx(expected.item())


def test_in_batch_top1():
    a = unit(5, 5)
    assert in_batch_top1(a, a) == 1.0
    assert in_batch_top1(a, a.roll(1, dims=0)) < 1.0


def test_same_song_mask_removes_repeats_from_the_negatives():
    import torch.nn.functional as F

    from htcl.losses import info_nce, same_song_mask

    torch.manual_seed(0)
    a = F.normalize(torch.randn(4, 8), dim=1)
    b = F.normalize(torch.randn(4, 8), dim=1)
    b[2] = b[0]  # row 2 recommends the same song as row 0
    trig, rec = torch.tensor([10, 11, 12, 13]), torch.tensor([20, 21, 20, 23])
    mask = same_song_mask(trig, rec)
    assert mask[0, 2] and mask[2, 0] and not mask[0, 1] and mask.diagonal().all()
    scale = torch.tensor(10.0)
    got = info_nce(a, b, scale, mask)
    # by hand: each row's softmax over the columns that are not the same song
    logits = scale * a @ b.T
    keep = ~(mask & ~torch.eye(4, dtype=torch.bool))
    rows = [-(logits[i, i] - torch.logsumexp(logits[i][keep[i]], 0)) for i in range(4)]
    cols = [-(logits[i, i] - torch.logsumexp(logits[:, i][keep[:, i]], 0)) for i in range(4)]
    assert torch.allclose(got, (torch.stack(rows).mean() + torch.stack(cols).mean()) / 2, atol=1e-6)
    assert got < info_nce(a, b, scale)  # the duplicate no longer counts against either row
    # trigger i against rec j where rec j IS trigger i's song: not a negative either
    assert same_song_mask(torch.tensor([1, 2]), torch.tensor([2, 3]))[1, 0]


def test_stage2_preference_losses_can_have_their_own_scale():
    torch.manual_seed(1)
    z = [F.normalize(torch.randn(6, 4), dim=1) for _ in range(4)]
    shared, parts = stage2_loss(*z, torch.tensor(14.0))
    own, own_parts = stage2_loss(*z, torch.tensor(14.0), pref_logit_scale=3.0)
    assert torch.allclose(own_parts["loss_at"], parts["loss_at"])  # L_at keeps the model's scale
    assert torch.allclose(own_parts["loss_aa"], info_nce(z[0], z[1], torch.tensor(3.0)))
    assert torch.allclose(own_parts["loss_af"], info_nce(z[0], z[2], torch.tensor(3.0)))
