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

POSITION_TERMS = ("c2p", "p2c")
# Entries transformers reads as "no term": p2p (a DeBERTa-v1 type it never computes), none / "" ("None" in a config).
NO_TERM_ENTRIES = ("p2p", "none", "")


def attention_constants(module) -> tuple[float, RelativePositionSpec | None]:
    """(softmax_scale, position_spec) of a DisentangledSelfAttention, with transformers' meaning of its config.

    Reads only attributes transformers' ``__init__`` sets (pos_att_type, relative_attention, position_buckets,
    max_relative_positions, attention_head_size), so it can validate a transformers module before it is switched.
    A term is on when ``"c2p"`` / ``"p2c"`` is in pos_att_type (transformers' own membership test; other entries
    add nothing); the scale counts those terms even without relative attention, as transformers does; with
    relative attention off or no term on there is no positional part (spec None). Raises ValueError for log
    buckets whose formula divides by log((max_relative_positions - 1) / (position_buckets // 2)) <= 0: there
    transformers' positions are non-finite or non-monotone (its output is then undefined or platform-dependent).
    """
    pos_att_type = module.pos_att_type if module.pos_att_type is not None else ()
    c2p, p2c = ("c2p" in pos_att_type), ("p2c" in pos_att_type)
    if not isinstance(pos_att_type, str):
        ignored = [t for t in pos_att_type if t not in POSITION_TERMS + NO_TERM_ENTRIES]
        if ignored:
            log_once(logging.WARNING, f"pos_att_type entries {ignored} are ignored (transformers ignores them); "
                                      "the position terms are \"c2p\" and \"p2c\"")
        if "p2p" in pos_att_type:
            log_once(logging.INFO, "pos_att_type 'p2p' is ignored, as transformers ignores it")
    scale = softmax_scale(module.attention_head_size, scale_factor(pos_att_type))
    if not (module.relative_attention and (c2p or p2c)):
        return scale, None
    spec = RelativePositionSpec(
        c2p=c2p, p2c=p2c, position_buckets=module.position_buckets,
        max_relative_positions=module.max_relative_positions,
    )
    return scale, spec


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
        self.softmax_scale, self.position_spec = attention_constants(self)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L, H·D] -> [N, H, L, D] as a view."""
        return x.view(x.shape[0], x.shape[1], self.num_attention_heads, -1).transpose(1, 2)

    def position_tables(self, rel_embeddings: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Projected relative embeddings (Pk, Pq), each [1, H, 2S, D] or None when its term is off.

        With share_att_key the content projections are reused, so whatever wraps query_proj / key_proj (LoRA,
        IA³) reaches the positional terms too, as in transformers.
        """
        spec = self.position_spec
        rel = self.pos_dropout(rel_embeddings)
        if rel.shape[0] != spec.num_slots:  # a full-length slice would cost a zero-filled copy in its backward
            rel = rel[: spec.num_slots]
        rel = rel.unsqueeze(0)
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
    constants = attention_constants(module)  # validate before switching: a refused module stays as it was
    module.__class__ = DisentangledSelfAttention
    module.softmax_scale, module.position_spec = constants
    return module
