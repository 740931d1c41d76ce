"""Layouts around the native CPU attention op: strided and non-dense operands, the layouts of its results, and no
copies between the projections and the op (forward and backward).

The op reads q / k / v / the positional tables / grad_out through their strides, stores out, dQ, dK, dV as
[B, L, H, D] (returned as [B, H, L, D] views) and the positional gradients in the layout of their tables, so the
model's head split ([B, L, H·D] viewed as [B, H, L, D]) and merge cost no copy in either direction.
"""

from __future__ import annotations

import pytest
import torch

from deberta_fast.models.attention import DisentangledSelfAttention
from deberta_fast.ops.attention import disentangled_attention
from deberta_fast.ops.positions import RelativePositionSpec, distance_slot_table, softmax_scale

from configs import make_config, make_mask

SPEC = RelativePositionSpec(c2p=True, p2c=True, position_buckets=16, max_relative_positions=64)
HEADS, DIM = 3, 8

# name -> how q, k, v (shape [B, H, L, D]) are laid out in memory
QKV_LAYOUTS = (
    "heads_major",     # contiguous [B, H, L, D]
    "model",           # [B, L, H, D] viewed as [B, H, L, D] (the projections' output)
    "fused_qkv",       # slices of one [B, L, 3, H, D] tensor: not dense, gaps between tokens
    "padded_rows",     # [B, H, L, D + 5][..., :D]: row stride != D
    "column_strided",  # [B, H, D, L] transposed: feature stride != 1
)
# name -> how the positional tables (shape [PB, H, 2S, D]) are laid out
TABLE_LAYOUTS = ("heads_major", "model", "padded_rows")
SHAPES = {"B1_L37": (1, 37), "B3_L64": (3, 64), "B2_L130": (2, 130)}


def qkv_leaves(layout, batch, length, generator):
    """(leaf tensors that require grad, (q, k, v) views of them in ``layout``)."""
    def randn(*shape):
        return torch.randn(*shape, generator=generator).requires_grad_()

    if layout == "fused_qkv":
        fused = randn(batch, length, 3, HEADS, DIM)
        return [fused], tuple(fused[:, :, i].transpose(1, 2) for i in range(3))
    if layout == "heads_major":
        leaves = [randn(batch, HEADS, length, DIM) for _ in range(3)]
        return leaves, tuple(leaves)
    if layout == "model":
        leaves = [randn(batch, length, HEADS, DIM) for _ in range(3)]
        return leaves, tuple(t.transpose(1, 2) for t in leaves)
    if layout == "padded_rows":
        leaves = [randn(batch, HEADS, length, DIM + 5) for _ in range(3)]
        return leaves, tuple(t[..., :DIM] for t in leaves)
    if layout == "column_strided":
        leaves = [randn(batch, HEADS, DIM, length) for _ in range(3)]
        return leaves, tuple(t.transpose(-1, -2) for t in leaves)
    raise ValueError(layout)


def table_leaves(layout, pos_batch, generator):
    slots = SPEC.num_slots
    leaves, views = [], []
    for _ in range(2):
        if layout == "heads_major":
            leaf = torch.randn(pos_batch, HEADS, slots, DIM, generator=generator).requires_grad_()
            view = leaf
        elif layout == "model":
            leaf = torch.randn(pos_batch, slots, HEADS, DIM, generator=generator).requires_grad_()
            view = leaf.transpose(1, 2)
        elif layout == "padded_rows":
            leaf = torch.randn(pos_batch, HEADS, slots, DIM + 3, generator=generator).requires_grad_()
            view = leaf[..., :DIM]
        else:
            raise ValueError(layout)
        leaves.append(leaf)
        views.append(view)
    return leaves, tuple(views)


def forward_backward(backend, views, tables, mask, grad_out, leaves, dropout_p=0.0, seed=0):
    torch.manual_seed(seed)  # the dropout seed is drawn from torch's default generator
    out, _ = disentangled_attention(*views, *tables, mask, spec=SPEC, softmax_scale=softmax_scale(DIM, 3),
                                    dropout_p=dropout_p, backend=backend)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out, grads


def assert_close(actual, expected, what):
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, atol=1e-5 * scale, rtol=1e-5, msg=lambda m: f"{what}: {m}")


pytestmark = pytest.mark.usefixtures("native_ops")


