"""Bottleneck adapter core: y = residual + s · (act(x W_dᵀ + b_d) W_uᵀ + b_u).

Shapes: x [..., H], down_weight [m, H], down_bias [m], up_weight [H, m], up_bias [H], residual [..., H] or
None (then y is the scaled adapter output alone), scaling s a float or a tensor broadcastable to [H]
([1] learned, [H] channel). activation: one of ACTIVATIONS. LayerNorms, gating and the placement around the
sub-layer stay in the adapter modules; this is the part a kernel fuses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import adapter_triton, dispatch

OP_NAME = "bottleneck_adapter"

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "swish": F.silu,
    "silu": F.silu,
    "tanh": torch.tanh,
}


def bottleneck_adapter_reference(x, down_weight, down_bias, up_weight, up_bias, residual, activation, scaling):
    hidden = ACTIVATIONS[activation](F.linear(x, down_weight, down_bias))
    out = F.linear(hidden, up_weight, up_bias) * scaling
    return out if residual is None else out + residual


CANDIDATES = (
    dispatch.Candidate("triton", "cuda", adapter_triton.bottleneck_reasons),
    dispatch.Candidate("reference", None, lambda *call: []),
)
_RUN = {"triton": adapter_triton.bottleneck, "reference": bottleneck_adapter_reference}
_DISPATCH = dispatch.OpDispatcher(OP_NAME, CANDIDATES, _RUN)


def check_bottleneck_inputs(x, down_weight, down_bias, up_weight, up_bias, residual, activation, scaling) -> None:
    """Raise ValueError naming the argument when an input does not fit the module docstring's contract."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}; got {activation!r}")
    hidden = x.shape[-1]
    if down_weight.dim() != 2 or down_weight.shape[1] != hidden:
        raise ValueError(f"down_weight must be [m, {hidden}] for x [..., {hidden}]; got {tuple(down_weight.shape)}")
    m = down_weight.shape[0]
    if tuple(up_weight.shape) != (hidden, m):
        raise ValueError(f"up_weight must be [{hidden}, {m}] for down_weight {tuple(down_weight.shape)}; "
                         f"got {tuple(up_weight.shape)}")
    if down_bias is not None and tuple(down_bias.shape) != (m,):
        raise ValueError(f"down_bias must be [{m}]; got {tuple(down_bias.shape)}")
    if up_bias is not None and tuple(up_bias.shape) != (hidden,):
        raise ValueError(f"up_bias must be [{hidden}]; got {tuple(up_bias.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}; got {tuple(residual.shape)}")
    if isinstance(scaling, torch.Tensor):
        if scaling.numel() not in (1, hidden) or (scaling.dim() > 0 and scaling.shape[-1] not in (1, hidden)):
            raise ValueError(f"scaling must be a float or a tensor with 1 or {hidden} entries ([1] learned, [H] "
                             f"channel); got shape {tuple(scaling.shape)}")
    elif not isinstance(scaling, (int, float)) or isinstance(scaling, bool):
        raise ValueError(f"scaling must be a float or a tensor; got {type(scaling).__name__}")


def bottleneck_adapter(x, down_weight, down_bias, up_weight, up_bias, residual=None, *, activation="relu",
                       scaling=1.0, backend=None):
    """Bottleneck adapter core (module docstring)."""
    check_bottleneck_inputs(x, down_weight, down_bias, up_weight, up_bias, residual, activation, scaling)
    call = (x, down_weight, down_bias, up_weight, up_bias, residual, activation, scaling)
    return _DISPATCH(backend, x.device.type, *call)
