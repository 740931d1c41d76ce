"""Triton LoRA projections as torch.library custom ops (fake tensor impls + autograd).

One op serves both ``lora_linear`` (P = 1 projection) and ``lora_qkv`` (P = 3 projections of one input):

    Y_j = x W_jᵀ + b_j + s_j · (drop_j(x) A_jᵀ) B_jᵀ        x [..., K], W_j [N, K], A_j [r_j, K], B_j [N, r_j]

A projection whose A_j/B_j are empty (rank 0) is the base linear alone; an empty bias is no bias (list
arguments of custom ops hold no None that could receive a gradient). drop_j uses the counter mask of stream j of
``seed`` (``counter_dropout``), regenerated in backward. Gradients: x, A_j, B_j, and W_j/b_j when they require
grad (full fine-tuning: dW_j = dY_jᵀ x, db_j = Σ dY_j, by cuBLAS). Math and kernel design:
``deberta_fast/triton_kernels/lora_linear.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import counter_dropout


def _kernels():
    from deberta_fast.triton_kernels import lora_linear

    return lora_linear


def _present(t: Tensor) -> bool:
    return t.numel() > 0


def _rank_of(lora_As: Sequence[Tensor]) -> int:
    ranks = [a.shape[0] for a in lora_As if _present(a)]
    return max(16, 1 << (max(ranks) - 1).bit_length()) if ranks else 16


def _or_none(tensors: Sequence[Tensor]) -> list[Tensor | None]:
    return [t.contiguous() if _present(t) else None for t in tensors]


def _keys(seed: int, dropout_p: float, P: int):
    if dropout_p == 0.0:
        return (0,) * P, 0, 1.0
    keys = tuple(counter_dropout.stream_key(seed, j) for j in range(P))
    return keys, counter_dropout.keep_threshold(dropout_p), counter_dropout.keep_scale(dropout_p)


def _keeps_s(lora_As, dropout_p: float, save_s: bool) -> bool:
    return any(_present(a) for a in lora_As) and (save_s or dropout_p > 0.0)


@torch.library.custom_op("deberta_fast::lora_projections", mutates_args=())
def lora_projections(
    x: Tensor, weights: list[Tensor], biases: list[Tensor], lora_As: list[Tensor], lora_Bs: list[Tensor],
    scalings: list[float], dropout_p: float, seed: int, save_s: bool,
) -> tuple[Tensor, Tensor]:
    """Y [P, M, N] (M = rows of x) and S [P, M, R] fp32 (empty unless saved for backward or dropout is on)."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K).contiguous()
    P, N = len(weights), weights[0].shape[0]
    R = _rank_of(lora_As)
    if x2.shape[0] == 0:
        s_shape = (P, 0, R) if _keeps_s(lora_As, dropout_p, save_s) else (0,)
        return x.new_empty((P, 0, N)), x.new_empty(s_shape, dtype=torch.float32)
    keys, threshold, keep_scale = _keys(seed, dropout_p, P)
    y, s = _kernels().lora_forward(x2, [w.contiguous() for w in weights], _or_none(biases), _or_none(lora_As),
                                   _or_none(lora_Bs), scalings, keys, threshold, keep_scale, store_s=save_s)
    return y, s


@lora_projections.register_fake
def _(x, weights, biases, lora_As, lora_Bs, scalings, dropout_p, seed, save_s):
    M = x.numel() // x.shape[-1] if x.shape[-1] else 0
    P, N = len(weights), weights[0].shape[0]
    s_shape = (P, M, _rank_of(lora_As)) if _keeps_s(lora_As, dropout_p, save_s) else (0,)
    return x.new_empty((P, M, N)), x.new_empty(s_shape, dtype=torch.float32)


