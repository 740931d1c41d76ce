"""Triton bottleneck adapter core as torch.library custom ops: y = residual + s ⊙ (act(x W_dᵀ + b_d) W_uᵀ + b_u).

Shapes: x [..., H], down_weight W_d [m, H], down_bias [m], up_weight W_u [H, m], up_bias [H], residual [..., H]
or None, s a float or a [1] / [H] tensor. Forward = two launches of the epilogue GEMM
(``triton_kernels/fused_linear.py``): z = x W_dᵀ + b_d, h = act(z) (z kept for backward), then
y = residual + s ⊙ (h W_uᵀ + b_u) with bias, scaling and residual in the epilogue. The [rows, m] bottleneck is
the only intermediate in memory (m = H / reduction_factor), so x and the residual are each read once and y
written once; eager PyTorch makes three more full [rows, H] passes (bias+scale, residual add) plus their
backward twins.

Backward, given dY (u = h W_uᵀ + b_u is never stored):

    d_residual = dY                      G = dYᵀ h   [H, m]           c = Σ_rows dY   [H]
    dW_u = diag(s) G     db_u = s ⊙ c    ds_i = Σ_k G_ik (W_u)_ik + (b_u)_i c_i   (summed for a [1] s)
    dz = (dY · diag(s) W_u) ⊙ act'(z)    (one launch; c is a by-product of its loads)
    dW_d = dzᵀ x         db_d = Σ_rows dz          dx = dz W_d
"""

from __future__ import annotations

import torch
from torch import Tensor


def _fused_linear():
    from deberta_fast.triton_kernels.fused_linear import fused_linear

    return fused_linear


def _scale_arg(scaling_value: float, scaling: Tensor | None):
    return scaling.reshape(-1) if scaling is not None else scaling_value


@torch.library.custom_op("deberta_fast::bottleneck_adapter", mutates_args=())
def bottleneck_op(
    x: Tensor, down_weight: Tensor, down_bias: Tensor | None, up_weight: Tensor, up_bias: Tensor | None,
    residual: Tensor | None, activation: str, scaling_value: float, scaling: Tensor | None, save_z: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y [..., H], h = act(z) [rows, m], z [rows, m] when save_z else empty). ``scaling`` (a tensor) wins
    over ``scaling_value``."""
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    fused_linear = _fused_linear()
    h, z, _ = fused_linear(x2, down_weight, bias=down_bias, activation=activation, store_pre=save_z)
    res2 = residual.reshape(-1, hidden) if residual is not None else None
    y, _, _ = fused_linear(h, up_weight, bias=up_bias, scale=_scale_arg(scaling_value, scaling), residual=res2)
    return y.reshape(x.shape), h, (z if save_z else x.new_empty((0,)))


@bottleneck_op.register_fake
def _(x, down_weight, down_bias, up_weight, up_bias, residual, activation, scaling_value, scaling, save_z):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    m = down_weight.shape[0]
    return x.new_empty(x.shape), x.new_empty((rows, m)), x.new_empty((rows, m) if save_z else (0,))


@torch.library.custom_op("deberta_fast::bottleneck_adapter_backward_dz", mutates_args=())
def bottleneck_backward_dz(dy: Tensor, up_weight_scaled: Tensor, z: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    """dz = (dY [rows, H] · W_us [H, m]) ⊙ act'(z) and Σ_rows dY (fp32 [H])."""
    dz, _, colsum = _fused_linear()(dy, up_weight_scaled, b_transposed=True, activation=activation,
                                    act_grad_of=z, colsum_a=True)
    return dz, colsum


@bottleneck_backward_dz.register_fake
def _(dy, up_weight_scaled, z, activation):
    return dy.new_empty((dy.shape[0], up_weight_scaled.shape[1])), dy.new_empty((dy.shape[1],), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, down_weight, down_bias, up_weight, up_bias, residual, activation, scaling_value, scaling, save_z = inputs
    _, h, z = output
    ctx.save_for_backward(x, down_weight, up_weight, up_bias, scaling, h, z)
    ctx.activation, ctx.scaling_value = activation, scaling_value
    ctx.has_down_bias, ctx.has_residual = down_bias is not None, residual is not None


def _backward(ctx, dy, _dh, _dz):
    x, down_weight, up_weight, up_bias, scaling, h, z = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_x, need_wd, need_bd, need_wu, need_bu, need_res = need[:6]
    need_s = need[8]
    hidden = x.shape[-1]
    dy2 = dy.reshape(-1, hidden).contiguous()
    x2 = x.reshape(-1, hidden)
    if scaling is not None:
        s_vec = scaling.reshape(-1).to(torch.float32)
        s_col = s_vec[:, None] if s_vec.numel() > 1 else s_vec
    else:
        s_vec = s_col = ctx.scaling_value
    grads = [None] * 10
    if need_res and ctx.has_residual:
        grads[5] = dy
    colsum = None
    if need_x or need_wd or need_bd:
        if z.numel() == 0 and dy2.shape[0] > 0:
            raise RuntimeError("bottleneck_adapter: the input gradient needs the saved pre-activation (save_z=False)")
        up_scaled = (up_weight.to(torch.float32) * s_col).to(up_weight.dtype)
        dz, colsum = torch.ops.deberta_fast.bottleneck_adapter_backward_dz(dy2, up_scaled, z, ctx.activation)
        if need_x:
            grads[0] = (dz @ down_weight).reshape(x.shape)
        if need_wd:
            grads[1] = dz.t() @ x2
        if need_bd and ctx.has_down_bias:
            grads[2] = dz.sum(0, dtype=torch.float32).to(dz.dtype)
    if need_bu or need_s or need_wu:
        if colsum is None:
            colsum = dy2.sum(0, dtype=torch.float32)
        if need_wu or need_s:
            g = dy2.t() @ h  # [H, m]
            if need_wu:
                grads[3] = (g.to(torch.float32) * s_col).to(up_weight.dtype)
            if need_s:
                ds = (g.to(torch.float32) * up_weight.to(torch.float32)).sum(1)
                if up_bias is not None:
                    ds = ds + up_bias.to(torch.float32) * colsum
                ds = ds.sum().reshape(scaling.shape) if scaling.numel() == 1 else ds.reshape(scaling.shape)
                grads[8] = ds.to(scaling.dtype)
        if need_bu and up_bias is not None:
            grads[4] = (colsum * s_vec).to(up_bias.dtype)
    return tuple(grads)


bottleneck_op.register_autograd(_backward, setup_context=_setup_context)


def run(x, down_weight, down_bias, up_weight, up_bias, residual, activation, scaling):
    # z (the pre-activation) is only needed for the gradients of x, W_d and b_d.
    save_z = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, down_weight, down_bias))
    if isinstance(scaling, Tensor):
        value, tensor = 1.0, scaling
    else:
        value, tensor = float(scaling), None
    return bottleneck_op(x, down_weight, down_bias, up_weight, up_bias, residual, activation, value, tensor,
                         save_z)[0]
