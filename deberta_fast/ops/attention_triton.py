"""Triton backend of disentangled attention: custom ops with fake implementations and registered autograd.

Contract and math: ``deberta_fast.ops.attention``. The kernels (``deberta_fast.triton_kernels``) never form an
[L, L] or [L, 2S] tensor: positional scores are computed per tile, softmax is online (LSE saved), dropout is
regenerated from a seed in the backward, and the backward is deterministic without atomics.

    torch.ops.deberta_fast.disentangled_attention_fwd(q, k, v, pk, pq, mask, seed, c2p, p2c, buckets, max_rel,
        softmax_scale, dropout_p, num_prefix_keys, allow_tf32) -> (out [B, H, L, D], lse [B, H, L] float32)
    torch.ops.deberta_fast.disentangled_attention_bwd(grad_out, q, k, v, pk, pq, mask, seed, out, lse, ...same)
        -> (dq, dk, dv, dpk, dpq)     (dpk / dpq empty when their term is off)

Both are opaque to torch.compile (fake implementations give shapes and strides), so
``torch.compile(model, fullgraph=True)`` traces through them.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from .dispatch import BackendUnavailable, module_available
from .positions import RelativePositionSpec

MAX_HEAD_DIM = 128
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unsupported_reasons(query, key, value, pos_key, pos_query, attention_mask, spec, softmax_scale, dropout_p,
                        output_attentions, num_prefix_keys) -> list[str]:
    """Every reason the triton backend cannot serve this call (empty when it can)."""
    reasons = []
    if not module_available("triton"):
        reasons.append("triton is not installed")
    device = query.device
    if device.type != "cuda" and not (device.type == "cpu" and _interpreter_on()):
        reasons.append(
            f"tensors are on {device.type}: the triton backend needs CUDA tensors (or CPU tensors with "
            "TRITON_INTERPRET=1, the Triton interpreter)"
        )
    if query.dtype not in SUPPORTED_DTYPES:
        reasons.append(f"dtype {query.dtype} is not supported (float32, float16, bfloat16)")
    head_dim = query.shape[-1]
    if head_dim > MAX_HEAD_DIM:
        reasons.append(f"head dim {head_dim} is over the kernel's maximum of {MAX_HEAD_DIM}")
    if value.shape[-1] != head_dim:
        reasons.append(f"value head dim {value.shape[-1]} differs from the query/key head dim {head_dim}")
    if output_attentions:
        reasons.append("output_attentions=True: the kernel never forms the attention probabilities")
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            reasons.append(
                f"attention_mask of shape {tuple(attention_mask.shape)}: the kernel takes a [B, L] token mask, "
                "not a pair mask"
            )
        if attention_mask.is_complex():
            reasons.append(f"attention_mask dtype {attention_mask.dtype} is not supported")
    if not 0.0 <= dropout_p < 1.0:
        reasons.append(f"dropout_p must be in [0, 1); got {dropout_p}")
    return reasons


# ----------------------------------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("deberta_fast::disentangled_attention_fwd", mutates_args=())
def _fwd_op(
    query: Tensor, key: Tensor, value: Tensor, pos_key: Optional[Tensor], pos_query: Optional[Tensor],
    attention_mask: Optional[Tensor], seed: Optional[Tensor], c2p: bool, p2c: bool, position_buckets: int,
    max_relative_positions: int, softmax_scale: float, dropout_p: float, num_prefix_keys: int, allow_tf32: bool,
) -> tuple[Tensor, Tensor]:
    from ..triton_kernels.disentangled_attention_fwd import disentangled_attention_forward

    return disentangled_attention_forward(
        query, key, value, pos_key, pos_query, attention_mask, seed, c2p=c2p, p2c=p2c,
        position_buckets=position_buckets, max_relative_positions=max_relative_positions,
        softmax_scale=softmax_scale, dropout_p=dropout_p, num_prefix_keys=num_prefix_keys, allow_tf32=allow_tf32,
    )


@_fwd_op.register_fake
def _fwd_fake(query, key, value, pos_key, pos_query, attention_mask, seed, c2p, p2c, position_buckets,
              max_relative_positions, softmax_scale, dropout_p, num_prefix_keys, allow_tf32):
    batch, heads, length, _ = query.shape
    out = query.new_empty(batch, length, heads, value.shape[-1]).transpose(1, 2)
    return out, query.new_empty(batch, heads, length, dtype=torch.float32)


@torch.library.custom_op("deberta_fast::disentangled_attention_bwd", mutates_args=())
def _bwd_op(
    grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, pos_key: Optional[Tensor],
    pos_query: Optional[Tensor], attention_mask: Optional[Tensor], seed: Optional[Tensor], out: Tensor, lse: Tensor,
    c2p: bool, p2c: bool, position_buckets: int, max_relative_positions: int, softmax_scale: float,
    dropout_p: float, num_prefix_keys: int, allow_tf32: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from ..triton_kernels.disentangled_attention_bwd import disentangled_attention_backward

    dq, dk, dv, dpk, dpq = disentangled_attention_backward(
        grad_out, query, key, value, pos_key, pos_query, attention_mask, seed, out, lse, c2p=c2p, p2c=p2c,
        position_buckets=position_buckets, max_relative_positions=max_relative_positions,
        softmax_scale=softmax_scale, dropout_p=dropout_p, num_prefix_keys=num_prefix_keys, allow_tf32=allow_tf32,
    )
    empty = query.new_empty(0)
    return dq, dk, dv, empty if dpk is None else dpk, empty.clone() if dpq is None else dpq


@_bwd_op.register_fake
def _bwd_fake(grad_out, query, key, value, pos_key, pos_query, attention_mask, seed, out, lse, c2p, p2c,
              position_buckets, max_relative_positions, softmax_scale, dropout_p, num_prefix_keys, allow_tf32):
    batch, heads, length, head_dim = query.shape
    num_keys = key.shape[2]
    dq = query.new_empty(batch, length, heads, head_dim).transpose(1, 2)
    dk = key.new_empty(batch, num_keys, heads, head_dim).transpose(1, 2)
    dv = value.new_empty(batch, num_keys, heads, value.shape[-1]).transpose(1, 2)
    dpk = torch.empty_like(pos_key, memory_format=torch.contiguous_format) if c2p else query.new_empty(0)
    dpq = torch.empty_like(pos_query, memory_format=torch.contiguous_format) if p2c else query.new_empty(0)
    return dq, dk, dv, dpk, dpq


def _setup_context(ctx, inputs, output):
    query, key, value, pos_key, pos_query, attention_mask, seed, *params = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, pos_key, pos_query, attention_mask, seed, out, lse)
    ctx.params = params


def _backward(ctx, grad_out, grad_lse):
    query, key, value, pos_key, pos_query, attention_mask, seed, out, lse = ctx.saved_tensors
    c2p, p2c = ctx.params[0], ctx.params[1]
    dq, dk, dv, dpk, dpq = _bwd_op(grad_out, query, key, value, pos_key, pos_query, attention_mask, seed, out, lse,
                                   *ctx.params)
    return (dq, dk, dv, dpk if c2p else None, dpq if p2c else None, None, None) + (None,) * len(ctx.params)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# entry points
# ----------------------------------------------------------------------------------------------------------------


@torch.compiler.assume_constant_result
def float32_matmul_allows_tf32() -> bool:
    """Whether ``torch.get_float32_matmul_precision()`` lets float32 matmuls use TF32 ("high" or "medium").

    dynamo cannot trace that call (it returns a str), which broke ``torch.compile(fullgraph=True)`` on CUDA only;
    a constant under tracing is safe because the precision is part of the global state that dynamo guards on, so a
    compiled graph is recompiled when it changes (tests/test_compile_export.py checks this)."""
    return torch.get_float32_matmul_precision() != "highest"


def draw_seed(device: torch.device) -> Tensor:
    """int64 [1] dropout seed drawn on ``device`` from torch's generator (no host synchronisation)."""
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)


