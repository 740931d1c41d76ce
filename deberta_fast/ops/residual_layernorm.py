"""Hidden dropout + bias + residual + LayerNorm: the tail of DeBERTa's attention-output and FFN-output blocks.

Shapes: x, residual [..., H] (x is the block's linear output without its bias), bias [H] or None, weight, beta [H]:

    h = dropout(x + bias) + residual
    y = (h - mean(h)) / sqrt(var(h) + eps) · weight + beta           (mean, biased variance over the last dim)

which is transformers' ``LayerNorm(dropout(dense(hidden)) + input_tensor)`` with the linear's bias moved out of the
GEMM. Backends (``deberta_fast.ops.dispatch``):

- ``cpu``: the native op (``csrc/residual_layernorm.cpp``): one fp32 pass per row, rows over threads; it saves h
  and the per-row mean and 1/std for backward, whose single pass per row gives d residual, d x, and the column sums
  d bias, d weight, d beta (in fixed block order: the same bits for any thread count). fp32 / bf16 / fp16 tensors of
  one dtype, computed in fp32, returned in that dtype.
- ``reference``: plain torch ops with torch's own dropout (the bernoulli draws transformers makes, in the same order).

Dropout on the native op is counter-based (``hidden_keep_mask``): element (row, col) of the 2-D view [rows, H] is
decided by word (col div 16) mod 4 of Philox4x32-10 on counters (row, 0, 16·(col div 64) + col mod 16, 1) under the
call's seed (one call, four words, four elements), with the attention dropout's threshold test on that word
(``attention_dropout``; the attention stream's last counter is 0), kept values scaled by 1 / (1 - p). The seed is drawn per
call from torch's default CPU generator (``torch.manual_seed`` makes runs repeatable); the backward pass regenerates
the mask instead of storing it. It is not torch's bernoulli stream: ``reference`` reproduces transformers' masks.

ONNX export and TorchScript tracing take the reference (plain ops the exporters lower); torch.compile and
torch.export keep the native op as a custom op with fake-tensor and autograd rules.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import attention_cpu, dispatch, native_op
from .attention_dropout import checked_seed, draw_seed, keep_of_word, philox4x32

OP_NAME = "residual_layernorm"
HIDDEN_STREAM = 1  # last Philox counter word of the hidden dropout (the attention dropout uses 0)


def residual_layernorm_reference(x, bias, residual, weight, beta, eps: float, dropout_p: float = 0.0):
    """The module docstring's formula in torch ops; dropout is ``F.dropout`` (torch's generator)."""
    h = x if bias is None else x + bias
    if dropout_p > 0.0:
        h = F.dropout(h, p=dropout_p, training=True)
    return F.layer_norm(h + residual, (weight.shape[0],), weight, beta, eps)


def hidden_keep_mask(seed, rows: int, cols: int, dropout_p: float) -> torch.Tensor:
    """bool [rows, cols]: where the native op's hidden dropout keeps element (row, col) for ``seed`` (an int in
    [0, 2^63) or an int64 tensor with one element). Pure PyTorch, O(rows · cols) memory: tests and oracles."""
    seed = checked_seed(seed, dropout_p)
    if dropout_p == 0.0:
        return torch.ones(rows, cols, dtype=torch.bool)
    row = torch.arange(rows, dtype=torch.int64).view(-1, 1)
    col = torch.arange(cols, dtype=torch.int64).view(1, -1)
    zero = torch.zeros((), dtype=torch.int64)
    words = philox4x32(row, zero, 16 * (col // 64) + col % 16, zero + HIDDEN_STREAM, seed)
    pick = ((col // 16) % 4).expand(rows, cols)
    word = torch.where(pick == 0, words[0], torch.where(pick == 1, words[1], torch.where(pick == 2, words[2],
                                                                                          words[3])))
    return keep_of_word(word, dropout_p)


def check_inputs(x, bias, residual, weight, beta, eps, dropout_p) -> None:
    """Raise ValueError naming the argument when the inputs do not fit the module docstring's contract."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"x must be a tensor [..., H]; got {type(x).__name__ if not isinstance(x, torch.Tensor) else tuple(x.shape)}")
    width = x.shape[-1]
    if not isinstance(residual, torch.Tensor) or residual.shape != x.shape:
        got = tuple(residual.shape) if isinstance(residual, torch.Tensor) else type(residual).__name__
        raise ValueError(f"residual must have the shape of x {tuple(x.shape)}; got {got}")
    for name, vector in (("bias", bias), ("weight", weight), ("beta", beta)):
        if vector is None and name == "bias":
            continue
        if not isinstance(vector, torch.Tensor) or tuple(vector.shape) != (width,):
            got = tuple(vector.shape) if isinstance(vector, torch.Tensor) else type(vector).__name__
            raise ValueError(f"{name} must be [H] = [{width}] for x {tuple(x.shape)}; got {got}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0; got {eps}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1); got {dropout_p}")


