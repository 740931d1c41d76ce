"""Unpadded (varlen) eval-mode encoder pass over a padded batch, with transformers' outputs at padded positions.

What transformers computes at a padded position (eval mode, [B, L] token mask, no nGiE conv layer): the embedding
layer multiplies by the mask, so every padded token enters layer 1 as the zero vector; its attention row is fully
masked (every score set to finfo.min), so softmax gives the uniform row 1/L over all L keys, padded ones included,
and its context is mean_j v_j of its row. All padded tokens of a row therefore carry the same hidden state in every
layer: token-wise layers map equal inputs to equal outputs and they all receive the same context. Real tokens give
padded keys probability exp(finfo.min - max) = 0, so they see only the real tokens of their row, at relative
positions i - j that do not change when the row's real span is moved to start at 0.

So per row b with n_b real tokens (one contiguous span: left or right padding) this pass runs
  the token-wise parts (projections, output dense, LayerNorms, FFN) on the sum(n_b) real tokens plus one
    representative padded token per row (B more tokens),
  the attention of the real tokens on [1, H, n_b, D] (no mask),
  the representative's context as (sum over real j of v_j + (L - n_b) · v_pad) / L,
and scatters the result back to [B, L, hidden]. Rows whose real tokens are not one span (holes) make the caller
stay on the padded path: moving their tokens together would change relative positions.
"""

from __future__ import annotations

import torch
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

from ..ops import disentangled_attention


def row_spans(token_mask: torch.Tensor) -> list[tuple[int, int]] | None:
    """[(start, count)] of each row's real tokens, or None when a row's real tokens are not one contiguous span."""
    mask = token_mask != 0
    counts = mask.sum(-1)
    starts = torch.where(counts > 0, mask.int().argmax(-1), torch.zeros_like(counts))
    positions = torch.arange(mask.shape[-1], device=mask.device)
    span = (positions >= starts[:, None]) & (positions < (starts + counts)[:, None])
    if not bool(torch.equal(span, mask)):
        return None
    return list(zip(starts.tolist(), counts.tolist()))


def layers_support_unpadding(layers) -> bool:
    """Only plain transformers layers around deberta_fast's attention (adapters or other wrappers change the math)."""
    from .attention import DisentangledSelfAttention
    from .output_blocks import DebertaV2Intermediate, DebertaV2Output, DebertaV2SelfOutput

    return all(
        type(layer) is hf.DebertaV2Layer
        and type(layer.attention) is hf.DebertaV2Attention
        and type(layer.attention.self) is DisentangledSelfAttention
        and type(layer.attention.output) in (hf.DebertaV2SelfOutput, DebertaV2SelfOutput)
        and type(layer.intermediate) in (hf.DebertaV2Intermediate, DebertaV2Intermediate)
        and type(layer.output) in (hf.DebertaV2Output, DebertaV2Output)
        for layer in layers
    )


def _unpadded_layer(layer, tokens, spans, length, rel_embeddings):
    """tokens [sum(n_b) + B, hidden] (real tokens row by row, then one padded representative per row) ->
    the layer's output at those tokens."""
    attention = layer.attention.self
    heads = attention.num_attention_heads
    query = attention.query_proj(tokens)
    key = attention.key_proj(tokens)
    value = attention.value_proj(tokens)
    pos_key = pos_query = None
    if attention.position_spec is not None:
        pos_key, pos_query = attention.position_tables(rel_embeddings)
    real = sum(count for _, count in spans)
    contexts = []
    pad_contexts = []
    offset = 0
    for row, (_, count) in enumerate(spans):
        v_pad = value[real + row]
        if count:
            def heads_of(x):
                return x[offset:offset + count].view(1, count, heads, -1).transpose(1, 2)

            out, _ = disentangled_attention(
                heads_of(query), heads_of(key), heads_of(value), pos_key, pos_query, None,
                spec=attention.position_spec, softmax_scale=attention.softmax_scale, dropout_p=0.0,
                output_attentions=False, backend=attention.backend,
            )
            contexts.append(out[0].transpose(0, 1).reshape(count, -1))
            v_sum = value[offset:offset + count].sum(0)
        else:
            v_sum = torch.zeros_like(v_pad)
        pad_contexts.append((v_sum + (length - count) * v_pad) / length)
        offset += count
    context = torch.cat(contexts + [torch.stack(pad_contexts)], 0)
    attention_output = layer.attention.output(context, tokens)
    return layer.output(layer.intermediate(attention_output), attention_output)


def unpadded_encoder_layers(layers, hidden_states, token_mask, spans, rel_embeddings, output_hidden_states):
    """Run ``layers`` unpadded. hidden_states [B, L, hidden] (zeros at padded positions, as the embeddings leave
    them); returns (last [B, L, hidden], per-layer hidden states or None)."""
    batch, length, width = hidden_states.shape
    mask = token_mask != 0
    rows = torch.arange(batch, device=hidden_states.device)
    pad_row_of_position = rows[:, None].expand(batch, length)[~mask]
    # Padded positions of a row share one value; the embeddings' zero vector when none is present (all real).
    representatives = torch.zeros(batch, width, dtype=hidden_states.dtype, device=hidden_states.device)
    if pad_row_of_position.numel():
        representatives[pad_row_of_position] = hidden_states[~mask]
    tokens = torch.cat([hidden_states[mask], representatives], 0)
    real = tokens.shape[0] - batch

    def scatter(packed):
        full = packed.new_empty(batch, length, width)
        full[mask] = packed[:real]
        full[~mask] = packed[real:][pad_row_of_position]
        return full

    all_states = []
    for layer in layers:
        tokens = _unpadded_layer(layer, tokens, spans, length, rel_embeddings)
        if output_hidden_states:
            all_states.append(scatter(tokens))
    last = all_states[-1] if output_hidden_states else scatter(tokens)
    return last, (all_states if output_hidden_states else None)
