"""LoRA linear: y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ.

Shapes: x [..., in], weight [out, in], bias [out] or None, lora_A [r, in], lora_B [out, r], s = scaling.
The reference below is the CPU path and the oracle; ``lora_linear`` dispatches (``deberta_fast.ops.dispatch``).

Dropout: with ``seed`` given, the mask is the counter mask of ``deberta_fast.ops.counter_dropout`` (identical on
every backend, regenerated in backward by the kernels); without it the reference uses torch's dropout and the
triton backend draws a seed from torch's default generator.
"""

from __future__ import annotations

import torch.nn.functional as F

from . import adapter_triton, counter_dropout, dispatch

OP_NAME = "lora_linear"


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float = 0.0,
                          seed: int | None = None):
    """Eager LoRA as PEFT and AdapterHub compute it: base linear, then the low-rank branch added."""
    base = F.linear(x, weight, bias)
    if dropout_p > 0.0 and seed is not None:
        dropped = counter_dropout.apply_dropout(x, seed, dropout_p)
    elif dropout_p > 0.0:
        dropped = F.dropout(x, p=dropout_p, training=True)
    else:
        dropped = x
    return base + (dropped @ lora_A.t() @ lora_B.t()) * scaling


CANDIDATES = (
    dispatch.Candidate("triton", "cuda", adapter_triton.lora_linear_reasons),
    dispatch.Candidate("reference", None, lambda *call: []),
)
_RUN = {"triton": adapter_triton.lora_linear, "reference": lora_linear_reference}
_DISPATCH = dispatch.OpDispatcher(OP_NAME, CANDIDATES, _RUN)


def check_lora_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed=None, prefix="") -> None:
    """Raise ValueError naming the argument when shapes or values do not fit the docstring's contract."""
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{prefix}weight must be [out, {x.shape[-1]}] for x [..., {x.shape[-1]}]; "
                         f"got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{prefix}bias must be [{weight.shape[0]}] (one per output feature); got {tuple(bias.shape)}")
    if (lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[1] != x.shape[-1]
            or lora_B.shape[0] != weight.shape[0] or lora_A.shape[0] != lora_B.shape[1]):
        raise ValueError(
            f"{prefix}lora_A must be [r, in] and lora_B [out, r] for x [..., {x.shape[-1]}] and weight "
            f"{tuple(weight.shape)}; got lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}"
        )
    if not 0.0 <= float(dropout_p) <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1]; got {dropout_p}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63):
        raise ValueError(f"seed must be None or an int in [0, 2**63); got {seed!r}")


def lora_linear(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float = 0.0, *, seed=None,
                backend=None):
    """LoRA linear (module docstring); dropout_p applies to the LoRA branch's input only (0.0 in eval)."""
    check_lora_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    call = (x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    return _DISPATCH(backend, x.device.type, *call)