def disentangled_attention_triton(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    pos_key: Tensor | None = None,
    pos_query: Tensor | None = None,
    attention_mask: Tensor | None = None,
    *,
    spec: RelativePositionSpec | None,
    softmax_scale: float,
    dropout_p: float = 0.0,
    num_prefix_keys: int = 0,
    allow_tf32: bool | None = None,
    seed: Tensor | None = None,
) -> Tensor:
    """Disentangled attention on the Triton kernels; returns out [B, H, L, D] (a transposed [B, L, H, D] buffer).

    Arguments as ``deberta_fast.ops.attention.disentangled_attention`` (token masks only). ``allow_tf32``: let
    float32 inputs use TF32 tensor cores (default: when ``torch.get_float32_matmul_precision()`` is not
    "highest"); otherwise float32 runs as true float32. ``seed``: int64 [1] dropout seed on the tensors' device
    (default: drawn with ``draw_seed``); the same seed gives the same dropout mask, bit for bit.
    """
    from .attention import check_attention_inputs

    check_attention_inputs(query, key, value, pos_key, pos_query, attention_mask, spec, num_prefix_keys)
    call = (query, key, value, pos_key, pos_query, attention_mask, spec, softmax_scale, dropout_p, False,
            num_prefix_keys)
    reasons = unsupported_reasons(*call)
    if reasons:
        raise BackendUnavailable("disentangled_attention: backend 'triton' cannot run this call: " + "; ".join(reasons))
    c2p = spec is not None and spec.c2p
    p2c = spec is not None and spec.p2c
    if allow_tf32 is None:
        allow_tf32 = query.device.type == "cuda" and float32_matmul_allows_tf32()
    if dropout_p > 0.0:
        if seed is None:
            seed = draw_seed(query.device)
        elif seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != query.device:
            raise ValueError(
                f"seed must be an int64 tensor with one element on {query.device}; got {seed.dtype} "
                f"{tuple(seed.shape)} on {seed.device}"
            )
    else:
        seed = None
    out, _ = _fwd_op(
        query, key, value, pos_key if c2p else None, pos_query if p2c else None, attention_mask, seed, c2p, p2c,
        spec.position_buckets if spec is not None else -1, spec.max_relative_positions if spec is not None else 1,
        float(softmax_scale), float(dropout_p), int(num_prefix_keys), bool(allow_tf32),
    )
    return out


