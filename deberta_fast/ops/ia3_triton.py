"""Triton IA³ linear as a torch.library custom op: y = (x Wᵀ + b) ⊙ l, the scale in the GEMM's epilogue.

Shapes: x [..., in], weight [out, in], bias [out] or None, scale l [out] (any shape with out entries).
Backward (p = x Wᵀ + b, saved by the forward kernel when l needs a gradient):

    dx = dY · diag(l) W        dl = Σ_rows dY ⊙ p        dW = diag(l) dYᵀ x        db = l ⊙ Σ_rows dY

dx and dW are cuBLAS GEMMs on the tiny pre-scaled diag(l)·W / on dYᵀ x; no [rows, out] temporary besides p.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _fused_linear():
    from deberta_fast.triton_kernels.fused_linear import fused_linear

    return fused_linear


@torch.library.custom_op("deberta_fast::ia3_linear", mutates_args=())
def ia3_linear_op(
    x: Tensor, weight: Tensor, bias: Tensor | None, scale: Tensor, save_pre: bool,
) -> tuple[Tensor, Tensor]:
    """(y [..., out], p = x Wᵀ + b as [rows, out] when save_pre, else empty)."""
    x2 = x.reshape(-1, x.shape[-1])
    y, pre, _ = _fused_linear()(x2, weight, bias=bias, scale=scale.reshape(-1), store_pre=save_pre)
    return y.reshape(*x.shape[:-1], weight.shape[0]), (pre if save_pre else x.new_empty((0,)))


@ia3_linear_op.register_fake
def _(x, weight, bias, scale, save_pre):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    pre = x.new_empty((rows, weight.shape[0]) if save_pre else (0,))
    return x.new_empty((*x.shape[:-1], weight.shape[0])), pre


def _setup_context(ctx, inputs, output):
    x, weight, bias, scale, save_pre = inputs
    ctx.save_for_backward(x, weight, scale, output[1])
    ctx.has_bias = bias is not None


def _backward(ctx, dy, _dpre):
    x, weight, scale, pre = ctx.saved_tensors
    need_x, need_w, need_b, need_scale = ctx.needs_input_grad[:4]
    out_features = weight.shape[0]
    dy2 = dy.reshape(-1, out_features)
    l = scale.reshape(-1).to(weight.dtype)
    dx = dw = db = dl = None
    if need_x:
        dx = (dy2 @ (weight * l[:, None])).reshape(x.shape)
    if need_w:
        dw = (dy2.t() @ x.reshape(-1, x.shape[-1])) * l[:, None]
    if need_b and ctx.has_bias:
        db = dy2.sum(0, dtype=torch.float32).to(dy.dtype) * l
    if need_scale:
        if pre.numel() == 0 and dy2.shape[0] > 0:
            raise RuntimeError("ia3_linear: the scale gradient needs x Wᵀ + b, which was not saved (save_pre=False)")
        dl = (dy2 * pre).sum(0, dtype=torch.float32).reshape(scale.shape).to(scale.dtype)
    return dx, dw, db, dl, None


ia3_linear_op.register_autograd(_backward, setup_context=_setup_context)


def run(x, weight, bias, scale):
    save_pre = torch.is_grad_enabled() and scale.requires_grad
    return ia3_linear_op(x, weight, bias, scale, save_pre)[0]