@torch.library.custom_op("deberta_fast::lora_projections_backward", mutates_args=())
def lora_projections_backward(
    dy: Tensor, x: Tensor, weights: list[Tensor], lora_As: list[Tensor], lora_Bs: list[Tensor],
    s: Tensor, scalings: list[float], dropout_p: float, seed: int, need_dx: bool, need_a: bool, need_b: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """dX (x's shape), dA [P, R, K] fp32, dB [P, R, N] fp32 (dB_jᵀ, padded); empty where not needed."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K).contiguous()
    P, M, N = dy.shape
    R = _rank_of(lora_As)
    present = any(_present(a) for a in lora_As)
    need_a, need_b = need_a and present, need_b and present
    if M == 0 or not (need_dx or need_a or need_b):
        dx = x.new_zeros(x.shape) if need_dx else x.new_empty((0,))
        da = x.new_zeros((P, R, K) if need_a else (0,), dtype=torch.float32)
        db = x.new_zeros((P, R, N) if need_b else (0,), dtype=torch.float32)
        return dx, da, db
    keys, threshold, keep_scale = _keys(seed, dropout_p, P)
    dx, da, db = _kernels().lora_backward(
        dy.contiguous(), x2, [w.contiguous() for w in weights], _or_none(lora_As), _or_none(lora_Bs), scalings, s,
        keys, threshold, keep_scale, need_dx, need_a, need_b)
    dx = dx.reshape(x.shape) if need_dx else x.new_empty((0,))
    da = da if need_a else x.new_empty((0,), dtype=torch.float32)
    db = db if need_b else x.new_empty((0,), dtype=torch.float32)
    return dx, da, db


@lora_projections_backward.register_fake
def _(dy, x, weights, lora_As, lora_Bs, s, scalings, dropout_p, seed, need_dx, need_a, need_b):
    P, _, N = dy.shape
    R, present = _rank_of(lora_As), any(_present(a) for a in lora_As)
    dx = x.new_empty(x.shape if need_dx else (0,))
    da = x.new_empty((P, R, x.shape[-1]) if need_a and present else (0,), dtype=torch.float32)
    db = x.new_empty((P, R, N) if need_b and present else (0,), dtype=torch.float32)
    return dx, da, db


def _setup_context(ctx, inputs, output):
    x, weights, biases, lora_As, lora_Bs, scalings, dropout_p, seed, save_s = inputs
    ctx.save_for_backward(x, output[1], *weights, *lora_As, *lora_Bs)
    ctx.bias_present = [_present(b) for b in biases]
    ctx.num_proj = len(weights)
    ctx.scalings, ctx.dropout_p, ctx.seed = list(scalings), dropout_p, seed


def _flags(entry, count: int) -> list[bool]:
    """needs_input_grad of a list argument: one bool per entry, or one bool for all."""
    if isinstance(entry, (list, tuple)):
        return [bool(e) for e in entry] + [False] * (count - len(entry))
    return [bool(entry)] * count


def _backward(ctx, dy, _ds):
    x, s, *rest = ctx.saved_tensors
    P = ctx.num_proj
    weights, lora_As, lora_Bs = rest[:P], rest[P:2 * P], rest[2 * P:]
    need_x = bool(ctx.needs_input_grad[0])
    need_w, need_bias, need_As, need_Bs = (_flags(e, P) for e in ctx.needs_input_grad[1:5])
    need_a, need_b = any(need_As), any(need_Bs)
    if need_b and s.numel() == 0:
        raise RuntimeError("lora_projections: the LoRA B gradient needs S, which was not saved (save_s=False)")
    dx, da, db = torch.ops.deberta_fast.lora_projections_backward(
        dy, x, list(weights), list(lora_As), list(lora_Bs), s, ctx.scalings, ctx.dropout_p, ctx.seed,
        bool(need_x), need_a, need_b)
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    grad_w = [None] * P
    grad_bias = [None] * P
    grad_a = [None] * P
    grad_b = [None] * P
    for j in range(P):
        if need_w[j]:
            grad_w[j] = (dy[j].t() @ x2).to(weights[j].dtype)
        if need_bias[j] and ctx.bias_present[j]:
            grad_bias[j] = dy[j].sum(0, dtype=torch.float32).to(dy.dtype)
        if _present(lora_As[j]):
            r = lora_As[j].shape[0]
            if need_As[j]:
                grad_a[j] = da[j, :r].to(lora_As[j].dtype)
            if need_Bs[j]:
                grad_b[j] = db[j, :r].t().to(lora_Bs[j].dtype)
    return (dx if need_x else None), grad_w, grad_bias, grad_a, grad_b, None, None, None, None


lora_projections.register_autograd(_backward, setup_context=_setup_context)


def run(x, weights, biases, lora_As, lora_Bs, scalings, dropout_p: float, seed: int | None):
    """Y_j for every projection, as a [P, ..., N] tensor (see the module docstring)."""
    if dropout_p > 0.0 and seed is None:
        seed = counter_dropout.draw_seed()
    needs_grad = torch.is_grad_enabled()
    save_s = needs_grad and any(b is not None and b.requires_grad for b in lora_Bs)
    N, K = weights[0].shape
    biases = [b if b is not None else x.new_empty((0,)) for b in biases]
    lora_As = [a if a is not None else x.new_empty((0, K)) for a in lora_As]
    lora_Bs = [b if b is not None else x.new_empty((N, 0)) for b in lora_Bs]
    y, _ = lora_projections(x, list(weights), biases, lora_As, lora_Bs, [float(s) for s in scalings],
                            float(dropout_p), 0 if seed is None else seed, save_s)
    return y.reshape(len(weights), *x.shape[:-1], y.shape[-1])