def _register_rules() -> None:
    forward = f"{attention_cpu.NAMESPACE}::residual_layernorm_forward"

    @torch.library.register_fake(forward)
    def _forward_fake(x, bias, residual, weight, beta, eps, seed, dropout_p, keep_sum):
        rows = math.prod(x.shape[:-1])
        h = x.new_empty(x.shape) if keep_sum else x.new_empty((0,))
        stats = x.new_empty((rows,), dtype=torch.float32)
        return x.new_empty(x.shape), h, stats, stats.new_empty((rows,))

    @torch.library.register_fake(f"{attention_cpu.NAMESPACE}::residual_layernorm_backward")
    def _backward_fake(grad_y, h, mean, rstd, weight, seed, dropout_p, bias_grad):
        dx = h.new_empty(h.shape) if dropout_p > 0.0 else h.new_empty((0,))
        dbias = weight.new_empty(weight.shape) if bias_grad else weight.new_empty((0,))
        return h.new_empty(h.shape), dx, dbias, weight.new_empty(weight.shape), weight.new_empty(weight.shape)

    def setup_context(ctx, inputs, output):
        _, bias, _, weight, _, _, seed, dropout_p, _ = inputs
        _, h, mean, rstd = output
        ctx.save_for_backward(h, mean, rstd, weight, seed)
        ctx.dropout_p = dropout_p
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(h, mean, rstd)
        ctx.set_materialize_grads(False)  # no zero [rows, H] gradient for h, which nothing differentiates


    def backward_rule(ctx, grad_y, _grad_h, _grad_mean, _grad_rstd):
        h, mean, rstd, weight, seed = ctx.saved_tensors
        if grad_y is None:
            return (None,) * 9
        bias_grad = ctx.has_bias and ctx.needs_input_grad[1]
        dh, dx, dbias, dweight, dbeta = torch.ops.deberta_fast_cpu.residual_layernorm_backward(
            grad_y, h, mean, rstd, weight, seed, ctx.dropout_p, bias_grad,
        )
        # Without dropout d x = d h: the same tensor flows into both inputs.
        return (dx if ctx.dropout_p > 0.0 else dh, dbias if bias_grad else None, dh, dweight, dbeta,
                None, None, None, None)

    torch.library.register_autograd(forward, backward_rule, setup_context=setup_context)


build_error = native_op.registration(_register_rules)


def unsupported_reasons(x, bias, residual, weight, beta, eps, dropout_p) -> list[str]:
    """Why the native CPU op cannot serve this call (the argument tuple of ``residual_layernorm``)."""
    reasons = native_op.tensor_reasons(x)
    others = [(name, t) for name, t in (("residual", residual), ("bias", bias), ("weight", weight), ("beta", beta))
              if t is not None and (t.dtype != x.dtype or t.device != x.device)]
    if others:
        reasons.append("every tensor must have the dtype and device of x "
                       f"({x.dtype}, {x.device}); these differ: {', '.join(name for name, _ in others)}")
    return native_op.with_build_reason(reasons, build_error)


def residual_layernorm_cpu(x, bias, residual, weight, beta, eps, dropout_p):
    """The native op (module docstring); inputs as accepted by ``unsupported_reasons``."""
    native_op.require_built(OP_NAME, build_error)
    seed = draw_seed() if dropout_p > 0.0 else None
    keep_sum = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, bias, residual, weight, beta)
    )
    y, _, _, _ = torch.ops.deberta_fast_cpu.residual_layernorm_forward(
        x, bias, residual, weight, beta, float(eps), seed, float(dropout_p), keep_sum,
    )
    return y


CANDIDATES = (
    dispatch.Candidate("cpu", "cpu", unsupported_reasons),
    dispatch.Candidate("reference", None, lambda *call: []),
)
_RUN = {"cpu": residual_layernorm_cpu, "reference": residual_layernorm_reference}
_DISPATCH = dispatch.OpDispatcher(OP_NAME, CANDIDATES, _RUN)


def residual_layernorm(x, bias, residual, weight, beta, eps: float, dropout_p: float = 0.0, *, backend=None):
    """LayerNorm(dropout(x + bias) + residual) over the last dim (module docstring); ``dropout_p`` 0.0 in eval mode.
    ``backend`` overrides the context / environment choice; returns y [..., H] in x's dtype."""
    check_inputs(x, bias, residual, weight, beta, eps, dropout_p)
    call = (x, bias, residual, weight, beta, float(eps), float(dropout_p))
    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
        return residual_layernorm_reference(*call)  # exporters lower plain ops; the custom op has no translation
    return _DISPATCH(backend, x.device.type, *call)
