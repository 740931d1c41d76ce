"""Invertible adapters (MAD-X, Pfeiffer et al. 2020): a coupling block on the input embeddings, inverted before a
masked-LM head's decoder.

``deberta.invertible_adapters.<n>`` holds one block per adapter whose bottleneck config sets ``inv_adapter``
("nice" or "glow"; AdapterHub's keys ``...<n>.F.{0,2}.{weight,bias}`` / ``...<n>.G...`` for NICE,
``...<n>.s1...`` / ``...<n>.s2...`` for GLOW). x [B, L, E] is split on the last axis into x1 [.., E//2] and
x2 [.., E - E//2]; each subnet is Linear(d, d // inv_adapter_reduction_factor) -> activation -> Linear(.., d').

    NICE:  y1 = x1 + F(x2);            y2 = x2 + G(y1)             inverse: x2 = y2 - G(y1); x1 = y1 - F(x2)
    GLOW:  (s, t) = s2(x2); y1 = e(s)·x1 + t;  (s', t') = s1(y1); y2 = e(s')·x2 + t'
           with e(s) = exp(clamp · 0.636 · atan(s / clamp)), clamp = 5; the inverse undoes the two steps in
           reverse order.

Only the first adapter of the active setup runs (AdapterHub's rule), after the embedding LayerNorm / dropout and
before a prompt is inserted; the masked-LM head applies the inverse to its transformed hidden states right before
the (tied) decoder. AdapterHub's GLOW block slices and concatenates on the sequence axis and crashes on [B, L, E]
inputs; here it works on the feature axis with the same modules and shapes.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..configuration import BnConfig
from ..layer_base import AdapterLayerBase
from .bottleneck import Activation
from .initialization import seeded_generator

__all__ = ["GLOWCouplingBlock", "InvertibleAdapterLayer", "NICECouplingBlock"]


def _subnet(dims_in: int, dims_out: int, non_linearity: str, reduction_factor) -> nn.Sequential:
    hidden = int(dims_in // reduction_factor)
    if hidden < 1:
        raise ValueError(f"inv_adapter_reduction_factor={reduction_factor} leaves no units for an input of {dims_in} "
                         "features")
    return nn.Sequential(nn.Linear(dims_in, hidden), Activation(non_linearity), nn.Linear(hidden, dims_out))


class NICECouplingBlock(nn.Module):
    """Additive coupling (module docstring); ``forward(x [B, L, E], rev=False) -> [B, L, E]``."""

    def __init__(self, channels: int, non_linearity: str = "relu", reduction_factor=2):
        super().__init__()
        self.split_len1 = channels // 2
        self.split_len2 = channels - channels // 2
        self.F = _subnet(self.split_len2, self.split_len1, non_linearity, reduction_factor)
        self.G = _subnet(self.split_len1, self.split_len2, non_linearity, reduction_factor)

    def forward(self, x: torch.Tensor, rev: bool = False) -> torch.Tensor:
        x1, x2 = x[..., : self.split_len1], x[..., self.split_len1:]
        if not rev:
            y1 = x1 + self.F(x2)
            y2 = x2 + self.G(y1)
        else:
            y2 = x2 - self.G(x1)
            y1 = x1 - self.F(y2)
        return torch.cat((y1, y2), -1)


class GLOWCouplingBlock(nn.Module):
    """Affine coupling with soft-clamped scales (module docstring); ``forward(x [B, L, E], rev=False)``."""

    def __init__(self, channels: int, non_linearity: str = "relu", reduction_factor=2, clamp: float = 5.0):
        super().__init__()
        self.split_len1 = channels // 2
        self.split_len2 = channels - channels // 2
        self.clamp = clamp
        self.s1 = _subnet(self.split_len1, self.split_len2 * 2, non_linearity, reduction_factor)
        self.s2 = _subnet(self.split_len2, self.split_len1 * 2, non_linearity, reduction_factor)

    def _log_scale(self, s: torch.Tensor) -> torch.Tensor:
        # 0.636 ~ 2/pi: atan maps to (-pi/2, pi/2), so log-scales stay within (-clamp, clamp)
        return self.clamp * 0.636 * torch.atan(s / self.clamp)

    def forward(self, x: torch.Tensor, rev: bool = False) -> torch.Tensor:
        x1, x2 = x[..., : self.split_len1], x[..., self.split_len1:]
        n1, n2 = self.split_len1, self.split_len2
        if not rev:
            r2 = self.s2(x2)
            y1 = torch.exp(self._log_scale(r2[..., :n1])) * x1 + r2[..., n1:]
            r1 = self.s1(y1)
            y2 = torch.exp(self._log_scale(r1[..., :n2])) * x2 + r1[..., n2:]
        else:
            r1 = self.s1(x1)
            y2 = (x2 - r1[..., n2:]) * torch.exp(-self._log_scale(r1[..., :n2]))
            r2 = self.s2(y2)
            y1 = (x1 - r2[..., n1:]) * torch.exp(-self._log_scale(r2[..., :n1]))
        return torch.cat((y1, y2), -1)


_BLOCKS = {"nice": NICECouplingBlock, "glow": GLOWCouplingBlock}


@torch.no_grad()
def _init_bert(module: nn.Module, generator) -> None:
    """AdapterHub's ``init_bert_weights``: Linear weights N(0, 0.02), biases 0."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear) and sub.weight.device.type != "meta":
            sub.weight.normal_(0.0, 0.02, generator=generator)
            if sub.bias is not None:
                sub.bias.zero_()


class InvertibleAdapterLayer(AdapterLayerBase, nn.ModuleDict):
    """``deberta.invertible_adapters``: {adapter name: coupling block} (layer index -1, location "invertible")."""

    adapter_modules_name = "invertible_adapters"

    def __init__(self, registry, model_config, get_word_embeddings):
        super().__init__()
        self._init_adapter_layer(registry, -1, "invertible")
        object.__setattr__(self, "_model_config", model_config)
        # new blocks take the device and dtype of the word embeddings (looked up when an adapter is added)
        object.__setattr__(self, "_get_word_embeddings", get_word_embeddings)

    @property
    def adapter_modules(self) -> nn.ModuleDict:
        return self

    def add_adapter(self, name: str, layer_idx: int) -> bool:
        config = self._registry.match(name, BnConfig, location_key="inv_adapter")
        if config is None:
            return False
        block_type = config["inv_adapter"]
        if block_type not in _BLOCKS:
            raise ValueError(f"Invalid invertible adapter type '{block_type}' (expected one of {sorted(_BLOCKS)})")
        channels = getattr(self._model_config, "embedding_size", None) or self._model_config.hidden_size
        reference = self._get_word_embeddings().weight
        block = _BLOCKS[block_type](channels, non_linearity=config["non_linearity"],
                                    reduction_factor=config["inv_adapter_reduction_factor"])
        _init_bert(block, seeded_generator(config.get("init_weights_seed"), "cpu"))
        block.to(device=reference.device, dtype=reference.dtype)
        block.train(self.training)
        self[name] = block
        return True

    def first_active(self) -> nn.Module | None:
        """The block of the active setup's first adapter, or None."""
        setup = self.active_setup()
        if setup is None:
            return None
        first = setup.first()
        return self[first] if first in self else None

    def forward(self, hidden_states: torch.Tensor, rev: bool = False) -> torch.Tensor:
        """[B, L, E] -> [B, L, E] through the first active adapter's block (its inverse with ``rev``)."""
        block = self.first_active()
        return hidden_states if block is None else block(hidden_states, rev=rev)

