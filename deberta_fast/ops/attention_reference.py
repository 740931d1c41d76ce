"""Pure-PyTorch disentangled attention: the CPU path and the oracle of every other backend.

Semantics are transformers 5.24's ``DisentangledSelfAttention`` (see ``attention.py`` for the contract), computed
without its O(L²) side tensors: no [1, L, L] int64 relative-position tensor, no [B, 1, L, L] mask, and positional
scores only over the window of slots that the sequence length can reach.

How the positional bias is gathered in O(L) index memory: with the keys taken in reverse order (j' = L-1-j),
slot(i - j) = table[i + j'] for the distance table ``table[t] = slot(t - (L - 1))``, so the [L, L] index is a
Hankel *view* of a [2L - 1] vector (strides (1, 1)). Attention is invariant to the order of its keys, so the
reference runs on reversed keys and flips back only what it returns per key (attention probabilities).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .positions import RelativePositionSpec, distance_slot_table, slot_window


def _hankel_slot_index(length: int, spec: RelativePositionSpec, lo: int, device) -> torch.Tensor:
    """[L, L] int64 view (no L² storage): index[i, j'] = slot(i - (L - 1 - j')) - lo."""
    table = distance_slot_table(length, spec, device) - lo
    return table.as_strided((length, length), (1, 1))


def positional_bias(
    query: torch.Tensor,
    key_reversed: torch.Tensor,
    pos_key: torch.Tensor | None,
    pos_query: torch.Tensor | None,
    spec: RelativePositionSpec,
    softmax_scale: float,
) -> torch.Tensor | None:
    """c2p + p2c scores, scaled, against keys in reversed order.

    query: [B, H, L, D]; key_reversed: [B, H, L, D] (content keys, reversed along L);
    pos_key / pos_query: [1 or B, H, 2S, D]. Returns [B, H, L, L] with
        bias[i, j'] = softmax_scale · (Q_i · Pk[slot(i - j)] + K_j · Pq[slot(i - j)]),  j = L - 1 - j'
    or None when the spec has no positional term.
    """
    if not spec.any_position_term:
        return None
    batch, heads, length, _ = query.shape
    lo, hi = slot_window(length, spec)
    index = _hankel_slot_index(length, spec, lo, query.device).expand(batch, heads, length, length)
    bias = None
    if spec.c2p:
        # [B, H, L, W]: every query against the W slots its distances can reach.
        c2p_scores = torch.matmul(query, pos_key[:, :, lo : hi + 1].transpose(-1, -2))
        bias = torch.gather(c2p_scores, -1, index)
    if spec.p2c:
        # [B, H, W, L]: the W slots against every (reversed) key; gathered along the slot axis.
        p2c_scores = torch.matmul(pos_query[:, :, lo : hi + 1], key_reversed.transpose(-1, -2))
        p2c = torch.gather(p2c_scores, -2, index)
        bias = p2c if bias is None else bias + p2c
    return bias * softmax_scale


def disentangled_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pos_key: torch.Tensor | None,
    pos_query: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    spec: RelativePositionSpec | None,
    softmax_scale: float,
    dropout_p: float = 0.0,
    output_attentions: bool = False,
    num_prefix_keys: int = 0,
    *,
    dropout_keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference disentangled attention. Arguments and semantics: ``deberta_fast.ops.attention``.

    dropout_keep: optional bool [B, H, L, P + L] keep mask used instead of drawing transformers' bernoulli mask
    when dropout_p > 0 (probs · keep / (1 - dropout_p)): the oracle of backends with a counter-based stream
    (``deberta_fast.ops.attention_dropout.attention_keep_mask``).
    """
    prefix = num_prefix_keys
    key_rev, value_rev = _reverse_content(key, prefix), _reverse_content(value, prefix)
    bias = None
    if spec is not None:
        bias = positional_bias(query, key_rev[:, :, prefix:], pos_key, pos_query, spec, softmax_scale)

    mask = None if attention_mask is None else attention_mask.to(device=query.device).bool()
    fused = not (output_attentions or dropout_p > 0.0 or prefix or (mask is not None and mask.dim() != 2))
    if fused:
        return _fused_softmax_path(query, key_rev, value_rev, bias, mask, softmax_scale), None

    scores = torch.matmul(query, (key_rev * softmax_scale).transpose(-1, -2))
    content = scores[..., prefix:]
    if bias is not None:
        content = content + bias
    if mask is not None:
        # transformers fills masked pairs with finfo.min: a query row without any valid key becomes uniform.
        lowest = torch.finfo(scores.dtype).min
        if mask.dim() == 2:
            content = content.masked_fill(~mask.flip(-1)[:, None, None, :], lowest)
            content = content.masked_fill(~mask[:, None, :, None], lowest)
        else:
            content = content.masked_fill(~mask.flip(-1), lowest)
    scores = torch.cat([scores[..., :prefix], content], dim=-1) if prefix else content
    # Back to the original key order before dropout, so that the dropout mask is drawn over the same layout
    # as transformers draws it: with the same seed both drop the same (query, key) pairs.
    probs = _reverse_content(torch.softmax(scores, dim=-1), prefix, dim=-1)
    if dropout_p > 0.0 and dropout_keep is not None:
        if tuple(dropout_keep.shape) != tuple(probs.shape):
            raise ValueError(f"dropout_keep must be [B, H, L, P + L] = {tuple(probs.shape)}; got "
                             f"{tuple(dropout_keep.shape)}")
        probs = probs * (dropout_keep.to(device=probs.device, dtype=probs.dtype) / (1.0 - dropout_p))
    elif dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    out = torch.matmul(probs, value)
    return out, (probs if output_attentions else None)


def _fused_softmax_path(query, key_rev, value_rev, bias, token_mask, softmax_scale):
    """scaled_dot_product_attention with the positional bias as an additive mask; [B, L] token mask only.

    Invalid query rows must come out as the uniform average of all values (transformers' finfo.min rows): they
    are replaced after the call by mean(V), which also gives their exact gradients (dV = dO / L, nothing to
    Q, K or the bias). Keys of a sequence without any valid token stay unmasked so that no row is all -inf.
    """
    if token_mask is None:
        return F.scaled_dot_product_attention(query, key_rev, value_rev, attn_mask=bias, scale=softmax_scale)
    key_ok = (token_mask | ~token_mask.any(-1, keepdim=True)).flip(-1)[:, None, None, :]
    if bias is None:
        bias = torch.zeros((), dtype=query.dtype, device=query.device)
    attn_mask = bias.masked_fill(~key_ok, float("-inf"))
    out = F.scaled_dot_product_attention(query, key_rev, value_rev, attn_mask=attn_mask, scale=softmax_scale)
    return torch.where(token_mask[:, None, :, None], out, value_rev.mean(dim=-2, keepdim=True))


def _reverse_content(x: torch.Tensor, prefix: int, dim: int = -2) -> torch.Tensor:
    """Reverse the content part of a per-key axis, leaving the first ``prefix`` (prefix-tuning) keys in place."""
    if not prefix:
        return x.flip(dim)
    head, content = x.split([prefix, x.shape[dim] - prefix], dim=dim)
    return torch.cat([head, content.flip(dim)], dim=dim)
