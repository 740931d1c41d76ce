"""Word embedding whose gradient is added row by row into a kept ``.grad`` (``deberta_fast.ops.embedding_rows``).

``RowGradEmbedding`` is ``nn.Embedding`` (same parameter, same forward) with ``embedding_rows``' backward: once the
weight has a dense ``.grad``, a backward pass adds only the looked-up rows into it, in place, instead of building
and adding a dense [V, E] gradient. ``patch_deberta`` switches the word embedding of every DeBERTa-v2 embeddings
module to it in place. The saving needs the ``.grad`` to be kept between steps: ``zero_grad`` zeroes these
weights' gradients in place and sets every other gradient to None (the cheapest for each kind).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.embedding_rows import embedding_rows


class RowGradEmbedding(nn.Embedding):
    """nn.Embedding with row-wise gradient accumulation; input [*] integer ids -> [*, embedding_dim]."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.max_norm is not None or self.scale_grad_by_freq or self.sparse:
            return super().forward(input)  # options whose gradient torch computes itself
        return embedding_rows(input, self.weight, self.padding_idx)


def row_grad_embedding_from(module: nn.Embedding) -> nn.Module:
    """Switch an exact ``nn.Embedding`` to ``RowGradEmbedding`` in place; any other module is returned unchanged."""
    if type(module) is nn.Embedding:
        module.__class__ = RowGradEmbedding
    return module


def zero_grad(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """``zero_grad(set_to_none=True)`` over the optimizer's parameters (or ``model``'s), except that the dense
    gradients of ``model``'s RowGradEmbedding weights are zeroed in place and kept, so the next backward adds its
    rows into them (no fresh [V, E] buffer, whose pages the system would fault in again every step)."""
    kept = {id(m.weight) for m in model.modules() if isinstance(m, RowGradEmbedding)}
    if optimizer is None:
        params = model.parameters()
    else:
        params = (p for group in optimizer.param_groups for p in group["params"])
    for param in params:
        grad = param.grad
        if grad is None:
            continue
        if id(param) in kept and grad.layout == torch.strided and grad.grad_fn is None:
            grad.requires_grad_(False)
            grad.zero_()
        else:
            param.grad = None
