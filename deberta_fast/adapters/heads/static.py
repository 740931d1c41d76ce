"""Turning the head of a transformers ``DebertaV2For*`` checkpoint into a flexible head (AdapterHub's mapping).

``static_head_conversion(config)`` returns the flex head config and the checkpoint-key renames (regex -> target)
for the architecture in ``config.architectures[0]``, or None for checkpoints without a known head:

- ForSequenceClassification / ForMultipleChoice: ``pooler.dense`` -> ``heads.<n>.1``, ``classifier`` -> ``.4``;
  the activation is ``config.pooler_hidden_act`` (AdapterHub hard-codes gelu).
- ForTokenClassification: ``classifier`` -> ``.1``; ForQuestionAnswering: ``qa_outputs`` -> ``.1``.
- ForMaskedLM (legacy head): ``cls.predictions.transform.dense`` -> ``.0``, ``.transform.LayerNorm`` -> ``.2``,
  ``cls.predictions.decoder`` -> ``.3``, ``cls.predictions.bias`` -> ``.3.bias``; non-legacy head
  (``config.legacy=False``): ``lm_predictions.lm_head.dense`` -> ``.0``, ``.LayerNorm`` -> ``.2``, ``.bias`` ->
  ``.3.bias``. The activation is ``config.hidden_act``. The decoder weight is the tied word embedding matrix.
"""

from __future__ import annotations

import re

__all__ = ["STATIC_HEAD_ARCHITECTURES", "static_head_conversion"]

STATIC_HEAD_ARCHITECTURES = (
    "DebertaV2ForSequenceClassification",
    "DebertaV2ForMultipleChoice",
    "DebertaV2ForTokenClassification",
    "DebertaV2ForQuestionAnswering",
    "DebertaV2ForMaskedLM",
)


def _renames(head_name: str, pairs) -> dict:
    return {rf"^{re.escape(source)}\.(.+)$": rf"heads.{head_name}.{index}.\1" for source, index in pairs}


def static_head_conversion(config, head_name: str = "default", architecture: str | None = None, label2id=None):
    """(head_config, {checkpoint key regex: replacement}) for a static DeBERTa-v2 head, or None.

    ``architecture`` defaults to ``config.architectures[0]``; ``label2id`` to ``config.label2id``."""
    architecture = architecture or (config.architectures[0] if getattr(config, "architectures", None) else None)
    label2id = label2id or getattr(config, "label2id", None) or {f"LABEL_{i}": i for i in range(2)}
    label2id = {str(label): int(i) for label, i in label2id.items()}
    if architecture not in STATIC_HEAD_ARCHITECTURES:
        return None
    if architecture in ("DebertaV2ForSequenceClassification", "DebertaV2ForMultipleChoice"):
        pooler_size = getattr(config, "pooler_hidden_size", config.hidden_size)
        if pooler_size != config.hidden_size:
            raise ValueError(
                f"cannot convert {architecture}'s head to a flexible head: pooler_hidden_size={pooler_size} differs "
                f"from hidden_size={config.hidden_size} (flexible heads are hidden_size wide)"
            )
        labels = label2id
        head = {"layers": 2, "activation_function": getattr(config, "pooler_hidden_act", "gelu"), "use_pooler": False}
        if architecture == "DebertaV2ForMultipleChoice":
            head.update(head_type="multiple_choice", num_choices=len(labels), label2id=labels)
        else:
            head.update(head_type="classification", num_labels=len(labels), label2id=labels)
        return head, _renames(head_name, [("pooler.dense", 1), ("classifier", 4)])
    if architecture == "DebertaV2ForTokenClassification":
        labels = label2id
        head = {"head_type": "tagging", "layers": 1, "activation_function": None, "num_labels": len(labels),
                "label2id": labels}
        return head, _renames(head_name, [("classifier", 1)])
    if architecture == "DebertaV2ForQuestionAnswering":
        labels = label2id
        head = {"head_type": "question_answering", "layers": 1, "activation_function": None,
                "num_labels": len(labels), "label2id": labels}
        return head, _renames(head_name, [("qa_outputs", 1)])
    head = {"head_type": "masked_lm", "layers": 2, "activation_function": config.hidden_act, "layer_norm": True,
            "bias": True}
    if not isinstance(config.hidden_act, str):
        raise ValueError("cannot convert DebertaV2ForMaskedLM's head: config.hidden_act is not an activation name")
    if getattr(config, "legacy", True):
        renames = _renames(head_name, [("cls.predictions.transform.dense", 0),
                                       ("cls.predictions.transform.LayerNorm", 2),
                                       ("cls.predictions.decoder", 3)])
        renames[r"^cls\.predictions\.bias$"] = f"heads.{head_name}.3.bias"
    else:
        renames = _renames(head_name, [("lm_predictions.lm_head.dense", 0), ("lm_predictions.lm_head.LayerNorm", 2)])
        renames[r"^lm_predictions\.lm_head\.bias$"] = f"heads.{head_name}.3.bias"
    return head, renames
