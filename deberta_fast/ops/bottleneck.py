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


def bottleneck_adapter(x, down_weight, down_bias, up_weight, up_bias, residual=None, *, activation="relu",
                       scaling=1.0, backend=None):
    """Bottleneck adapter core (module docstring)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}; got {activation!r}")
    call = (x, down_weight, down_bias, up_weight, up_bias, residual, activation, scaling)
    chosen = dispatch.select(OP_NAME, dispatch.requested_backend(backend), CANDIDATES, x.device.type, *call)
    return _RUN[chosen](*call)
