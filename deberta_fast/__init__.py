"""deberta_fast: kernel-accelerated, drop-in DeBERTa-v2/v3 for PyTorch.

    from deberta_fast import DebertaV2Model, DebertaV2ForSequenceClassification, patch_deberta, use_backend

Classes are resolved on first access, so ``import deberta_fast`` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "DebertaV2Model": "deberta_fast.models",
    "DebertaV2ForMaskedLM": "deberta_fast.models",
    "DebertaV2ForSequenceClassification": "deberta_fast.models",
    "DebertaV2ForTokenClassification": "deberta_fast.models",
    "DebertaV2ForQuestionAnswering": "deberta_fast.models",
    "DebertaV2ForMultipleChoice": "deberta_fast.models",
    "patch_deberta": "deberta_fast.models",
    "set_attention_backend": "deberta_fast.models",
    "use_backend": "deberta_fast.ops",
    "disentangled_attention": "deberta_fast.ops",
    "BackendUnavailable": "deberta_fast.ops",
    "DebertaV2AdapterModel": "deberta_fast.adapters",
    "AdapterSetup": "deberta_fast.adapters",
    "AdapterConfig": "deberta_fast.adapters",
    "LoRAConfig": "deberta_fast.adapters",
    "IA3Config": "deberta_fast.adapters",
    "SeqBnConfig": "deberta_fast.adapters",
    "DoubleSeqBnConfig": "deberta_fast.adapters",
    "ParBnConfig": "deberta_fast.adapters",
    "BnConfig": "deberta_fast.adapters",
    "ConfigUnion": "deberta_fast.adapters",
    "Stack": "deberta_fast.adapters",
    "Average": "deberta_fast.adapters",
    "DoRAConfig": "deberta_fast.adapters",
    "DvoRAConfig": "deberta_fast.adapters",
    "VeraConfig": "deberta_fast.adapters",
    "MTLLoRAConfig": "deberta_fast.adapters",
    "MultiTask": "deberta_fast.adapters",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'deberta_fast' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__():
    return __all__
