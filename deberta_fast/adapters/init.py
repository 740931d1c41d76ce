"""Setting up the adapter machinery of a model: ``init_adapters`` (used by DebertaV2AdapterModel) and
``init(model)``, AdapterHub's ``adapters.init`` for transformers' DeBERTa-v2 models with static heads.

``init(model)`` works in place on a ``transformers`` (or deberta_fast) ``DebertaV2Model`` / ``DebertaV2For*``:

1. its DeBERTa-v2 modules are switched to deberta_fast's (``patch_deberta``: same parameters and keys);
2. the adapter-holding modules are injected into the encoder (injection.py; keys as AdapterHub's);
3. the instance's class becomes a subclass of its own class that adds the adapter API (``add_adapter``,
   ``train_adapter``, ``save_adapter``, fusions, embeddings, ...). Only this instance changes: transformers'
   classes are never modified.

The static head stays what it is (``pooler`` / ``classifier``, ``qa_outputs``, ``cls``): ``save_head(dir)``
writes it in AdapterHub's static-head format (``head_config.json`` names the transformers class, the weights keep
their transformers keys), which a DebertaV2AdapterModel loads as a flexible head (heads/static.py); ``load_head``
here reads such a directory, or the directory of a flexible head of the matching type, which is converted back
(the inverse of heads/static.py's renames). ``save_adapter(..., with_head=True)`` includes the static head, as in
AdapterHub.
"""

from __future__ import annotations

import functools
import logging
import os
import re

import torch
import torch.nn as nn
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

from ..models.patch import patch_deberta
from .base_model import DebertaV2ModelWithAdapters
from .base_model_api import AdapterOwnerMixin, set_adapter_owner
from .composition.fusion_management import FusionManagementMixin
from .context import AdapterSetup
from .embeddings import EmbeddingsMixin
from .heads.static import STATIC_HEAD_ARCHITECTURES, static_head_conversion
from .injection import inject_adapter_layers
from .management import AdapterManagementMixin, unsupported_reasons
from .persistence import files
from .persistence.adapter_io import AdapterIOMixin
from .persistence.hub import HubMixin
from .persistence.setup_io import AdapterSetupIOMixin
from .registry import AdapterRegistry

logger = logging.getLogger("deberta_fast")

__all__ = ["AdapterInitMixin", "StaticHeadAdaptersMixin", "init"]


class AdapterInitMixin:
    """``init_adapters`` and ``forward_context`` (AdapterHub's names) for a model whose ``base_model`` is the
    DeBERTa encoder."""

    def init_adapters(self, model_config, adapters_config, add_prefix_tuning_pool: bool = True) -> None:
        """Make the base model hold adapters and build those named in ``adapters_config`` (an AdapterRegistry, a
        dict in config.json's "adapters" form, or None), with their fusions. ``add_prefix_tuning_pool=False``
        requires the base model to have a prefix-tuning pool already (it is shared, not replaced). Called once
        by the model constructors (and by ``init``); a second call with the same registry changes nothing, and a
        model that has adapters already refuses another registry."""
        base = self.base_model
        if not add_prefix_tuning_pool and not hasattr(base, "prefix_tuning"):
            raise ValueError("init_adapters(add_prefix_tuning_pool=False): the base model has no prefix-tuning pool "
                             "to share; pass add_prefix_tuning_pool=True")
        registry = adapters_config if isinstance(adapters_config, AdapterRegistry) else \
            AdapterRegistry.from_dict(adapters_config)
        registry.model_config = model_config
        previous = getattr(self, "adapters_config", None)
        if previous is registry:
            return
        if previous is not None and previous.adapters:
            raise ValueError(f"init_adapters: the model already has adapters {list(previous)}; init_adapters builds "
                             "a model's adapters once (use add_adapter / load_adapter to add more)")
        self.adapters_config = registry
        if not hasattr(self, "model_frozen"):
            self.model_frozen = False
        inject_adapter_layers(base, registry)
        # modules injected earlier (with another, empty registry) now read this one
        base.__dict__["_adapter_registry"] = registry
        for module in base.modules():
            if "_registry" in module.__dict__:
                object.__setattr__(module, "_registry", registry)
        registry.shared_parameters = base.shared_parameters
        set_adapter_owner(base, self)
        for name in registry:
            reasons = unsupported_reasons(registry.get(name))
            if reasons:
                raise ValueError(f"config.adapters: adapter {name!r} cannot be built: " + "; ".join(reasons))
            self._add_adapter_weights(name)
        for fusion_name in registry.fusions:
            self.apply_to_adapter_layers(lambda i, layer, fusion=fusion_name: layer.add_fusion_layer(fusion))

    def forward_context(self, context, *args, **kwargs) -> None:
        """Fill the ForwardContext of a forward pass (AdapterHub's hook): ``task_ids`` from ``kwargs`` and the
        shared parameters of the active adapters (``context.shared_parameters``). (The warning AdapterHub gives
        here when adapters exist but none is active comes from the model's forward.)"""
        if "task_ids" in kwargs:
            context.task_ids = kwargs.pop("task_ids")
        setup = context.adapter_setup
        if setup is None:
            setup = AdapterSetup.get_context_adapter_setup() or self.adapters_config.active_setup
        if not setup:
            return
        shared = self.base_model.shared_parameters
        context.shared_parameters = {name: shared[name] for name in setup.flatten() if name in shared}


