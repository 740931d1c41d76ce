"""Flexible prediction heads with AdapterHub's module layout, configs, losses and outputs.

A head is an ``nn.Sequential`` whose numbered children give the state-dict keys ``heads.<name>.<index>.*``. Built
from its config (the dict written to ``head_config.json`` and to config.json's ``"prediction_heads"``):

- classification / multilabel / multiple choice (layers=2): 0 Dropout, 1 Linear(H, H), 2 activation, 3 Dropout,
  4 Linear(H, C | 1); input: the first token's hidden state [B, H].
- tagging / question answering (layers=1): 0 Dropout, 1 Linear(H, C | 2); input: all tokens [B, L, H].
- masked LM (layers=2): 0 Linear(H, E), 1 activation, 2 LayerNorm(E), 3 Linear(E, vocab) whose weight is the word
  embedding matrix (tied by the model); no dropout.

Dropout probability: ``dropout_prob``, else ``config.classifier_dropout``, else ``config.hidden_dropout_prob``.
Linear weights ~ N(0, initializer_range), biases 0, LayerNorm weights 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from transformers.modeling_outputs import (
    MaskedLMOutput,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from transformers.utils import ModelOutput

from ..methods.bottleneck import Activation

__all__ = [
    "HEAD_TYPES",
    "ClassificationHead",
    "MaskedLMHead",
    "MultiHeadOutput",
    "MultiLabelClassificationHead",
    "MultipleChoiceHead",
    "PredictionHead",
    "QuestionAnsweringHead",
    "TaggingHead",
]


@dataclass
class MultiHeadOutput(ModelOutput):
    """Outputs of several heads run on one base-model output (``active_head`` a list); ``loss`` is their sum when
    every head returned one."""

    head_outputs: list | None = None
    loss: torch.FloatTensor | None = None

    @property
    def logits(self):
        return torch.vstack([out["logits"] for out in self.head_outputs])

    def __getitem__(self, key):
        return self.head_outputs[key] if isinstance(key, int) else super().__getitem__(key)

    def __iter__(self):
        return iter(self.head_outputs)

    def __len__(self):
        return len(self.head_outputs)


def _label2id(num: int | None, id2label) -> dict | None:
    if id2label is not None:
        return {label: int(id_) for id_, label in id2label.items()}
    return None


class PredictionHead(nn.Sequential):
    """Base of the heads: ``name``, ``config`` (a plain dict owned by this head) and the layer builder."""

    head_type = ""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.config: dict = {}

    def _dropout_prob(self, model_config) -> float:
        if self.config.get("dropout_prob") is not None:
            return self.config["dropout_prob"]
        if getattr(model_config, "classifier_dropout", None) is not None:
            return model_config.classifier_dropout
        if getattr(model_config, "hidden_dropout_prob", None) is not None:
            return model_config.hidden_dropout_prob
        return 0.0

    def build(self, model, out_features: int | None = None) -> None:
        """Add the layers (AdapterHub's layout) from ``self.config`` ("layers", "activation_function", "bias",
        "dropout_prob"). ``model``: the model (AdapterHub's signature; its training mode is copied) or its config.
        ``out_features`` defaults, as in AdapterHub, to config "num_labels", else 1 with "num_choices", else
        hidden_size followed by the activation."""
        model_config = model_config_of(model)
        hidden = model_config.hidden_size
        layers = []
        p = self._dropout_prob(model_config)
        for index in range(self.config["layers"]):
            layers.append(nn.Dropout(p))
            if index < self.config["layers"] - 1:
                layers.append(nn.Linear(hidden, hidden))
                if self.config["activation_function"]:
                    layers.append(Activation(self.config["activation_function"]))
                continue
            if out_features is None and "num_labels" not in self.config and "num_choices" not in self.config:
                layers.append(nn.Linear(hidden, hidden, bias=self.config.get("bias", True)))
                if self.config["activation_function"]:
                    layers.append(Activation(self.config["activation_function"]))
                continue
            if out_features is None:
                out_features = self.config["num_labels"] if "num_labels" in self.config else 1
            layers.append(nn.Linear(hidden, out_features, bias=self.config.get("bias", True)))
        for index, module in enumerate(layers):
            self.add_module(str(index), module)
        _init_head(self, model_config)
        if isinstance(model, nn.Module):
            self.train(model.training)

    def get_output_embeddings(self):
        return None

    def get_label_names(self) -> list[str]:
        return ["labels"]

    def cls_output(self, outputs, **kwargs) -> torch.Tensor:
        """The per-sequence input of sequence-level heads: [B, H]."""
        hidden = outputs[0]
        if kwargs.get("get_cls_from_eos_tokens", False):
            eos_mask = kwargs.get("eos_mask")
            if eos_mask is None:
                raise ValueError("get_cls_from_eos_tokens=True needs eos_mask [batch, length]")
            counts = eos_mask.sum(1)
            if len(torch.unique(counts)) > 1:
                raise ValueError("All examples must have the same number of <eos> tokens.")
            return hidden[eos_mask, :].view(hidden.size(0), -1, hidden.size(-1))[:, -1, :]
        # use_pooler=True: DeBERTa has no pooler, so the pooled input is the first token too (AdapterHub feeds the
        # whole sequence here and returns per-token logits; see the README's list of differences).
        return hidden[:, 0]


def model_config_of(model_or_config):
    """A head's first constructor argument: the model (AdapterHub's signature) or the model config."""
    return model_or_config.config if isinstance(model_or_config, nn.Module) else model_or_config


@torch.no_grad()
def _init_head(head: nn.Module, model_config) -> None:
    std = getattr(model_config, "initializer_range", 0.02) or 0.02
    for module in head.modules():
        if isinstance(module, nn.Linear):
            module.weight.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()


def _outputs_tuple(first: tuple, outputs, loss):
    result = first + tuple(outputs[1:])
    return (loss,) + result if loss is not None else result


def _head_output(output_class, outputs, loss, return_dict: bool, **logits):
    """A head's return value: ``output_class`` (loss, the named logits, the body's hidden states and attentions)
    when return_dict, else the tuple (loss if any, the logits in the order given, the body's other outputs)."""
    if return_dict:
        return output_class(loss=loss, **logits, hidden_states=_get(outputs, "hidden_states"),
                            attentions=_get(outputs, "attentions"))
    return _outputs_tuple(tuple(logits.values()), outputs, loss)


class ClassificationHead(PredictionHead):
    """Sequence classification; cross-entropy, or MSE when num_labels == 1 (regression)."""

    head_type = "classification"

    def __init__(self, model_config, head_name, num_labels=2, layers=2, activation_function="tanh", id2label=None,
                 use_pooler=False, bias=True, dropout_prob=None):
        super().__init__(head_name)
        model_config = model_config_of(model_config)
        self.config = {"head_type": self.head_type, "num_labels": num_labels, "layers": layers,
                       "activation_function": activation_function, "label2id": _label2id(num_labels, id2label),
                       "use_pooler": use_pooler, "bias": bias, "dropout_prob": dropout_prob}
        self.build(model_config, num_labels)

    def loss(self, logits, labels):
        if self.config["num_labels"] == 1:
            return MSELoss()(logits.view(-1), labels.view(-1))
        return CrossEntropyLoss()(logits.view(-1, self.config["num_labels"]), labels.view(-1))

    def forward(self, outputs, cls_output=None, attention_mask=None, return_dict=False, **kwargs):
        if cls_output is None:
            cls_output = self.cls_output(outputs, **kwargs)
        logits = super().forward(cls_output)
        labels = kwargs.get("labels")
        loss = self.loss(logits, labels) if labels is not None else None
        return _head_output(SequenceClassifierOutput, outputs, loss, return_dict, logits=logits)


class MultiLabelClassificationHead(ClassificationHead):
    """Multi-label classification: binary cross-entropy with logits (labels converted to float)."""

    head_type = "multilabel_classification"

    def loss(self, logits, labels):
        return BCEWithLogitsLoss()(logits, labels.to(logits.dtype))


class MultipleChoiceHead(PredictionHead):
    """Multiple choice over inputs flattened to [B * num_choices, L]; logits [B, num_choices]; cross-entropy."""

    head_type = "multiple_choice"

    def __init__(self, model_config, head_name, num_choices=2, layers=2, activation_function="tanh", id2label=None,
                 use_pooler=False, dropout_prob=None):
        super().__init__(head_name)
        model_config = model_config_of(model_config)
        self.config = {"head_type": self.head_type, "num_choices": num_choices, "layers": layers,
                       "activation_function": activation_function, "label2id": _label2id(num_choices, id2label),
                       "use_pooler": use_pooler, "dropout_prob": dropout_prob}
        self.build(model_config, 1)

    def forward(self, outputs, cls_output=None, attention_mask=None, return_dict=False, **kwargs):
        if cls_output is None:
            cls_output = self.cls_output(outputs, **kwargs)
        logits = super().forward(cls_output).view(-1, self.config["num_choices"])
        labels = kwargs.get("labels")
        loss = CrossEntropyLoss()(logits, labels) if labels is not None else None
        return _head_output(MultipleChoiceModelOutput, outputs, loss, return_dict, logits=logits)


class TaggingHead(PredictionHead):
    """Token classification; cross-entropy over tokens whose attention_mask is 1."""

    head_type = "tagging"

    def __init__(self, model_config, head_name, num_labels=2, layers=1, activation_function="tanh", id2label=None,
                 dropout_prob=None):
        super().__init__(head_name)
        model_config = model_config_of(model_config)
        self.config = {"head_type": self.head_type, "num_labels": num_labels, "layers": layers,
                       "activation_function": activation_function, "label2id": _label2id(num_labels, id2label),
                       "dropout_prob": dropout_prob}
        self.build(model_config, num_labels)

    def forward(self, outputs, cls_output=None, attention_mask=None, return_dict=False, **kwargs):
        logits = super().forward(outputs[0])
        labels = kwargs.get("labels")
        loss = None
        if labels is not None:
            loss_fct = CrossEntropyLoss()
            labels, attention_mask = _pad_for_prompt(labels, attention_mask, kwargs.get("prompt_tokens_length"),
                                                     loss_fct.ignore_index)
            flat_logits = logits.view(-1, self.config["num_labels"])
            if attention_mask is not None and attention_mask.dim() == 2:
                active = attention_mask.reshape(-1) == 1
                flat_labels = torch.where(active, labels.view(-1),
                                          torch.tensor(loss_fct.ignore_index).type_as(labels))
                loss = loss_fct(flat_logits, flat_labels)
            else:
                loss = loss_fct(flat_logits, labels.view(-1))
        return _head_output(TokenClassifierOutput, outputs, loss, return_dict, logits=logits)


class QuestionAnsweringHead(PredictionHead):
    """Extractive QA: start/end logits [B, L]; loss = mean of the two cross-entropies, positions clamped to
    [0, L] and L ignored."""

    head_type = "question_answering"

    def __init__(self, model_config, head_name, num_labels=2, layers=1, activation_function="tanh", id2label=None,
                 dropout_prob=None):
        super().__init__(head_name)
        model_config = model_config_of(model_config)
        self.config = {"head_type": self.head_type, "num_labels": num_labels, "layers": layers,
                       "activation_function": activation_function, "label2id": _label2id(num_labels, id2label),
                       "dropout_prob": dropout_prob}
        self.build(model_config, num_labels)

    def get_label_names(self) -> list[str]:
        return ["start_positions", "end_positions"]

    def forward(self, outputs, cls_output=None, attention_mask=None, return_dict=False, **kwargs):
        logits = super().forward(outputs[0])
        start_logits, end_logits = (t.squeeze(-1) for t in logits.split(1, dim=-1))
        start, end = kwargs.get("start_positions"), kwargs.get("end_positions")
        loss = None
        if start is not None and end is not None:
            start = start.squeeze(-1) if start.dim() > 1 else start
            end = end.squeeze(-1) if end.dim() > 1 else end
            ignored = start_logits.size(1)
            loss_fct = CrossEntropyLoss(ignore_index=ignored)
            loss = (loss_fct(start_logits, start.clamp(0, ignored)) + loss_fct(end_logits, end.clamp(0, ignored))) / 2
        return _head_output(QuestionAnsweringModelOutput, outputs, loss, return_dict, start_logits=start_logits,
                            end_logits=end_logits)


class MaskedLMHead(PredictionHead):
    """BERT-style masked-LM head (AdapterHub's BertStyleMaskedLMHead); cross-entropy over all positions
    (labels -100 ignored). The decoder (last child) is tied to the word embeddings by the model."""

    head_type = "masked_lm"

    def __init__(self, model_config, head_name, vocab_size=None, embedding_size=None, layers=2,
                 activation_function="gelu", layer_norm=True, bias=True, shift_labels=False, dropout_prob=None):
        super().__init__(head_name)
        model_config = model_config_of(model_config)
        if shift_labels:
            raise ValueError("a masked-LM head does not shift labels (shift_labels must be False)")
        self.config = {
            "head_type": self.head_type,
            "vocab_size": vocab_size or model_config.vocab_size,
            "embedding_size": embedding_size or getattr(model_config, "embedding_size", None)
            or model_config.hidden_size,
            "layers": layers,
            "activation_function": activation_function,
            "layer_norm": layer_norm,
            "bias": bias,
            "shift_labels": shift_labels,
            "label2id": None,
        }
        if dropout_prob is not None:
            self.config["dropout_prob"] = dropout_prob
        hidden, embedding = model_config.hidden_size, self.config["embedding_size"]
        layers_list = []
        for index in range(layers - 1):
            layers_list.append(nn.Linear(hidden if index == 0 else embedding, embedding))
            if activation_function:
                layers_list.append(Activation(activation_function))
            if layer_norm:
                layers_list.append(nn.LayerNorm(embedding, eps=getattr(model_config, "layer_norm_eps", 1e-12)))
        layers_list.append(nn.Linear(embedding, self.config["vocab_size"], bias=bias))
        for index, module in enumerate(layers_list):
            self.add_module(str(index), module)
        _init_head(self, model_config)

    @property
    def decoder_index(self) -> int:
        return len(self) - 1

    def get_output_embeddings(self) -> nn.Linear:
        return self[self.decoder_index]

    def set_output_embeddings(self, embeddings: nn.Linear) -> None:
        self._modules[str(self.decoder_index)] = embeddings

    def forward(self, outputs, cls_output=None, attention_mask=None, return_dict=False, **kwargs):
        hidden = outputs[0]
        for index in range(self.decoder_index):
            hidden = self[index](hidden)
        invertible = kwargs.get("invertible_adapter")
        if invertible is not None:
            hidden = invertible(hidden, rev=True)
        logits = self[self.decoder_index](hidden)
        labels = kwargs.get("labels")
        loss = None
        if labels is not None:
            labels, _ = _pad_for_prompt(labels, None, kwargs.get("prompt_tokens_length"), -100)
            loss = CrossEntropyLoss()(logits.reshape(-1, self.config["vocab_size"]), labels.reshape(-1))
        return _head_output(MaskedLMOutput, outputs, loss, return_dict, logits=logits)


def _pad_for_prompt(labels, attention_mask, prompt_length, ignore_index: int):
    """With prompt tuning the sequence has ``prompt_length`` extra positions in front: their labels are ignored
    (and their attention-mask entries set to 1), as in AdapterHub."""
    if not prompt_length:
        return labels, attention_mask
    pad = torch.full((labels.shape[0], prompt_length), ignore_index, dtype=labels.dtype, device=labels.device)
    labels = torch.cat([pad, labels], dim=-1)
    if attention_mask is not None and attention_mask.dim() == 2:
        attention_mask = torch.cat([torch.ones_like(pad, dtype=attention_mask.dtype), attention_mask], dim=-1)
    return labels, attention_mask


def _get(outputs, key):
    return outputs.get(key) if isinstance(outputs, ModelOutput) else None


HEAD_TYPES = {
    "classification": ClassificationHead,
    "multilabel_classification": MultiLabelClassificationHead,
    "tagging": TaggingHead,
    "multiple_choice": MultipleChoiceHead,
    "question_answering": QuestionAnsweringHead,
    "masked_lm": MaskedLMHead,
}

# Head types AdapterHub knows but DeBERTa-v2 does not support (AdapterHub raises the same ValueError for them).
UNSUPPORTED_HEAD_TYPES = ("causal_lm", "seq2seq_lm", "dependency_parsing", "image_classification")
