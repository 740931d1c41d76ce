"""AdapterFusion (Pfeiffer et al., 2021): attention over the outputs of several bottleneck adapters.

Config (AdapterHub's ``AdapterFusionConfig``; names "dynamic" (default) and "static"): which of the query / key /
value projections exist, where the query is taken (``query_before_ln``), whether the residual is added before the
attention (``residual_before``), the softmax temperature schedule (``temperature``), whether the value projection
runs before or after the weighted sum (``value_before_softmax``), its identity initialisation
(``value_initialized``), the regularisation flag and the score dropout (``dropout_prob``; None: the model's
attention_probs_dropout_prob).

Math of one fusion layer, for the query q [B, L, H] (the last fused adapter's input: methods/bottleneck.py), the fused
adapters' up-projections U [B, L, n, H] and the adapters' residual r [B, L, H]:

    U' = U + r (residual_before)             K = key(U'),  V = value(U') (value_before_softmax)
    s = dropout((query(q) · K) per adapter)  p = softmax(s / T) over the n adapters       [B, L, n]
    c = Σ_n p · V  (value(c) when not value_before_softmax);   out = c + r (unless residual_before)

T starts at 50 with ``temperature`` (else 1) and decreases by T/1000 after every forward, down to 1, as in
AdapterHub. Parameters (state-dict keys under ``adapter_fusion_layer.<fusion name>.``): ``query`` / ``key``
Linear(H, H), ``value`` Linear(H, H, bias=False) (identity + 1e-6 when value_initialized), ``dense`` Linear(H, 1)
when none of the three exists (AdapterHub keeps it, unused).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..configuration import AdapterConfig

__all__ = ["ADAPTERFUSION_CONFIG_MAP", "DEFAULT_ADAPTERFUSION_CONFIG", "AdapterFusionConfig", "AdapterFusionLayer",
           "DynamicAdapterFusionConfig", "StaticAdapterFusionConfig", "fusion_regularization_loss"]


@dataclass(eq=False)
class AdapterFusionConfig(AdapterConfig):
    """AdapterFusion configuration (module docstring); fields and JSON keys are AdapterHub's."""

    key: bool
    query: bool
    value: bool
    query_before_ln: bool
    regularization: bool
    residual_before: bool
    temperature: bool
    value_before_softmax: bool
    value_initialized: bool | str
    dropout_prob: float | None

    @classmethod
    def load(cls, config=None, **overrides) -> AdapterFusionConfig:
        """``config``: "dynamic" / "static" (None: "dynamic"), a dict, a config object, or a JSON file (a bare
        config or an adapter_fusion_config.json); ``overrides`` replace fields."""
        if config is None:
            config = DEFAULT_ADAPTERFUSION_CONFIG
        if isinstance(config, AdapterFusionConfig):
            resolved = config
        elif isinstance(config, Mapping):
            resolved = _from_mapping(config)
        elif isinstance(config, str) and config in ADAPTERFUSION_CONFIG_MAP:
            resolved = ADAPTERFUSION_CONFIG_MAP[config]
        elif isinstance(config, str) and os.path.isfile(config):
            with open(config, encoding="utf-8") as handle:
                try:
                    loaded = json.load(handle)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{config}: not a valid JSON AdapterFusion config: {error}") from None
            resolved = _from_mapping(loaded["config"] if "config" in loaded else loaded)
        else:
            raise ValueError(f"Invalid AdapterFusion config {config!r}: expected one of "
                             f"{sorted(ADAPTERFUSION_CONFIG_MAP)}, a dict or a JSON file path")
        return resolved.replace(**overrides) if overrides else resolved


def _from_mapping(config: Mapping) -> AdapterFusionConfig:
    values = {k: v for k, v in dict(config).items() if k != "architecture"}
    return AdapterFusionConfig.from_dict(values)


