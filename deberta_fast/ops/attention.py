"""Disentangled self-attention of DeBERTa-v2/v3: the op every backend implements.

Shapes (any strides): B batch, H heads, L tokens, P prefix keys (prefix tuning, default 0), D head dim,
S = ``spec.att_span``.

    query                 [B, H, L, D]
    key, value            [B, H, P + L, D]      the P prefix keys first, then the L content keys
    pos_key, pos_query    [1 or B, H, 2S, D]    projected relative embeddings (Pk for c2p, Pq for p2c)
    attention_mask        None, [B, L] token mask (1 = real token), or [B, 1 or H, L, L] pair mask
    returns               out [B, H, L, D], and probs [B, H, L, P + L] when output_attentions

Math (transformers 5.24; s = softmax_scale = 1 / sqrt(D · (1 + #position terms)), slot from ``positions``):

    score(i, j) = s · (Q_i·K_j + [c2p] Q_i·Pk[slot(i-j)] + [p2c] K_j·Pq[slot(i-j)])    content key j
    score(i, p) = s · Q_i·K_p                                                             prefix key p
    masked pairs get finfo.min; probs = dropout(softmax(score)); out = probs · V

A [B, L] token mask makes pair (i, j) valid when tokens i and j are both real; prefix keys are valid for every
query. A query row with no valid key therefore attends uniformly to all keys, as in transformers.
"""

from __future__ import annotations

import torch

from . import attention_cpu, attention_triton, dispatch
from .attention_export import disentangled_attention_export
from .attention_reference import disentangled_attention_reference
from .positions import RelativePositionSpec

OP_NAME = "disentangled_attention"

# Fastest first. Each backend module exposes unsupported_reasons(*call) and run(*call).
CANDIDATES = (
    dispatch.Candidate("triton", "cuda", attention_triton.unsupported_reasons),
    dispatch.Candidate("cpu", "cpu", attention_cpu.unsupported_reasons),
    dispatch.Candidate("reference", None, lambda *call: []),
)
_RUN = {
    "triton": attention_triton.run,
    "cpu": attention_cpu.run,
    "reference": disentangled_attention_reference,
}
_DISPATCH = dispatch.OpDispatcher(OP_NAME, CANDIDATES, _RUN)


def check_attention_inputs(query, key, value, pos_key, pos_query, attention_mask, spec, num_prefix_keys) -> None:
    """Raise ValueError naming the argument when the inputs do not fit the contract above."""
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{name} must be a 4-D tensor [B, H, L, D]; got {got}")
    batch, heads, length, head_dim = query.shape
    if num_prefix_keys < 0:
        raise ValueError(f"num_prefix_keys must be >= 0; got {num_prefix_keys}")
    expected_kv = (batch, heads, num_prefix_keys + length)
    for name, tensor in (("key", key), ("value", value)):
        if tuple(tensor.shape[:3]) != expected_kv or (name == "key" and tensor.shape[3] != head_dim):
            raise ValueError(
                f"{name} must have shape [B, H, P + L, D] = [{batch}, {heads}, {num_prefix_keys + length}, "
                f"{head_dim if name == 'key' else 'Dv'}] to match query {tuple(query.shape)}; got {tuple(tensor.shape)}"
            )
    for name, tensor in (("key", key), ("value", value)):
        if tensor.dtype != query.dtype or tensor.device != query.device:
            raise ValueError(
                f"{name} must have the dtype and device of query ({query.dtype}, {query.device}); "
                f"got ({tensor.dtype}, {tensor.device})"
            )
    if spec is not None:
        needed = (("pos_key", pos_key, spec.c2p), ("pos_query", pos_query, spec.p2c))
        for name, table, used in needed:
            if not used:
                continue
            if table is None:
                raise ValueError(f"{name} is required: the position spec has the {'c2p' if name == 'pos_key' else 'p2c'} term")
            if table.dim() != 4 or table.shape[0] not in (1, batch) or tuple(table.shape[1:]) != (heads, spec.num_slots, head_dim):
                raise ValueError(
                    f"{name} must have shape [1 or {batch}, {heads}, {spec.num_slots}, {head_dim}] (2S = "
                    f"{spec.num_slots} slots); got {tuple(table.shape)}"
                )
            if table.dtype != query.dtype or table.device != query.device:
                raise ValueError(
                    f"{name} must have the dtype and device of query ({query.dtype}, {query.device}); "
                    f"got ({table.dtype}, {table.device})"
                )
    if attention_mask is not None:
        shape = tuple(attention_mask.shape)
        token_mask = shape == (batch, length)
        pair_mask = len(shape) == 4 and shape[0] == batch and shape[1] in (1, heads) and shape[2:] == (length, length)
        if not (token_mask or pair_mask):
            raise ValueError(
                f"attention_mask must be [B, L] = [{batch}, {length}] or [B, 1 or H, L, L]; got {shape}"
            )
        if attention_mask.device != query.device:
            raise ValueError(f"attention_mask must be on {query.device}; got {attention_mask.device}")


def disentangled_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pos_key: torch.Tensor | None = None,
    pos_query: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    spec: RelativePositionSpec | None,
    softmax_scale: float,
    dropout_p: float = 0.0,
    output_attentions: bool = False,
    num_prefix_keys: int = 0,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Disentangled attention (module docstring). ``spec=None``: no positional term (plain attention).

    dropout_p is applied to the attention probabilities (pass 0.0 in eval mode). ``backend`` overrides the
    context / environment choice (``deberta_fast.ops.dispatch``).
    """
    check_attention_inputs(query, key, value, pos_key, pos_query, attention_mask, spec, num_prefix_keys)
    call = (query, key, value, pos_key, pos_query, attention_mask, spec, softmax_scale, dropout_p,
            output_attentions, num_prefix_keys)
    if torch.onnx.is_in_onnx_export():
        # ONNX exporters trace plain tensor ops, before any dispatch: the backends' custom ops have no ONNX
        # translation (attention_export.py).
        return disentangled_attention_export(*call)
    return _DISPATCH(backend, query.device.type, *call)
