"""``patch_deberta``: switch transformers DeBERTa-v2 modules to deberta_fast's, in place.

Only exact transformers classes are switched (their ``__class__`` becomes deberta_fast's subclass, which adds
no parameters), so weights, parameter names, hooks and wrappers such as PEFT's LoRA layers stay as they are.
A subclass written by someone else is refused, since its forward may differ from transformers'.
"""

from __future__ import annotations

import torch.nn as nn
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

from ..ops.dispatch import check_backend_name


def _switch_table():
    from .attention import DisentangledSelfAttention
    from .base import DebertaV2Model
    from .encoder import DebertaV2Encoder
    from .output_blocks import DebertaV2Intermediate, DebertaV2Output, DebertaV2SelfOutput

    return {
        hf.DisentangledSelfAttention: DisentangledSelfAttention,
        hf.DebertaV2Encoder: DebertaV2Encoder,
        hf.DebertaV2Model: DebertaV2Model,
        hf.DebertaV2SelfOutput: DebertaV2SelfOutput,
        hf.DebertaV2Intermediate: DebertaV2Intermediate,
        hf.DebertaV2Output: DebertaV2Output,
    }


def patch_deberta(model: nn.Module) -> nn.Module:
    """Make every DeBERTa-v2 attention inside ``model`` run deberta_fast's op; returns ``model``.

    The word embeddings (exact ``nn.Embedding``) become ``RowGradEmbedding`` (models/embedding.py): same forward,
    their gradient added row by row into a kept ``.grad``.

    Works on a DebertaV2Model, any DebertaV2For* head class, or any module that contains one. Idempotent.
    Raises TypeError for a model without DeBERTa-v2 attention (DeBERTa v1 included) and for subclasses of
    transformers' DeBERTa-v2 modules that deberta_fast does not know, and ValueError for an attention config the
    op cannot serve. Every module is checked before any is switched, so a refused model is left exactly as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_deberta expects a torch.nn.Module; got {type(model).__name__}")
    from .attention import attention_constants
    from .embedding import row_grad_embedding_from

    table = _switch_table()
    fast_classes = tuple(table.values())
    found_attention = False
    switches = []  # (module, deberta_fast class, attention constants or None)
    for name, module in model.named_modules():
        cls = type(module)
        if issubclass(cls, fast_classes):  # deberta_fast's classes and their subclasses (adapters)
            found_attention |= issubclass(cls, hf.DisentangledSelfAttention)
            continue
        if cls in table:
            constants = None
            if cls is hf.DisentangledSelfAttention:
                try:
                    constants = attention_constants(module)
                except ValueError as error:
                    raise ValueError(f"patch_deberta: {name}: {error}") from error
                found_attention = True
            switches.append((module, table[cls], constants))
            continue
        for hf_cls in table:
            if isinstance(module, hf_cls):
                raise TypeError(
                    f"patch_deberta: {name or 'the model'} is a {cls.__module__}.{cls.__qualname__}, a subclass of "
                    f"transformers' {hf_cls.__name__} that deberta_fast does not know; its forward may differ, so it "
                    "is not patched"
                )
    if not found_attention:
        hint = ""
        if any(type(m).__module__.startswith("transformers.models.deberta.") for m in model.modules()):
            hint = " (DeBERTa v1 is not supported: deberta_fast implements DeBERTa-v2/v3)"
        raise TypeError(f"patch_deberta: {type(model).__name__} contains no DeBERTa-v2 attention{hint}")
    for module, fast_cls, constants in switches:
        module.__class__ = fast_cls
        if constants is not None:
            module.softmax_scale, module.position_spec = constants
    for module in model.modules():  # exact nn.Embedding only: same forward, rows-only gradient accumulation
        if isinstance(module, hf.DebertaV2Embeddings):
            row_grad_embedding_from(module.word_embeddings)
    return model


def set_attention_backend(model: nn.Module, backend: str | None) -> nn.Module:
    """Pin the attention backend of every deberta_fast attention in ``model`` (None: context / env / auto)."""
    from .attention import DisentangledSelfAttention

    if backend is not None:
        check_backend_name(backend)
    modules = [m for m in model.modules() if isinstance(m, DisentangledSelfAttention)]
    if not modules:
        raise TypeError(f"set_attention_backend: {type(model).__name__} has no deberta_fast attention; patch it first")
    for module in modules:
        module.backend = backend
    return model
