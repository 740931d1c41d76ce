"""Query, key and value projections of one input, each with an optional LoRA, in one op (one launch on CUDA).

    q = lora_linear(x, W_q, b_q, *q_lora, dropout_p)     (plain x W_qᵀ + b_q when q_lora is None)
    k = lora_linear(x, W_k, b_k, *k_lora, dropout_p)
    v = lora_linear(x, W_v, b_v, *v_lora, dropout_p)

Shapes: x [..., in]; W_q, W_k, W_v [out, in] (one out for all three); biases [out] or None; each *_lora is None
or (lora_A [r, in], lora_B [out, r], scaling) with its own rank. Returns (q, k, v), each [..., out].
Each LoRA drops its own copy of x (independent masks, as three AdapterHub LoRA modules do): with ``seed``, the
LoRA of q, k, v uses stream 0, 1, 2 of ``deberta_fast.ops.counter_dropout``. With share_att_key, DeBERTa also
feeds the relative embeddings through the adapted q/k projections: call the op on them too.
"""

from __future__ import annotations

import torch.nn.functional as F

from . import adapter_triton, counter_dropout, dispatch
from .lora import check_lora_inputs, lora_linear_reference

OP_NAME = "lora_qkv"
_NAMES = ("q", "k", "v")


def lora_qkv_reference(x, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, q_lora=None, k_lora=None,
                       v_lora=None, dropout_p: float = 0.0, seed: int | None = None):
    """Three eager projections (the oracle and CPU path)."""
    outputs = []
    for j, (weight, bias, lora) in enumerate(((q_weight, q_bias, q_lora), (k_weight, k_bias, k_lora),
                                              (v_weight, v_bias, v_lora))):
        if lora is None:
            outputs.append(F.linear(x, weight, bias))
            continue
        lora_A, lora_B, scaling = lora
        if dropout_p > 0.0 and seed is not None:
            dropped = counter_dropout.apply_dropout(x, seed, dropout_p, stream=j)
            outputs.append(F.linear(x, weight, bias) + (dropped @ lora_A.t() @ lora_B.t()) * scaling)
        else:
            outputs.append(lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, dropout_p))
    return tuple(outputs)


CANDIDATES = (
    dispatch.Candidate("triton", "cuda", adapter_triton.lora_qkv_reasons),
    dispatch.Candidate("reference", None, lambda *call: []),
)
_RUN = {"triton": adapter_triton.lora_qkv, "reference": lora_qkv_reference}
_DISPATCH = dispatch.OpDispatcher(OP_NAME, CANDIDATES, _RUN)


def lora_qkv(x, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, q_lora=None, k_lora=None, v_lora=None,
             dropout_p: float = 0.0, *, seed=None, backend=None):
    """(q, k, v) (module docstring)."""
    weights = (q_weight, k_weight, v_weight)
    for name, weight in zip(_NAMES, weights):
        if tuple(weight.shape) != tuple(q_weight.shape):
            raise ValueError(f"{name}_weight must have q_weight's shape {tuple(q_weight.shape)}; "
                             f"got {tuple(weight.shape)}")
    for name, weight, bias, lora in zip(_NAMES, weights, (q_bias, k_bias, v_bias), (q_lora, k_lora, v_lora)):
        if lora is not None and (not isinstance(lora, (tuple, list)) or len(lora) != 3):
            raise ValueError(f"{name}_lora must be None or a tuple (lora_A, lora_B, scaling); "
                             f"got {type(lora).__name__}")
        lora_A, lora_B, scaling = lora if lora is not None else (weight.new_empty(0, x.shape[-1]),
                                                                 weight.new_empty(weight.shape[0], 0), 0.0)
        check_lora_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, prefix=f"{name}: ")
    call = (x, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, q_lora, k_lora, v_lora, dropout_p, seed)
    return _DISPATCH(backend, x.device.type, *call)
