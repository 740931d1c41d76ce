"""Prefix tuning (Li & Liang, 2021) with AdapterHub's modules, keys and math.

The pool ``deberta.prefix_tuning`` holds, per adapter, a ``PrefixTuningGroup`` with one prefix generator per
location ("self_prefix"). A generator produces the prefix keys and values of all its layers at once:

    MLP form:  kv = control_trans(wte(arange(P)))        wte Embedding(P, H), control_trans =
               Sequential(Linear(H, bottleneck), act, Linear(bottleneck, n_layers · 2 · heads · d))
    flat form: kv = control_trans                        Parameter [P · n_layers · 2 · heads · d]
    kv -> [B, P, n_layers · 2, heads, d] -> dropout -> per layer (key, value), each [B, heads, P, d]

Keys: ``prefix_tuning.prefix_tunings.<n>.self_prefix.{wte.weight, control_trans.{0,2}.{weight,bias}}`` or
``...self_prefix.control_trans``. AdapterHub also registers the pool inside every layer, so its files carry a
second copy of each tensor under ``encoder.layer.<i>.attention.self.prefix_tuning.pool.<same>``; here the pool is
referenced, not registered, and persistence/adapter_io.py writes / reads those aliases (files stay AdapterHub's).

Each attention layer's ``PrefixTuningLayer`` (key ``...attention.self.prefix_tuning``) owns the optional gates
(``prefix_gates.<n>``, Linear(H, 1) shared or Linear(H, 2) for key / value): with ``use_gating`` the prefix keys
and values are multiplied by mean over the sequence of sigmoid(gate(layer input)). Composition: Stack prepends
the later adapter's prefix in front of the earlier one; Parallel / BatchSplit give each row group its own
prefixes. The layer returns the prefixes as row segments [(rows, key, value)]; the attention runs the op once
when all segments have the same prefix length, else once per segment (attention.py).

``eject()`` turns the MLP form into the flat form with the same output (and the model records flat=True in the
adapter's config, so the ejected adapter saves and loads; AdapterHub keeps flat=False and cannot reload it).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn

from ..composition.blocks import BatchSplit, Parallel, Stack
from ..configuration import PrefixTuningConfig
from ..layer_base import AdapterLayerBase
from .bottleneck import Activation
from .initialization import seeded_generator

__all__ = ["FlatPrefixTuning", "PrefixTuning", "PrefixTuningGroup", "PrefixTuningLayer", "PrefixTuningPool"]


def _reset_linear_(linear: nn.Linear, generator) -> None:
    nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5), generator=generator)
    bound = 1.0 / math.sqrt(linear.in_features) if linear.in_features > 0 else 0.0
    nn.init.uniform_(linear.bias, -bound, bound, generator=generator)


def _split_layers(key_values: torch.Tensor, batch: int, prefix_length: int, n_layers: int, heads: int,
                  head_dim: int) -> tuple:
    """[B, P · n_layers · 2 · heads · d] (any leading view) -> per layer (key, value) [B, heads, P, d]."""
    kv = key_values.view(batch, prefix_length, n_layers * 2, heads, head_dim).permute(2, 0, 3, 1, 4)
    return tuple((kv[2 * i], kv[2 * i + 1]) for i in range(n_layers))


class PrefixTuning(nn.Module):
    """MLP form of a prefix generator (module docstring)."""

    def __init__(self, n_layers: int, n_heads: int, input_size: int, config: PrefixTuningConfig, head_dim: int,
                 device=None, dtype=None):
        super().__init__()
        self.n_layers, self.n_heads, self.input_size, self.head_dim = n_layers, n_heads, input_size, head_dim
        self.prefix_length = config.prefix_length
        factory = dict(device=device, dtype=dtype)
        self.wte = nn.Embedding(config.prefix_length, input_size, **factory)
        self.control_trans = nn.Sequential(
            nn.Linear(input_size, config.bottleneck_size, **factory),
            Activation(config.non_linearity),
            nn.Linear(config.bottleneck_size, n_layers * 2 * n_heads * head_dim, **factory),
        )
        self.dropout = nn.Dropout(config.dropout)
        generator = seeded_generator(config.init_weights_seed, self.wte.weight.device)
        if generator is not None:
            with torch.no_grad():
                nn.init.normal_(self.wte.weight, generator=generator)
                _reset_linear_(self.control_trans[0], generator)
                _reset_linear_(self.control_trans[2], generator)

    def flat_weights(self) -> torch.Tensor:
        """The flat form's parameter: control_trans(wte(arange(P))) as [P · n_layers · 2 · heads · d]."""
        tokens = torch.arange(self.prefix_length, device=self.wte.weight.device)
        return self.control_trans(self.wte(tokens)).reshape(-1)

    def forward(self, batch: int) -> tuple:
        tokens = torch.arange(self.prefix_length, device=self.wte.weight.device)
        key_values = self.control_trans(self.wte(tokens)).unsqueeze(0).expand(batch, -1, -1)
        key_values = self.dropout(key_values.reshape(batch, -1))
        return _split_layers(key_values, batch, self.prefix_length, self.n_layers, self.n_heads, self.head_dim)