def _static_architecture(model) -> str | None:
    for cls in type(model).__mro__:
        if cls.__name__ in STATIC_HEAD_ARCHITECTURES and issubclass(cls, hf.DebertaV2PreTrainedModel):
            return cls.__name__
    return None


class StaticHeadAdaptersMixin(AdapterInitMixin, AdapterOwnerMixin, EmbeddingsMixin, AdapterSetupIOMixin, HubMixin,
                              AdapterIOMixin, FusionManagementMixin, AdapterManagementMixin):
    """The adapter API on a transformers DeBERTa-v2 model with a static head (module docstring)."""

    @property
    def heads(self) -> dict:
        """No flexible heads: the model's own head is its static head."""
        return {}

    def _activate_head_for_setup(self, setup) -> None:
        """A static head is always active."""

    def _active_head_names(self) -> list:
        return []

    def _train_heads_and_embeddings(self, train_embeddings: bool) -> None:
        # the static head is outside the base model, so freeze_model never froze it: it trains (AdapterHub)
        if train_embeddings:
            embeddings = self.get_input_embeddings()
            embeddings.train()
            embeddings.weight.requires_grad = True
        else:
            self.freeze_embeddings()

    def _refresh_tied_weights_keys(self) -> None:
        """Static heads tie through transformers' own mechanism."""

    def save_pretrained(self, save_directory, **kwargs):
        """transformers' save_pretrained with config.json's "adapters" section (AdapterHub's layout), so that
        DebertaV2AdapterModel.from_pretrained rebuilds the adapters (and the static head as flexible head
        "default"). Merged LoRAs are saved unmerged and re-merged afterwards."""
        merged = {layer: layer.merged for layer in self._lora_layers() if layer.merged is not None}
        for layer in merged:
            layer.reset_adapter()
        missing = object()
        previous = getattr(self.config, "adapters", missing)
        self.config.adapters = self.adapters_config.to_dict()
        try:
            return super().save_pretrained(save_directory, **kwargs)
        finally:
            if previous is missing:
                delattr(self.config, "adapters")
            else:
                self.config.adapters = previous
            for layer, name in merged.items():
                layer.merge_adapter(name)

    def save_adapter(self, save_directory: str, adapter_name: str, with_head: bool = True, meta_dict: dict = None,
                     custom_weights_loaders=None, use_safetensors: bool = False) -> None:
        """AdapterIOMixin.save_adapter; ``with_head`` also writes the static head (if the model has one)."""
        super().save_adapter(save_directory, adapter_name, with_head=False, meta_dict=meta_dict,
                             custom_weights_loaders=custom_weights_loaders, use_safetensors=use_safetensors)
        if with_head and _static_architecture(self) is not None:
            self.save_head(save_directory, use_safetensors=use_safetensors)

    def _static_head_state(self) -> dict:
        prefix = f"{self.base_model_prefix}."
        return {k: v for k, v in self.state_dict().items() if not k.startswith(prefix)}

    def save_head(self, save_directory: str, head_name: str = None, use_safetensors: bool = False) -> None:
        """Write the static head (every weight outside the base model, transformers' keys) and a head_config.json
        naming the transformers class, with label2id / num_labels (AdapterHub's static-head format)."""
        architecture = _static_architecture(self)
        if architecture is None:
            raise ValueError(f"save_head: {type(self).__name__} has no prediction head")
        if os.path.exists(save_directory) and not os.path.isdir(save_directory):
            raise ValueError(f"{save_directory}: exists and is not a directory")
        os.makedirs(save_directory, exist_ok=True)
        envelope = self._file_envelope(None, None)
        envelope["model_class"] = architecture
        envelope["label2id"] = {str(k): int(v) for k, v in (self.config.label2id or {}).items()}
        envelope["num_labels"] = self.config.num_labels
        state = self._static_head_state()
        weights_name = files.SAFE_HEAD_WEIGHTS_NAME if use_safetensors else files.HEAD_WEIGHTS_NAME
        files.write_weights(os.path.join(save_directory, weights_name), state, use_safetensors)
        files.write_json(os.path.join(save_directory, files.HEAD_CONFIG_NAME), envelope)

    def load_head(self, save_directory: str, load_as: str = None, id2label=None, use_safetensors: bool = False,
                  **kwargs) -> str | None:
        """Load the static head saved by ``save_head`` of the same class, or a flexible head of the matching type
        and size (converted to this class's keys). Every head tensor must be present; a mismatch raises
        ValueError and leaves the model unchanged. Returns the saved head's name (None for a static head)."""
        loading_info = kwargs.pop("loading_info", None)
        kwargs.pop("set_active", None)
        if kwargs:
            raise TypeError(f"load_head got unexpected keyword arguments {sorted(kwargs)}")
        architecture = _static_architecture(self)
        if architecture is None:
            raise ValueError(f"load_head: {type(self).__name__} has no prediction head to load into")
        weights_path = files.weights_file(save_directory, files.HEAD_WEIGHTS_NAME, files.SAFE_HEAD_WEIGHTS_NAME,
                                          use_safetensors)
        if weights_path is None:
            raise OSError(f"{save_directory}: no {files.HEAD_WEIGHTS_NAME} or {files.SAFE_HEAD_WEIGHTS_NAME} found")
        config_path = os.path.join(save_directory, files.HEAD_CONFIG_NAME)
        file_config = files.read_json(config_path)
        state = files.read_weights(weights_path)
        model_class = file_config.get("model_class")
        name = file_config.get("name")
        if model_class == architecture:
            renamed = state
        elif model_class in ("DebertaV2AdapterModel", "DebertaV2ModelWithHeads"):
            renamed = self._flex_head_to_static(file_config, state, config_path)
        else:
            raise ValueError(f"{config_path}: a head of model class {model_class!r} cannot be loaded into "
                             f"{architecture}")
        expected = self._static_head_state()
        tied = {k for k in expected if self._is_tied_static_key(k)}
        missing = sorted(k for k in expected if k not in renamed and k not in tied)
        unexpected = sorted(k for k in renamed if k not in expected)
        shapes = [k for k in renamed if k in expected and tuple(renamed[k].shape) != tuple(expected[k].shape)]
        if missing or unexpected or shapes:
            raise ValueError(f"{weights_path}: the head weights do not match {architecture}'s head: missing "
                             f"{missing}, unexpected {unexpected}, shape mismatches {shapes}")
        targets = dict(self.named_parameters(remove_duplicate=False))
        targets.update(dict(self.named_buffers(remove_duplicate=False)))
        with torch.no_grad():
            for key, value in renamed.items():
                if key not in tied:
                    targets[key].copy_(value)
        if id2label:
            self.config.id2label = {int(i): label for i, label in id2label.items()}
            self.config.label2id = {label: int(i) for i, label in id2label.items()}
        if isinstance(loading_info, dict):
            loading_info.setdefault("missing_keys", [])
            loading_info.setdefault("unexpected_keys", [])
        return load_as or name

    def _is_tied_static_key(self, key: str) -> bool:
        output = self.get_output_embeddings()
        if output is None or not getattr(self.config, "tie_word_embeddings", True):
            return False
        weight = dict(self.named_parameters(remove_duplicate=False)).get(key)
        return weight is not None and weight is output.weight and weight is self.get_input_embeddings().weight

    def _flex_head_to_static(self, file_config: dict, state: dict, config_path: str) -> dict:
        """Flexible-head keys -> this class's keys (heads/static.py's conversion run backwards); the flexible
        head's type, layer count, label count and (with a hidden layer) activation must be the static head's."""
        architecture = _static_architecture(self)
        head_config = dict(file_config.get("config") or {})
        reference, renames = static_head_conversion(self.config, file_config.get("name"), architecture=architecture)
        keys = ["head_type", "layers", "num_labels"]
        if reference.get("layers", 1) > 1:
            keys.append("activation_function")
        problems = [f"{key}={head_config.get(key)!r} (this model: {reference[key]!r})" for key in keys
                    if key in reference and head_config.get(key) != reference[key]]
        if problems:
            raise ValueError(f"{config_path}: the flexible head does not match {architecture}'s head: "
                             + ", ".join(problems))
        converted = {}
        for static_key in self._static_head_state():
            for pattern, replacement in renames.items():
                flex_key, count = re.subn(pattern, replacement, static_key)
                if count:
                    if flex_key in state:
                        converted[static_key] = state[flex_key]
                    break
        leftover = sorted(set(state) - {k for k in state if any(v is state[k] for v in converted.values())})
        if leftover:
            raise ValueError(f"{config_path}: flexible-head tensors {leftover} have no place in {architecture}'s head")
        return converted


