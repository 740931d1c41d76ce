"""``DebertaV2Model``: transformers' base model with deberta_fast's encoder and attention.

Subclasses of transformers' classes, switched in place by ``patch_deberta`` at the end of ``__init__``: the
module tree, parameter names, weight initialisation (and the random numbers it draws) are transformers' own,
so checkpoints load and save both ways and a seeded model equals transformers' seeded model.
"""

from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

from .patch import patch_deberta


def validate_model_inputs(config, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds):
    """Raise ValueError naming the argument when inputs disagree; returns (batch, length)."""
    if input_ids is not None and inputs_embeds is not None:
        raise ValueError("You cannot specify both input_ids and inputs_embeds at the same time")
    if input_ids is None and inputs_embeds is None:
        raise ValueError("You have to specify either input_ids or inputs_embeds")
    if input_ids is not None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length]; got shape {tuple(input_ids.shape)}")
        batch, length = input_ids.shape
    else:
        if inputs_embeds.dim() != 3:
            raise ValueError(f"inputs_embeds must be [batch, length, embedding_size]; got {tuple(inputs_embeds.shape)}")
        batch, length = inputs_embeds.shape[:2]
    if length < 1:
        raise ValueError("the input sequence is empty (length 0); at least one token is needed")
    if attention_mask is not None:
        shape = tuple(attention_mask.shape)
        rows = shape[:1] if shape[:1] in ((batch,), (1,)) else None
        if rows is None or shape[1:] not in ((length,), (length, length), (1, length, length)):
            raise ValueError(
                f"attention_mask must be [batch, length] = [{batch}, {length}] (or [batch, length, length] / "
                f"[batch, 1, length, length]; batch 1 is broadcast over the batch) to match the inputs; got {shape}"
            )
    for name, tensor in (("token_type_ids", token_type_ids), ("position_ids", position_ids)):
        if tensor is not None and tuple(tensor.shape) not in ((batch, length), (1, length)):
            raise ValueError(f"{name} must be [batch, length] = [{batch}, {length}]; got {tuple(tensor.shape)}")
    absolute_positions = getattr(config, "position_biased_input", True)
    if absolute_positions and position_ids is None and length > config.max_position_embeddings:
        raise ValueError(
            f"the sequence has {length} tokens but this model adds absolute position embeddings "
            f"(position_biased_input=True) for at most max_position_embeddings={config.max_position_embeddings}"
        )
    return batch, length


def broadcast_mask(attention_mask: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """A mask of batch 1 expanded (a view) to ``batch`` rows: transformers broadcasts a [1, L] mask over the batch."""
    if attention_mask is None or attention_mask.shape[0] == batch:
        return attention_mask
    return attention_mask.expand(batch, *attention_mask.shape[1:])


class DebertaV2Model(hf.DebertaV2Model):
    """transformers' DebertaV2Model on deberta_fast's ops; same arguments and outputs.

    Also accepts [B, L, L] and [B, 1, L, L] pair masks end to end (transformers' model rejects them in its
    embedding layer); the tokens of such a mask are those that attend to anything. A mask with batch 1 applies
    to every row, as transformers broadcasts a [1, L] mask.
    """

    def __init__(self, config):
        super().__init__(config)
        patch_deberta(self)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> tuple | BaseModelOutput:
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = config.return_dict if return_dict is None else return_dict

        batch, length = validate_model_inputs(
            config, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds
        )
        attention_mask = broadcast_mask(attention_mask, batch)
        device = input_ids.device if input_ids is not None else inputs_embeds.device
        if input_ids is not None:
            self.warn_if_padding_and_no_attention_mask(input_ids, attention_mask)
        if attention_mask is None:
            attention_mask = torch.ones((batch, length), device=device)
        if token_type_ids is None:
            token_type_ids = torch.zeros((batch, length), dtype=torch.long, device=device)

        token_mask = attention_mask
        if attention_mask.dim() > 2:
            pairs = attention_mask if attention_mask.dim() == 3 else attention_mask[:, 0]
            token_mask = (pairs.sum(-2) > 0).to(attention_mask.dtype)
        embedding_output = self.embeddings(
            input_ids=input_ids,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            mask=token_mask,
            inputs_embeds=inputs_embeds,
        )
        encoder_outputs = self.encoder(
            embedding_output,
            attention_mask,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        if not return_dict:
            return tuple(
                v
                for v in (encoder_outputs.last_hidden_state, encoder_outputs.hidden_states, encoder_outputs.attentions)
                if v is not None
            )
        return encoder_outputs
