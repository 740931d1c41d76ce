"""DeBERTa-v2 encoder without transformers' O(L²) side tensors.

transformers' encoder turns a [B, L] mask into a [B, 1, L, L] pair mask and builds a [1, L, L] int64
relative-position tensor on every forward; here the layers receive the [B, L] token mask as is and the attention
op derives positions itself. Layers, rel_embeddings, its LayerNorm and the nGiE conv layer are transformers'
modules, so parameter names and gradient checkpointing are unchanged.
"""

from __future__ import annotations

import logging

import torch
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

from ..ops.dispatch import log_once
from .unpadded import layers_support_unpadding, row_spans, unpadded_encoder_layers


class DebertaV2Encoder(hf.DebertaV2Encoder):
    """forward(hidden_states [B, L, hidden], attention_mask [B, L] | [B, L, L] | [B, 1, L, L], ...) as
    transformers', returning a BaseModelOutput (or tuple).

    On the CPU in eval mode, a [B, L] mask whose padded fraction is at least ``unpad_threshold`` runs unpadded
    (``deberta_fast.models.unpadded``: real tokens only, attention per row on its real length, transformers'
    values at padded positions reproduced from one representative token per row). It stays padded in train mode
    (dropout would make padded tokens differ), under torch.compile (data-dependent shapes), with output_attentions,
    an nGiE conv layer, rows with holes in the mask, non-zero inputs at padded positions, or wrapped layers.
    """

    unpad_threshold: float = 0.2

    def forward(
        self,
        hidden_states,
        attention_mask,
        output_hidden_states=True,
        output_attentions=False,
        query_states=None,
        relative_pos=None,
        return_dict=True,
    ):
        if query_states is not None or relative_pos is not None:
            log_once(
                logging.WARNING,
                "DebertaV2Encoder: query_states / relative_pos given; running transformers' encoder for this call",
            )
            return super().forward(
                hidden_states, attention_mask, output_hidden_states, output_attentions, query_states,
                relative_pos, return_dict,
            )
        if attention_mask.shape[0] == 1 and hidden_states.shape[0] > 1:  # transformers broadcasts a batch-1 mask
            attention_mask = attention_mask.expand(hidden_states.shape[0], *attention_mask.shape[1:])
        if attention_mask.dim() <= 2:
            token_mask = attention_mask
            layer_mask = attention_mask
        else:
            pairs = attention_mask if attention_mask.dim() == 3 else attention_mask[:, 0]
            token_mask = pairs.sum(-2) > 0
            layer_mask = self.get_attention_mask(attention_mask)
        if token_mask.dtype == torch.bool:
            token_mask = token_mask.long()  # the conv layer computes 1 - mask

        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        rel_embeddings = self.get_rel_embedding()
        spans = self._unpadding_spans(hidden_states, attention_mask, output_attentions)
        if spans is not None:
            last, states = unpadded_encoder_layers(
                self.layer, hidden_states, attention_mask, spans, rel_embeddings, output_hidden_states
            )
            if output_hidden_states:
                all_hidden_states = all_hidden_states + tuple(states)
            if not return_dict:
                return tuple(v for v in (last, all_hidden_states) if v is not None)
            return BaseModelOutput(last_hidden_state=last, hidden_states=all_hidden_states, attentions=None)
        next_states = hidden_states
        for index, layer_module in enumerate(self.layer):
            next_states, attn_weights = layer_module(
                next_states,
                layer_mask,
                rel_embeddings=rel_embeddings,
                output_attentions=output_attentions,
            )
            if index == 0 and self.conv is not None:
                next_states = self.conv(hidden_states, next_states, token_mask)
            if output_attentions:
                all_attentions = all_attentions + (attn_weights,)
            if output_hidden_states:
                all_hidden_states = all_hidden_states + (next_states,)

        if not return_dict:
            return tuple(v for v in (next_states, all_hidden_states, all_attentions) if v is not None)
        return BaseModelOutput(
            last_hidden_state=next_states, hidden_states=all_hidden_states, attentions=all_attentions
        )

    def _unpadding_spans(self, hidden_states, attention_mask, output_attentions):
        """Each row's (start, count) when this call may run unpadded, else None."""
        if (
            self.training
            or hidden_states.device.type != "cpu"  # one attention call per row: launch-bound on a GPU
            or output_attentions
            or self.conv is not None
            or attention_mask.dim() != 2
            or torch.compiler.is_compiling()
            # A trace would bake this batch's row spans into the graph: exported graphs stay padded.
            or torch.compiler.is_exporting()
            or torch.jit.is_tracing()
            or torch.onnx.is_in_onnx_export()
            or not torch.is_floating_point(hidden_states)
        ):
            return None
        padded = attention_mask == 0
        if not bool(padded.any()) or float(padded.float().mean()) < self.unpad_threshold:
            return None
        if bool(hidden_states[padded].any()) or not layers_support_unpadding(self.layer):
            return None
        return row_spans(attention_mask)