class FlatPrefixTuning(nn.Module):
    """Flat form of a prefix generator: the prefix keys and values are the parameter ``control_trans``."""

    def __init__(self, n_layers: int, n_heads: int, input_size: int, config: PrefixTuningConfig, head_dim: int,
                 device=None, dtype=None):
        super().__init__()
        self.n_layers, self.n_heads, self.input_size, self.head_dim = n_layers, n_heads, input_size, head_dim
        self.prefix_length = config.prefix_length
        self.control_trans = nn.Parameter(torch.empty(config.prefix_length * n_layers * 2 * n_heads * head_dim,
                                                      device=device, dtype=dtype))
        if self.control_trans.device.type != "meta":
            generator = seeded_generator(config.init_weights_seed, self.control_trans.device)
            with torch.no_grad():
                nn.init.normal_(self.control_trans, generator=generator)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, batch: int) -> tuple:
        key_values = self.dropout(self.control_trans.unsqueeze(0).expand(batch, -1))
        return _split_layers(key_values, batch, self.prefix_length, self.n_layers, self.n_heads, self.head_dim)


class PrefixTuningGroup(nn.ModuleDict):
    """{location key: prefix generator} of one adapter."""

    def __init__(self, module_configs: dict, config: PrefixTuningConfig, device=None, dtype=None):
        super().__init__()
        cls = FlatPrefixTuning if config.flat else PrefixTuning
        for location, kwargs in module_configs.items():
            self[location] = cls(**kwargs, config=config, device=device, dtype=dtype)

    @torch.no_grad()
    def eject(self, config: PrefixTuningConfig) -> None:
        """Replace every MLP generator by the flat generator with the same output."""
        for location, module in list(self.items()):
            if isinstance(module, PrefixTuning):
                flat = FlatPrefixTuning(module.n_layers, module.n_heads, module.input_size, config.replace(flat=True),
                                        module.head_dim, device=module.wte.weight.device, dtype=module.wte.weight.dtype)
                flat.control_trans.copy_(module.flat_weights())
                flat.train(module.training)
                self[location] = flat

    def forward(self, batch: int) -> dict:
        return {location: module(batch) for location, module in self.items()}


