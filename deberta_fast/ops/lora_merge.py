"""Merged inference: fold a LoRA or an IA³ scale into a linear layer's weight and bias, and unfold it.

    LoRA   merge:   W' = W + s · B A                  unmerge: W = W' - s · B A
    IA³    merge:   W' = diag(l) W,   b' = l ⊙ b      unmerge: W = diag(1/l) W',  b = b' / l

Shapes: weight [out, in], bias [out] or None, lora_A [r, in], lora_B [out, r], scale l [out] (any shape with out
entries). The functions return new tensors (the caller copies them into its Parameters under no_grad) in the
weight's dtype; the arithmetic runs in float32 (float64 for float64 weights), so a merge rounds once.

IA³ scales the bias too, so the merged layer equals ``ia3_linear`` exactly in real arithmetic; AdapterHub's
``merge_adapter`` leaves the bias unscaled, which changes the output by (l - 1) ⊙ b whenever the bias is not
zero. Unmerging IA³ needs every l ≠ 0. Unmerge inverts merge up to rounding (about one ulp of W per step).
"""

from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_lora(weight, lora_A, lora_B) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out, in]; got {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[1] != in_features or lora_B.shape[0] != out_features \
            or lora_A.shape[0] != lora_B.shape[1]:
        raise ValueError(f"lora_A must be [r, {in_features}] and lora_B [{out_features}, r] for weight "
                         f"{tuple(weight.shape)}; got lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}")


def lora_delta_weight(lora_A, lora_B, scaling: float, dtype=None) -> torch.Tensor:
    """s · B A [out, in] computed in float32 (float64 for float64 inputs), returned in ``dtype``."""
    compute = _compute_dtype(lora_A.dtype)
    delta = (lora_B.to(compute) @ lora_A.to(compute)) * scaling
    return delta.to(dtype or lora_A.dtype)


def merge_lora(weight, lora_A, lora_B, scaling: float) -> torch.Tensor:
    """W + s · B A."""
    _check_lora(weight, lora_A, lora_B)
    compute = _compute_dtype(weight.dtype)
    return (weight.to(compute) + lora_delta_weight(lora_A, lora_B, scaling, compute)).to(weight.dtype)


def unmerge_lora(weight, lora_A, lora_B, scaling: float) -> torch.Tensor:
    """W' - s · B A (the inverse of ``merge_lora``)."""
    _check_lora(weight, lora_A, lora_B)
    compute = _compute_dtype(weight.dtype)
    return (weight.to(compute) - lora_delta_weight(lora_A, lora_B, scaling, compute)).to(weight.dtype)


def _check_ia3(weight, bias, scale) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out, in]; got {tuple(weight.shape)}")
    if scale.numel() != weight.shape[0]:
        raise ValueError(f"scale must have {weight.shape[0]} entries (one per output feature); "
                         f"got {tuple(scale.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}]; got {tuple(bias.shape)}")


def merge_ia3(weight, bias, scale):
    """(diag(l) W, l ⊙ b); the bias stays None when there is none."""
    _check_ia3(weight, bias, scale)
    compute = _compute_dtype(weight.dtype)
    l = scale.reshape(-1).to(compute)
    new_weight = (weight.to(compute) * l[:, None]).to(weight.dtype)
    new_bias = None if bias is None else (bias.to(compute) * l).to(bias.dtype)
    return new_weight, new_bias


def unmerge_ia3(weight, bias, scale):
    """(diag(1/l) W', b' / l), the inverse of ``merge_ia3``; raises when some l is 0 (not invertible)."""
    _check_ia3(weight, bias, scale)
    compute = _compute_dtype(weight.dtype)
    l = scale.reshape(-1).to(compute)
    zeros = torch.nonzero(l == 0).flatten()
    if zeros.numel():
        raise ValueError(f"cannot unmerge IA³: scale is 0 at output feature(s) {zeros[:8].tolist()}, so the "
                         "merged rows no longer hold the original weights")
    new_weight = (weight.to(compute) / l[:, None]).to(weight.dtype)
    new_bias = None if bias is None else (bias.to(compute) / l).to(bias.dtype)
    return new_weight, new_bias
