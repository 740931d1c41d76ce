"""ReFT interventions (Wu et al., 2024): LoReFT, NoReFT, DiReFT with AdapterHub's modules, keys and math.

Applied to the output of each chosen DeBERTa layer (layer 0: before the nGiE conv layer, as AdapterHub's hook
does), at the first ``prefix_positions`` valid tokens of every row (from its first non-padding position) and the
last ``suffix_positions`` valid tokens. Each position x [H] becomes

    x' = dropout(x + (act(W_s x + b_s) − R x) R)        R [r, H]; DiReFT (subtract_projection=False) drops − R x

with R orthogonal-parametrised for LoReFT (``torch.nn.utils.parametrizations.orthogonal``). Two units (prefix,
suffix) unless ``tied_weights``. Keys: ``encoder.layer.<i>.reft_layer.refts.<n>.units.<u>.learned_source.{weight,
bias}``, ``...projection.weight`` or, orthogonal, ``...projection.parametrizations.weight.original`` and
``...parametrizations.weight.0.base``. Only the first adapter of the active setup runs (AdapterHub's rule).
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ..configuration import ReftConfig
from ..layer_base import AdapterLayerBase
from .bottleneck import Activation
from .initialization import seeded_init
from .lora import _torch_dtype

logger = logging.getLogger("deberta_fast")

__all__ = ["ReftLayer", "ReftModule", "ReftUnit"]


class ReftUnit(nn.Module):
    """One intervention (module docstring)."""

    def __init__(self, hidden_size: int, r: int, orthogonal: bool, subtract_projection: bool, non_linearity,
                 dropout: float, device=None, dtype=None):
        super().__init__()
        self.orthogonal = orthogonal
        self.subtract_projection = subtract_projection
        self.learned_source = nn.Linear(hidden_size, r, bias=True, device=device, dtype=dtype)
        projection = nn.Linear(hidden_size, r, bias=False, device=device, dtype=dtype)
        if orthogonal:
            if dtype in (torch.float16, torch.bfloat16):
                logger.warning("ReFT: the orthogonal parametrisation needs float32; its projection stays float32")
                projection = projection.float()
            if projection.weight.device.type == "meta":
                projection = projection.to_empty(device="cpu")
            projection = nn.utils.parametrizations.orthogonal(projection)
        self.projection = projection
        self.non_linearity = Activation(non_linearity)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        source = self.non_linearity(self.learned_source(x))
        weight = self.projection.weight
        if self.subtract_projection:
            source = source - self.projection(x)
        return self.dropout(x + torch.matmul(source, weight))


class ReftModule(nn.Module):
    """The units of one adapter in one layer and the positions they act on."""

    def __init__(self, hidden_size: int, config: ReftConfig, device=None, dtype=None):
        super().__init__()
        self.prefix_positions = config.prefix_positions
        self.suffix_positions = config.suffix_positions
        self.tied_weights = config.tied_weights
        dtype = _torch_dtype(config.dtype, dtype or torch.get_default_dtype())
        count = 1 if config.tied_weights else 2
        self.units = nn.ModuleList([
            ReftUnit(hidden_size, config.r, config.orthogonality, config.subtract_projection, config.non_linearity,
                     config.dropout, device=device, dtype=dtype)
            for _ in range(count)
        ])

    def _positions(self, hidden: torch.Tensor, offsets, lengths):
        """(prefix index [B, p, H] or None, suffix index [B, s, H] or None)."""
        batch, length, width = hidden.shape
        device = hidden.device
        if offsets is None:
            offsets = torch.zeros(batch, dtype=torch.long, device=device)
            lengths = torch.full((batch,), length, dtype=torch.long, device=device)
        prefix = suffix = None
        # Rows shorter than the positions asked for: indices are clamped into the sequence (AdapterHub indexes
        # out of range and fails for suffixes longer than a row's valid tokens).
        if self.prefix_positions > 0:
            count = min(self.prefix_positions, length)
            steps = torch.arange(count, device=device)
            index = (offsets.view(-1, 1) + steps).clamp(0, length - 1)
            prefix = index.unsqueeze(-1).expand(batch, count, width)
        if self.suffix_positions > 0:
            count = min(self.suffix_positions, length)
            steps = torch.arange(-count, 0, device=device)
            index = ((offsets + lengths).view(-1, 1) + steps).clamp(0, length - 1)
            suffix = index.unsqueeze(-1).expand(batch, count, width)
        return prefix, suffix

    def forward(self, hidden: torch.Tensor, offsets=None, lengths=None) -> torch.Tensor:
        """hidden [B, L, H]; offsets / lengths [B]: first valid position and number of valid tokens per row."""
        prefix_index, suffix_index = self._positions(hidden, offsets, lengths)
        empty = hidden.new_zeros(hidden.shape[0], 0, hidden.shape[2])
        prefix = hidden.gather(1, prefix_index) if prefix_index is not None else empty
        suffix = hidden.gather(1, suffix_index) if suffix_index is not None else empty
        groups = [torch.cat([prefix, suffix], dim=1)] if self.tied_weights else [prefix, suffix]
        adapted = torch.cat([unit(group) for unit, group in zip(self.units, groups)], dim=1).to(hidden.dtype)
        if prefix_index is not None:
            hidden = torch.scatter(hidden, 1, prefix_index, adapted[:, : self.prefix_positions])
        if suffix_index is not None:
            hidden = torch.scatter(hidden, 1, suffix_index, adapted[:, -self.suffix_positions:])
        return hidden


class ReftLayer(AdapterLayerBase, nn.Module):
    """``encoder.layer.<i>.reft_layer``: the ReFT modules of one layer (location "output_reft")."""

    adapter_modules_name = "refts"

    def __init__(self, registry, layer_idx: int, hidden_size: int, reference: nn.Module):
        super().__init__()
        self._init_adapter_layer(registry, layer_idx, "output_reft")
        # a module of the layer (not registered here): new modules take the device and dtype of its weight
        object.__setattr__(self, "_reference", reference)
        self.hidden_size = hidden_size
        self.refts = nn.ModuleDict()

    def add_adapter(self, name: str, layer_idx: int) -> bool:
        config = self._registry.match(name, ReftConfig, layer_idx=layer_idx, location_key=self.location_key)
        if config is None or not (config.layers == "all" or layer_idx in config.layers):
            return False
        device = self._reference.weight.device
        with seeded_init(None if device.type == "meta" else config.init_weights_seed, device):
            module = ReftModule(self.hidden_size, config, device=device, dtype=self._reference.weight.dtype)
        module.train(self.training)
        self.refts[name] = module
        return True

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        setup = self.active_setup()
        if setup is None:
            return hidden
        first = setup.first()
        if first not in self.refts:
            return hidden
        context = self.forward_context()
        offsets = lengths = None
        if context is not None and context.token_offsets is not None:
            offsets, lengths = context.token_offsets, context.token_lengths
            if offsets.shape[0] != hidden.shape[0]:
                repeats = hidden.shape[0] // offsets.shape[0]
                offsets, lengths = offsets.repeat(repeats), lengths.repeat(repeats)
        return self.refts[first](hidden, offsets, lengths)
