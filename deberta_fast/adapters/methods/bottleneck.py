"""Bottleneck adapters (seq_bn / double_seq_bn / par_bn / scaled_par_bn and their options), AdapterHub's math.

Module layout of one adapter (state-dict keys under ``...adapters.<name>.``): ``adapter_down`` =
Sequential([adapter_norm_before (ln_before),] Linear(H, m), activation), ``adapter_up`` = Linear(m, H),
``adapter_norm_before`` / ``adapter_norm_after`` (ln_before / ln_after; the "before" norm is registered both on its
own and inside ``adapter_down``, so both key names exist, as in AdapterHub), ``scaling`` ([1] "learned", [H]
"channel"), ``gate`` (use_gating). m = max(1, int(H // reduction_factor)).

Placement, with h = dropout(dense(x)) of the sub-layer (attention output or feed-forward output), ``inp`` the
sub-layer's residual input and LN the sub-layer's LayerNorm (the pre-trained one):

    pre:   residual = h                         (residual_before_ln=True)
           z = LN(h + inp) if original_ln_before else h
           residual = z                         (residual_before_ln=False; "post_add": h + inp)
    core:  a = dropout(up(act(down(norm_before(z)))) · scaling) [· gate(z)]
           out = [norm_after](a + residual)     (adapter_residual_before_ln moves the residual inside norm_after)
    post:  LN(out + inp) if original_ln_after else out

The parallel adapter (is_parallel) reads z = inp, adds no residual in the core, and posts LN(a + h + inp).
The core ``up(act(down(z))) · scaling + residual`` goes through ``deberta_fast.ops.bottleneck_adapter`` whenever
its activation is one the op knows; gating, dropout and the norms stay here. With ``phm_layer`` (Compacter) the two
projections are PHM layers (methods/phm.py) whose equivalent weight matrix feeds the same op; PHM layers keep their own
initialisation whatever ``init_weights`` says (AdapterHub crashes on "mam_adapter" / "houlsby" with PHM).

Composition (AdapterHub's rules): Stack re-runs each adapter's pre stage on the previous output; Fuse feeds the
up-projections of its children to the AdapterFusion layer (composition/fusion.py) with the last child's query; Split
cuts the sequence; Average takes the weighted mean of the children's outputs. Parallel and BatchSplit run each
row group as its own setup would run alone (each child's own pre and post stages), so every channel equals the
single-adapter run; AdapterHub applies the first child's pre stage and the last child's post stage to all rows,
which differs only when the children's configurations differ.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn as nn
from transformers.activations import get_activation

from ...ops.bottleneck import ACTIVATIONS as OP_ACTIVATIONS
from ...ops.bottleneck import bottleneck_adapter
from ..composition.blocks import AdapterCompositionBlock, Average, BatchSplit, Fuse, Parallel, Split, Stack
from ..composition.fusion import AdapterFusionLayer
from ..configuration import BnConfig
from ..errors import MissingLayerEntryError
from ..layer_base import AdapterLayerBase, concat_row_labels, row_groups, slice_row_labels
from .initialization import seeded_generator
from .phm import PHMLayer

__all__ = ["Activation", "BottleneckAdapter", "BottleneckLayerMixin", "ParallelBottleneckAdapter",
           "bottleneck_size"]


class Activation(nn.Module):
    """AdapterHub's activation lookup: transformers' ``get_activation(name.lower())``; "leakyrelu" and None too."""

    def __init__(self, name: str | None):
        super().__init__()
        self.name = None if name is None else name.lower()
        if self.name is None:
            self.fn = nn.Identity()
        elif self.name == "leakyrelu":
            self.fn = nn.functional.leaky_relu
        else:
            try:
                self.fn = get_activation(self.name)
            except KeyError:
                raise ValueError(f"unknown activation {name!r}") from None

    def forward(self, x):
        return self.fn(x)

    @property
    def op_name(self) -> str | None:
        """The name ``ops.bottleneck_adapter`` uses for this activation (None: the op cannot run it)."""
        aliases = {"relu": "relu", "gelu": "gelu", "swish": "swish", "silu": "silu", "tanh": "tanh"}
        name = aliases.get(self.name)
        return name if name in OP_ACTIVATIONS else None


def bottleneck_size(hidden_size: int, reduction_factor, layer_idx: int) -> int:
    """max(1, int(hidden_size // reduction_factor)); a mapping gives per-layer factors with a "default" entry."""
    if isinstance(reduction_factor, Mapping):
        if str(layer_idx) in reduction_factor:
            reduction_factor = reduction_factor[str(layer_idx)]
        elif layer_idx in reduction_factor:
            reduction_factor = reduction_factor[layer_idx]
        elif "default" in reduction_factor:
            reduction_factor = reduction_factor["default"]
        else:
            raise MissingLayerEntryError(
                f"reduction_factor mapping {dict(reduction_factor)} has no entry for layer {layer_idx} and no "
                "'default'; give one like {'1': 16, 'default': 16}"
            )
    if not reduction_factor or reduction_factor <= 0:
        raise ValueError(f"reduction_factor must be > 0; got {reduction_factor!r}")
    return max(1, int(hidden_size // reduction_factor))


def _bert_init(module: nn.Module, generator) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02, generator=generator)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class BottleneckAdapter(nn.Module):
    """One sequential bottleneck adapter (module docstring: layout, pre / core / post)."""

    parallel = False

    def __init__(self, name: str, hidden_size: int, down_size: int, config: BnConfig, device=None, dtype=None,
                 registry=None):
        super().__init__()
        self.name = name
        self.ln_before = config["ln_before"]
        self.ln_after = config["ln_after"]
        self.adapter_residual_before_ln = config["adapter_residual_before_ln"]
        self.use_gating = config["use_gating"]
        self.residual_before_ln = config["residual_before_ln"]
        self.original_ln_before = config["original_ln_before"]
        self.original_ln_after = config["original_ln_after"]
        if self.residual_before_ln == "post_add" and not self.original_ln_before and not self.parallel:
            raise ValueError("residual_before_ln='post_add' needs original_ln_before=True")
        factory = dict(device=device, dtype=dtype)
        layers = []
        if self.ln_before:
            self.adapter_norm_before = nn.LayerNorm(hidden_size, **factory)
            layers.append(self.adapter_norm_before)
        self.phm = bool(config["phm_layer"])
        if self.phm:
            layers.append(PHMLayer(name, hidden_size, down_size, "down", config, registry, **factory))
        else:
            layers.append(nn.Linear(hidden_size, down_size, **factory))
        self.non_linearity = Activation(config["non_linearity"])
        layers.append(self.non_linearity)
        self.adapter_down = nn.Sequential(*layers)
        if self.phm:
            self.adapter_up = PHMLayer(name, down_size, hidden_size, "up", config, registry, **factory)
        else:
            self.adapter_up = nn.Linear(down_size, hidden_size, **factory)
        scaling = config["scaling"]
        if isinstance(scaling, bool) or not isinstance(scaling, (int, float, str)):
            raise ValueError(f"scaling must be a float, 'learned' or 'channel'; got {scaling!r}")
        if isinstance(scaling, (int, float)):
            self.scaling = float(scaling)
        elif scaling == "learned":
            self.scaling = nn.Parameter(torch.ones(1, **factory))
        elif scaling == "channel":
            self.scaling = nn.Parameter(torch.ones(hidden_size, **factory))
        else:
            raise ValueError(f"scaling must be a float, 'learned' or 'channel'; got {scaling!r}")
        if self.ln_after:
            self.adapter_norm_after = nn.LayerNorm(hidden_size, **factory)
        if self.use_gating:
            self.gate = nn.Linear(hidden_size, 1, **factory)
        self.dropout = nn.Dropout(p=config["dropout"])
        self._initialize(config)

    @property
    def down_linear(self) -> nn.Module:
        """The down projection: nn.Linear, or a PHMLayer (which has the same ``weight`` / ``bias`` view)."""
        return self.adapter_down[1 if self.ln_before else 0]

    @torch.no_grad()
    def _initialize(self, config: BnConfig) -> None:
        reference = self.adapter_up.bias if self.adapter_up.bias is not None else next(self.parameters())
        if reference.device.type == "meta":
            return
        generator = seeded_generator(config["init_weights_seed"], reference.device)
        scheme = config["init_weights"]
        if self.phm:
            # PHM projections keep their own initialisation (module docstring); only norms and the gate here.
            for module in self.adapter_down:
                if isinstance(module, nn.LayerNorm):
                    _bert_init(module, generator)
            if self.use_gating:
                _bert_init(self.gate, generator)
            return
        if scheme == "bert":
            for module in (*self.adapter_down, self.adapter_up):
                _bert_init(module, generator)
            if self.use_gating:
                _bert_init(self.gate, generator)
        elif scheme == "mam_adapter":
            nn.init.kaiming_uniform_(self.down_linear.weight, a=math.sqrt(5), generator=generator)
            nn.init.zeros_(self.down_linear.bias)
            nn.init.zeros_(self.adapter_up.weight)
            nn.init.zeros_(self.adapter_up.bias)
            if self.use_gating:
                _bert_init(self.gate, generator)
        elif scheme == "houlsby":
            for linear in (self.down_linear, self.adapter_up):
                nn.init.trunc_normal_(linear.weight, mean=0.0, std=1e-2, a=-2e-2, b=2e-2, generator=generator)
                nn.init.zeros_(linear.bias)
        else:
            raise ValueError(f"unknown bottleneck init_weights {scheme!r}; expected 'bert', 'mam_adapter' or 'houlsby'")

    # ---- the three stages (module docstring) -------------------------------------------------------------------

    def pre_forward(self, h, inp, layer_norm):
        """-> (adapter input z, adapter residual)."""
        z, _, residual = self.pre_forward_with_query(h, inp, layer_norm, None)
        return z, residual

    def pre_forward_with_query(self, h, inp, layer_norm, fusion_config):
        """-> (adapter input z, AdapterFusion query (None without fusion_config), adapter residual)."""
        residual = h if self.residual_before_ln is True else None
        query = h if fusion_config is not None and fusion_config["query_before_ln"] else None
        if self.original_ln_before:
            if inp is not None:
                h = h + inp
            if self.residual_before_ln == "post_add":
                residual = h
            if layer_norm is not None:
                h = layer_norm(h)
        if not self.residual_before_ln:
            residual = h
        if fusion_config is not None and not fusion_config["query_before_ln"]:
            query = h
        return h, query, residual

    def forward(self, z, residual, need_up: bool = False):
        """Core: -> (output, scaled up-projection or None, gate [B, 1, 1] or None). ``need_up`` returns the
        up-projection (AdapterFusion)."""
        fused_residual = (residual is not None and not need_up and not self.use_gating and not self.ln_after
                          and not (self.dropout.p > 0 and self.training))
        x = self.adapter_norm_before(z) if self.ln_before else z
        up = self._core(x, residual if fused_residual else None)
        if fused_residual:
            return up, None, None
        out = self.dropout(up)
        gate = None
        if self.use_gating:
            gate = torch.sigmoid(self.gate(z)).mean(dim=1).unsqueeze(-1)
            out = out * gate
        if residual is not None and self.adapter_residual_before_ln:
            out = out + residual
        if self.ln_after:
            out = self.adapter_norm_after(out)
        if residual is not None and not self.adapter_residual_before_ln:
            out = out + residual
        return out, up, gate

    def _core(self, x, residual):
        """up(act(down(x))) · scaling (+ residual)."""
        linear = self.down_linear
        op_activation = self.non_linearity.op_name
        if op_activation is not None:
            return bottleneck_adapter(x, linear.weight, linear.bias, self.adapter_up.weight, self.adapter_up.bias,
                                      residual, activation=op_activation, scaling=self.scaling)
        up = self.adapter_up(self.non_linearity(linear(x))) * self.scaling
        return up if residual is None else up + residual

    def post_forward(self, out, h, inp, layer_norm):
        if self.original_ln_after:
            out = out + inp if inp is not None else out
            if layer_norm is not None:
                out = layer_norm(out)
        return out


class ParallelBottleneckAdapter(BottleneckAdapter):
    """Parallel adapter (He et al., 2021): reads the sub-layer input, result added next to the sub-layer output."""

    parallel = True

    def pre_forward_with_query(self, h, inp, layer_norm, fusion_config):
        return inp, (inp if fusion_config is not None else None), inp

    def forward(self, z, residual, need_up: bool = False):
        # no residual inside the core: the sub-layer output h is added in post_forward
        return super().forward(z, None, need_up=need_up)

    def post_forward(self, out, h, inp, layer_norm):
        out = out + h
        return super().post_forward(out, h, inp, layer_norm)


class _BottleneckState(NamedTuple):
    """hidden / input_tensor / adapter_residual [B, L, H]; up: the last scaled up-projection (Fuse); last: the
    adapter whose post stage finishes the rows: None, a name, or a tuple with one name (or None) per row."""

    hidden: torch.Tensor
    input_tensor: torch.Tensor
    adapter_residual: torch.Tensor
    layer_norm: nn.Module | None
    up: torch.Tensor | None = None
    last: str | tuple | None = None
    want_up: bool = False


class BottleneckLayerMixin(AdapterLayerBase):
    """Adds ``adapters`` (and, for AdapterFusion, ``adapter_fusion_layer``) to a DeBERTa sub-layer output module
    (attention.output: location "mh_adapter"; output: "output_adapter") and runs them around its LayerNorm."""

    adapter_modules_name = "adapters"
    supported_compositions = (Stack, Fuse, Split, Parallel, BatchSplit, Average)

    def init_adapters(self, registry, layer_idx: int, location_key: str, hidden_size: int) -> None:
        self._init_adapter_layer(registry, layer_idx, location_key)
        self.hidden_size = hidden_size
        self.adapters = nn.ModuleDict()
        self.adapter_fusion_layer = nn.ModuleDict()

    def add_adapter(self, name: str, layer_idx: int) -> bool:
        config = self._registry.match(name, BnConfig, layer_idx=layer_idx, location_key=self.location_key)
        if config is None:
            return False
        # inv_adapter lives on the embeddings (methods/invertible.py), not in the layers
        unsupported = [key for key, off in (("cross_adapter", False), ("stochastic_depth", 0.0))
                       if config[key] not in (off, None, 0, False)]
        if unsupported:
            raise NotImplementedError(f"bottleneck options {unsupported} are not implemented in this version of "
                                      "deberta_fast")
        down = bottleneck_size(self.hidden_size, config["reduction_factor"], layer_idx)
        cls = ParallelBottleneckAdapter if config["is_parallel"] else BottleneckAdapter
        reference = self.LayerNorm.weight
        adapter = cls(name, self.hidden_size, down, config, device=reference.device, dtype=reference.dtype,
                      registry=self._registry)
        adapter.train(self.training)
        self.adapters[name] = adapter
        return True

    # ---- AdapterFusion ----------------------------------------------------------------------------------------

    def add_fusion_layer(self, fusion_name: str) -> None:
        """Create the fusion layer of ``fusion_name`` here if its adapters place a module at this location (they
        must agree on that, as in AdapterHub)."""
        config, names = self._registry.get_fusion(fusion_name)
        if config is None or not self._registry.common_config_value(names, self.location_key):
            return
        model_config = getattr(self._registry, "model_config", None)
        dropout = config["dropout_prob"] or getattr(model_config, "attention_probs_dropout_prob", 0.0) or 0.0
        reference = self.LayerNorm.weight
        fusion = AdapterFusionLayer(config, self.hidden_size, dropout, device=reference.device,
                                    dtype=reference.dtype)
        fusion.train(self.training)
        self.adapter_fusion_layer[fusion_name] = fusion

    def delete_fusion_layer(self, fusion_name: str) -> None:
        if fusion_name in self.adapter_fusion_layer:
            del self.adapter_fusion_layer[fusion_name]

    def get_adapter_fusion(self, fusion_name: str):
        return self.adapter_fusion_layer[fusion_name] if fusion_name in self.adapter_fusion_layer else None

    def enable_adapters(self, setup, unfreeze_adapters: bool, unfreeze_fusion: bool) -> None:
        super().enable_adapters(setup, unfreeze_adapters, unfreeze_fusion)
        if unfreeze_fusion:
            blocks = [setup, *setup.children] if isinstance(setup, AdapterCompositionBlock) else []
            for block in blocks:
                if isinstance(block, Fuse) and block.name in self.adapter_fusion_layer:
                    for param in self.adapter_fusion_layer[block.name].parameters():
                        param.requires_grad = True

    # ---- forward ----------------------------------------------------------------------------------------------

    def adapter_layer_forward(self, h: torch.Tensor, inp: torch.Tensor, layer_norm: nn.Module) -> torch.Tensor:
        """h: sub-layer output after its dropout [B, L, H]; inp: residual input [B, L, H] -> [B, L, H]."""
        setup = self.active_setup()
        if setup is None:
            return layer_norm(h + inp)
        state = self.compose(setup, _BottleneckState(h, inp, inp, layer_norm))
        last = state.last
        if last is None:
            return layer_norm(h + inp)
        if isinstance(last, str):
            return self.adapters[last].post_forward(state.hidden, h, state.input_tensor, layer_norm)
        outputs = []
        for name, rows in row_groups(last):
            if name is None:
                outputs.append(layer_norm(h[rows] + inp[rows]))
            else:
                outputs.append(self.adapters[name].post_forward(state.hidden[rows], h[rows], state.input_tensor[rows],
                                                                layer_norm))
        return torch.cat(outputs, dim=0)

    def pre_block(self, setup, state: _BottleneckState) -> _BottleneckState:
        name = setup.first() if not isinstance(setup, str) else setup
        if name not in self.adapters:
            return state
        hidden, residual = self.adapters[name].pre_forward(state.hidden, state.input_tensor, state.layer_norm)
        return state._replace(hidden=hidden, adapter_residual=residual)

    def pre_branches(self, block, state: _BottleneckState) -> _BottleneckState:
        return state

    def compose_branch(self, block, child, state: _BottleneckState, level: int) -> _BottleneckState:
        if isinstance(child, str):
            if child not in self.adapters:
                return state
            return self.compose_single(child, self.pre_block(child, state), level + 1)
        return self._compose_child(block, child, state, level)

    def compose_single(self, name: str, state: _BottleneckState, level: int = 0) -> _BottleneckState:
        out, up, gate = self.adapters[name](state.hidden, state.adapter_residual, need_up=state.want_up)
        if gate is not None:
            self.store_gating_score(name, gate)
        return state._replace(hidden=out, up=up, last=name)

    def compose_fuse(self, block: Fuse, state: _BottleneckState, level: int) -> _BottleneckState:
        if set(self.adapters.keys()).isdisjoint(block.flatten()):
            return state
        config, _ = self._registry.get_fusion(block.name)
        if block.name not in self.adapter_fusion_layer or config is None:
            raise ValueError(f"no AdapterFusion layer {block.name!r} in layer {self.layer_idx} ({self.location_key}); "
                             f"add it with add_adapter_fusion(Fuse({', '.join(map(repr, block.children))}))")
        last = block.last()
        hidden, query, residual = self.adapters[last].pre_forward_with_query(state.hidden, state.input_tensor,
                                                                             state.layer_norm, config)
        state = state._replace(hidden=hidden, adapter_residual=residual, want_up=True)
        ups = [self._compose_child(block, child, state, level).up for child in block
               if isinstance(child, AdapterCompositionBlock) or child in self.adapters]
        if not ups:
            return state._replace(last=last, want_up=False)
        fused, probs = self.adapter_fusion_layer[block.name](query, torch.stack(ups, dim=2), state.adapter_residual)
        self.store_fusion_attentions(block.name, probs)
        return state._replace(hidden=fused, last=last, want_up=False)

    def compose_split(self, block: Split, state: _BottleneckState, level: int) -> _BottleneckState:
        length = state.hidden.shape[1]
        if sum(block.splits) != length:
            raise IndexError(f"The given input has sequence length {length} which is not equal to the sum of splits "
                             f"{block.splits}")
        # AdapterHub pre-processes with the first child; when that child has no module here, each child does its own
        pre_done = block.first() in self.adapters
        state = self.pre_block(block, state)
        outputs, last, start = [], None, 0
        for child, size in zip(block, block.splits):
            cut = slice(start, start + size)
            part = _BottleneckState(state.hidden[:, cut], state.input_tensor[:, cut], state.adapter_residual[:, cut],
                                    state.layer_norm, state.up[:, cut] if state.up is not None else None,
                                    want_up=state.want_up)
            if isinstance(child, str) and child in self.adapters and not pre_done:
                part = self.pre_block(child, part)
            if isinstance(child, AdapterCompositionBlock) or child in self.adapters:
                part = self._compose_child(block, child, part, level)
                last = part.last or last
            # a child without a module here keeps its positions as they are (AdapterHub drops them and fails)
            outputs.append(part.hidden)
            start += size
        return state._replace(hidden=torch.cat(outputs, dim=1), last=last)

    def vslice(self, state: _BottleneckState, index) -> _BottleneckState:
        return _BottleneckState(state.hidden[index], state.input_tensor[index], state.adapter_residual[index],
                                state.layer_norm, state.up[index] if state.up is not None else None,
                                slice_row_labels(state.last, index), state.want_up)

    def pad_and_concat(self, states: list) -> _BottleneckState:
        ups = [s.up for s in states]
        up = torch.cat(ups, dim=0) if all(u is not None for u in ups) else None
        return _BottleneckState(torch.cat([s.hidden for s in states]), torch.cat([s.input_tensor for s in states]),
                                torch.cat([s.adapter_residual for s in states]), states[0].layer_norm, up,
                                concat_row_labels([(s.last, s.hidden.shape[0]) for s in states]), states[0].want_up)

    def repeat(self, state: _BottleneckState, channels: int) -> _BottleneckState:
        def rep(x):
            return x.repeat(channels, 1, 1) if x is not None else None

        last = state.last * channels if isinstance(state.last, tuple) else state.last
        return _BottleneckState(rep(state.hidden), rep(state.input_tensor), rep(state.adapter_residual),
                                state.layer_norm, rep(state.up), last, state.want_up)

    def mean(self, states: list, weights: list) -> _BottleneckState:
        w = torch.tensor(weights, dtype=states[0].hidden.dtype, device=states[0].hidden.device)
        stacked = torch.stack([s.hidden for s in states], dim=0)
        hidden = (stacked * w.view(-1, *([1] * (stacked.dim() - 1)))).mean(dim=0)
        return states[0]._replace(hidden=hidden, last=states[-1].last)
