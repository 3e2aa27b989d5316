"""The losses against their plain formulas."""

from __future__ import annotations

import pytest
import torch

from attndistill.core.engine import Distiller
from attndistill.core.losses import (
    ad_loss,
    concat_references,
    content_loss,
    ideal_attention,
    label_mask,
    resize_labels,
)


def _plain_ideal(q, k, v, scale=1.0, mask=None):
    scores = (scale * q) @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _plain_ad(outputs, queries, keys, values, scale=1.0):
    return sum((o - _plain_ideal(q, k, v, scale)).abs().mean() for o, q, k, v in zip(outputs, queries, keys, values))


@pytest.mark.parametrize("scale", [1.0, 1.3])
def test_ad_loss_equals_plain_formula(scale):
    g = torch.Generator().manual_seed(1)
    shapes = [(2, 4, 64, 8), (2, 4, 16, 16)]
    outputs = [torch.randn(s, generator=g) for s in shapes]
    queries = [torch.randn(s, generator=g) for s in shapes]
    keys = [torch.randn(1, s[1], s[2] * 3, s[3], generator=g) for s in shapes]
    values = [torch.randn(1, s[1], s[2] * 3, s[3], generator=g) for s in shapes]
    got = ad_loss(outputs, queries, keys, values, scale=scale)
    want = _plain_ad(outputs, queries, keys, values, scale)
    assert abs(got.item() - want.item()) < 1e-5


def test_ad_loss_gradient_flows_to_outputs_only():
    q = torch.randn(1, 2, 8, 4, requires_grad=True)
    o = torch.randn(1, 2, 8, 4, requires_grad=True)
    k, v = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4)
    ad_loss([o], [q], [k], [v]).backward()
    assert o.grad is not None and o.grad.abs().sum() > 0
    assert q.grad is None  # the ideal attention is stop-gradient


def test_content_loss_equals_plain_formula():
    q = [torch.randn(3, 2, 8, 4), torch.randn(3, 2, 4, 4)]
    qc = [torch.randn(1, 2, 8, 4), torch.randn(1, 2, 4, 4)]
    want = sum((a - b).abs().mean() for a, b in zip(q, qc))
    assert abs(content_loss(q, qc).item() - want.item()) < 1e-6


def test_concat_references_keeps_each_reference_block():
    x = torch.randn(3, 2, 5, 4)  # (R, h, N, d)
    y = concat_references(x)
    assert y.shape == (1, 2, 15, 4)
    for r in range(3):
        assert torch.equal(y[0, :, r * 5:(r + 1) * 5], x[r])


def test_several_references_equal_attention_over_their_union():
    q = torch.randn(2, 2, 6, 4)
    refs_k, refs_v = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    got = ideal_attention(q, concat_references(refs_k), concat_references(refs_v))
    union_k = torch.cat([refs_k[0], refs_k[1]], dim=1)[None]  # (1, h, 10, d)
    union_v = torch.cat([refs_v[0], refs_v[1]], dim=1)[None]
    torch.testing.assert_close(got, _plain_ideal(q, union_k, union_v), atol=1e-6, rtol=1e-5)


def test_masked_ideal_never_attends_across_labels():
    target = torch.tensor([0, 0, 1, 1, 2, 2])
    ref = torch.tensor([2, 1, 0, 0, 1, 2, 2, 0])
    mask = label_mask(target, ref)  # (1, 1, 6, 8)
    q = torch.randn(1, 2, 6, 4)
    k = torch.randn(1, 2, 8, 4)
    # one-hot values reveal which reference tokens each target token attended to
    v = torch.eye(8).expand(1, 2, 8, 8)
    weights = ideal_attention(q, k, v, mask=mask)  # (1, 2, 6, 8) = attention weights
    for i, lt in enumerate(target.tolist()):
        for j, lr in enumerate(ref.tolist()):
            if lt != lr:
                assert weights[0, :, i, j].abs().max() == 0
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 2, 6))
    torch.testing.assert_close(weights, _plain_ideal(q, k, v, mask=mask), atol=1e-6, rtol=1e-5)


def test_label_mask_refuses_labels_missing_from_reference():
    with pytest.raises(ValueError, match=r"\[3\]"):
        label_mask(torch.tensor([0, 3]), torch.tensor([0, 1]))


def test_a_token_takes_the_label_at_its_centre():
    """A map of 8 pixels across, boundary after pixel 4, on a grid of 2 tokens of 4 pixels: the second token's
    pixels 5-7 are label 1, so it is label 1 (a corner sample would say 0 and move the boundary by half a token);
    integer upscales copy each label to its whole block, and a map's own size is the identity."""
    row = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1])
    labels = torch.stack([row, row.flip(0)])  # (2, 8): a second map, mirrored
    assert resize_labels(labels[:, None].expand(2, 8, 8), (1, 2))[:, 0].tolist() == [[0, 1], [1, 0]]
    assert resize_labels(torch.tensor([[0, 1], [2, 3]]), (4, 4)).tolist() == [
        [0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    ids = torch.randint(0, 5, (3, 7, 9))
    assert torch.equal(resize_labels(ids, (7, 9)), ids)


def test_ad_loss_is_zero_when_target_equals_reference(tiny_sd15):
    z = torch.randn(1, 4, 8, 8)
    t = torch.tensor(400)
    with torch.no_grad(), Distiller(tiny_sd15, fused=False) as ad:
        ad.begin_timestep(t, z)
        assert ad.loss(z.clone()).item() < 1e-6
        assert ad.loss(torch.randn(1, 4, 8, 8)).item() > 1e-3


def test_fused_and_separate_calls_give_the_same_loss(tiny_sd15):
    z_ref, z_c, z = torch.randn(2, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor(300)
    losses = []
    for fused in (False, True):
        with torch.no_grad(), Distiller(tiny_sd15, content_weight=0.25, fused=fused) as ad:
            ad.begin_timestep(t, z_ref, z_c)
            losses.append(ad.loss(z).item())
    assert abs(losses[0] - losses[1]) < 1e-5


def test_content_loss_weights_scale_each_target():
    q, qc = torch.randn(3, 2, 8, 4), torch.randn(3, 2, 8, 4)
    per_target = [(q[i] - qc[i]).abs().mean() for i in range(3)]
    got = content_loss([q], [qc], weights=torch.tensor([1.0, 0.0, 2.0]))
    assert abs(got.item() - (per_target[0] + 2 * per_target[2]).item() / 3) < 1e-6


def test_target_on_its_content_gets_an_exactly_zero_content_term(tiny_sd15):
    """At init == content the content L1 sits on its kink: no gradient from it, whatever the batch layout."""
    z_ref, z_c = torch.randn(1, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for fused in (False, True):
        with Distiller(tiny_sd15, content_weight=0.25, fused=fused) as ad:
            ad.begin_timestep(torch.tensor(700), z_ref, z_c)
            z = z_c.clone().requires_grad_(True)
            ad.loss(z)
            assert ad.last_parts["content"].item() == 0.0
            assert not any(v.requires_grad for v in ad.last_parts.values())  # holds no autograd graph
            z_moved = z_c + 0.1
            ad.loss(z_moved)
            assert ad.last_parts["content"].item() > 0
