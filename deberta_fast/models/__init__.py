"""nn.Module drop-ins for transformers' DeBERTa-v2 family."""

from .attention import DisentangledSelfAttention, fast_attention_from
from .base import DebertaV2Model
from .encoder import DebertaV2Encoder
from .heads import (
    DebertaV2ForMaskedLM,
    DebertaV2ForMultipleChoice,
    DebertaV2ForQuestionAnswering,
    DebertaV2ForSequenceClassification,
    DebertaV2ForTokenClassification,
)
from .patch import patch_deberta, set_attention_backend

__all__ = [
    "DebertaV2Encoder",
    "DebertaV2ForMaskedLM",
    "DebertaV2ForMultipleChoice",
    "DebertaV2ForQuestionAnswering",
    "DebertaV2ForSequenceClassification",
    "DebertaV2ForTokenClassification",
    "DebertaV2Model",
    "DisentangledSelfAttention",
    "fast_attention_from",
    "patch_deberta",
    "set_attention_backend",
]
