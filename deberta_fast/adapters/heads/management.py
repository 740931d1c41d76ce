"""Flexible prediction heads on DebertaV2AdapterModel: AdapterHub's ``ModelWithFlexibleHeadsAdaptersMixin`` API.

Head configs live on the head modules only (``model.heads[name].config``); they are written to config.json by
``save_pretrained`` but never onto the transformers config object, so two models built from one config object do
not share heads.
"""

from __future__ import annotations

import copy
import functools
import logging

import torch
import torch.nn as nn
from transformers.utils import ModelOutput

from ..composition.blocks import AdapterCompositionBlock, BatchSplit, Parallel, parse_heads_from_composition
from ..configuration import adapter_config_hash
from ..context import AdapterSetup, ForwardContext
from ..errors import UnknownHeadTypeError
from .prediction import (
    HEAD_TYPES,
    UNSUPPORTED_HEAD_TYPES,
    ClassificationHead,
    MaskedLMHead,
    MultiHeadOutput,
    MultiLabelClassificationHead,
    MultipleChoiceHead,
    PredictionHead,
    QuestionAnsweringHead,
    TaggingHead,
)

logger = logging.getLogger("deberta_fast")

__all__ = ["FlexibleHeadsMixin", "HEAD_KWARGS", "head_type"]

# Keyword arguments of forward() that belong to the heads (anything else is a TypeError).
HEAD_KWARGS = {"labels", "start_positions", "end_positions", "get_cls_from_eos_tokens", "eos_mask", "pooled_output"}


