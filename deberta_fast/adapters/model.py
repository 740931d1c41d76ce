"""``DebertaV2AdapterModel``: deberta_fast's DeBERTa-v2 with AdapterHub 1.3.0's adapter and flexible-head API.

    model = DebertaV2AdapterModel.from_pretrained(path)       # a DebertaV2Model / DebertaV2For* / saved adapter model
    model.add_adapter("sst", config="lora[r=8, alpha=16]")
    model.add_classification_head("sst", num_labels=2)
    model.train_adapter("sst")                                 # only "sst" (and its head) train
    model.save_adapter("out/sst", "sst")                       # loads in AdapterHub too

Module tree: ``deberta`` (deberta_fast.models.DebertaV2Model, switched in place to DebertaV2ModelWithAdapters with
adapter-holding modules injected, see injection.py and base_model.py) and ``heads`` (nn.ModuleDict). Base
state-dict keys are transformers' ``DebertaV2Model`` keys with the ``deberta.`` prefix; adapter, fusion and head
keys are AdapterHub's.
"""

from __future__ import annotations

import logging
import os
import re

from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

from ..models import DebertaV2Model
from ..ops.dispatch import log_once
from .base_model_api import AdapterOwnerMixin
from .composition.fusion_management import FusionManagementMixin
from .context import AdapterSetup, ForwardContext
from .embeddings import EmbeddingsMixin
from .heads.management import HEAD_KWARGS, FlexibleHeadsMixin
from .heads.static import static_head_conversion
from .init import AdapterInitMixin
from .management import AdapterManagementMixin
from .persistence.adapter_io import AdapterIOMixin
from .persistence.files import atomic_directory
from .persistence.hub import HubMixin
from .persistence.setup_io import AdapterSetupIOMixin

logger = logging.getLogger("deberta_fast")

__all__ = ["DebertaV2AdapterModel"]

# Keyword arguments of from_pretrained that locate files; used to read the config before loading.
# What a save_pretrained owns in its folder: config files and the weights in any format and shard layout.
_PRETRAINED_FILES = re.compile(r"^(config\.json|generation_config\.json|"
                               r"(pytorch_model|model)(-\d+-of-\d+)?\.(bin|safetensors)(\.index\.json)?)$")
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