@functools.lru_cache(maxsize=None)
def _with_adapters(cls: type) -> type:
    """The subclass of ``cls`` with the adapter API (one per class, created on first use)."""
    extra = {"__module__": __name__, "__doc__": f"{cls.__name__} with deberta_fast's adapter API (adapters/init.py)."}
    if issubclass(cls, DebertaV2ModelWithAdapters):
        # a bare base model is its own base model
        extra["deberta"] = property(lambda self: self)
    return type(cls.__name__, (StaticHeadAdaptersMixin, cls), extra)


def init(model: nn.Module, adapters_config=None) -> nn.Module:
    """Add the adapter API to ``model`` (a transformers / deberta_fast DebertaV2Model or DebertaV2For*) in place;
    returns ``model``. ``adapters_config``: an AdapterRegistry or a dict in config.json's "adapters" form (default:
    ``model.config.adapters`` if present). Idempotent (module docstring)."""
    if isinstance(model, StaticHeadAdaptersMixin):
        return model
    if not isinstance(model, hf.DebertaV2PreTrainedModel):
        raise TypeError(f"init expects a transformers DeBERTa-v2 model (DebertaV2Model or DebertaV2For*); got "
                        f"{type(model).__name__}")
    patch_deberta(model)
    base = model.base_model
    if adapters_config is None:
        adapters_config = getattr(model.config, "adapters", None)
    if base is model:
        registry = adapters_config if isinstance(adapters_config, AdapterRegistry) else \
            AdapterRegistry.from_dict(adapters_config)
        inject_adapter_layers(model, registry)  # the model itself becomes DebertaV2ModelWithAdapters
        model.__class__ = _with_adapters(type(model))
        model.init_adapters(model.config, registry)
    else:
        model.__class__ = _with_adapters(type(model))
        model.init_adapters(model.config, adapters_config)
    return model

