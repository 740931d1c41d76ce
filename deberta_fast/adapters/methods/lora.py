"""LoRA and (IA)³ on DeBERTa's linear projections, with AdapterHub's module layout and math.

``LoRALinear`` replaces a ``nn.Linear`` (query_proj, key_proj, value_proj, intermediate.dense, output.dense) and
reuses its ``weight``/``bias`` Parameters, so base state-dict keys do not change; adapters live in ``loras``:
``...query_proj.loras.<name>.lora_A`` [r, in], ``.lora_B`` [out, r] ((IA)³: ``lora_B`` [out, 1] only),
``.gate.{weight, bias}`` with gating.

Math for x [..., in], W [out, in], b [out]:

- LoRA:   y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ,  s = alpha / r;  gated: s is replaced by
  g = mean over the sequence of sigmoid(gate(x)) (shape [B, 1, 1]).
- (IA)³:  y = (x Wᵀ + b) ⊙ (alpha · l),  l = lora_B[:, 0]  (gated: alpha replaced by g).
- Stack(a, b) in one layer: b's input is a's update (not x) and y = x Wᵀ + b + update_b (AdapterHub's rule).
- Average: y = x Wᵀ + b + mean_i(w_i · update_i) (AdapterHub's rule: the mean of the weighted updates).
- DoRA (``use_dora``), VeRA (``vera_d`` / ``vera_b``) and MTL-LoRA (``MTLLoRAConfig``): methods/dora.py, vera.py,
  mtl_lora.py. The adapter that finishes a row applies its ``combine`` (DoRA rescales there).

A single active plain LoRA or (IA)³ adapter runs through ``deberta_fast.ops.lora_linear`` / ``ops.ia3_linear`` (the
fused kernels plug in there); a merged adapter of any kind costs a plain linear. Unmerged DoRA, VeRA, MTL-LoRA,
gating, stacking, averaging and the row-splitting blocks (Parallel, BatchSplit, MultiTask) run in eager PyTorch
here. After Parallel / BatchSplit each row group is finished by its own adapter (LoRA adds, (IA)³ scales,
rows without an adapter keep x Wᵀ + b), so every channel equals its single-adapter run.

Because DeBERTa's attention (share_att_key=True) projects the relative embeddings with query_proj / key_proj, LoRA
and (IA)³ on q and k also reach the position terms, as in AdapterHub and transformers + PEFT. ``forward(rel,
positions_batch=B)`` does that projection; when the active setup gives different batch rows different adapters, it
returns one table per row ([B, 2S, out]) instead of one shared table (AdapterHub crashes there).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...ops.ia3 import ia3_linear
from ...ops.lora import lora_linear
from ..composition.blocks import AdapterCompositionBlock, Average, BatchSplit, MultiTask, Parallel, Stack
from ..configuration import LoRAConfig, MTLLoRAConfig
from ..layer_base import AdapterLayerBase, concat_row_labels, row_groups, slice_row_labels
from .dora import dora_merged_weights, dora_output, magnitude_from_weight
from .initialization import seeded_generator
from .mtl_lora import MTLLoRA
from .vera import Vera, is_vera

__all__ = ["IA3", "LoRA", "LoRALinear"]


def _torch_dtype(name: str | None, fallback: torch.dtype) -> torch.dtype:
    if name is None:
        return fallback
    dtype = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"LoRA config dtype must name a torch dtype such as 'float32'; got {name!r}")
    return dtype


def _gate_factor(gate: nn.Linear, layer_input: torch.Tensor) -> torch.Tensor:
    """mean over the sequence (dim 1) of sigmoid(gate(x)), shaped to broadcast over [B, L, out]."""
    return torch.sigmoid(gate(layer_input)).mean(dim=1).unsqueeze(-1)


class LoRA(nn.Module):
    """One LoRA update: parameters ``lora_A`` [r, in], ``lora_B`` [out, r] (and ``gate`` with use_gating)."""

    sharable_parameters = ("lora_A", "lora_B")

    def __init__(self, in_features: int, out_features: int, config: LoRAConfig, device=None, dtype=None,
                 base_weight: torch.Tensor | None = None):
        super().__init__()
        if config.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1; got {config.r}")
        self.r = config.r
        self.lora_alpha = config.alpha
        self.scaling = config.alpha / config.r
        self.dropout_p = float(config.dropout)
        self.use_gating = config.use_gating
        self.use_dora = config.use_dora
        # DoRA needs the module's own combine / merge, which the fused LoRA op does not do
        self.fusable = not self.use_dora
        self.composition_mode = "add"
        dtype = _torch_dtype(config.dtype, dtype or torch.get_default_dtype())
        self.lora_A = nn.Parameter(torch.zeros(config.r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.r, device=device, dtype=dtype))
        generator = seeded_generator(config.init_weights_seed, self.lora_A.device)
        with torch.no_grad():
            if config.init_weights == "lora":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
                nn.init.zeros_(self.lora_B)
            elif config.init_weights == "bert":
                nn.init.normal_(self.lora_A, std=0.02, generator=generator)
                nn.init.normal_(self.lora_B, std=0.02, generator=generator)
            elif config.init_weights == "ia3":
                nn.init.ones_(self.lora_A)
                nn.init.ones_(self.lora_B)
            elif config.init_weights == "vera":
                nn.init.kaiming_uniform_(self.lora_A, generator=generator)
                nn.init.kaiming_uniform_(self.lora_B, generator=generator)
            else:
                raise ValueError(f"unknown LoRA init_weights {config.init_weights!r}; expected 'lora', 'bert', 'ia3' "
                                 "or 'vera'")
        if self.use_dora:
            if base_weight is None:
                raise ValueError("DoRA needs the base weight to initialise its magnitude")
            self.m = magnitude_from_weight(base_weight, dtype)
        if self.use_gating:
            self.gate = nn.Linear(in_features, 1, device=device, dtype=dtype)
            with torch.no_grad():
                nn.init.normal_(self.gate.weight, std=0.02, generator=generator)

    @property
    def dropout_active(self) -> float:
        return self.dropout_p if self.training else 0.0

    def update(self, hidden: torch.Tensor | None, layer_input: torch.Tensor) -> tuple:
        """(additive update, gate [B, 1, 1] or None); ``hidden`` is the previous adapter's update in a Stack (None
        for the first)."""
        source = layer_input if hidden is None else hidden
        if source.shape[-1] != self.lora_A.shape[1]:
            raise ValueError(
                f"cannot stack this LoRA on the previous adapter's update: the update has {source.shape[-1]} features "
                f"but lora_A expects {self.lora_A.shape[1]} (stacking needs in_features == out_features)"
            )
        if self.dropout_active > 0:
            source = F.dropout(source, p=self.dropout_active, training=True)
        out = source @ self.lora_A.t() @ self.lora_B.t()
        if self.use_gating:
            gate = _gate_factor(self.gate, layer_input)
            return out * gate, gate
        return out * self.scaling, None

    @property
    def delta_w(self) -> torch.Tensor:
        """B A, shape [out, in] (unscaled)."""
        return self.lora_B @ self.lora_A

    def combine(self, layer_output: torch.Tensor, update: torch.Tensor,
                weight: torch.Tensor | None = None) -> torch.Tensor:
        """layer_output + update; DoRA rescales the sum (methods/dora.py, needs the base ``weight``)."""
        if self.use_dora:
            return dora_output(layer_output, update, self.m, weight, self.delta_w)
        return layer_output + update

    def merged_weights(self, weight: torch.Tensor, bias: torch.Tensor | None):
        """(W + s·B A, b): the base weights with this update folded in (DoRA: methods/dora.py)."""
        delta = self.delta_w.to(weight.dtype)
        if self.use_dora:
            return dora_merged_weights(weight, bias, delta, self.scaling, self.m)
        return weight + delta * self.scaling, bias


class IA3(nn.Module):
    """One (IA)³ scale: parameter ``lora_B`` [out, 1] (and ``gate`` with use_gating)."""

    def __init__(self, in_features: int, out_features: int, config: LoRAConfig, device=None, dtype=None):
        super().__init__()
        if config.r != 1:
            raise ValueError("Can only use composition_mode='scale' when r == 1.")
        if config.use_dora:
            raise ValueError("(IA)³ (composition_mode='scale') does not support DoRA (use_dora=True).")
        if config.dropout > 0.0:
            raise ValueError("IA3 module does not support dropout.")
        self.r = 1
        self.lora_alpha = config.alpha
        self.scaling = config.alpha
        self.use_gating = config.use_gating
        self.use_dora = False
        self.fusable = True
        self.composition_mode = "scale"
        dtype = _torch_dtype(config.dtype, dtype or torch.get_default_dtype())
        self.lora_B = nn.Parameter(torch.zeros(out_features, 1, device=device, dtype=dtype))
        generator = seeded_generator(config.init_weights_seed, self.lora_B.device)
        with torch.no_grad():
            if config.init_weights == "ia3":
                nn.init.ones_(self.lora_B)
            elif config.init_weights == "bert":
                nn.init.normal_(self.lora_B, std=0.02, generator=generator)
            elif config.init_weights == "lora":
                nn.init.zeros_(self.lora_B)
            else:
                raise ValueError(f"unknown (IA)³ init_weights {config.init_weights!r}; "
                                 "expected 'ia3', 'bert' or 'lora'")
        if self.use_gating:
            self.gate = nn.Linear(in_features, 1, device=device, dtype=dtype)
            with torch.no_grad():
                nn.init.normal_(self.gate.weight, std=0.02, generator=generator)

    def scale_vector(self) -> torch.Tensor:
        """alpha · l, shape [out]."""
        return self.lora_B.view(-1) * self.scaling

    def update(self, hidden: torch.Tensor | None, layer_input: torch.Tensor) -> tuple:
        """(multiplicative factor, gate or None); in a Stack it multiplies the previous adapter's factor/update."""
        # one factor per batch row ([B, 1, ..., out]) so that row-splitting blocks can slice it
        shape = (layer_input.shape[0], *([1] * (layer_input.dim() - 2)), self.lora_B.shape[0])
        vector = self.lora_B.view(-1).expand(shape)
        out = vector if hidden is None else hidden * vector
        if self.use_gating:
            gate = _gate_factor(self.gate, layer_input)
            return out * gate, gate
        return out * self.scaling, None

    @staticmethod
    def combine(layer_output: torch.Tensor, update: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return layer_output * update

    def merged_weights(self, weight: torch.Tensor, bias: torch.Tensor | None):
        """(W ⊙ (alpha·l) row-wise, b ⊙ (alpha·l)): exact, the bias is scaled too (AdapterHub leaves it unscaled)."""
        scale = self.scale_vector().to(weight.dtype)
        return weight * scale[:, None], (bias * scale if bias is not None else None)


class _LoRAState(NamedTuple):
    """layer_input [B, ..., in], layer_output [B, ..., out] (x Wᵀ + b), hidden: the running update (None before
    the first adapter), last: the adapter that finishes the rows (None, a name, or one entry per row), record:
    whether gates are reported (not for the position tables)."""

    layer_input: torch.Tensor
    hidden: torch.Tensor | None
    layer_output: torch.Tensor
    last: str | tuple | None
    record: bool = True


class LoRALinear(AdapterLayerBase, nn.Linear):
    """A ``nn.Linear`` with LoRA / (IA)³ adapters (module docstring). Built around an existing Linear, whose
    Parameters it shares; ``location`` is "selfattn", "intermediate" or "output"; ``attn_key`` "q", "k" or "v"."""

    adapter_modules_name = "loras"
    supported_compositions = (Stack, BatchSplit, Average, Parallel, MultiTask)

    def __init__(self, base: nn.Linear, registry, layer_idx: int, location: str, attn_key: str | None = None):
        nn.Module.__init__(self)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        if base.bias is not None:
            self.bias = base.bias
        else:
            self.register_parameter("bias", None)
        self.loras = nn.ModuleDict()
        # MTL-LoRA parameter sharing: {joined names: ParameterDict(lora_A, lora_B)} (AdapterHub's layout)
        self.shared_parameters = nn.ModuleDict()
        self._init_adapter_layer(registry, layer_idx, location + "_lora")
        self.attn_key = attn_key
        self.merged: str | None = None
        for key, value in base.__dict__.items():
            if "_hooks" in key and isinstance(value, dict):
                setattr(self, key, value)
        self.train(base.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, location={self.location_key}, attn_key={self.attn_key}"

    # ---- management -------------------------------------------------------------------------------------------

    def add_adapter(self, name: str, layer_idx: int) -> bool:
        config = self._registry.match(name, LoRAConfig, layer_idx=layer_idx, location_key=self.location_key)
        if config is None or (self.attn_key is not None and self.attn_key not in config.attn_matrices):
            return False
        kwargs = dict(device=self.weight.device, dtype=self.weight.dtype)
        if config.composition_mode == "add":
            if isinstance(config, MTLLoRAConfig):
                if config.use_dora or is_vera(config):
                    raise ValueError("MTL-LoRA cannot be combined with DoRA or VeRA (use_dora / vera_d / vera_b)")
                module = MTLLoRA(self.in_features, self.out_features, config, self.weight.device,
                                 _torch_dtype(config.dtype, self.weight.dtype))
            elif is_vera(config):
                module = Vera(self.in_features, self.out_features, config, self._registry, name, self.weight,
                              self.weight.device, _torch_dtype(config.dtype, self.weight.dtype))
            else:
                module = LoRA(self.in_features, self.out_features, config, base_weight=self.weight, **kwargs)
        elif config.composition_mode == "scale":
            module = IA3(self.in_features, self.out_features, config, **kwargs)
        else:
            raise ValueError(f"Unknown composition_mode: {config.composition_mode!r}; expected 'add' or 'scale'")
        module.train(self.training)
        self.loras[name] = module
        return True

    def delete_adapter(self, name: str) -> None:
        if self.merged == name:
            self.reset_adapter()
        if name in self.shared_parameters:
            del self.shared_parameters[name]
        super().delete_adapter(name)

    def share_parameters(self, name: str, adapter_names, reference_adapter_name: str) -> None:
        """Make the adapters ``adapter_names`` (all present here) use one copy of ``reference_adapter_name``'s
        lora_A / lora_B, kept in ``shared_parameters[name]``."""
        if not adapter_names or not all(n in self.loras for n in adapter_names):
            return
        reference = self.loras[reference_adapter_name]
        keys = [k for k in getattr(reference, "sharable_parameters", ()) if hasattr(reference, k)]
        shared = nn.ParameterDict({k: nn.Parameter(getattr(reference, k).detach().clone(),
                                                   requires_grad=getattr(reference, k).requires_grad)
                                   for k in keys})
        self.shared_parameters[name] = shared
        for adapter in adapter_names:
            for key in keys:
                if getattr(self.loras[adapter], key).shape != shared[key].shape:
                    raise ValueError(f"cannot share {key} of adapter {adapter!r}: shape "
                                     f"{tuple(getattr(self.loras[adapter], key).shape)} differs from the reference's "
                                     f"{tuple(shared[key].shape)}")
                setattr(self.loras[adapter], key, shared[key])

    def unshare_parameters(self, name: str) -> None:
        """Drop ``shared_parameters[name]``; the adapters that used it get their own copies (same values), so
        training one no longer changes the others (AdapterHub leaves them tied)."""
        if name not in self.shared_parameters:
            return
        shared = self.shared_parameters[name]
        for module in self.loras.values():
            for key, param in shared.items():
                if getattr(module, key, None) is param:
                    setattr(module, key, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))
        del self.shared_parameters[name]

    def untie_shared(self) -> dict:
        """Give every adapter tied by ``share_parameters`` its own copy and drop ``shared_parameters`` for now
        (full-model saving: sharing is not part of the saved config, in AdapterHub neither); returns what
        ``retie_shared`` needs to restore the exact Parameters."""
        state = {}
        for name, shared in list(self.shared_parameters.items()):
            tied = [(adapter, key) for adapter, module in self.loras.items() for key, param in shared.items()
                    if getattr(module, key, None) is param]
            state[name] = (shared, tied)
            self.unshare_parameters(name)
        return state

    def retie_shared(self, state: dict) -> None:
        for name, (shared, tied) in state.items():
            self.shared_parameters[name] = shared
            for adapter, key in tied:
                setattr(self.loras[adapter], key, shared[key])

    def average_adapter(self, name: str, input_adapters: dict, combine_strategy: str, **kwargs) -> bool:
        if combine_strategy != "lora_linear_only_negate_b":
            return super().average_adapter(name, input_adapters, combine_strategy, **kwargs)
        if not self.add_adapter(name, self.layer_idx):
            return False
        missing = [n for n in input_adapters if n not in self.loras]
        if missing:
            self.delete_adapter(name)
            raise ValueError(f"cannot average: adapter(s) {missing} have no module in layer {self.layer_idx}")
        total = {}
        for source, weight in input_adapters.items():
            for key, value in self.loras[source].state_dict().items():
                if key not in ("lora_A", "lora_B"):
                    self.delete_adapter(name)
                    raise ValueError(f"combine strategy 'lora_linear_only_negate_b' averages lora_A and lora_B only; "
                                     f"adapter {source!r} also has {key!r}")
                factor = abs(weight) if key == "lora_A" else weight
                total[key] = total[key] + factor * value if key in total else factor * value
        self.loras[name].load_state_dict(total)
        return True

    def merge_adapter(self, name: str) -> None:
        """Fold adapter ``name`` into ``weight`` (and, for (IA)³, ``bias``); the forward then skips all LoRA work
        here. The weights from before are kept and restored bit-exactly by ``reset_adapter``."""
        if name not in self.loras or self.merged == name:
            return
        if self.merged is not None:
            raise ValueError("LoRALayer already has a merged LoRA module. Please reset it first.")
        module = self.loras[name]
        if module.use_gating:
            raise ValueError("Cannot merge LoRA layer with gating.")
        with torch.no_grad():
            weight, bias = module.merged_weights(self.weight, self.bias)
        # Non-persistent buffers: they follow .to() / .half() but never enter a state dict.
        self.register_buffer("_unmerged_weight", self.weight.data, persistent=False)
        self.register_buffer("_unmerged_bias", self.bias.data if self.bias is not None else None, persistent=False)
        self.weight.data = weight.detach()
        if self.bias is not None and bias is not None:
            self.bias.data = bias.detach()
        self.merged = name

    def reset_adapter(self) -> None:
        """Undo ``merge_adapter``: the weights from before the merge come back unchanged."""
        if self.merged is None:
            return
        self.weight.data = self._unmerged_weight
        if self._unmerged_bias is not None:
            self.bias.data = self._unmerged_bias
        del self._unmerged_weight, self._unmerged_bias
        self.merged = None

    # ---- forward ----------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, positions_batch: int | None = None) -> torch.Tensor:
        """x [..., in] -> [..., out] (module docstring). ``positions_batch``: x is the relative-embedding table
        [1, 2S, in] of a batch of that many rows (share_att_key); the result is [1, 2S, out], or [B, 2S, out] when
        the active setup gives rows different adapters here; gates are not reported for it."""
        if self.merged is None:
            setup = self.active_setup()
            if setup is not None:
                if positions_batch is not None and _splits_rows(setup):
                    base = F.linear(x, self.weight, self.bias)
                    shape = (positions_batch, *x.shape[1:])
                    return self._forward_composed(x.expand(shape), setup, base.expand(*shape[:-1], base.shape[-1]),
                                                  record=False)
                single = self._single_adapter(setup)
                if single is not None:
                    return self._forward_single(x, single)
                return self._forward_composed(x, setup, record=positions_batch is None)
        return F.linear(x, self.weight, self.bias)

    def fusable_lora(self):
        """What this layer adds to its base linear for the active setup, in a form a fused q/k/v op can run:
        ``()`` for nothing (no setup, merged, or no adapter of the setup here), ``(lora_A, lora_B, scaling,
        dropout_p)`` for one plain LoRA, or None when its work needs the module (composition, gating, (IA)³)."""
        if self.merged is not None:
            return ()
        setup = self.active_setup()
        if setup is None:
            return ()
        if type(setup) is not Stack or not all(isinstance(c, str) for c in setup.children):
            return None
        present = [self.loras[c] for c in setup.children if c in self.loras]
        if not present:
            return ()
        if len(present) != 1 or present[0].use_gating or isinstance(present[0], IA3) or not present[0].fusable:
            return None
        module = present[0]
        return module.lora_A, module.lora_B, module.scaling, module.dropout_active

    def _single_adapter(self, setup):
        """The only adapter of this layer a plain Stack of names runs, if it is ungated; else None."""
        if type(setup) is not Stack or not all(isinstance(c, str) for c in setup.children):
            return None
        present = [self.loras[c] for c in setup.children if c in self.loras]
        if len(present) != 1 or present[0].use_gating or not present[0].fusable:
            return None
        return present[0]

    def _forward_single(self, x: torch.Tensor, module) -> torch.Tensor:
        if isinstance(module, IA3):
            return ia3_linear(x, self.weight, self.bias, module.scale_vector())
        return lora_linear(x, self.weight, self.bias, module.lora_A, module.lora_B, module.scaling,
                           module.dropout_active)

    def _forward_composed(self, x: torch.Tensor, setup, layer_output: torch.Tensor | None = None,
                          record: bool = True) -> torch.Tensor:
        if layer_output is None:
            layer_output = F.linear(x, self.weight, self.bias)
        state = self.compose(setup, _LoRAState(x, None, layer_output, None, record))
        last = state.last
        if last is None:
            return layer_output
        if isinstance(last, str):
            return self.loras[last].combine(layer_output, state.hidden, self.weight)
        outputs = []
        for name, rows in row_groups(last):
            rows_output = layer_output[rows]
            outputs.append(rows_output if name is None else
                           self.loras[name].combine(rows_output, state.hidden[rows], self.weight))
        return torch.cat(outputs, dim=0)

    def compose_single(self, name: str, state: _LoRAState, level: int = 0) -> _LoRAState:
        update, gate = self.loras[name].update(state.hidden, state.layer_input)
        if gate is not None and state.record:
            self.store_gating_score(name, gate)
        return state._replace(hidden=update, last=name)

    def vslice(self, state: _LoRAState, index) -> _LoRAState:
        return _LoRAState(state.layer_input[index], state.hidden[index] if state.hidden is not None else None,
                          state.layer_output[index], slice_row_labels(state.last, index), state.record)

    def pad_and_concat(self, states: list) -> _LoRAState:
        hidden = None
        if any(s.hidden is not None for s in states):
            reference = next(s.hidden for s in states if s.hidden is not None)
            # rows without an adapter here are finished by the base output; their placeholder update is unused
            hidden = torch.cat([s.hidden if s.hidden is not None else
                                reference.new_zeros(s.layer_output.shape[0], *reference.shape[1:]) for s in states])
        last = concat_row_labels([(s.last, s.layer_output.shape[0]) for s in states])
        return _LoRAState(torch.cat([s.layer_input for s in states]), hidden,
                          torch.cat([s.layer_output for s in states]), last, states[0].record)

    def repeat(self, state: _LoRAState, channels: int) -> _LoRAState:
        def rep(x):
            return x.repeat(channels, *([1] * (x.dim() - 1))) if x is not None else None

        last = state.last * channels if isinstance(state.last, tuple) else state.last
        return _LoRAState(rep(state.layer_input), rep(state.hidden), rep(state.layer_output), last, state.record)

    def mean(self, states: list, weights: list) -> _LoRAState:
        if states[0].hidden is None:
            return states[0]
        w = torch.tensor(weights, dtype=states[0].hidden.dtype, device=states[0].hidden.device)
        stacked = torch.stack([s.hidden for s in states], dim=0)
        hidden = (stacked * w.view(-1, *([1] * (stacked.dim() - 1)))).mean(dim=0)
        return states[0]._replace(hidden=hidden, last=states[-1].last)


def _splits_rows(setup) -> bool:
    """Whether ``setup`` gives different batch rows different adapters (Parallel, BatchSplit, MultiTask)."""
    if isinstance(setup, (Parallel, BatchSplit, MultiTask)):
        return True
    return isinstance(setup, AdapterCompositionBlock) and any(_splits_rows(c) for c in setup.children)
