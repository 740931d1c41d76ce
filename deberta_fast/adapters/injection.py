"""Put adapter-holding modules into a deberta_fast ``DebertaV2Model``, in place, keeping every base parameter.

Per layer i (AdapterHub's placement; state-dict keys in brackets):

- ``attention.self.{query,key,value}_proj`` -> LoRALinear, location "selfattn", attn_key q/k/v
  [``...query_proj.weight`` unchanged, ``...query_proj.loras.<n>.*``]
- ``intermediate.dense`` -> LoRALinear "intermediate";  ``output.dense`` -> LoRALinear "output"
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
"""

from __future__ import annotations

import torch.nn as nn
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

from ..models.attention import DisentangledSelfAttention
from ..models.output_blocks import DebertaV2Output, DebertaV2SelfOutput
from .attention import DisentangledSelfAttentionWithAdapters
from .base_model import DebertaV2LayerWithAdapters, attach_model_parts
from .methods.bottleneck import BottleneckLayerMixin
from .methods.invertible import InvertibleAdapterLayer
from .methods.lora import LoRALinear
from .methods.prefix_tuning import PrefixTuningLayer, PrefixTuningPool
from .methods.prompt_tuning import PromptTuningLayer
from .methods.reft import ReftLayer

__all__ = ["DebertaV2OutputWithAdapters", "DebertaV2SelfOutputWithAdapters", "inject_adapter_layers"]


class DebertaV2SelfOutputWithAdapters(BottleneckLayerMixin, DebertaV2SelfOutput):
    """transformers' attention output block with bottleneck adapters around its LayerNorm."""

    def forward(self, hidden_states, input_tensor):
        h = self.dropout(self.dense(hidden_states))
        return self.adapter_layer_forward(h, input_tensor, self.LayerNorm)


class DebertaV2OutputWithAdapters(BottleneckLayerMixin, DebertaV2Output):
    """transformers' feed-forward output block with bottleneck adapters around its LayerNorm."""

    def forward(self, hidden_states, input_tensor):
        h = self.dropout(self.dense(hidden_states))
        return self.adapter_layer_forward(h, input_tensor, self.LayerNorm)


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
        _wrap(layer.output, "dense", registry, i, "output")
        if not isinstance(layer.attention.output, BottleneckLayerMixin):
            _switch(layer.attention.output, (hf.DebertaV2SelfOutput, DebertaV2SelfOutput),
                    DebertaV2SelfOutputWithAdapters, f"encoder.layer.{i}.attention.output")
            layer.attention.output.init_adapters(registry, i, "mh_adapter", hidden_size)
        if not isinstance(layer.output, BottleneckLayerMixin):
            _switch(layer.output, (hf.DebertaV2Output, DebertaV2Output), DebertaV2OutputWithAdapters,
                    f"encoder.layer.{i}.output")
            layer.output.init_adapters(registry, i, "output_adapter", hidden_size)
