"""Embedding lookup whose backward adds only the looked-up rows into an existing dense ``.grad``.

    embedding_rows(input_ids [*], weight [V, E], padding_idx) -> weight[input_ids]  [*, E]

The forward is ``F.embedding``. torch's backward builds a dense [V, E] gradient (zeros, then the T = numel(input_ids)
rows added in): for DeBERTa-v3's 128100 x 768 word embedding that is 393 MB written on fresh pages every step, and
when ``.grad`` already exists (``zero_grad(set_to_none=False)``, gradient accumulation over micro-batches)
AccumulateGrad then adds all V·E elements into it. Here, when this backward pass is about to accumulate into a dense
``weight.grad`` (AccumulateGrad of the weight will run, no grad mode, no tensor hooks on the weight), the gradient is
returned as a sparse COO tensor of the looked-up rows (one entry per token): AccumulateGrad adds it in place
(``.grad += sparse``), touching those rows only. ``.grad`` stays dense, so AdamW and every other optimizer see
torch's values (the same sum in another order: rounding may differ in the last bits). In every other case (no ``.grad`` yet, ``torch.autograd.grad`` capturing the weight's gradient, hooks,
create_graph) the gradient is torch's own dense one. Rows looked up at ``padding_idx`` get no gradient, as in
``F.embedding``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _EmbeddingRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_ids, weight, padding_idx):
        ctx.save_for_backward(input_ids)
        ctx.weight = weight  # the Parameter itself: its .grad and hooks are read when the backward runs
        ctx.accumulate = torch.autograd.graph.get_gradient_edge(weight).node
        ctx.padding_idx = padding_idx
        return F.embedding(input_ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_output):
        (input_ids,) = ctx.saved_tensors
        weight, padding_idx = ctx.weight, ctx.padding_idx
        ids = input_ids.reshape(-1)
        grad = grad_output.reshape(ids.numel(), -1)
        if _accumulates_into_dense_grad(ctx, weight, grad):
            values = grad.contiguous()
            if padding_idx is not None:
                padded = ids == padding_idx
                if bool(padded.any()):
                    values = values.masked_fill(padded.unsqueeze(1), 0)
            # One entry per looked-up token, repeats included (not coalesced): torch's dense += sparse then gives
            # every thread its own range of rows and adds a row's entries in token order (no race, no atomics).
            sparse = torch.sparse_coo_tensor(ids.unsqueeze(0), values, weight.shape, is_coalesced=False,
                                             check_invariants=False)
            return None, sparse, None
        dense = torch.ops.aten.embedding_dense_backward(
            grad_output, input_ids, weight.shape[0], -1 if padding_idx is None else padding_idx, False
        )
        return None, dense, None


def _accumulates_into_dense_grad(ctx, weight, grad) -> bool:
    existing = weight.grad
    if existing is None or existing.layout != torch.strided or torch.is_grad_enabled():
        return False
    if existing.shape != weight.shape or existing.dtype != grad.dtype or existing.device != grad.device:
        return False
    if weight._backward_hooks:  # a tensor hook would receive the sparse gradient
        return False
    # Whether this pass runs the weight's AccumulateGrad (.backward() does, unless inputs= leaves the weight out).
    # torch.autograd.grad never accumulates, and the query raises for it: the dense gradient is always correct.
    try:
        return bool(torch._C._will_engine_execute_node(ctx.accumulate))
    except RuntimeError:
        return False


def embedding_rows(input_ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None = None) -> torch.Tensor:
    """``F.embedding(input_ids, weight, padding_idx)`` with the row-wise gradient accumulation above.

    input_ids: integer tensor of any shape; weight: [V, E]; returns [*input_ids.shape, E]. Falls back to
    ``F.embedding`` itself when no gradient reaches the weight (no grad mode, a frozen weight), for a weight that
    is not a leaf (it has no ``.grad`` of its own), under torch.func transforms, and while compiling or exporting
    (the choice depends on ``weight.grad`` at backward time, which a traced graph cannot read).
    """
    if padding_idx is not None and padding_idx < 0:
        padding_idx += weight.shape[0]
    if (not (torch.is_grad_enabled() and weight.requires_grad and weight.is_leaf) or weight.layout != torch.strided
            or torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
            or torch._C._are_functorch_transforms_active()):
        return F.embedding(input_ids, weight, padding_idx)
    return _EmbeddingRows.apply(input_ids, weight, padding_idx)