class PrefixTuningPool(nn.Module):
    """The model-level holder of every adapter's prefix generators (module docstring).

    Adding a prefix adapter: each PrefixTuningLayer that takes it calls ``indicate_prefix`` (and gets its index
    among the layers of its location), then the model calls ``confirm_prefix``, which builds the generators for
    the number of layers counted.
    """

    def __init__(self, registry):
        super().__init__()
        object.__setattr__(self, "_registry", registry)
        self.prefix_tunings = nn.ModuleDict()
        self._counts: dict = {}

    def fill_context(self, context, batch: int) -> None:
        """Compute the prefixes of the setup's prefix adapters for ``batch`` rows into ``context.prefix_states``
        before the encoder runs, so that the layers only read them: a layer recomputed by gradient checkpointing
        then builds the same graph as in the forward pass, and the prefix generators stay outside the checkpoint."""
        setup = context.adapter_setup
        if setup is None:
            return
        for name in sorted(setup.flatten()):
            if name in self.prefix_tunings and name not in context.prefix_states:
                context.prefix_states[name] = (batch, self.prefix_tunings[name](batch))

    def indicate_prefix(self, name: str, location_key: str, **kwargs) -> int:
        locations = self._counts.setdefault(name, {})
        entry = locations.setdefault(location_key, {"count": 0, **kwargs})
        entry["count"] += 1
        return entry["count"] - 1

    def confirm_prefix(self, name: str, device=None, dtype=None) -> bool:
        config = self._registry.match(name, PrefixTuningConfig)
        if config is None:
            return False
        if name not in self._counts:
            raise ValueError(f"prefix tuning {name!r}: no attention layer takes it (check leave_out)")
        module_configs = {location: {"n_layers": entry["count"], "n_heads": entry["n_heads"],
                                     "input_size": entry["input_size"], "head_dim": entry["head_dim"]}
                          for location, entry in self._counts.pop(name).items()}
        group = PrefixTuningGroup(module_configs, config, device=device, dtype=dtype)
        group.train(self.training)
        self.prefix_tunings[name] = group
        return True

    def discard_counts(self, name: str) -> None:
        self._counts.pop(name, None)

    def average_prefix(self, name: str, input_adapters: dict, combine_strategy: str, device=None, dtype=None) -> bool:
        """Add prefix ``name`` as the weighted sum of the prefixes in ``input_adapters`` {name: weight}."""
        if not self.confirm_prefix(name, device=device, dtype=dtype):
            return False
        if combine_strategy != "linear":
            raise ValueError(f"Combine strategy {combine_strategy} not supported for prefix tuning.")
        total = {}
        for source, weight in input_adapters.items():
            for key, value in self.prefix_tunings[source].state_dict().items():
                total[key] = total[key] + weight * value if key in total else weight * value
        self.prefix_tunings[name].load_state_dict(total)
        return True

    def delete_prefix(self, name: str) -> None:
        if name in self.prefix_tunings:
            del self.prefix_tunings[name]
        self._counts.pop(name, None)

    def enable_prefix(self, name: str) -> None:
        if name in self.prefix_tunings:
            for param in self.prefix_tunings[name].parameters():
                param.requires_grad = True

    def get_prefix(self, name: str):
        return self.prefix_tunings[name] if name in self.prefix_tunings else None


class _PrefixState(NamedTuple):
    """start: first (absolute) batch row of this state; residual: the attention input of its rows [rows, L, H];
    segments: [(start, stop, key [rows, heads, P, d] | None, value)] covering the rows in order; batch: rows of
    the whole forward pass (the prefix generators run for all of them)."""

    start: int
    residual: torch.Tensor
    segments: tuple
    batch: int


