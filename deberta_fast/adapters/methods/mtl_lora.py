"""MTL-LoRA (Yang et al., 2024): LoRA with a task-specific matrix and several weighted up-projections, with
AdapterHub 1.3.0's parameter layout and math.

Parameters of one adapter in one linear layer (AdapterHub's state-dict keys): ``loras.<name>.lora_A`` [r, in],
``loras.<name>.lora_B`` [n, out, r] (n = ``n_up_projection``), ``loras.<name>.weights`` [n] (init ones) and
``loras.<name>.task_specific.values``: [r] for ``task_specific_matrix_type="singular_values"`` (T = diag(values)),
[r, r] for ``"linear"`` (T = values); init ones. For x [..., in]:

    h_i = dropout(x) Aᵀ T B_iᵀ                          (i = 1..n)
    w   = exp(weights / weights_sharpness);  u = s · Σ_i w_i h_i / Σ_i w_i,   s = alpha / r (or the gate)
    y   = x Wᵀ + b + u

One MTL-LoRA adapter per task; a ``MultiTask("t1", "t2", ...)`` setup routes every batch row to the adapter named by
the forward's ``task_ids``. ``model.share_parameters(MultiTask(...))`` makes the tasks' adapters use one copy of
``lora_A`` / ``lora_B`` (kept per layer in ``shared_parameters.<joined names>``). Merging folds
ΔW = s · Σ_i ŵ_i B_i T A into W (exact; AdapterHub's merge cannot handle the 3-d lora_B).

Initialisation draws in AdapterHub's order from one generator (seeded by ``init_weights_seed``): A and a discarded
[out, r] B (AdapterHub's LoRA constructor draws it before MTL-LoRA replaces it), then the [n, out, r] B: zeros for
"lora" (and "vera", "ia3"), N(0, 0.02) for "bert".
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..configuration import MTLLoRAConfig
from .initialization import seeded_generator

__all__ = ["MTLLoRA", "TaskSpecificMatrix"]


class TaskSpecificMatrix(nn.Module):
    """T: ``values`` [r] read as diag(values) ("singular_values"), or ``values`` [r, r] read as is ("linear")."""

    def __init__(self, rank: int, kind: str, device=None, dtype=None):
        super().__init__()
        if kind not in ("singular_values", "linear"):
            raise ValueError(f"task_specific_matrix_type must be 'singular_values' or 'linear'; got {kind!r}")
        self.kind = kind
        shape = (rank,) if kind == "singular_values" else (rank, rank)
        self.values = nn.Parameter(torch.ones(shape, device=device, dtype=dtype))

    def forward(self) -> torch.Tensor:
        return torch.diag(self.values) if self.kind == "singular_values" else self.values


class MTLLoRA(nn.Module):
    """One MTL-LoRA update in one linear layer (module docstring)."""

    fusable = False
    sharable_parameters = ("lora_A", "lora_B")

    def __init__(self, in_features: int, out_features: int, config: MTLLoRAConfig, device=None, dtype=None):
        super().__init__()
        if config.r < 1:
            raise ValueError(f"MTL-LoRA rank r must be >= 1; got {config.r}")
        if config.n_up_projection < 1:
            raise ValueError(f"n_up_projection must be >= 1; got {config.n_up_projection}")
        if config.weights_sharpness <= 0:
            raise ValueError(f"weights_sharpness must be > 0; got {config.weights_sharpness}")
        self.r = config.r
        self.lora_alpha = config.alpha
        self.scaling = config.alpha / config.r
        self.dropout_p = float(config.dropout)
        self.use_gating = config.use_gating
        self.use_dora = False
        self.composition_mode = "add"
        self.weights_sharpness = float(config.weights_sharpness)
        n = config.n_up_projection
        self.lora_A = nn.Parameter(torch.zeros(config.r, in_features, device=device, dtype=dtype))
        discarded = torch.zeros(out_features, config.r, device=device, dtype=dtype)
        generator = seeded_generator(config.init_weights_seed, self.lora_A.device)
        with torch.no_grad():
            if config.init_weights == "lora":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
            elif config.init_weights == "bert":
                nn.init.normal_(self.lora_A, std=0.02, generator=generator)
                nn.init.normal_(discarded, std=0.02, generator=generator)
            elif config.init_weights == "ia3":
                nn.init.ones_(self.lora_A)
            elif config.init_weights == "vera":
                nn.init.kaiming_uniform_(self.lora_A, generator=generator)
                nn.init.kaiming_uniform_(discarded, generator=generator)
            else:
                raise ValueError(f"unknown MTL-LoRA init_weights {config.init_weights!r}; expected 'lora', 'bert', "
                                 "'ia3' or 'vera'")
        if self.use_gating:
            self.gate = nn.Linear(in_features, 1, device=device, dtype=dtype)
            with torch.no_grad():
                nn.init.normal_(self.gate.weight, std=0.02, generator=generator)
        self.lora_B = nn.Parameter(torch.zeros(n, out_features, config.r, device=device, dtype=dtype))
        if config.init_weights == "bert":
            with torch.no_grad():
                nn.init.normal_(self.lora_B, std=0.02, generator=generator)
        self.task_specific = TaskSpecificMatrix(config.r, config.task_specific_matrix_type, device, dtype)
        self.weights = nn.Parameter(torch.ones(n, device=device, dtype=dtype))

    @property
    def dropout_active(self) -> float:
        return self.dropout_p if self.training else 0.0

    def projection_weights(self) -> torch.Tensor:
        """ŵ = exp(weights / sharpness) / Σ exp(weights / sharpness), shape [n]."""
        w = (self.weights / self.weights_sharpness).exp()
        return w / w.sum()

    @property
    def delta_w(self) -> torch.Tensor:
        """Σ_i ŵ_i B_i T A, shape [out, in] (unscaled)."""
        combined_b = torch.einsum("n,nor->or", self.projection_weights(), self.lora_B)
        return combined_b @ self.task_specific() @ self.lora_A

    def update(self, hidden: torch.Tensor | None, layer_input: torch.Tensor) -> tuple:
        source = layer_input if hidden is None else hidden
        if source.shape[-1] != self.lora_A.shape[1]:
            raise ValueError(f"cannot stack this MTL-LoRA on the previous adapter's update: the update has "
                             f"{source.shape[-1]} features but lora_A expects {self.lora_A.shape[1]}")
        if self.dropout_active > 0:
            source = F.dropout(source, p=self.dropout_active, training=True)
        low = source @ self.lora_A.t() @ self.task_specific()            # [..., r]
        per_projection = torch.einsum("...r,nor->n...o", low, self.lora_B)  # [n, ..., out]
        w = self.projection_weights().to(per_projection.dtype)
        out = torch.einsum("n,n...->...", w, per_projection)
        if self.use_gating:
            gate = torch.sigmoid(self.gate(layer_input)).mean(dim=1).unsqueeze(-1)
            return out * gate, gate
        return out * self.scaling, None

    @staticmethod
    def combine(layer_output: torch.Tensor, update: torch.Tensor, weight: torch.Tensor | None = None):
        return layer_output + update

    def merged_weights(self, weight: torch.Tensor, bias: torch.Tensor | None):
        return weight + self.delta_w.to(weight.dtype) * self.scaling, bias