def head_type(head_type_str: str):
    """Decorator of a model method that adds a head of type ``head_type_str``: the call raises AdapterHub's
    ValueError when the model's ``head_types`` do not include it."""

    def decorator(method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            if head_type_str not in self.head_types:
                raise ValueError(f"This model of type '{self.config.model_type}' does not support head type "
                                 f"'{head_type_str}'.")
            return method(self, *args, **kwargs)

        return wrapper

    return decorator


class FlexibleHeadsMixin:
    """Head management for a model with ``heads`` (nn.ModuleDict) and ``deberta`` (the base model)."""

    head_types = list(HEAD_TYPES)
    head_type = staticmethod(head_type)

    def _init_head_state(self) -> None:
        self.heads = nn.ModuleDict()
        self._active_heads: list | AdapterCompositionBlock = []
        self.custom_heads = {}

    # ---- active head ------------------------------------------------------------------------------------------

    @property
    def active_head(self):
        """The active head name, a list of names (several heads on one output), or None."""
        if isinstance(self._active_heads, AdapterCompositionBlock):
            return self._active_heads
        if not self._active_heads:
            return None
        return self._active_heads[0] if len(self._active_heads) == 1 else list(self._active_heads)

    @active_head.setter
    def active_head(self, head_name_or_list):
        if head_name_or_list is None or head_name_or_list == "":
            self._active_heads = []
            return
        if isinstance(head_name_or_list, AdapterCompositionBlock):
            names = head_name_or_list.flatten()
        else:
            names = [head_name_or_list] if isinstance(head_name_or_list, str) else list(head_name_or_list)
        unknown = [n for n in names if n not in self.heads]
        if unknown:
            raise ValueError(f"Model does not contain a head with name '{unknown[0]}'. Heads: {list(self.heads)}")
        self._active_heads = (head_name_or_list if isinstance(head_name_or_list, AdapterCompositionBlock)
                              else list(names))

    def _active_head_names(self) -> list[str]:
        if isinstance(self._active_heads, AdapterCompositionBlock):
            return sorted(self._active_heads.flatten())
        return list(self._active_heads)

    def _activate_head_for_setup(self, setup) -> None:
        heads = parse_heads_from_composition(setup)
        if isinstance(heads, str):
            heads = [heads]
        if heads and all(h in self.heads for h in (heads.flatten() if isinstance(heads, AdapterCompositionBlock)
                                                   else heads)):
            self.active_head = heads
        else:
            logger.info("Could not identify valid prediction head(s) from setup '%s'.", setup)

    # ---- adding and removing ----------------------------------------------------------------------------------

    def add_prediction_head(self, head: PredictionHead, overwrite_ok: bool = False, set_active: bool = True) -> None:
        if not isinstance(head.name, str) or not head.name or "." in head.name:
            raise ValueError(f"head name must be a non-empty string without '.'; got {head.name!r}")
        if head.name in self.heads and not overwrite_ok:
            raise ValueError(f"Model already contains a head with name '{head.name}'. "
                             "Use overwrite_ok=True to force overwrite.")
        if head.config.get("label2id", "absent") is None:
            count = head.config.get("num_labels", head.config.get("num_choices"))
            if count is not None:
                head.config["label2id"] = {f"LABEL_{i}": i for i in range(count)}
        reference = self.get_input_embeddings().weight
        head.to(device=reference.device, dtype=reference.dtype)
        head.train(self.training)
        self.heads[head.name] = head
        self._tie_head(head)
        self._refresh_tied_weights_keys()
        if set_active:
            self.active_head = head.name

    def add_prediction_head_from_config(self, head_name: str, config: dict, overwrite_ok: bool = False,
                                        set_active: bool = True) -> None:
        """Add a head from its config dict (as in head_config.json / config.json's "prediction_heads")."""
        config = copy.deepcopy(dict(config))
        head_type = config.pop("head_type", None)
        id2label = config.pop("id2label", None)
        label2id = config.pop("label2id", None)
        if id2label is None and label2id is not None:
            id2label = {int(i): label for label, i in label2id.items()}
        elif id2label is not None:
            id2label = {int(i): label for i, label in id2label.items()}
        if head_type in self.head_types:
            head_class = HEAD_TYPES[head_type]
            if id2label is not None and head_class is not MaskedLMHead:
                config["id2label"] = id2label
            if head_type == "multilabel_classification":
                config.pop("multilabel", None)
            try:
                head = head_class(self.config, head_name, **config)
            except TypeError as error:
                raise ValueError(f"head config for {head_name!r} ({head_type}) has invalid keys: {error}") from None
            self.add_prediction_head(head, overwrite_ok=overwrite_ok, set_active=set_active)
        elif head_type in self.custom_heads:
            if id2label is not None:
                config["id2label"] = id2label
            self.add_custom_head(head_type, head_name, overwrite_ok=overwrite_ok, set_active=set_active, **config)
        else:
            self._unsupported_head(head_type)

    def _unsupported_head(self, head_type):
        if head_type in UNSUPPORTED_HEAD_TYPES:
            raise ValueError(f"This model of type '{self.config.model_type}' does not support head type '{head_type}'.")
        raise ValueError(f"Given head type '{head_type}' is not known; supported: {self.head_types} and registered "
                         f"custom heads {sorted(self.custom_heads)}")

    @head_type("classification")
    def add_classification_head(self, head_name, num_labels=2, layers=2, activation_function="tanh",
                                overwrite_ok=False, multilabel=False, id2label=None, use_pooler=False):
        cls = MultiLabelClassificationHead if multilabel else ClassificationHead
        head = cls(self.config, head_name, num_labels, layers, activation_function, id2label, use_pooler)
        self.add_prediction_head(head, overwrite_ok)

    @head_type("multiple_choice")
    def add_multiple_choice_head(self, head_name, num_choices=2, layers=2, activation_function="tanh",
                                 overwrite_ok=False, id2label=None, use_pooler=False):
        head = MultipleChoiceHead(self.config, head_name, num_choices, layers, activation_function, id2label,
                                  use_pooler)
        self.add_prediction_head(head, overwrite_ok)

    @head_type("tagging")
    def add_tagging_head(self, head_name, num_labels=2, layers=1, activation_function="tanh", overwrite_ok=False,
                         id2label=None):
        head = TaggingHead(self.config, head_name, num_labels, layers, activation_function, id2label)
        self.add_prediction_head(head, overwrite_ok)

    @head_type("question_answering")
    def add_qa_head(self, head_name, num_labels=2, layers=1, activation_function="tanh", overwrite_ok=False,
                    id2label=None):
        head = QuestionAnsweringHead(self.config, head_name, num_labels, layers, activation_function, id2label)
        self.add_prediction_head(head, overwrite_ok)

    @head_type("masked_lm")
    def add_masked_lm_head(self, head_name, activation_function="gelu", layers=2, overwrite_ok=False):
        head = MaskedLMHead(self.config, head_name, layers=layers, activation_function=activation_function)
        self.add_prediction_head(head, overwrite_ok=overwrite_ok)

    @head_type("causal_lm")
    def add_causal_lm_head(self, head_name, activation_function="gelu", layers=2, overwrite_ok=False):
        self._unsupported_head("causal_lm")

    @head_type("seq2seq_lm")
    def add_seq2seq_lm_head(self, head_name, layers=1, overwrite_ok=False):
        self._unsupported_head("seq2seq_lm")

    @head_type("dependency_parsing")
    def add_dependency_parsing_head(self, head_name, num_labels=2, overwrite_ok=False, id2label=None):
        self._unsupported_head("dependency_parsing")

    @head_type("image_classification")
    def add_image_classification_head(self, head_name, num_labels=2, layers=1, activation_function="tanh",
                                      overwrite_ok=False, multilabel=False, id2label=None, use_pooler=False):
        self._unsupported_head("image_classification")

    def register_custom_head(self, identifier: str, head) -> None:
        """Register a head class ``head(model, head_name, **kwargs)`` under ``identifier``."""
        self.custom_heads[identifier] = head

    def add_custom_head(self, head_type, head_name, overwrite_ok=False, set_active=True, **kwargs):
        """Add head ``head_name`` built by the class registered as ``head_type``: ``cls(model, head_name,
        **kwargs)`` (AdapterHub's signature; deberta_fast's built-in head classes accept it too)."""
        if head_type not in self.custom_heads:
            raise UnknownHeadTypeError(f"head type {head_type!r} is not registered as a custom head; call "
                                       f"register_custom_head first (registered: {sorted(self.custom_heads)})")
        head = self.custom_heads[head_type](self, head_name, **kwargs)
        head.config.setdefault("head_type", head_type)
        self.add_prediction_head(head, overwrite_ok, set_active=set_active)

    def delete_head(self, head_name: str) -> None:
        """Remove head ``head_name`` (unknown names are skipped, as in AdapterHub)."""
        if head_name not in self.heads:
            logger.info("No prediction head '%s' found for deletion. Skipping.", head_name)
            return
        del self.heads[head_name]
        self._refresh_tied_weights_keys()
        if head_name in self._active_head_names():
            self._active_heads = [h for h in self._active_head_names() if h != head_name]

    def get_prediction_heads_config(self) -> dict:
        return {name: copy.deepcopy(head.config) for name, head in self.heads.items()}

    def average_head(self, head_name, head_list, weights=None, normalize_weights=True, overwrite_ok=False,
                     set_active=False) -> None:
        """Add ``head_name`` as the weighted average (linear) of the heads in ``head_list``."""
        if isinstance(head_list, dict):
            weights = list(head_list.values()) if weights is None else weights
            head_list = list(head_list)
        if not head_list:
            raise ValueError("No heads to average. Please provide at least one head.")
        for name in head_list:
            if name not in self.heads:
                raise ValueError(f"Unknown head_name '{name}'")
        first = self.heads[head_list[0]]
        for name in head_list:
            if type(self.heads[name]) is not type(first):
                raise ValueError(f"Cannot average heads of different classes. All heads must be of type "
                                 f"{type(first).__name__}.")
            if (adapter_config_hash(self.heads[name].config, ignore_params=["dropout_prob"])
                    != adapter_config_hash(first.config, ignore_params=["dropout_prob"])):
                raise ValueError("Cannot average heads with different configurations. "
                                 "Please make sure all heads have the same configuration.")
        if weights is None:
            weights = [1.0 / len(head_list)] * len(head_list)
        elif normalize_weights:
            total = sum(weights)
            weights = [w / total for w in weights]
        if head_name in self.heads and not overwrite_ok:
            raise ValueError(f"Model already contains a head with name '{head_name}'. "
                             "Use overwrite_ok=True to force overwrite.")
        new_head = copy.deepcopy(first)
        new_head.name = head_name
        state = {}
        for name, weight in zip(head_list, weights):
            for key, value in self.heads[name].state_dict().items():
                state[key] = state[key] + weight * value if key in state else weight * value
        new_head.load_state_dict(state)
        self.add_prediction_head(new_head, overwrite_ok=overwrite_ok, set_active=set_active)

    # ---- labels -----------------------------------------------------------------------------------------------

    def _head_for_labels(self, head_name):
        if head_name is None:
            names = self._active_head_names()
            if not names:
                raise ValueError("No head name given and no active head in the model")
            if len(names) > 1:
                raise ValueError(f"several heads are active ({names}); pass head_name")
            head_name = names[0]
        if head_name not in self.heads:
            raise ValueError(f"Unknown head_name '{head_name}'. Heads: {list(self.heads)}")
        return self.heads[head_name]

    def get_labels_dict(self, head_name=None):
        """{id: label} of a head (default: the active head), or None when it has no labels."""
        label2id = self._head_for_labels(head_name).config.get("label2id")
        return {int(i): label for label, i in label2id.items()} if label2id is not None else None

    def get_labels(self, head_name=None):
        labels = self.get_labels_dict(head_name)
        return list(labels.values()) if labels is not None else None

    # ---- output embeddings and tying --------------------------------------------------------------------------

    def get_output_embeddings(self):
        """The active heads' output embeddings (the masked-LM decoder): a module, a list, or None."""
        embeddings = [self.heads[n].get_output_embeddings() for n in self._active_head_names() if n in self.heads]
        embeddings = [e for e in embeddings if e is not None]
        if not embeddings:
            return None
        return embeddings[0] if len(embeddings) == 1 else embeddings

    def set_output_embeddings(self, new_embeddings) -> None:
        names = self._active_head_names()
        if not isinstance(new_embeddings, list):
            new_embeddings = [new_embeddings] * len(names)
        for name, module in zip(names, new_embeddings):
            if hasattr(self.heads[name], "set_output_embeddings"):
                self.heads[name].set_output_embeddings(module)

    def _tie_head(self, head) -> None:
        decoder = head.get_output_embeddings()
        if decoder is not None and getattr(self.config, "tie_word_embeddings", True):
            decoder.weight = self.get_input_embeddings().weight

    def _head_tied_weights_keys(self) -> dict:
        if not getattr(self.config, "tie_word_embeddings", True):
            return {}
        return {f"heads.{name}.{head.decoder_index}.weight": "deberta.embeddings.word_embeddings.weight"
                for name, head in self.heads.items() if isinstance(head, MaskedLMHead)}

    # ---- forward ----------------------------------------------------------------------------------------------

    def _head_setup(self, head_name=None):
        """The heads of this forward: a list of names, or a BatchSplit / Parallel block of names."""
        if head_name:
            setup = [head_name] if isinstance(head_name, str) else head_name
        elif len(self.heads) > 0 and AdapterSetup.get_context_head_setup():
            setup = AdapterSetup.get_context_head_setup()
            setup = [setup] if isinstance(setup, str) else setup
        elif self._active_heads:
            setup = self._active_heads
        else:
            return []
        names = setup.flatten() if isinstance(setup, AdapterCompositionBlock) else setup
        for name in names:
            if name not in self.heads:
                raise ValueError(f"Unknown head_name '{name}'. Heads: {list(self.heads)}")
        if isinstance(setup, AdapterCompositionBlock) and not isinstance(setup, (BatchSplit, Parallel)):
            raise ValueError(f"a head setup is a name, a list of names, a BatchSplit or a Parallel block; got {setup}")
        return setup if isinstance(setup, AdapterCompositionBlock) else list(setup)

    def forward_head(self, all_outputs, head_name=None, cls_output=None, attention_mask=None, return_dict=False,
                     context=None, **kwargs):
        """Run the head(s) (``head_name``, else the AdapterSetup context's, else the active ones) on base outputs.

        A BatchSplit of heads gives each head its rows; under a Parallel adapter setup (the batch holds one copy per
        channel) head i reads channel i (one head per channel is required); several heads otherwise all read the
        whole output. Several heads return a MultiHeadOutput (loss: the sum, when every head has one)."""
        setup = self._head_setup(head_name)
        if not setup:
            return all_outputs
        kwargs.pop("pooled_output", None)
        context = context if context is not None else ForwardContext.for_registry(self.adapters_config)
        if context is not None and context.prompt_tokens_length:
            kwargs["prompt_tokens_length"] = context.prompt_tokens_length
        invertible = getattr(self.base_model, "invertible_adapters", None)
        block = invertible.first_active() if invertible is not None else None
        if block is not None:
            kwargs["invertible_adapter"] = block
        channels = 1
        if context is not None and context.adapter_setup is not None and context.adapters_parallelized:
            channels = context.adapter_setup.parallel_channels
        rows = _batch_of(all_outputs)
        if isinstance(setup, BatchSplit):
            if sum(setup.batch_sizes) != rows:
                raise ValueError(f"The specified batch sizes {setup.batch_sizes} do not match the actual batch size "
                                 f"{rows}")
            outputs, start = [], 0
            for name, size in zip(setup, setup.batch_sizes):
                part = slice(start, start + size)
                head_kwargs = {k: (v[part] if k in ("labels", "eos_mask", "start_positions", "end_positions")
                                   and torch.is_tensor(v) else v) for k, v in kwargs.items()}
                mask = attention_mask[part] if attention_mask is not None else None
                outputs.append(self.heads[name](_slice_outputs(all_outputs, part),
                                                cls_output[part] if cls_output is not None else None, mask,
                                                return_dict, **head_kwargs))
                start += size
            return _multi_head_output(outputs)
        if channels > 1 or isinstance(setup, Parallel):
            names = list(setup)
            if len(names) != channels:
                raise ValueError("The number of parallel adapters and the number of active heads must match.")
            size = rows // channels
            outputs = []
            for i, name in enumerate(names):
                part = slice(i * size, (i + 1) * size)
                outputs.append(self.heads[name](_slice_outputs(all_outputs, part),
                                                cls_output[part] if cls_output is not None else None,
                                                attention_mask, return_dict, **kwargs))
            return _multi_head_output(outputs)
        heads = [self.heads[name] for name in setup]
        if len(heads) > 1:
            return MultiHeadOutput(head_outputs=[
                head(all_outputs, cls_output, attention_mask, return_dict, **kwargs) for head in heads])
        result = heads[0](all_outputs, cls_output, attention_mask, return_dict, **kwargs)
        if isinstance(result, ModelOutput) and isinstance(all_outputs, ModelOutput):
            for key in ("hidden_states", "attentions"):
                if result.get(key) is None and all_outputs.get(key) is not None:
                    result[key] = all_outputs[key]
        return result


def _batch_of(outputs) -> int:
    first = outputs[0] if isinstance(outputs, (tuple, list)) else next(iter(outputs.values()))
    return first.shape[0]


def _slice_outputs(outputs, rows: slice):
    """The base-model outputs of batch rows ``rows`` (tensors and tuples of tensors are sliced)."""
    def cut(value):
        if torch.is_tensor(value):
            return value[rows]
        if isinstance(value, tuple) and all(torch.is_tensor(v) for v in value):
            return tuple(v[rows] for v in value)
        return value

    if isinstance(outputs, ModelOutput):
        return type(outputs)(**{k: cut(v) for k, v in outputs.items()})
    return tuple(cut(v) for v in outputs)


def _multi_head_output(outputs: list):
    losses = [out.get("loss") if isinstance(out, (dict, ModelOutput)) else None for out in outputs]
    loss = torch.stack(losses).sum() if losses and all(x is not None for x in losses) else None
    return MultiHeadOutput(head_outputs=outputs, loss=loss)