@pytest.mark.parametrize("table_layout", TABLE_LAYOUTS)
@pytest.mark.parametrize("qkv_layout", QKV_LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_strided_operands_match_the_reference(shape, qkv_layout, table_layout):
    batch, length = SHAPES[shape]
    generator = torch.Generator().manual_seed(7)
    qkv, views = qkv_leaves(qkv_layout, batch, length, generator)
    pos_batch = batch if table_layout == "padded_rows" else 1
    tables_leaves, tables = table_leaves(table_layout, pos_batch, generator)
    mask = make_mask("holes", batch, length)
    # grad_out not contiguous either: the layout the output projection's backward hands over ([B, L, H, D])
    grad_out = torch.randn(batch, length, HEADS, DIM, generator=generator).transpose(1, 2)
    leaves = qkv + tables_leaves
    out, grads = forward_backward("cpu", views, tables, mask, grad_out, leaves)
    ref_out, ref_grads = forward_backward("reference", views, tables, mask, grad_out, leaves)
    assert_close(out, ref_out, "out")
    for index, (grad, ref) in enumerate(zip(grads, ref_grads)):
        assert grad.shape == ref.shape
        assert_close(grad, ref, f"grad of leaf {index}")


@pytest.mark.parametrize("qkv_layout", ("model", "fused_qkv", "column_strided"))
def test_strided_operands_with_dropout_match_contiguous_ones(qkv_layout):
    """Dropout keeps (b, h, i, k) by counter, whatever the layout: a strided call equals the contiguous call."""
    batch, length = 2, 70
    generator = torch.Generator().manual_seed(3)
    qkv, views = qkv_leaves(qkv_layout, batch, length, generator)
    tables_leaves, tables = table_leaves("model", 1, generator)
    grad_out = torch.randn(batch, HEADS, length, DIM, generator=generator)
    mask = make_mask("right", batch, length)
    out, grads = forward_backward("cpu", views, tables, mask, grad_out, list(views) + list(tables), 0.2, seed=11)
    dense = [t.detach().contiguous().requires_grad_() for t in views + tables]
    ref_out, ref_grads = forward_backward("cpu", dense[:3], dense[3:], mask, grad_out.contiguous(), dense, 0.2,
                                          seed=11)
    assert_close(out, ref_out, "out")
    for index, (grad, ref) in enumerate(zip(grads, ref_grads)):
        assert_close(grad, ref, f"grad of input {index}")


@pytest.mark.parametrize("table_layout", ("heads_major", "model"))
@pytest.mark.parametrize("batch", (1, 3))
def test_results_are_stored_in_the_layouts_the_projections_consume(batch, table_layout):
    """out, dQ, dK, dV: [B, L, H, D] storage ([B, L, H·D] after a free transpose + view); dPk, dPq: the strides
    of their tables. The fake (meta) rules must give the same strides, or torch.compile would misread them."""
    length = 40
    generator = torch.Generator().manual_seed(5)
    _, (query, key, value) = qkv_leaves("model", batch, length, generator)
    _, (pos_key, pos_query) = table_leaves(table_layout, 1, generator)
    slots = distance_slot_table(length, SPEC).to(torch.int32)
    scale = softmax_scale(DIM, 3)
    args = (query.detach(), key.detach(), value.detach(), pos_key.detach(), pos_query.detach(), None, slots, scale, 0)
    out, lse = torch.ops.deberta_fast_cpu.disentangled_attention_forward(*args)
    grad_out = torch.randn(batch, length, HEADS, DIM, generator=generator).transpose(1, 2)
    grads = torch.ops.deberta_fast_cpu.disentangled_attention_backward(grad_out, *args[:7], out, lse, scale, 0)
    for name, tensor in zip(("out", "dq", "dk", "dv"), (out, *grads[:3])):
        assert tensor.transpose(1, 2).is_contiguous(), f"{name} strides {tensor.stride()}"
    for name, grad, table in (("dpk", grads[3], pos_key), ("dpq", grads[4], pos_query)):
        assert grad.stride() == table.stride(), f"{name}: strides {grad.stride()}, table {table.stride()}"
    torch.library.opcheck(torch.ops.deberta_fast_cpu.disentangled_attention_forward.default,
                          tuple(t.requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                                for t in args),
                          test_utils=("test_faketensor",))
    torch.library.opcheck(torch.ops.deberta_fast_cpu.disentangled_attention_backward.default,
                          (grad_out, *args[:7], out, lse, scale, 0), test_utils=("test_faketensor",))


def copy_like_events(profiler) -> list[str]:
    """Copies and zero-fills in the profile, except the bias broadcast inside addmm (part of every nn.Linear) and
    the fill of aten::sum's output (the bias gradients)."""
    found = []
    for event in profiler.events():
        if event.name not in ("aten::copy_", "aten::clone", "aten::zero_", "aten::fill_", "aten::contiguous"):
            continue
        parents, parent = [], event.cpu_parent
        while parent is not None:
            parents.append(parent.name)
            parent = parent.cpu_parent
        if parents and parents[0] in ("aten::addmm", "aten::sum"):
            continue
        found.append(f"{event.name} {event.input_shapes} <- {' <- '.join(parents[:4])}")
    return found


@pytest.mark.parametrize("batch", (1, 3))
def test_attention_module_makes_no_copies_around_the_op(batch):
    """DisentangledSelfAttention (v3 layout, shared keys, both terms, attention dropout on), forward + backward:
    the head split and merge, the positional tables and all their gradients go through without a copy or fill."""
    config = make_config("v3", attention_probs_dropout_prob=0.1, hidden_dropout_prob=0.0)
    torch.manual_seed(0)
    module = DisentangledSelfAttention(config).train()
    module.backend = "cpu"
    length = 48
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(batch, length, config.hidden_size, generator=generator, requires_grad=True)
    rel = torch.randn(2 * config.position_buckets, config.hidden_size, generator=generator, requires_grad=True)
    mask = make_mask("right", batch, length)
    grad = torch.randn(batch, length, config.hidden_size, generator=generator)
    module(hidden, mask, rel_embeddings=rel)[0].backward(grad)  # warm-up: slot table cache, lazy initialisation
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as profiler:
        context, _ = module(hidden, mask, rel_embeddings=rel)
        context.backward(grad)
    assert context.shape == (batch, length, config.hidden_size)
    names = {event.name for event in profiler.events()}
    assert "deberta_fast_cpu::disentangled_attention_backward" in names, "the native op must have run"
    assert copy_like_events(profiler) == []
