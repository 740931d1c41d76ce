"""LoRA linear: y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ.

Shapes: x [..., in], weight [out, in], bias [out] or None, lora_A [r, in], lora_B [out, r], s = scaling.
The reference below is the CPU path and the oracle; ``lora_linear`` dispatches (``deberta_fast.ops.dispatch``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import adapter_triton, dispatch

OP_NAME = "lora_linear"


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float = 0.0):
    """Eager LoRA as PEFT and AdapterHub compute it: base linear, then the low-rank branch added."""
    base = F.linear(x, weight, bias)
    dropped = F.dropout(x, p=dropout_p, training=True) if dropout_p > 0.0 else x
    return base + (dropped @ lora_A.t() @ lora_B.t()) * scaling


CANDIDATES = (
    dispatch.Candidate("triton", "cuda", adapter_triton.lora_linear_reasons),
    dispatch.Candidate("reference", None, lambda *call: []),
)
_RUN = {"triton": adapter_triton.lora_linear, "reference": lora_linear_reference}


def lora_linear(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float = 0.0, *, backend=None):
    """LoRA linear (module docstring); dropout_p applies to the LoRA branch's input only (0.0 in eval)."""
    if lora_A.shape[1] != x.shape[-1] or lora_B.shape[0] != weight.shape[0] or lora_A.shape[0] != lora_B.shape[1]:
        raise ValueError(
            f"lora_A must be [r, in] and lora_B [out, r] for x [..., {x.shape[-1]}] and weight "
            f"{tuple(weight.shape)}; got lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}"
        )
    call = (x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    chosen = dispatch.select(OP_NAME, dispatch.requested_backend(backend), CANDIDATES, x.device.type, *call)
    return _RUN[chosen](*call)
