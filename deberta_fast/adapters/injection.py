"""Put adapter-holding modules into a deberta_fast ``DebertaV2Model``, in place, keeping every base parameter.

Per layer i (AdapterHub's placement; state-dict keys in brackets):

- ``attention.self.{query,key,value}_proj`` -> LoRALinear, location "selfattn", attn_key q/k/v
  [``...query_proj.weight`` unchanged, ``...query_proj.loras.<n>.*``]
- ``intermediate.dense`` -> LoRALinear "intermediate";  ``output.dense`` -> LoRALinear "output"
- ``intermediate`` -> DebertaV2IntermediateWithAdapters (no parameters of its own: the fused GELU, below)
- ``attention.output`` -> DebertaV2SelfOutputWithAdapters, location "mh_adapter" [``attention.output.adapters.<n>``,
  ``attention.output.adapter_fusion_layer.<fusion>``]
- ``output`` -> DebertaV2OutputWithAdapters, location "output_adapter" [``output.adapters.<n>``, fusions]
- ``attention.self`` -> DisentangledSelfAttentionWithAdapters with ``prefix_tuning`` (PrefixTuningLayer, location
  "self_prefix") [``...attention.self.prefix_tuning.prefix_gates.<n>``]
- the layer -> DebertaV2LayerWithAdapters with ``reft_layer`` (location "output_reft") [``reft_layer.refts.<n>``]

and on the model: ``invertible_adapters``, ``prefix_tuning`` (the prefix pool), ``prompt_tuning``,
``shared_parameters`` (base_model.py).

``pos_key_proj`` / ``pos_query_proj`` (share_att_key=False) and ``attention.output.dense`` get no LoRA, as in
AdapterHub. The relative-position projections with share_att_key=True go through the wrapped q/k projections.

Fused tails (``deberta_fast.models.output_blocks``, same conditions and dispatch as the base model's blocks): an output
block with no bottleneck adapter of the active setup at its location runs LayerNorm(dropout(dense(x)) + input) as
``residual_layernorm``. The dense's bias goes into the fused op when the dense is a plain linear in this pass (an
nn.Linear, or a LoRALinear with no adapter of the setup there, or merged); with a LoRA / (IA)³ update on the dense,
the dense runs as a module (bias included, (IA)³ scales it) and the fused op adds only dropout, residual and LayerNorm.
The intermediate block runs ``bias_gelu`` when its dense is a plain linear in this pass; with an adapter on it, the
activation is transformers' (the bias cannot be taken apart from an (IA)³-scaled output).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

from ..models.attention import DisentangledSelfAttention
from ..models.output_blocks import (
    DebertaV2Intermediate,
    DebertaV2Output,
    DebertaV2SelfOutput,
    bias_gelu_tail,
    bias_gelu_tail_applies,
    has_hooks,
    residual_layernorm_tail,
    residual_layernorm_tail_applies,
)
from .attention import DisentangledSelfAttentionWithAdapters
from .base_model import DebertaV2LayerWithAdapters, attach_model_parts
from .methods.bottleneck import BottleneckLayerMixin
from .methods.invertible import InvertibleAdapterLayer
from .methods.lora import LoRALinear
from .methods.prefix_tuning import PrefixTuningLayer, PrefixTuningPool
from .methods.prompt_tuning import PromptTuningLayer
from .methods.reft import ReftLayer

__all__ = ["DebertaV2IntermediateWithAdapters", "DebertaV2OutputWithAdapters", "DebertaV2SelfOutputWithAdapters",
           "inject_adapter_layers"]


def _plain_dense(dense: nn.Module) -> bool:
    """Whether dense(x) is exactly F.linear(x, dense.weight, dense.bias) in this pass, with a bias, run unhooked."""
    if has_hooks(dense) or getattr(dense, "bias", None) is None:
        return False
    if type(dense) is nn.Linear:
        return True
    return isinstance(dense, LoRALinear) and dense.fusable_lora() == ()


def _dense_and_bias(dense: nn.Module, hidden_states: torch.Tensor):
    """(y, bias) with dense(hidden_states) = y + bias: bias [out] apart when the dense is plain (``_plain_dense``),
    else (dense(hidden_states), None)."""
    if _plain_dense(dense):
        return F.linear(hidden_states, dense.weight), dense.bias
    return dense(hidden_states), None


class _OutputWithAdapters(BottleneckLayerMixin):
    """forward(hidden_states [B, L, in], input_tensor [B, L, hidden]) -> [B, L, hidden]: bottleneck adapters around
    the LayerNorm of LayerNorm(dropout(dense(hidden_states)) + input_tensor); the fused tail when none runs here."""

    def forward(self, hidden_states, input_tensor):
        if self.active_setup() is None and residual_layernorm_tail_applies(self, hidden_states):
            x, bias = _dense_and_bias(self.dense, hidden_states)
            return residual_layernorm_tail(self, x, bias, input_tensor)
        h = self.dropout(self.dense(hidden_states))
        return self.adapter_layer_forward(h, input_tensor, self.LayerNorm)


class DebertaV2SelfOutputWithAdapters(_OutputWithAdapters, DebertaV2SelfOutput):
    """transformers' attention output block with bottleneck adapters around its LayerNorm (location "mh_adapter")."""


