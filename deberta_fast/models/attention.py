"""DeBERTa-v2 self-attention that runs ``deberta_fast.ops.disentangled_attention``.

A subclass of transformers' ``DisentangledSelfAttention``: the same submodules and parameter names
(query_proj, key_proj, value_proj, pos_key_proj, pos_query_proj, pos_dropout, dropout), so a transformers module
can be switched to it in place (``fast_attention_from``) without touching its weights.
"""

from __future__ import annotations

import logging

import torch
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

from ..ops import disentangled_attention
from ..ops.dispatch import log_once
from ..ops.positions import RelativePositionSpec, scale_factor, softmax_scale

KNOWN_POSITION_TYPES = ("c2p", "p2c", "p2p")


class DisentangledSelfAttention(hf.DisentangledSelfAttention):
    """Disentangled self-attention (DeBERTa-v2/v3), transformers' math on deberta_fast's op.

    forward(hidden_states [B, L, hidden], attention_mask [B, L] (or [B, 1, L, L] as transformers' encoder
    passes it), output_attentions, rel_embeddings [2S', hidden]) -> (context [B, L, H·D], probs or None).
    ``backend`` (None = context / environment / auto) picks the op's backend for this module.
    """

    backend: str | None = None

    def __init__(self, config):
        super().__init__(config)
        self._derive_attention_constants()

    def _derive_attention_constants(self) -> None:
        unknown = [t for t in self.pos_att_type if t not in KNOWN_POSITION_TYPES]
        if unknown:
            raise ValueError(
                f"config.pos_att_type has unsupported entries {unknown}; expected a subset of "
                f"{list(KNOWN_POSITION_TYPES)} (for example \"p2c|c2p\")"
            )
        if "p2p" in self.pos_att_type:
            log_once(logging.INFO, "pos_att_type 'p2p' is ignored, as transformers ignores it")
        self.softmax_scale = softmax_scale(self.attention_head_size, scale_factor(self.pos_att_type))
        self.position_spec = None
        if self.relative_attention:
            self.position_spec = RelativePositionSpec(
                c2p="c2p" in self.pos_att_type,
                p2c="p2c" in self.pos_att_type,
                position_buckets=self.position_buckets,
                max_relative_positions=self.max_relative_positions,
            )

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L, H·D] -> [N, H, L, D] as a view."""
        return x.view(x.shape[0], x.shape[1], self.num_attention_heads, -1).transpose(1, 2)

    def position_tables(self, rel_embeddings: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Projected relative embeddings (Pk, Pq), each [1, H, 2S, D] or None when its term is off.

        With share_att_key the content projections are reused, so whatever wraps query_proj / key_proj (LoRA,
        IA³) reaches the positional terms too, as in transformers.
        """
        spec = self.position_spec
        rel = self.pos_dropout(rel_embeddings)[: spec.num_slots].unsqueeze(0)
        key_proj = self.key_proj if self.share_att_key else getattr(self, "pos_key_proj", None)
        query_proj = self.query_proj if self.share_att_key else getattr(self, "pos_query_proj", None)
        pos_key = self._heads(key_proj(rel)) if spec.c2p else None
        pos_query = self._heads(query_proj(rel)) if spec.p2c else None
        return pos_key, pos_query

    def forward(
        self,
        hidden_states,
        attention_mask,
        output_attentions=False,
        query_states=None,
        relative_pos=None,
        rel_embeddings=None,
    ):
        if query_states is not None or relative_pos is not None:
            log_once(
                logging.WARNING,
                "DisentangledSelfAttention: query_states / relative_pos given; running transformers' own "
                "attention for this call",
            )
            return super().forward(
                hidden_states, attention_mask, output_attentions, query_states, relative_pos, rel_embeddings
            )
        query = self._heads(self.query_proj(hidden_states))
        key = self._heads(self.key_proj(hidden_states))
        value = self._heads(self.value_proj(hidden_states))
        pos_key = pos_query = None
        if self.position_spec is not None:
            pos_key, pos_query = self.position_tables(rel_embeddings)
        if attention_mask is not None and attention_mask.dim() == 3:
            attention_mask = attention_mask.unsqueeze(1)
        out, probs = disentangled_attention(
            query,
            key,
            value,
            pos_key,
            pos_query,
            attention_mask,
            spec=self.position_spec,
            softmax_scale=self.softmax_scale,
            dropout_p=self.dropout.p if self.training else 0.0,
            output_attentions=output_attentions,
            backend=self.backend,
        )
        context = out.transpose(1, 2).reshape(hidden_states.shape[0], hidden_states.shape[1], -1)
        return context, probs


def fast_attention_from(module: hf.DisentangledSelfAttention) -> DisentangledSelfAttention:
    """Switch a transformers DisentangledSelfAttention to deberta_fast's in place (same parameters)."""
    module.__class__ = DisentangledSelfAttention
    module._derive_attention_constants()
    return module
