"""The reference op against an independent dense float64 formula of the op contract (ops/attention.py)."""

from __future__ import annotations

import pytest
import torch

from deberta_fast.ops import RelativePositionSpec, disentangled_attention, distance_slot_table


def dense_oracle(q, k, v, pos_key, pos_query, token_mask, spec, scale, prefix=0):
    """Straight from the docstring: full [L, L] slot matrix, finfo.min fill, softmax; float64."""
    q, k, v = q.double(), k.double(), v.double()
    length = q.shape[2]
    scores = q @ k.transpose(-1, -2) * scale
    if spec is not None:
        table = distance_slot_table(length, spec)
        i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
        slots = table[i - j + length - 1]  # [L, L]
        content_k = k[:, :, prefix:]
        if spec.c2p:
            c2p = q @ pos_key.double().transpose(-1, -2)  # [B, H, L, 2S]
            scores[..., prefix:] += torch.gather(c2p, -1, slots.expand(*c2p.shape[:2], length, length)) * scale
        if spec.p2c:
            p2c = content_k @ pos_query.double().transpose(-1, -2)  # [B, H, L(key), 2S]
            index = slots.T.expand(*p2c.shape[:2], length, length)
            scores[..., prefix:] += torch.gather(p2c, -1, index).transpose(-1, -2) * scale
    if token_mask is not None:
        pair = token_mask.bool()[:, None, :, None] & token_mask.bool()[:, None, None, :]
        full = torch.cat([torch.ones(*pair.shape[:-1], prefix, dtype=torch.bool), pair], dim=-1)
        scores = scores.masked_fill(~full, torch.finfo(torch.float64).min)
    return torch.softmax(scores, -1) @ v


CASES = {
    # name: (L, prefix, c2p, p2c, buckets, max_rel, pos batch)
    "both_small_buckets": (37, 0, True, True, 8, 24, 1),
    "c2p_only_knee": (70, 0, True, False, 16, 64, 1),
    "p2c_only_unbucketed": (20, 0, False, True, -1, 12, 1),
    "per_batch_tables": (25, 0, True, True, 8, 24, 2),
    "prefix_keys": (30, 5, True, True, 8, 24, 1),
    "no_positions": (17, 3, False, False, 8, 24, 1),
}


@pytest.mark.parametrize("mask_kind", ["none", "left", "empty_row"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_matches_dense_oracle(case, mask_kind):
    length, prefix, c2p, p2c, buckets, max_rel, pos_batch = CASES[case]
    spec = None
    if c2p or p2c:
        spec = RelativePositionSpec(c2p=c2p, p2c=p2c, position_buckets=buckets, max_relative_positions=max_rel)
    batch, heads, dim = 2, 2, 8
    q = torch.randn(batch, heads, length, dim, requires_grad=True)
    k = torch.randn(batch, heads, prefix + length, dim, requires_grad=True)
    v = torch.randn(batch, heads, prefix + length, dim, requires_grad=True)
    slots = spec.num_slots if spec else 1
    pos_key = torch.randn(pos_batch, heads, slots, dim, requires_grad=True)
    pos_query = torch.randn(pos_batch, heads, slots, dim, requires_grad=True)
    mask = None
    if mask_kind == "left":
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[1, : length // 2] = 0
    elif mask_kind == "empty_row":
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[0, 3:] = 0
        mask[1] = 0  # a sequence without any valid token
    scale = 0.3
    tables = (pos_key if spec and spec.c2p else None, pos_query if spec and spec.p2c else None)
    out, _ = disentangled_attention(q, k, v, *tables, mask, spec=spec, softmax_scale=scale,
                                    num_prefix_keys=prefix, backend="reference")
    expected = dense_oracle(q, k, v, pos_key, pos_query, mask, spec, scale, prefix)
    assert (out.double() - expected).abs().max().item() <= 1e-5
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v, pos_key, pos_query), allow_unused=True)
    expected_grads = torch.autograd.grad((expected * weights.double()).sum(), (q, k, v, pos_key, pos_query),
                                         allow_unused=True)
    for name, got, want in zip(("q", "k", "v", "pos_key", "pos_query"), grads, expected_grads):
        if want is None:
            assert got is None or got.abs().max() == 0, name
            continue
        assert torch.isfinite(got).all(), name
        assert (got.double() - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item()), name


def test_output_attentions_and_dropout_paths_agree_with_the_fused_path():
    spec = RelativePositionSpec(c2p=True, p2c=True, position_buckets=8, max_relative_positions=24)
    q = torch.randn(2, 2, 40, 8)
    table = torch.randn(1, 2, 16, 8)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 30:] = 0
    fused, none = disentangled_attention(q, q, q, table, table, mask, spec=spec, softmax_scale=0.3)
    explicit, probs = disentangled_attention(q, q, q, table, table, mask, spec=spec, softmax_scale=0.3,
                                             output_attentions=True)
    assert none is None and probs.shape == (2, 2, 40, 40)
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 40))
    torch.testing.assert_close(probs[1, :, 35], torch.full((2, 40), 1 / 40))  # padded row: uniform