@dataclass(eq=False)
class StaticAdapterFusionConfig(AdapterFusionConfig):
    """Fusion without a value matrix."""

    key: bool = True
    query: bool = True
    value: bool = False
    query_before_ln: bool = False
    regularization: bool = False
    residual_before: bool = False
    temperature: bool = False
    value_before_softmax: bool = True
    value_initialized: bool | str = False
    dropout_prob: float | None = None


@dataclass(eq=False)
class DynamicAdapterFusionConfig(AdapterFusionConfig):
    """Fusion with an identity-initialised value matrix and its regularisation (the default)."""

    key: bool = True
    query: bool = True
    value: bool = True
    query_before_ln: bool = False
    regularization: bool = True
    residual_before: bool = False
    temperature: bool = False
    value_before_softmax: bool = True
    value_initialized: bool | str = True
    dropout_prob: float | None = None


ADAPTERFUSION_CONFIG_MAP = {"static": StaticAdapterFusionConfig(), "dynamic": DynamicAdapterFusionConfig()}
DEFAULT_ADAPTERFUSION_CONFIG = "dynamic"


def _bert_init_(linear: nn.Linear) -> None:
    nn.init.normal_(linear.weight, mean=0.0, std=0.02)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


class AdapterFusionLayer(nn.Module):
    """One fusion layer (module docstring)."""

    def __init__(self, config: AdapterFusionConfig, hidden_size: int, dropout_prob: float, device=None, dtype=None):
        super().__init__()
        self.config = config
        factory = dict(device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout_prob)
        meta = torch.device(device or "cpu").type == "meta"
        with torch.no_grad():
            if not (config["query"] or config["key"] or config["value"]):
                self.dense = nn.Linear(hidden_size, 1, **factory)
            if config["query"]:
                self.query = nn.Linear(hidden_size, hidden_size, **factory)
                if not meta:
                    _bert_init_(self.query)
            if config["key"]:
                self.key = nn.Linear(hidden_size, hidden_size, **factory)
                if not meta:
                    _bert_init_(self.key)
            if config["value"]:
                self.value = nn.Linear(hidden_size, hidden_size, bias=False, **factory)
                if not meta:
                    _bert_init_(self.value)
                    if config["value_initialized"]:
                        self.value.weight.fill_(1e-6).fill_diagonal_(1.0)
        self.T = 50.0 if config["temperature"] else 1.0
        self.reduction = self.T / 1000.0

    def forward(self, query: torch.Tensor, up: torch.Tensor, residual: torch.Tensor):
        """query [B, L, H], up [B, L, n, H], residual [B, L, H] -> (out [B, L, H], probabilities [B, L, n])."""
        config = self.config
        if config["residual_before"]:
            up = up + residual.unsqueeze(2)
        query_layer = self.query(query) if config["query"] else query
        key_layer = self.key(up) if config["key"] else up
        value_layer = self.value(up) if config["value"] and config["value_before_softmax"] else up
        scores = torch.matmul(query_layer.unsqueeze(2), key_layer.transpose(-2, -1)).squeeze(2)
        scores = self.dropout(scores)
        probs = torch.softmax(scores / self.T, dim=-1)
        self.T = max(self.T - self.reduction, 1.0)
        context = torch.matmul(probs.unsqueeze(2), value_layer).squeeze(2)
        if config["value"] and not config["value_before_softmax"]:
            context = self.value(context)
        if not config["residual_before"]:
            context = context + residual
        return context, probs


def fusion_regularization_loss(fusion_layers, hidden_size: int) -> torch.Tensor | None:
    """0.01 · Σ ‖I − W_value‖² over the fusion layers whose value matrix trains (None if there is none)."""
    total = None
    for layer in fusion_layers:
        value = getattr(layer, "value", None)
        if value is None or not value.weight.requires_grad:
            continue
        target = torch.eye(hidden_size, device=value.weight.device, dtype=value.weight.dtype)
        loss = 0.01 * (target - value.weight).pow(2).sum()
        total = loss if total is None else total + loss
    return total
