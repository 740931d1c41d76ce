"""DoRA (Liu et al., 2024): weight-decomposed low-rank adaptation, with AdapterHub 1.3.0's math.

A DoRA adapter is a LoRA (or VeRA) update plus a magnitude vector ``m`` (stored as ``m.weight`` [out, 1], an
``nn.Linear(1, out, bias=False)`` so that the state-dict key is AdapterHub's ``loras.<name>.m.weight``), initialised
to the row norms of the base weight. For x [..., in], W [out, in], b [out], the unscaled update matrix
ΔW [out, in] (B A for LoRA, vera_B B vera_D A for VeRA) and the scaled update u = s · ΔW x (or gate · ΔW x):

    y = (m / n) ⊙ (x Wᵀ + b + u),      n = ‖W + ΔW‖ per row (unscaled ΔW, as AdapterHub computes it)

The bias sits inside the rescaling, exactly as AdapterHub's forward does it. Merging folds everything into the
linear layer: W' = (m / n) ⊙ (W + s · ΔW) row-wise and b' = (m / n) ⊙ b, so a merged DoRA gives the unmerged
output up to rounding. (AdapterHub merges m · (W + ΔW) / n, which drops s and leaves b unscaled: its merged
output differs from its own unmerged output whenever alpha != r or the bias is non-zero.)
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["dora_merged_weights", "dora_output", "magnitude_from_weight", "row_norm"]


def magnitude_from_weight(weight: torch.Tensor, dtype: torch.dtype | None = None) -> nn.Linear:
    """``m``: an ``nn.Linear(1, out, bias=False)`` whose weight [out, 1] holds the row norms of ``weight`` [out, in]."""
    dtype = dtype or weight.dtype
    module = nn.Linear(1, weight.shape[0], bias=False, device=weight.device, dtype=dtype)
    with torch.no_grad():
        module.weight.copy_(torch.linalg.norm(weight.detach(), dim=1).unsqueeze(1).to(dtype))
    return module


def row_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """‖W + ΔW‖ per row, shape [out]. Differentiable in ΔW (and W), as in AdapterHub (no detach)."""
    return torch.linalg.norm(weight + delta.to(weight.dtype), dim=1)


def dora_output(layer_output: torch.Tensor, update: torch.Tensor, magnitude: nn.Linear, weight: torch.Tensor,
                delta: torch.Tensor) -> torch.Tensor:
    """(m / ‖W + ΔW‖) ⊙ (layer_output + update); layer_output = x Wᵀ + b [..., out], update [..., out]."""
    scale = magnitude.weight.view(-1) / row_norm(weight, delta)
    return scale.to(layer_output.dtype) * (layer_output + update)


def dora_merged_weights(weight: torch.Tensor, bias: torch.Tensor | None, delta: torch.Tensor, scaling: float,
                        magnitude: nn.Linear):
    """(W', b') with x W'ᵀ + b' equal to :func:`dora_output` for the un-gated update s · ΔW x."""
    delta = delta.to(weight.dtype)
    scale = (magnitude.weight.view(-1) / row_norm(weight, delta)).to(weight.dtype)
    merged_weight = scale[:, None] * (weight + delta * scaling)
    merged_bias = scale * bias if bias is not None else None
    return merged_weight, merged_bias