class PrefixTuningLayer(AdapterLayerBase, nn.Module):
    """The prefix-tuning hook of one attention layer (module docstring). ``pool``: the model's PrefixTuningPool;
    ``n_heads``, ``head_dim``: the attention's head count and head size."""

    adapter_modules_name = "prefixes"
    supported_compositions = (Stack, Parallel, BatchSplit)

    def __init__(self, registry, layer_idx: int, pool: PrefixTuningPool, hidden_size: int, n_heads: int,
                 head_dim: int, reference: nn.Module, location_key: str = "self_prefix"):
        super().__init__()
        self._init_adapter_layer(registry, layer_idx, location_key)
        # the pool belongs to the model and a reference module (device / dtype of new gates) to the attention:
        # referenced, not registered
        object.__setattr__(self, "pool", pool)
        object.__setattr__(self, "_reference", reference)
        self.hidden_size, self.n_heads, self.head_dim = hidden_size, n_heads, head_dim
        self.prefixes: dict[str, int] = {}
        self.prefix_gates = nn.ModuleDict()

    # ---- management -------------------------------------------------------------------------------------------

    def add_adapter(self, name: str, layer_idx: int) -> bool:
        config = self._registry.match(name, PrefixTuningConfig, layer_idx=layer_idx)
        if config is None:
            return False
        self.prefixes[name] = self.pool.indicate_prefix(name, self.location_key, n_heads=self.n_heads,
                                                        input_size=self.hidden_size, head_dim=self.head_dim)
        if config.use_gating:
            weight = self._reference.weight
            gate = nn.Linear(self.hidden_size, 1 if config.shared_gating else 2, device=weight.device,
                             dtype=weight.dtype)
            if gate.weight.device.type != "meta":
                with torch.no_grad():
                    nn.init.normal_(gate.weight, mean=0.0, std=0.02)
            gate.train(self.training)
            self.prefix_gates[name] = gate
        return True

    def average_adapter(self, name: str, input_adapters: dict, combine_strategy: str, **kwargs) -> bool:
        if not self.add_adapter(name, self.layer_idx):
            return False
        if combine_strategy != "linear":
            self.delete_adapter(name)
            raise ValueError(f"Combine strategy {combine_strategy} not supported for prefix tuning.")
        if name in self.prefix_gates:
            missing = [n for n in input_adapters if n not in self.prefix_gates]
            if missing:
                self.delete_adapter(name)
                raise ValueError(f"Adapter {missing[0]} not found.")
            total = {}
            for source, weight in input_adapters.items():
                for key, value in self.prefix_gates[source].state_dict().items():
                    total[key] = total[key] + weight * value if key in total else weight * value
            self.prefix_gates[name].load_state_dict(total)
        return True

    def delete_adapter(self, name: str) -> None:
        self.pool.delete_prefix(name)
        self.prefixes.pop(name, None)
        if name in self.prefix_gates:
            del self.prefix_gates[name]

    def enable_adapters(self, setup, unfreeze_adapters: bool, unfreeze_fusion: bool) -> None:
        if unfreeze_adapters:
            for name in setup.flatten():
                self.pool.enable_prefix(name)
                if name in self.prefix_gates:
                    for param in self.prefix_gates[name].parameters():
                        param.requires_grad = True

    def freeze_adapter(self, name: str, freeze: bool = True) -> None:
        if name in self.prefixes:
            generator = self.pool.get_prefix(name)[self.location_key]
            generator.train(not freeze)
            for param in generator.parameters():
                param.requires_grad = not freeze
            if name in self.prefix_gates:
                for param in self.prefix_gates[name].parameters():
                    param.requires_grad = not freeze

    def get_adapter(self, name: str):
        """{"prefix": the generator (first layer of the location only, so it is counted once), "gate": ...}."""
        found = nn.ModuleDict()
        if self.prefixes.get(name) == 0 and self.pool.get_prefix(name) is not None:
            found["prefix"] = self.pool.get_prefix(name)[self.location_key]
        if name in self.prefix_gates:
            found["gate"] = self.prefix_gates[name]
        return found if len(found) else None

    # ---- forward ----------------------------------------------------------------------------------------------

    def prefix_segments(self, hidden_states: torch.Tensor):
        """The prefixes of this layer for the current setup: [(rows slice, key [rows, heads, P, d], value)], or
        None when no prefix adapter runs here. hidden_states: the attention input [B, L, H] (gate input)."""
        setup = self.active_setup()
        if setup is None:
            return None
        batch = hidden_states.shape[0]
        state = self.compose(setup, _PrefixState(0, hidden_states, ((0, batch, None, None),), batch))
        return [(slice(start, stop), key, value) for start, stop, key, value in state.segments]

    def _prefix_states(self, name: str, batch: int) -> tuple:
        context = self.forward_context()
        if context is not None:
            cached = context.prefix_states.get(name)
            if cached is None or cached[0] != batch:
                cached = (batch, self.pool.prefix_tunings[name](batch))
                context.prefix_states[name] = cached
            return cached[1][self.location_key][self.prefixes[name]]
        return self.pool.prefix_tunings[name](batch)[self.location_key][self.prefixes[name]]

    def compose_single(self, name: str, state: _PrefixState, level: int = 0) -> _PrefixState:
        all_keys, all_values = self._prefix_states(name, state.batch)
        gate = None
        if name in self.prefix_gates:
            gate = torch.sigmoid(self.prefix_gates[name](state.residual)).mean(dim=1)
            self.store_gating_score(name, gate)
        segments = []
        for start, stop, key, value in state.segments:
            prefix_key, prefix_value = all_keys[start:stop], all_values[start:stop]
            if gate is not None:
                rows = gate[start - state.start:stop - state.start]
                prefix_key = prefix_key * rows[:, 0].view(-1, 1, 1, 1)
                prefix_value = prefix_value * rows[:, -1].view(-1, 1, 1, 1)
            if key is not None:
                prefix_key, prefix_value = torch.cat([prefix_key, key], dim=2), torch.cat([prefix_value, value], dim=2)
            segments.append((start, stop, prefix_key, prefix_value))
        return state._replace(segments=tuple(segments))

    def _bsz(self, state: _PrefixState) -> int:
        return state.residual.shape[0]

    def _device_of(self, state: _PrefixState):
        return state.residual.device

    def vslice(self, state: _PrefixState, index) -> _PrefixState:
        if not isinstance(index, slice):
            raise NotImplementedError("prefix tuning slices the batch into row ranges only")
        begin, end = state.start + index.start, state.start + index.stop
        segments = []
        for start, stop, key, value in state.segments:
            lo, hi = max(start, begin), min(stop, end)
            if lo >= hi:
                continue
            cut = slice(lo - start, hi - start)
            segments.append((lo, hi, key[cut] if key is not None else None, value[cut] if value is not None else None))
        if not segments:
            segments = [(begin, begin, None, None)]
        return _PrefixState(begin, state.residual[index], tuple(segments), state.batch)

    def pad_and_concat(self, states: list) -> _PrefixState:
        segments = tuple(segment for s in states for segment in s.segments if segment[1] > segment[0])
        return _PrefixState(states[0].start, torch.cat([s.residual for s in states]), segments, states[0].batch)

    def repeat(self, state: _PrefixState, channels: int) -> _PrefixState:
        rows = state.residual.shape[0]
        segments = []
        for i in range(channels):
            for start, stop, key, value in state.segments:
                segments.append((start + i * rows, stop + i * rows, key, value))
        return _PrefixState(state.start, state.residual.repeat(channels, 1, 1), tuple(segments),
                            state.batch * channels)

    def mean(self, states: list, weights: list):
        raise NotImplementedError("Average composition is not supported by prefix tuning (as in AdapterHub)")

    def compose_multi_task(self, block, state: _PrefixState, level: int) -> _PrefixState:
        """Each run of consecutive rows with one task gets that task's child (AdapterHub's MultiTask result; rows
        stay in place, as the prefix segments are row ranges)."""
        task_ids = self.task_ids_of(block, state).tolist()
        if len(task_ids) != self._bsz(state):
            raise ValueError(f"task_ids has {len(task_ids)} entries for a batch of {self._bsz(state)} rows")
        parts, start = [], 0
        for stop in range(1, len(task_ids) + 1):
            if stop == len(task_ids) or task_ids[stop] != task_ids[start]:
                child = block.children[task_ids[start]]
                parts.append(self.compose_branch(block, child, self.vslice(state, slice(start, stop)), level))
                start = stop
        return self.pad_and_concat(parts)