class DebertaV2AdapterModel(AdapterInitMixin, AdapterOwnerMixin, EmbeddingsMixin, AdapterSetupIOMixin, HubMixin,
                            AdapterIOMixin, FlexibleHeadsMixin, FusionManagementMixin, AdapterManagementMixin,
                            hf.DebertaV2PreTrainedModel):
    """DeBERTa-v2/v3 with adapters (bottleneck, Compacter, LoRA, (IA)³, prefix and prompt tuning, ReFT, unions),
    AdapterFusion, composition blocks and flexible heads, AdapterHub's API (module docstring).
    ``forward(..., head=None, **head_kwargs)`` returns the head's output (SequenceClassifierOutput, ...,
    MultiHeadOutput for several heads) when a head is used, else the base model's BaseModelOutput; with
    ``output_adapter_gating_scores`` / ``output_adapter_fusion_attentions`` the output also carries
    ``adapter_gating_scores`` / ``adapter_fusion_attentions`` ({name: {layer: {location: numpy array}}})."""

    _keys_to_ignore_on_load_unexpected = [r"position_embeddings", r"prompt_tuning\.base_model_embeddings"]

    def __init__(self, config, _flex_head_from_static=None):
        super().__init__(config)
        self.deberta = DebertaV2Model(config)
        self._init_head_state()
        self.model_frozen = False
        self.post_init()
        # Injected after post_init so that transformers' weight initialisation never touches the wrappers.
        self.init_adapters(config, getattr(config, "adapters", None))
        heads = dict(getattr(config, "prediction_heads", None) or {})
        if _flex_head_from_static is not None:
            name, head_config = _flex_head_from_static
            heads[name] = head_config
        for name, head_config in heads.items():
            self.add_prediction_head_from_config(name, head_config, overwrite_ok=True)
        self._refresh_tied_weights_keys()

    # ---- transformers plumbing --------------------------------------------------------------------------------

    def get_input_embeddings(self):
        return self.deberta.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.deberta.set_input_embeddings(value)
        self.tie_weights()

    def _refresh_tied_weights_keys(self) -> None:
        """Tell transformers that masked-LM decoders are tied to the word embeddings (saving drops the copy,
        loading re-ties it)."""
        self._tied_weights_keys = self._head_tied_weights_keys() or None
        self.all_tied_weights_keys = self.get_expanded_tied_weights_keys(all_submodels=True)

    def tie_weights(self, missing_keys=None, recompute_mapping: bool = True):
        """Tie every masked-LM head's decoder to the word embeddings (config.tie_word_embeddings), then let
        transformers tie what it knows."""
        for head in self.heads.values():
            self._tie_head(head)
        self._refresh_tied_weights_keys()
        return super().tie_weights(missing_keys=missing_keys, recompute_mapping=recompute_mapping)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' from_pretrained; a DebertaV2For* checkpoint's head becomes flexible head "default"
        (AdapterHub's conversion, see heads/static.py); a saved DebertaV2AdapterModel gets its adapters and heads
        back from config.json's "adapters" / "prediction_heads"."""
        config = kwargs.get("config")
        if config is None or isinstance(config, (str, os.PathLike)):
            source = config if config is not None else pretrained_model_name_or_path
            peek = cls.config_class.from_pretrained(source, **{k: kwargs[k] for k in _HUB_KWARGS if k in kwargs})
        else:
            peek = config
        conversion = None
        if not getattr(peek, "prediction_heads", None) and pretrained_model_name_or_path is not None:
            conversion = static_head_conversion(peek, "default")
        if conversion is not None:
            head_config, renames = conversion
            kwargs["key_mapping"] = {**renames, **(kwargs.get("key_mapping") or {})}
            kwargs["_flex_head_from_static"] = ("default", head_config)
        result = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        # output_loading_info=True gives (model, {"missing_keys": ..., "unexpected_keys": ..., ...})
        model = result[0] if isinstance(result, tuple) else result
        if conversion is not None:
            # The renames are a one-way conversion: saving must write the flex-head keys, not revert them.
            targets = set(conversion[1].values())
            model._weight_conversions = [
                c for c in (getattr(model, "_weight_conversions", None) or [])
                if not set(getattr(c, "target_patterns", [])) & targets
            ] or None
        return result

    def save_pretrained(self, save_directory, **kwargs):
        """transformers' save_pretrained with config.json's "adapters" and "prediction_heads" sections (AdapterHub's
        layout), atomic as a whole directory (adapters/persistence/files.py ``atomic_directory``): the files are written
        to a staging folder and swapped with the target in one step. Files of the target that this save does not
        write (a tokenizer, a README) are kept; the config and weight files of an earlier save are replaced, in
        every format and shard layout. Merged LoRAs are saved unmerged (base weights as loaded, adapters separate)
        and re-merged afterwards; MTL-LoRA adapters tied by ``share_parameters`` are saved as
        separate copies (the tie is restored afterwards)."""
        merged = {layer: layer.merged for layer in self._lora_layers() if layer.merged is not None}
        for layer in merged:
            layer.reset_adapter()
        ties = {layer: layer.untie_shared() for layer in self._lora_layers() if len(layer.shared_parameters)}
        missing = object()
        previous = {key: getattr(self.config, key, missing) for key in ("adapters", "prediction_heads")}
        self.config.adapters = self.adapters_config.to_dict()
        self.config.prediction_heads = self.get_prediction_heads_config()
        try:
            with atomic_directory(save_directory, _PRETRAINED_FILES.match) as staging:
                result = super().save_pretrained(staging, **kwargs)
        finally:
            for key, value in previous.items():
                if value is missing:
                    delattr(self.config, key)
                else:
                    setattr(self.config, key, value)
            for layer, state in ties.items():
                layer.retie_shared(state)
            for layer, name in merged.items():
                layer.merge_adapter(name)
        return result

    # ---- forward ----------------------------------------------------------------------------------------------

    def _forward_setup(self):
        setup = AdapterSetup.get_context_adapter_setup()
        if AdapterSetup.get_context() is None:
            setup = self.adapters_config.active_setup
        if setup is None:
            if self.has_adapters():
                log_once(logging.WARNING, "There are adapters available but none are activated for the forward pass.")
            return None
        unknown = sorted(n for n in setup.flatten() if n not in self.adapters_config)
        if unknown:
            raise ValueError(f"the adapter setup {setup} names unknown adapters {unknown}; added adapters: "
                             f"{list(self.adapters_config)}")
        return setup

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, output_attentions=None, output_hidden_states=None, return_dict=None, head=None,
                output_adapter_gating_scores=False, output_adapter_fusion_attentions=False,
                adapter_input_parallelized=False, task_ids=None, labels=None, start_positions=None,
                end_positions=None, **kwargs):
        """Inputs as DebertaV2Model's ([B, L], or [B, C, L] for multiple choice, flattened to [B·C, L]); ``head``
        picks a head by name; head arguments (labels, start_positions, end_positions, get_cls_from_eos_tokens,
        eos_mask) go to the head. The label arguments are named in the signature so that transformers' Trainer
        keeps them in its batches (it drops inputs the forward signature does not name). ``task_ids`` route rows in
        a MultiTask setup; ``adapter_input_parallelized`` says the inputs are already replicated per Parallel
        channel."""
        # transformers' Trainer passes num_items_in_batch to models whose forward takes **kwargs; the heads
        # average their losses over the batch themselves, as transformers' own DebertaV2 heads do.
        kwargs.pop("num_items_in_batch", None)
        for name, value in (("labels", labels), ("start_positions", start_positions),
                            ("end_positions", end_positions)):
            if value is not None:
                kwargs[name] = value
        unknown = sorted(set(kwargs) - HEAD_KWARGS)
        if unknown:
            raise TypeError(f"forward() got unexpected keyword arguments {unknown}")

        def flat(tensor, trailing):
            return tensor.reshape(-1, *tensor.shape[-trailing:]) if tensor is not None else None

        input_ids, position_ids, token_type_ids = flat(input_ids, 1), flat(position_ids, 1), flat(token_type_ids, 1)
        attention_mask, inputs_embeds = flat(attention_mask, 1), flat(inputs_embeds, 2)
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        context = ForwardContext(
            registry=self.adapters_config,
            adapter_setup=self._forward_setup(),
            skip_layers=tuple(self.adapters_config.skip_layers or ()),
            output_adapter_gating_scores=bool(output_adapter_gating_scores),
            output_adapter_fusion_attentions=bool(output_adapter_fusion_attentions),
            adapter_input_parallelized=bool(adapter_input_parallelized),
            task_ids=task_ids,
        )
        self.forward_context(context)
        with context:
            outputs = self.deberta(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                                   position_ids=position_ids, inputs_embeds=inputs_embeds,
                                   output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                                   return_dict=return_dict)
            if head or AdapterSetup.get_context_head_setup() or self._active_heads:
                outputs = self.forward_head(outputs, head_name=head, attention_mask=attention_mask,
                                            return_dict=return_dict, context=context, **kwargs)
            elif kwargs:
                raise ValueError(f"head arguments {sorted(kwargs)} were given but no prediction head is active; add "
                                 "one (add_classification_head, ...), activate it, or pass head=...")
        return _attach_context_outputs(outputs, context)


def _attach_context_outputs(outputs, context):
    """Append adapter_gating_scores / adapter_fusion_attentions (as AdapterHub: output keys, or tuple items)."""
    extra = []
    if context.output_adapter_gating_scores:
        extra.append(("adapter_gating_scores", dict(context.adapter_gating_scores)))
    if context.output_adapter_fusion_attentions:
        extra.append(("adapter_fusion_attentions", dict(context.adapter_fusion_attentions)))
    for key, value in extra:
        if isinstance(outputs, tuple):
            outputs = outputs + (value,)
        else:
            outputs[key] = value
    return outputs
