"""IA³ linear: y = (x Wᵀ + b) ⊙ l, the projection scaled per output feature (bias scaled too, as in AdapterHub).

Shapes: x [..., in], weight [out, in], bias [out] or None, scale l [out].
"""

from __future__ import annotations

import torch.nn.functional as F

from . import adapter_triton, dispatch

OP_NAME = "ia3_linear"


def ia3_linear_reference(x, weight, bias, scale):
    return F.linear(x, weight, bias) * scale


CANDIDATES = (
    dispatch.Candidate("triton", "cuda", adapter_triton.ia3_linear_reasons),
    dispatch.Candidate("reference", None, lambda *call: []),
)
_RUN = {"triton": adapter_triton.ia3_linear, "reference": ia3_linear_reference}
_DISPATCH = dispatch.OpDispatcher(OP_NAME, CANDIDATES, _RUN)


def ia3_linear(x, weight, bias, scale, *, backend=None):
    """IA³ linear (module docstring)."""
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must be [out, {x.shape[-1]}] for x [..., {x.shape[-1]}]; got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}] (one per output feature); got {tuple(bias.shape)}")
    if scale.shape[-1] != weight.shape[0] or scale.numel() != weight.shape[0]:
        raise ValueError(f"scale must have {weight.shape[0]} entries (one per output feature); "
                         f"got {tuple(scale.shape)}")
    call = (x, weight, bias, scale)
    return _DISPATCH(backend, x.device.type, *call)
