"""DeBERTa-v2 self-attention with prefix tuning and per-row relative-position tables.

``DisentangledSelfAttentionWithAdapters`` is deberta_fast's DisentangledSelfAttention (same parameters, same op)
plus a ``prefix_tuning`` submodule (methods/prefix_tuning.py). Differences from the base class:

- Prefix tuning: the prefix keys / values [B, heads, P, d] go in front of the content keys and take part in the
  content score only (zero positional bias), through the op's ``num_prefix_keys``; the [B, L] token mask keeps
  masking content keys and never masks prefix keys (AdapterHub extends its pair mask with ones). Row groups with
  different prefix lengths (Parallel / BatchSplit) run one op call each; their attention probabilities are padded
  with zeros on the left to the longest prefix, as AdapterHub's masked padding gives.
- Relative-position tables: with share_att_key the tables come from query_proj / key_proj, which may carry LoRA /
  (IA)³. When the active setup gives batch rows different adapters there (Parallel, BatchSplit, MultiTask), the
  tables are built per row, [B, heads, 2S, d], which the op accepts; otherwise one [1, heads, 2S, d] table.
- Prompt tuning over a padded batch: the [B, 1, L, L] pair mask of methods/prompt_tuning.py replaces the token mask.
- q, k and v with plain LoRAs run as one ``lora_qkv`` op (one launch on CUDA) instead of three projections.
- q, k and v of different batch sizes (a Parallel block replicating its own input outside the model's forward)
  are brought to the largest batch, as AdapterHub does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.attention import DisentangledSelfAttention
from ..ops import disentangled_attention
from ..ops.lora_qkv import lora_qkv
from .methods.lora import LoRALinear

__all__ = ["DisentangledSelfAttentionWithAdapters"]


def _to_batch(tensor: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    if tensor is None or tensor.shape[0] == batch:
        return tensor
    return tensor.repeat(batch // tensor.shape[0], *([1] * (tensor.dim() - 1)))


def _prefix_length(segment) -> int:
    return segment[1].shape[2] if segment[1] is not None else 0


class DisentangledSelfAttentionWithAdapters(DisentangledSelfAttention):
    """forward(hidden_states [B, L, hidden], attention_mask [B, L] or [B, 1, L, L], output_attentions,
    rel_embeddings) -> (context [B, L, heads · d], probs [B, heads, L, P + L] or None). See module docstring."""

    def position_tables(self, rel_embeddings: torch.Tensor, batch: int = 1):
        """(Pk, Pq), each [1 or batch, heads, 2S, d] or None when its term is off."""
        spec = self.position_spec
        rel = self.pos_dropout(rel_embeddings)[: spec.num_slots].unsqueeze(0)
        key_proj = self.key_proj if self.share_att_key else getattr(self, "pos_key_proj", None)
        query_proj = self.query_proj if self.share_att_key else getattr(self, "pos_query_proj", None)

        def project(proj):
            return proj(rel, positions_batch=batch) if isinstance(proj, LoRALinear) else proj(rel)

        pos_key = self._heads(project(key_proj)) if spec.c2p else None
        pos_query = self._heads(project(query_proj)) if spec.p2c else None
        return pos_key, pos_query

    def _project_qkv(self, hidden_states: torch.Tensor):
        """(q, k, v) [B, L, heads·d]. When at least one projection runs a plain LoRA and none needs its module
        (composition, gating, (IA)³), the three go through ``ops.lora_qkv`` together: one launch on CUDA."""
        projections = (self.query_proj, self.key_proj, self.value_proj)
        plans = [p.fusable_lora() if isinstance(p, LoRALinear) else None for p in projections]
        loras = [plan for plan in plans if plan]
        if any(plan is None for plan in plans) or not loras or len({plan[3] for plan in loras}) > 1:
            return tuple(projection(hidden_states) for projection in projections)
        q_lora, k_lora, v_lora = (tuple(plan[:3]) if plan else None for plan in plans)
        return lora_qkv(hidden_states, self.query_proj.weight, self.query_proj.bias, self.key_proj.weight,
                        self.key_proj.bias, self.value_proj.weight, self.value_proj.bias, q_lora, k_lora, v_lora,
                        loras[0][3])

    def forward(self, hidden_states, attention_mask, output_attentions=False, query_states=None, relative_pos=None,
                rel_embeddings=None):
        if query_states is not None or relative_pos is not None:
            return super().forward(hidden_states, attention_mask, output_attentions, query_states, relative_pos,
                                   rel_embeddings)
        query, key, value = (self._heads(t) for t in self._project_qkv(hidden_states))
        batch = max(query.shape[0], key.shape[0], value.shape[0])
        query, key, value = _to_batch(query, batch), _to_batch(key, batch), _to_batch(value, batch)
        hidden_states = _to_batch(hidden_states, batch)
        if attention_mask is not None and attention_mask.dim() == 3:
            attention_mask = attention_mask.unsqueeze(1)
        context = self.prefix_tuning.forward_context() if hasattr(self, "prefix_tuning") else None
        if context is not None and context.attention_pair_mask is not None and attention_mask is not None \
                and attention_mask.dim() == 2:
            attention_mask = context.attention_pair_mask  # prompt tuning over a padded batch (methods/prompt_tuning.py)
        attention_mask = _to_batch(attention_mask, batch)
        pos_key = pos_query = None
        if self.position_spec is not None:
            pos_key, pos_query = self.position_tables(rel_embeddings, batch)
        segments = self.prefix_tuning.prefix_segments(hidden_states) if hasattr(self, "prefix_tuning") else None
        if segments is not None and all(segment[1] is None for segment in segments):
            segments = None
        if segments is None:
            out, probs = self._attend(query, key, value, pos_key, pos_query, attention_mask, output_attentions, None)
        elif len({_prefix_length(segment) for segment in segments}) == 1:
            prefix_key = torch.cat([segment[1] for segment in segments], dim=0)
            prefix_value = torch.cat([segment[2] for segment in segments], dim=0)
            out, probs = self._attend(query, key, value, pos_key, pos_query, attention_mask, output_attentions,
                                      (prefix_key, prefix_value))
        else:
            out, probs = self._attend_segments(query, key, value, pos_key, pos_query, attention_mask,
                                               output_attentions, segments)
        context = out.transpose(1, 2).reshape(batch, hidden_states.shape[1], -1)
        return context, probs

    def _attend(self, query, key, value, pos_key, pos_query, attention_mask, output_attentions, prefix):
        num_prefix = 0
        if prefix is not None:
            num_prefix = prefix[0].shape[2]
            key = torch.cat([prefix[0].to(key.dtype), key], dim=2)
            value = torch.cat([prefix[1].to(value.dtype), value], dim=2)
        return disentangled_attention(
            query, key, value, pos_key, pos_query, attention_mask,
            spec=self.position_spec, softmax_scale=self.softmax_scale,
            dropout_p=self.dropout.p if self.training else 0.0, output_attentions=output_attentions,
            num_prefix_keys=num_prefix, backend=self.backend,
        )

    def _attend_segments(self, query, key, value, pos_key, pos_query, attention_mask, output_attentions, segments):
        longest = max(_prefix_length(segment) for segment in segments)
        outs, all_probs = [], []
        for rows, prefix_key, prefix_value in segments:
            def cut(tensor):
                return tensor[rows] if tensor is not None and tensor.shape[0] > 1 else tensor

            prefix = (prefix_key, prefix_value) if prefix_key is not None else None
            out, probs = self._attend(query[rows], key[rows], value[rows], cut(pos_key), cut(pos_query),
                                      attention_mask[rows] if attention_mask is not None else None,
                                      output_attentions, prefix)
            outs.append(out)
            if probs is not None:
                all_probs.append(F.pad(probs, (longest - _prefix_length((rows, prefix_key, prefix_value)), 0)))
        return torch.cat(outs, dim=0), (torch.cat(all_probs, dim=0) if output_attentions else None)