def run(query, key, value, pos_key, pos_query, attention_mask, spec, softmax_scale, dropout_p, output_attentions,
        num_prefix_keys):
    """Backend entry of the dispatcher: (out, None)."""
    if output_attentions:
        raise BackendUnavailable("disentangled_attention: backend 'triton' cannot return attention probabilities")
    out = disentangled_attention_triton(
        query, key, value, pos_key, pos_query, attention_mask, spec=spec, softmax_scale=softmax_scale,
        dropout_p=dropout_p, num_prefix_keys=num_prefix_keys,
    )
    return out, None


def dropout_keep_mask(seed: Tensor, batch: int, heads: int, length: int, num_keys: int, dropout_p: float) -> Tensor:
    """Debug helper (tiny shapes): bool [B, H, L, P + L], where the kernels keep a probability for ``seed``."""
    from ..triton_kernels._common import dropout_keep_mask as _keep

    return _keep(seed, batch, heads, length, num_keys, dropout_p)


def kernel_distance_slots(length: int, spec: RelativePositionSpec, device) -> Tensor:
    """Debug helper: int32 [2L - 1], slot(t - (L - 1)) as the kernels evaluate it on ``device``."""
    from ..triton_kernels._common import distance_slots

    return distance_slots(length, spec.position_buckets, spec.max_relative_positions, device)