class DebertaV2OutputWithAdapters(_OutputWithAdapters, DebertaV2Output):
    """transformers' feed-forward output block with bottleneck adapters around its LayerNorm ("output_adapter")."""


class DebertaV2IntermediateWithAdapters(DebertaV2Intermediate):
    """forward(hidden_states [B, L, hidden]) -> gelu(dense(hidden_states)) [B, L, intermediate] with the dense a
    LoRALinear: ``bias_gelu`` while no adapter changes the dense in this pass, else transformers' forward."""

    def forward(self, hidden_states):
        if _plain_dense(self.dense) and bias_gelu_tail_applies(self, hidden_states):
            return bias_gelu_tail(F.linear(hidden_states, self.dense.weight), self.dense.bias)
        return super().forward(hidden_states)


def _switch(module: nn.Module, expected: tuple[type, ...], new_class: type, where: str) -> nn.Module:
    if type(module) not in expected:
        raise TypeError(f"{where} is a {type(module).__qualname__}; expected transformers' {expected[0].__name__}")
    module.__class__ = new_class
    return module


def _wrap(parent: nn.Module, attr: str, registry, layer_idx: int, location: str, attn_key=None) -> None:
    linear = getattr(parent, attr)
    if isinstance(linear, LoRALinear):
        return
    if type(linear) is not nn.Linear:
        raise TypeError(f"layer {layer_idx}: {attr} is a {type(linear).__qualname__}; expected torch.nn.Linear")
    setattr(parent, attr, LoRALinear(linear, registry, layer_idx, location, attn_key))


def inject_adapter_layers(base_model: nn.Module, registry) -> None:
    """Prepare every layer of ``base_model`` (a DebertaV2Model) to hold adapters (module docstring). Idempotent."""
    config = base_model.config
    hidden_size = config.hidden_size
    pool = getattr(base_model, "prefix_tuning", None) or PrefixTuningPool(registry)
    prompt = getattr(base_model, "prompt_tuning", None) or PromptTuningLayer(registry, config,
                                                                             base_model.get_input_embeddings)
    invertible = getattr(base_model, "invertible_adapters", None) or InvertibleAdapterLayer(
        registry, config, base_model.get_input_embeddings)
    attach_model_parts(base_model, registry, pool, prompt, invertible)
    for i, layer in enumerate(base_model.encoder.layer):
        if not isinstance(layer, DebertaV2LayerWithAdapters):
            _switch(layer, (hf.DebertaV2Layer,), DebertaV2LayerWithAdapters, f"encoder.layer.{i}")
            layer.reft_layer = ReftLayer(registry, i, hidden_size, layer.output.LayerNorm)
        attention = layer.attention.self
        if not isinstance(attention, DisentangledSelfAttentionWithAdapters):
            _switch(attention, (DisentangledSelfAttention,), DisentangledSelfAttentionWithAdapters,
                    f"encoder.layer.{i}.attention.self")
        for attn_key, attr in (("q", "query_proj"), ("k", "key_proj"), ("v", "value_proj")):
            _wrap(attention, attr, registry, i, "selfattn", attn_key)
        if not hasattr(attention, "prefix_tuning"):
            attention.prefix_tuning = PrefixTuningLayer(registry, i, pool, hidden_size,
                                                        attention.num_attention_heads,
                                                        attention.attention_head_size, attention.query_proj)
        _wrap(layer.intermediate, "dense", registry, i, "intermediate")
        if not isinstance(layer.intermediate, DebertaV2IntermediateWithAdapters):
            _switch(layer.intermediate, (hf.DebertaV2Intermediate, DebertaV2Intermediate),
                    DebertaV2IntermediateWithAdapters, f"encoder.layer.{i}.intermediate")
        _wrap(layer.output, "dense", registry, i, "output")
        if not isinstance(layer.attention.output, BottleneckLayerMixin):
            _switch(layer.attention.output, (hf.DebertaV2SelfOutput, DebertaV2SelfOutput),
                    DebertaV2SelfOutputWithAdapters, f"encoder.layer.{i}.attention.output")
            layer.attention.output.init_adapters(registry, i, "mh_adapter", hidden_size)
        if not isinstance(layer.output, BottleneckLayerMixin):
            _switch(layer.output, (hf.DebertaV2Output, DebertaV2Output), DebertaV2OutputWithAdapters,
                    f"encoder.layer.{i}.output")
            layer.output.init_adapters(registry, i, "output_adapter", hidden_size)
