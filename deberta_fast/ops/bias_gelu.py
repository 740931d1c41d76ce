"""Bias + exact GELU: the activation of DeBERTa's intermediate (feed-forward) layer.

Shapes: x [..., F] (the linear's output without its bias), bias [F]:

    y = gelu(x + bias) = z · Φ(z),   z = x + bias,   Φ(z) = (1 + erf(z / √2)) / 2

transformers' ``GELUActivation`` (``F.gelu``, exact form) of ``dense(hidden)``, with the linear's bias moved out of
the GEMM. Backends (``deberta_fast.ops.dispatch``):

- ``cpu``: the native op (``csrc/bias_gelu.cpp``). The forward is one pass like ATen's gelu; it saves x (the GEMM
  output autograd keeps for the activation anyway), and the backward computes d x = d y · (Φ(z) + z·φ(z)) and
  d bias = Σ_rows d x in the same pass (column sums in fixed block order: the same bits for any thread count), instead
  of ATen's gelu_backward followed by a separate column sum in the linear's backward. fp32 / bf16 / fp16, computed in
  fp32.
- ``reference``: ``F.gelu(x + bias)``.

ONNX export and TorchScript tracing take the reference; torch.compile and torch.export keep the native op as a
custom op with fake-tensor and autograd rules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import attention_cpu, dispatch, native_op

OP_NAME = "bias_gelu"


def bias_gelu_reference(x, bias):
    """``F.gelu(x + bias)`` (exact erf form)."""
    return F.gelu(x + bias)


def check_inputs(x, bias) -> None:
    """Raise ValueError naming the argument when the inputs do not fit the module docstring's contract."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"x must be a tensor [..., F]; got {type(x).__name__}")
    if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (x.shape[-1],):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"bias must be [F] = [{x.shape[-1]}] for x {tuple(x.shape)}; got {got}")


def _register_rules() -> None:
    forward = f"{attention_cpu.NAMESPACE}::bias_gelu_forward"

    @torch.library.register_fake(forward)
    def _forward_fake(x, bias):
        return x.new_empty(x.shape)

    @torch.library.register_fake(f"{attention_cpu.NAMESPACE}::bias_gelu_backward")
    def _backward_fake(grad_y, x, bias):
        return x.new_empty(x.shape), bias.new_empty(bias.shape)

    def setup_context(ctx, inputs, output):
        x, bias = inputs
        ctx.save_for_backward(x, bias)

    def backward_rule(ctx, grad_y):
        x, bias = ctx.saved_tensors
        dx, dbias = torch.ops.deberta_fast_cpu.bias_gelu_backward(grad_y, x, bias)
        return dx, (dbias if ctx.needs_input_grad[1] else None)

    torch.library.register_autograd(forward, backward_rule, setup_context=setup_context)


build_error = native_op.registration(_register_rules)


def unsupported_reasons(x, bias) -> list[str]:
    """Why the native CPU op cannot serve this call."""
    reasons = native_op.tensor_reasons(x)
    if bias.dtype != x.dtype or bias.device != x.device:
        reasons.append(f"bias must have the dtype and device of x ({x.dtype}, {x.device}); got ({bias.dtype}, "
                       f"{bias.device})")
    return native_op.with_build_reason(reasons, build_error)


def bias_gelu_cpu(x, bias):
    """The native op; inputs as accepted by ``unsupported_reasons``."""
    native_op.require_built(OP_NAME, build_error)
    return torch.ops.deberta_fast_cpu.bias_gelu_forward(x, bias)


CANDIDATES = (
    dispatch.Candidate("cpu", "cpu", unsupported_reasons),
    dispatch.Candidate("reference", None, lambda *call: []),
)
_RUN = {"cpu": bias_gelu_cpu, "reference": bias_gelu_reference}
_DISPATCH = dispatch.OpDispatcher(OP_NAME, CANDIDATES, _RUN)


def bias_gelu(x, bias, *, backend=None):
    """gelu(x + bias), exact form (module docstring); returns y [..., F] in x's dtype."""
    check_inputs(x, bias)
    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
        return bias_gelu_reference(x, bias)  # exporters lower plain ops; the custom op has no translation
    return _DISPATCH(backend, x.device.type, x, bias)
