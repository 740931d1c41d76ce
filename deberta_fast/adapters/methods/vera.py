"""VeRA (Kopiczko et al., 2024): vector-based random matrix adaptation, with AdapterHub 1.3.0's layout and math.

All layers of a VeRA adapter share two frozen random matrices, kept once per adapter in the model's
``shared_parameters.<name>`` (state-dict keys ``deberta.shared_parameters.<name>.lora_A`` [r, in] and ``.lora_B``
[out, r], ``requires_grad=False``). Each adapted linear layer trains two diagonal matrices, stored dense as
AdapterHub stores them: ``loras.<name>.vera_D`` [r, r] = diag(vera_d) and ``loras.<name>.vera_B`` [out, out] =
diag(vera_b) at initialisation (vera_b = 0 makes a new adapter a no-op). For x [..., in]:

    ΔW = vera_B · B · vera_D · A      [out, in]
    y  = x Wᵀ + b + s · dropout(x) ΔWᵀ,    s = alpha / r   (gated: s replaced by the gate, as in LoRA)

With ``use_dora`` (DvoRA), ``m`` and the DoRA rescaling of methods/dora.py apply with this ΔW.

Shared matrices: created after every layer has its module, with the shapes of the adapter's first module (the
q projection of layer 0 by default), initialised by ``init_weights`` ("vera": kaiming-uniform for A then B, as
AdapterHub's ``nn.init.kaiming_uniform_`` with its default a=0; also "lora", "bert", "ia3"). A non-zero
``init_weights_seed`` seeds their generator, so two adapters with the same seed get the same matrices (AdapterHub
reseeds its global RNG with the seed for the same draws). Every module of the adapter must have the shared
shapes: VeRA on linears of different shapes (e.g. with ``intermediate_lora``) is refused when the adapter is
added (AdapterHub builds it and then fails in the forward).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..configuration import LoRAConfig
from .dora import dora_merged_weights, dora_output, magnitude_from_weight
from .initialization import seeded_generator

__all__ = ["Vera", "is_vera", "shared_vera_parameters"]


def is_vera(config: LoRAConfig) -> bool:
    """Whether a LoRA-family config asks for VeRA (either vera_d or vera_b set)."""
    return config.vera_d is not None or config.vera_b is not None


class Vera(nn.Module):
    """One VeRA update in one linear layer (module docstring); ``registry`` gives access to the shared A/B."""

    fusable = False

    def __init__(self, in_features: int, out_features: int, config: LoRAConfig, registry, name: str,
                 base_weight: torch.Tensor | None = None, device=None, dtype=None):
        super().__init__()
        if config.vera_d is None or config.vera_b is None:
            raise ValueError(f"VeRA needs both vera_d and vera_b (floats); got vera_d={config.vera_d!r}, "
                             f"vera_b={config.vera_b!r}")
        if config.composition_mode != "add":
            raise ValueError("Vera module only supports composition_mode='add'.")
        if config.r < 1:
            raise ValueError(f"VeRA rank r must be >= 1; got {config.r}")
        object.__setattr__(self, "_registry", registry)
        self.adapter_name = name
        self.in_features = in_features
        self.out_features = out_features
        self.r = config.r
        self.lora_alpha = config.alpha
        self.scaling = config.alpha / config.r
        self.dropout_p = float(config.dropout)
        self.use_gating = config.use_gating
        self.use_dora = config.use_dora
        self.composition_mode = "add"
        self.vera_D = nn.Parameter(torch.diag(torch.full((config.r,), float(config.vera_d), device=device,
                                                         dtype=dtype)))
        self.vera_B = nn.Parameter(torch.diag(torch.full((out_features,), float(config.vera_b), device=device,
                                                         dtype=dtype)))
        if self.use_dora:
            if base_weight is None:
                raise ValueError("DoRA needs the base weight to initialise its magnitude")
            self.m = magnitude_from_weight(base_weight, dtype)
        if self.use_gating:
            generator = seeded_generator(config.init_weights_seed, self.vera_D.device)
            self.gate = nn.Linear(in_features, 1, device=device, dtype=dtype)
            with torch.no_grad():
                nn.init.normal_(self.gate.weight, std=0.02, generator=generator)

    @property
    def dropout_active(self) -> float:
        return self.dropout_p if self.training else 0.0

    def _shared(self) -> nn.ParameterDict:
        shared = getattr(self._registry, "shared_parameters", None)
        if shared is None or self.adapter_name not in shared:
            raise RuntimeError(f"VeRA adapter {self.adapter_name!r}: its shared matrices are missing from the "
                               "model's shared_parameters")
        return shared[self.adapter_name]

    @property
    def delta_w(self) -> torch.Tensor:
        """vera_B · B · vera_D · A, shape [out, in] (unscaled)."""
        shared = self._shared()
        return self.vera_B @ shared["lora_B"] @ self.vera_D @ shared["lora_A"]

    def update(self, hidden: torch.Tensor | None, layer_input: torch.Tensor) -> tuple:
        """(additive update, gate or None); in a Stack ``hidden`` is the previous adapter's update."""
        source = layer_input if hidden is None else hidden
        if source.shape[-1] != self.in_features:
            raise ValueError(f"cannot stack this VeRA on the previous adapter's update: the update has "
                             f"{source.shape[-1]} features but VeRA expects {self.in_features}")
        if self.dropout_active > 0:
            source = F.dropout(source, p=self.dropout_active, training=True)
        out = source @ self.delta_w.t()
        if self.use_gating:
            gate = torch.sigmoid(self.gate(layer_input)).mean(dim=1).unsqueeze(-1)
            return out * gate, gate
        return out * self.scaling, None

    def combine(self, layer_output: torch.Tensor, update: torch.Tensor, weight: torch.Tensor | None = None):
        if self.use_dora:
            return dora_output(layer_output, update, self.m, weight, self.delta_w)
        return layer_output + update

    def merged_weights(self, weight: torch.Tensor, bias: torch.Tensor | None):
        """(W', b'): W + s·ΔW (DvoRA: the DoRA fold of methods/dora.py)."""
        delta = self.delta_w.to(weight.dtype)
        if self.use_dora:
            return dora_merged_weights(weight, bias, delta, self.scaling, self.m)
        return weight + delta * self.scaling, bias


def shared_vera_parameters(config: LoRAConfig, a_shape: tuple, b_shape: tuple, device=None,
                           dtype=None) -> nn.ParameterDict:
    """The frozen shared matrices ``lora_A`` [r, in] and ``lora_B`` [out, r] of a VeRA adapter."""
    lora_a = torch.zeros(a_shape, device=device, dtype=dtype)
    lora_b = torch.zeros(b_shape, device=device, dtype=dtype)
    generator = seeded_generator(config.init_weights_seed, lora_a.device)
    if config.init_weights == "vera":
        nn.init.kaiming_uniform_(lora_a, generator=generator)
        nn.init.kaiming_uniform_(lora_b, generator=generator)
    elif config.init_weights == "lora":
        nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5), generator=generator)
    elif config.init_weights == "bert":
        nn.init.normal_(lora_a, std=0.02, generator=generator)
        nn.init.normal_(lora_b, std=0.02, generator=generator)
    elif config.init_weights == "ia3":
        nn.init.ones_(lora_a)
        nn.init.ones_(lora_b)
    else:
        raise ValueError(f"unknown VeRA init_weights {config.init_weights!r}; expected 'vera', 'lora', 'bert' "
                         "or 'ia3'")
    return nn.ParameterDict({"lora_A": nn.Parameter(lora_a, requires_grad=False),
                             "lora_B": nn.Parameter(lora_b, requires_grad=False)})
