"""The model-level and layer-level parts of adapters: what runs before the encoder and after each layer.

``DebertaV2ModelWithAdapters`` is deberta_fast's DebertaV2Model (same modules and keys) plus

- ``invertible_adapters`` (methods/invertible.py, applied to the embedding output before a prompt is inserted),
- ``prefix_tuning`` (PrefixTuningPool), ``prompt_tuning`` (PromptTuningLayer) and ``shared_parameters``
  (ModuleDict {adapter: ParameterDict}, e.g. Compacter's shared PHM rule), under AdapterHub's key names;
- a forward that (1) joins the adapter model's ForwardContext or opens one, (2) for a Parallel setup replicates the
  inputs once per channel ([channels · B] rows; channel c holds rows c·B .. c·B + B − 1), so the embeddings, the
  relative-position tables, the nGiE conv layer and every adapter layer see consistent batches (AdapterHub
  replicates inside the first adapter layer and breaks on the conv layer and on share_att_key LoRA),
  (3) records the first valid position and the number of valid tokens per row (ReFT), (4) inserts the prompt of a
  prompt-tuning adapter after the embeddings and extends the mask for it (methods/prompt_tuning.py).

``DebertaV2LayerWithAdapters`` is transformers' DebertaV2Layer plus ``reft_layer`` applied to its output.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

from ..models import DebertaV2Model
from ..models.base import broadcast_mask, validate_model_inputs
from .base_model_api import BaseModelAdapterAPI
from .context import AdapterSetup, ForwardContext, snapshot_contexts
from .methods.prompt_tuning import insert_prompt_mask, prompt_pair_mask

__all__ = ["DebertaV2LayerWithAdapters", "DebertaV2ModelWithAdapters"]


class DebertaV2LayerWithAdapters(hf.DebertaV2Layer):
    """transformers' layer; ReFT interventions (``reft_layer``) act on its output. Under gradient checkpointing
    the recomputation runs inside the adapter contexts of the forward pass that checkpointed it (AdapterHub passes
    a ``context_fn`` for the same purpose; wrapping the function also covers ``use_reentrant=True``)."""

    @property
    def _gradient_checkpointing_func(self):
        checkpoint = self.__dict__.get("_checkpoint_func")
        if checkpoint is None:
            raise AttributeError("_gradient_checkpointing_func")

        def with_contexts(function, *args, **kwargs):
            context = ForwardContext.get_context()
            reentrant = getattr(checkpoint, "keywords", {}).get("use_reentrant", kwargs.get("use_reentrant"))
            if reentrant and context is not None and context.prefix_states:
                # the prefixes are computed once per pass, outside the layers; reentrant recomputation would
                # backpropagate through their graph once per layer
                raise ValueError("gradient checkpointing with use_reentrant=True cannot run prefix tuning; enable it "
                                 "with gradient_checkpointing_kwargs={'use_reentrant': False} (as AdapterHub needs)")
            restored = snapshot_contexts()

            def run(*inner_args, **inner_kwargs):
                with restored():
                    return function(*inner_args, **inner_kwargs)

            return checkpoint(run, *args, **kwargs)

        return with_contexts

    @_gradient_checkpointing_func.setter
    def _gradient_checkpointing_func(self, function):
        self.__dict__["_checkpoint_func"] = function

    def forward(self, hidden_states, attention_mask, query_states=None, relative_pos=None, rel_embeddings=None,
                output_attentions: bool = False):
        layer_output, attentions = super().forward(hidden_states, attention_mask, query_states=query_states,
                                                   relative_pos=relative_pos, rel_embeddings=rel_embeddings,
                                                   output_attentions=output_attentions)
        return self.reft_layer(layer_output), attentions


def _repeat_rows(tensor: torch.Tensor | None, channels: int) -> torch.Tensor | None:
    if tensor is None:
        return None
    return tensor.repeat(channels, *([1] * (tensor.dim() - 1)))


class DebertaV2ModelWithAdapters(BaseModelAdapterAPI, DebertaV2Model):
    """deberta_fast's DebertaV2Model with the model-level adapter steps (module docstring); same arguments and
    outputs (the batch is [channels · B] under a Parallel setup, the sequence P + L with a prompt). It also carries
    AdapterHub's base-model adapter API, forwarded to the model that owns it (base_model_api.py)."""

    @property
    def adapter_registry(self):
        return self.__dict__["_adapter_registry"]

    def _open_context(self):
        setup = AdapterSetup.get_context_adapter_setup()
        if AdapterSetup.get_context() is None:
            setup = self.adapter_registry.active_setup
        return ForwardContext(registry=self.adapter_registry, adapter_setup=setup,
                              skip_layers=tuple(self.adapter_registry.skip_layers or ()))

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        context = ForwardContext.for_registry(self.adapter_registry)
        if context is not None:
            return self._forward(context, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                                 output_attentions, output_hidden_states, return_dict)
        with self._open_context() as context:
            return self._forward(context, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                                 output_attentions, output_hidden_states, return_dict)

    def _forward(self, context, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                 output_attentions, output_hidden_states, return_dict):
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = config.return_dict if return_dict is None else return_dict
        batch, length = validate_model_inputs(config, input_ids, attention_mask, token_type_ids, position_ids,
                                              inputs_embeds)
        attention_mask = broadcast_mask(attention_mask, batch)
        setup = context.adapter_setup
        channels = setup.parallel_channels if setup is not None else 1
        if channels > 1 and not context.adapters_parallelized:
            context.adapters_parallelized = True
            if context.adapter_input_parallelized:
                if batch % channels:
                    raise ValueError(f"adapter_input_parallelized=True: the batch of {batch} rows is not divisible "
                                     f"by the {channels} Parallel channels")
                context.original_batch_size = batch // channels
            else:
                context.original_batch_size = batch
                input_ids, attention_mask, inputs_embeds = (_repeat_rows(t, channels) for t in
                                                            (input_ids, attention_mask, inputs_embeds))
                token_type_ids = _repeat_rows(token_type_ids, channels)
                if position_ids is not None and position_ids.shape[0] > 1:
                    position_ids = _repeat_rows(position_ids, channels)
                batch *= channels
        device = input_ids.device if input_ids is not None else inputs_embeds.device
        if input_ids is not None:
            self.warn_if_padding_and_no_attention_mask(input_ids, attention_mask)
        if attention_mask is not None and attention_mask.dim() == 2:
            context.token_offsets = attention_mask.argmax(dim=1)
            context.token_lengths = (attention_mask == 1).sum(dim=-1)
        if attention_mask is None:
            attention_mask = torch.ones((batch, length), device=device)
        if token_type_ids is None:
            token_type_ids = torch.zeros((batch, length), dtype=torch.long, device=device)
        token_mask = attention_mask
        if attention_mask.dim() > 2:
            pairs = attention_mask if attention_mask.dim() == 3 else attention_mask[:, 0]
            token_mask = (pairs.sum(-2) > 0).to(attention_mask.dtype)
        embedding_output = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids,
                                           position_ids=position_ids, mask=token_mask, inputs_embeds=inputs_embeds)
        if "invertible_adapters" in self._modules:
            embedding_output = self.invertible_adapters(embedding_output)
        embedding_output, prompt = self.prompt_tuning(embedding_output)
        if prompt is not None:
            context.prompt_tokens_length = prompt.prompt_length
            attention_mask = insert_prompt_mask(attention_mask, prompt.prompt_length)
            if attention_mask.dim() == 2 and not bool(attention_mask.bool().all()):
                context.attention_pair_mask = prompt_pair_mask(attention_mask, prompt.prompt_length)
        self.prefix_tuning.fill_context(context, embedding_output.shape[0])
        encoder_outputs = self.encoder(embedding_output, attention_mask, output_hidden_states=output_hidden_states,
                                       output_attentions=output_attentions, return_dict=True)
        if not return_dict:
            return tuple(v for v in (encoder_outputs.last_hidden_state, encoder_outputs.hidden_states,
                                     encoder_outputs.attentions) if v is not None)
        return encoder_outputs


def attach_model_parts(base_model: nn.Module, registry, pool: nn.Module, prompt: nn.Module,
                       invertible: nn.Module | None = None) -> None:
    """Switch ``base_model`` (deberta_fast's DebertaV2Model) to DebertaV2ModelWithAdapters and attach the model-level
    adapter modules (idempotent)."""
    if not isinstance(base_model, DebertaV2ModelWithAdapters):
        if type(base_model) is not DebertaV2Model:
            raise TypeError(f"the base model is a {type(base_model).__qualname__}; expected deberta_fast's "
                            "DebertaV2Model")
        base_model.__class__ = DebertaV2ModelWithAdapters
    base_model.__dict__["_adapter_registry"] = registry
    if not hasattr(base_model, "prefix_tuning"):
        base_model.prefix_tuning = pool
    if not hasattr(base_model, "prompt_tuning"):
        base_model.prompt_tuning = prompt
    if invertible is not None and not hasattr(base_model, "invertible_adapters"):
        base_model.invertible_adapters = invertible
    if not hasattr(base_model, "shared_parameters"):
        base_model.shared_parameters = nn.ModuleDict()
    registry.shared_parameters = base_model.shared_parameters
