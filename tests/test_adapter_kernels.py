"""Triton adapter kernels (LoRA linear, q/k/v LoRA, IA³, bottleneck) against the in-package references.

Every output and gradient must stay within the error budget: |kernel - oracle| <= 2 |torch same dtype - oracle|
+ floor, the oracle being the reference in float64 on the same (rounded) inputs and the same dropout mask.
On CPU the kernels run under TRITON_INTERPRET=1 (conftest) in fp32 and fp16; bf16 runs on GPU only.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from deberta_fast.ops import BackendUnavailable, counter_dropout
from deberta_fast.ops.bottleneck import bottleneck_adapter, bottleneck_adapter_reference
from deberta_fast.ops.ia3 import ia3_linear, ia3_linear_reference
from deberta_fast.ops.lora import lora_linear, lora_linear_reference
from deberta_fast.ops.lora_merge import merge_ia3, merge_lora, unmerge_ia3, unmerge_lora
from deberta_fast.ops.lora_qkv import lora_qkv, lora_qkv_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CPU_DTYPES = [torch.float32, torch.float16]
# Floor of the error budget, relative to the oracle's largest magnitude.
FLOOR = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


# ------------------------------------------------------------------------------------------------- helpers


def within_budget(name, ours, same_dtype, oracle, dtype):
    """Assert the error budget for one tensor (see module docstring)."""
    assert ours.shape == oracle.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(oracle.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    oracle = oracle.double()
    scale = max(oracle.abs().max().item(), 1e-30)
    err = (ours.double() - oracle).abs().max().item()
    err_torch = (same_dtype.double() - oracle).abs().max().item()
    budget = 2 * err_torch + FLOOR[dtype] * scale
    assert err <= budget, (f"{name}: error {err:.3g} > budget {budget:.3g} "
                           f"(torch {dtype} error {err_torch:.3g}, scale {scale:.3g})")


def leaves(tensors, dtype, device=DEVICE):
    """Fresh leaf copies (requires_grad kept) in ``dtype``."""
    out = []
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            out.append(t)
        else:
            out.append(t.detach().to(device=device, dtype=dtype).requires_grad_(t.requires_grad))
    return out


def run_and_grad(fn, inputs, grad_out):
    """Outputs of fn(*inputs) and the gradients of every input that requires grad."""
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    grads_out = grad_out if isinstance(grad_out, tuple) else (grad_out,)
    wanted = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(outs, wanted, [g.to(o.dtype) for g, o in zip(grads_out, outs)]) if wanted else ()
    return outs, grads


def compare(name, fn_ours, fn_ref, inputs, dtype, grad_out_fn=None):
    """Run ours and the reference in ``dtype`` and the reference in float64; check outputs and gradients."""
    ours_in = leaves(inputs, dtype)
    torch_in = leaves(inputs, dtype)
    oracle_in = [t.double().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
                 for t in leaves(inputs, dtype)]
    with torch.no_grad():
        probe = fn_ref(*[t.detach() if isinstance(t, torch.Tensor) else t for t in oracle_in])
    probe = probe if isinstance(probe, tuple) else (probe,)
    gen = torch.Generator().manual_seed(1234)
    grad_out = tuple(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(DEVICE) for p in probe)
    outs, grads = run_and_grad(fn_ours, ours_in, grad_out)
    outs_t, grads_t = run_and_grad(fn_ref, torch_in, grad_out)
    outs_o, grads_o = run_and_grad(fn_ref, oracle_in, grad_out)
    for i, (a, b, c) in enumerate(zip(outs, outs_t, outs_o)):
        assert a.dtype == dtype, f"{name}: output {i} has dtype {a.dtype}"
        within_budget(f"{name} output {i}", a, b, c, dtype)
    names = [f"input {i}" for i, t in enumerate(inputs) if isinstance(t, torch.Tensor) and t.requires_grad]
    assert len(grads) == len(names)
    for label, a, b, c in zip(names, grads, grads_t, grads_o):
        within_budget(f"{name} grad of {label}", a, b, c, dtype)
    return outs, grads


def rand(*shape, scale=1.0, grad=False):
    return (torch.randn(*shape) * scale).requires_grad_(grad)


# --------------------------------------------------------------------------------------- counter dropout


@pytest.mark.parametrize("seed,stream,rows,cols", [(0, 0, 70, 45), (12345, 2, 33, 100), (2**40 + 7, 1, 129, 48)])
def test_counter_mask_kernel_matches_torch_mirror(seed, stream, rows, cols):
    from deberta_fast.triton_kernels import counter_rng

    for p in (0.1, 0.5):
        out = torch.empty(rows, cols, dtype=torch.int8, device=DEVICE)
        key, threshold = counter_dropout.stream_key(seed, stream), counter_dropout.keep_threshold(p)
        counter_rng.materialize_keep_mask(out, key, threshold)
        mirror = counter_dropout.keep_mask(seed, rows, cols, p, stream, device=DEVICE)
        assert torch.equal(out.bool(), mirror)  # exact: keep masks are integer hashes of the counters


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_counter_mask_statistics(p):
    rows, cols = 800, 500
    mask = counter_dropout.keep_mask(7, rows, cols, p).double()
    n = rows * cols
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(mask.mean().item() - (1 - p)) < 5 * sigma
    # Per-row and per-column keep rates spread like binomials (no stuck rows/columns).
    for axis, count in ((1, cols), (0, rows)):
        rates = mask.mean(axis)
        expected_sd = (p * (1 - p) / count) ** 0.5
        assert 0.8 * expected_sd < rates.std().item() < 1.25 * expected_sd
    # Neighbours are independent: P(both kept) ≈ (1-p)².
    for pair in (mask[:, 1:] * mask[:, :-1], mask[1:] * mask[:-1]):
        assert abs(pair.mean().item() - (1 - p) ** 2) < 6 * ((1 - p) ** 2 * (1 - (1 - p) ** 2) / pair.numel()) ** 0.5
    other = counter_dropout.keep_mask(8, rows, cols, p).double()
    assert abs((mask * other).mean().item() - (1 - p) ** 2) < 0.01
    # keep masks are booleans: another stream must give another pattern
    assert not torch.equal(counter_dropout.keep_mask(7, 64, 64, p, stream=1), counter_dropout.keep_mask(7, 64, 64, p))


def test_lora_kernel_applies_the_counter_mask():
    """With W = 0, A = B = I and x = 1 the LoRA output is the dropped x itself: the mask the kernel used."""
    rows, width, p = 200, 48, 0.3
    x = torch.ones(rows, width, device=DEVICE)
    eye = torch.eye(width, device=DEVICE)
    y = lora_linear(x, torch.zeros(width, width, device=DEVICE), None, eye, eye, 1.0, p, seed=99, backend="triton")
    kept = y != 0
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / (1 - p)))
    assert torch.equal(kept, counter_dropout.keep_mask(99, rows, width, p, device=DEVICE))  # boolean masks
    sigma = (p * (1 - p) / kept.numel()) ** 0.5
    assert abs(kept.double().mean().item() - (1 - p)) < 5 * sigma


# ------------------------------------------------------------------------------------------- LoRA linear

# name -> (x shape, out features, rank, dropout_p); rows 1, 7, 65, 129; widths 48, 80, 100 (not powers of two).
LORA_SHAPES = {
    "rows1_r1": ((1, 48), 48, 1, 0.0),
    "rows7_r4_3d_dropout": ((1, 7, 80), 100, 4, 0.1),
    "rows65_r8": ((65, 100), 80, 8, 0.0),
    "rows65_r4_3d_dropout": ((5, 13, 100), 80, 4, 0.3),
    "rows129_r16": ((129, 80), 48, 16, 0.0),
    "rows129_r16_3d_dropout": ((3, 43, 48), 100, 16, 0.1),
}


def lora_inputs(x_shape, out_features, rank, weight_grad=False):
    in_features = x_shape[-1]
    return [
        rand(*x_shape, grad=True),
        rand(out_features, in_features, scale=in_features ** -0.5, grad=weight_grad),
        rand(out_features, grad=weight_grad),
        rand(rank, in_features, scale=in_features ** -0.5, grad=True),
        rand(out_features, rank, scale=rank ** -0.5, grad=True),
    ]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", LORA_SHAPES, ids=str)
def test_lora_linear_matches_reference(shape, dtype):
    x_shape, out_features, rank, p = LORA_SHAPES[shape]
    inputs = lora_inputs(x_shape, out_features, rank)
    scaling = 0.75
    compare(
        shape,
        lambda x, w, b, a, bb: lora_linear(x, w, b, a, bb, scaling, p, seed=5, backend="triton"),
        lambda x, w, b, a, bb: lora_linear_reference(x, w, b, a, bb, scaling, p, seed=5),
        inputs, dtype,
    )


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_lora_linear_full_finetuning_gradients(dtype):
    """W and b trainable: dW = dYᵀ X and db = Σ dY on top of the LoRA gradients."""
    inputs = lora_inputs((2, 33, 80), 48, 8, weight_grad=True)
    compare(
        "full_ft",
        lambda x, w, b, a, bb: lora_linear(x, w, b, a, bb, 2.0, 0.1, seed=11, backend="triton"),
        lambda x, w, b, a, bb: lora_linear_reference(x, w, b, a, bb, 2.0, 0.1, seed=11),
        inputs, dtype,
    )


def test_lora_linear_partial_gradients_and_inference():
    """Frozen x (only dA/dB: the dS-only kernel path), no bias, and a no-grad call (S not kept)."""
    x, w, _, a, b = lora_inputs((65, 100), 80, 4)
    x.requires_grad_(False)
    compare(
        "frozen_x",
        lambda x, w, a, bb: lora_linear(x, w, None, a, bb, 0.5, 0.2, seed=3, backend="triton"),
        lambda x, w, a, bb: lora_linear_reference(x, w, None, a, bb, 0.5, 0.2, seed=3),
        [x, w, a, b], torch.float32,
    )
    with torch.no_grad():
        ours = lora_linear(x, w, None, a, b, 0.5, backend="triton")
    torch.testing.assert_close(ours, lora_linear_reference(x, w, None, a, b, 0.5), rtol=1e-5, atol=1e-5)


def test_lora_dropout_reproducible():
    x, w, bias, a, b = lora_inputs((2, 30, 48), 80, 8)

    def run(seed):
        y = lora_linear(x, w, bias, a, b, 1.0, 0.25, seed=seed, backend="triton")
        grads = torch.autograd.grad(y, (x, a, b), torch.ones_like(y))
        return (y, *grads)

    first, again, other = run(21), run(21), run(22)
    for u, v in zip(first, again):
        assert torch.equal(u, v)  # exact: one kernel, same inputs and seed, same process
    assert not torch.equal(first[0], other[0])
    # Without a seed one is drawn from torch's generator: manual_seed makes it repeatable.
    torch.manual_seed(4)
    drawn = lora_linear(x, w, bias, a, b, 1.0, 0.25, backend="triton")
    torch.manual_seed(4)
    assert torch.equal(drawn, lora_linear(x, w, bias, a, b, 1.0, 0.25, backend="triton"))  # same kernel and seed
    # dropout_p = 1 drops the whole LoRA branch, as torch's dropout does.
    base = F.linear(x, w, bias)
    within_budget("p=1", lora_linear(x, w, bias, a, b, 1.0, 1.0, seed=1, backend="triton"), base, base.double(),
                  torch.float32)


# ---------------------------------------------------------------------------------------------- LoRA q/k/v

# name -> (x shape, width, ranks of the q/k/v LoRAs (None = no LoRA), dropout_p)
QKV_SHAPES = {
    "all_three_2d": ((65, 48), 48, (4, 8, 16), 0.0),
    "q_and_v_3d_dropout": ((3, 43, 80), 80, (8, None, 8), 0.1),
    "k_only_rows7": ((7, 100), 100, (None, 1, None), 0.2),
    "no_lora_rows1": ((1, 1, 48), 48, (None, None, None), 0.0),
}


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", QKV_SHAPES, ids=str)
def test_lora_qkv_matches_reference(shape, dtype):
    x_shape, width, ranks, p = QKV_SHAPES[shape]
    inputs = [rand(*x_shape, grad=True)]
    for rank in ranks:
        inputs += [rand(width, x_shape[-1], scale=x_shape[-1] ** -0.5), rand(width)]
    for rank in ranks:
        if rank is not None:
            inputs += [rand(rank, x_shape[-1], scale=x_shape[-1] ** -0.5, grad=True),
                       rand(width, rank, scale=rank ** -0.5, grad=True)]
    scalings = (0.5, 1.0, 2.0)

    def split(args):
        x, wq, bq, wk, bk, wv, bv, *lora = args
        loras, it = [], iter(lora)
        for rank, s in zip(ranks, scalings):
            loras.append(None if rank is None else (next(it), next(it), s))
        return (x, wq, bq, wk, bk, wv, bv, *loras)

    compare(
        shape,
        lambda *args: lora_qkv(*split(args), dropout_p=p, seed=17, backend="triton"),
        lambda *args: lora_qkv_reference(*split(args), dropout_p=p, seed=17),
        inputs, dtype,
    )


def test_lora_qkv_trainable_projections_and_equivalence_to_lora_linear():
    """Weights/biases trainable; each projection equals lora_linear on its own (stream j of the seed)."""
    x = rand(2, 20, 48, grad=True)
    wq, bq = rand(48, 48, scale=0.15, grad=True), rand(48, grad=True)
    wk, bk = rand(48, 48, scale=0.15, grad=True), None
    wv, bv = rand(48, 48, scale=0.15, grad=True), rand(48, grad=True)
    q_lora = (rand(4, 48, scale=0.15, grad=True), rand(48, 4, scale=0.5, grad=True), 1.5)
    inputs = [x, wq, bq, wk, wv, bv, *q_lora[:2]]
    compare(
        "qkv_trainable",
        lambda x, wq, bq, wk, wv, bv, a, b: lora_qkv(x, wq, bq, wk, None, wv, bv, (a, b, 1.5), None, None,
                                                     dropout_p=0.1, seed=3, backend="triton"),
        lambda x, wq, bq, wk, wv, bv, a, b: lora_qkv_reference(x, wq, bq, wk, None, wv, bv, (a, b, 1.5), None, None,
                                                               dropout_p=0.1, seed=3),
        inputs, torch.float32,
    )
    with torch.no_grad():
        q, k, v = lora_qkv(x, wq, bq, wk, bk, wv, bv, q_lora, None, None, dropout_p=0.1, seed=3, backend="triton")
        alone = lora_linear(x, wq, bq, q_lora[0], q_lora[1], 1.5, 0.1, seed=3, backend="triton")
    torch.testing.assert_close(q, alone, rtol=1e-5, atol=1e-5)


def test_lora_on_qk_changes_positional_scores_as_reference():
    """share_att_key: the relative embeddings go through the adapted q/k projections too. The c2p and p2c
    scores built from kernel-projected position embeddings match the reference, and differ from plain W."""
    hidden, heads, length, span = 48, 4, 9, 16
    x = rand(2, length, hidden, grad=True)
    rel = rand(1, 2 * span, hidden, grad=True)  # LayerNorm(rel_embeddings)[: 2 * att_span]
    projections = [t for _ in range(3) for t in (rand(hidden, hidden, scale=0.15), rand(hidden))]
    q_lora = (rand(8, hidden, scale=0.15, grad=True), rand(hidden, 8, scale=0.5, grad=True), 2.0)
    k_lora = (rand(8, hidden, scale=0.15, grad=True), rand(hidden, 8, scale=0.5, grad=True), 2.0)

    def scores(project, x, rel, qa, qb, ka, kb):
        params = [t.to(x.dtype) for t in projections]
        q, k, _ = project(x, *params, (qa, qb, 2.0), (ka, kb, 2.0))
        pos_q, pos_k, _ = project(rel, *params, (qa, qb, 2.0), (ka, kb, 2.0))
        split = lambda t: t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
        q, k, pos_q, pos_k = split(q), split(k), split(pos_q), split(pos_k)
        return q @ pos_k.transpose(-1, -2), k @ pos_q.transpose(-1, -2)  # c2p [B,H,L,2S], p2c [B,H,L,2S]

    ours = lambda *a: scores(lambda *p: lora_qkv(*p, backend="triton"), *a)  # noqa: E731
    ref = lambda *a: scores(lora_qkv_reference, *a)  # noqa: E731
    inputs = [x, rel, *q_lora[:2], *k_lora[:2]]
    (c2p, p2c), _ = compare("positional scores", ours, ref, inputs, torch.float32)
    plain_c2p, plain_p2c = scores(lambda x, wq, bq, wk, bk, wv, bv, *_: lora_qkv_reference(x, wq, bq, wk, bk, wv, bv),
                                  x, rel, *q_lora[:2], *k_lora[:2])
    assert (c2p - plain_c2p).abs().max() > 1e-2 and (p2c - plain_p2c).abs().max() > 1e-2


# -------------------------------------------------------------------------------------------------- IA³

IA3_SHAPES = {"rows1": ((1, 48), 100, True), "rows65_3d": ((5, 13, 80), 48, True),
              "rows129_no_bias": ((129, 100), 80, False)}


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", IA3_SHAPES, ids=str)
def test_ia3_linear_matches_reference(shape, dtype):
    x_shape, out_features, has_bias = IA3_SHAPES[shape]
    inputs = [rand(*x_shape, grad=True), rand(out_features, x_shape[-1], scale=x_shape[-1] ** -0.5, grad=True),
              rand(out_features, grad=True) if has_bias else None,
              (1 + 0.3 * torch.randn(out_features)).requires_grad_()]
    compare(shape, lambda x, w, b, l: ia3_linear(x, w, b, l, backend="triton"), ia3_linear_reference, inputs, dtype)


# ---------------------------------------------------------------------------------------------- bottleneck

# name -> (x shape, bottleneck width m, activation, scaling kind, residual)
BOTTLENECK_SHAPES = {
    "relu_float_rows1": ((1, 48), 3, "relu", "float", True),
    "gelu_learned_3d": ((3, 43, 80), 5, "gelu", "learned", True),
    "swish_channel_rows65": ((65, 100), 50, "swish", "channel", True),
    "silu_float_no_residual": ((7, 48), 24, "silu", "float", False),
    "tanh_channel_3d": ((1, 7, 80), 40, "tanh", "channel", True),
    "relu_learned_rows129": ((129, 100), 6, "relu", "learned", True),
}


def bottleneck_inputs(x_shape, m, scaling_kind, residual):
    hidden = x_shape[-1]
    inputs = [rand(*x_shape, grad=True), rand(m, hidden, scale=hidden ** -0.5, grad=True), rand(m, grad=True),
              rand(hidden, m, scale=m ** -0.5, grad=True), rand(hidden, grad=True),
              rand(*x_shape, grad=True) if residual else None]
    if scaling_kind == "learned":
        inputs.append(torch.tensor([0.8]).requires_grad_())
    elif scaling_kind == "channel":
        inputs.append((1 + 0.5 * torch.randn(hidden)).requires_grad_())
    return inputs


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", BOTTLENECK_SHAPES, ids=str)
def test_bottleneck_matches_reference(shape, dtype):
    x_shape, m, act, scaling_kind, residual = BOTTLENECK_SHAPES[shape]
    inputs = bottleneck_inputs(x_shape, m, scaling_kind, residual)
    fixed = 1.7 if scaling_kind == "float" else None

    def ours(x, wd, bd, wu, bu, res, s=fixed):
        return bottleneck_adapter(x, wd, bd, wu, bu, res, activation=act, scaling=s, backend="triton")

    def ref(x, wd, bd, wu, bu, res, s=fixed):
        return bottleneck_adapter_reference(x, wd, bd, wu, bu, res, act, s)

    compare(shape, ours, ref, inputs, dtype)


def _layer_norm(hidden):
    ln = torch.nn.LayerNorm(hidden, eps=1e-7)
    with torch.no_grad():
        ln.weight.copy_(1 + 0.2 * torch.randn(hidden))
        ln.bias.copy_(0.1 * torch.randn(hidden))
    return ln.weight.detach().requires_grad_(), ln.bias.detach().requires_grad_()


def _ln(t, w, b):
    return F.layer_norm(t, (t.shape[-1],), w, b, 1e-7)


# placement -> (activation, reduction factor, scaling); adapterhub.md §2.2.
PLACEMENTS = {"seq_bn": ("relu", 16, 1.0), "double_seq_bn": ("swish", 16, 1.0), "par_bn": ("relu", 2, 4.0)}


def placement_forward(placement, adapter, h, inp, ln_w, ln_b, wd, bd, wu, bu, mh=None):
    """AdapterHub's sub-layer output with the adapter; ``adapter`` is the op (ours or the reference) with the
    signature of bottleneck_adapter_reference. h = dropout(dense(x_sub)) (dropout off), inp = residual input."""
    act, _, s = PLACEMENTS[placement]
    if placement == "seq_bn":       # z = LN(h + inp); out = LN(h + a(z) + inp), residual h
        z = _ln(h + inp, ln_w, ln_b)
        return _ln(adapter(z, wd, bd, wu, bu, h, act, s) + inp, ln_w, ln_b)
    if placement == "double_seq_bn":  # out = LN(h + a(h) + inp), at the attention output and the FFN output
        first = _ln(adapter(h, wd, bd, wu, bu, h, act, s) + inp, ln_w, ln_b)
        mh_wd, mh_bd, mh_wu, mh_bu = mh
        h2 = torch.tanh(first) * 0.5 + 0.1 * h  # stands in for the FFN between the two sub-layers
        return _ln(adapter(h2, mh_wd, mh_bd, mh_wu, mh_bu, h2, act, s) + first, ln_w, ln_b)
    if placement == "par_bn":       # out = LN(h + s·a(inp) + inp)
        return _ln(adapter(inp, wd, bd, wu, bu, h, act, s) + inp, ln_w, ln_b)
    raise AssertionError(placement)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("placement", PLACEMENTS, ids=str)
def test_bottleneck_placements_with_layer_norm(placement, dtype):
    hidden, rows = 80, 65
    _, rf, _ = PLACEMENTS[placement]
    m = hidden // rf
    h, inp = rand(5, 13, hidden, grad=True), rand(5, 13, hidden, grad=True)
    ln_w, ln_b = _layer_norm(hidden)
    adapter = [rand(m, hidden, scale=hidden ** -0.5, grad=True), rand(m, grad=True),
               rand(hidden, m, scale=m ** -0.5, grad=True), rand(hidden, grad=True)]
    second = [rand(m, hidden, scale=hidden ** -0.5, grad=True), rand(m, grad=True),
              rand(hidden, m, scale=m ** -0.5, grad=True), rand(hidden, grad=True)]
    assert rows == h.shape[0] * h.shape[1]

    def triton_adapter(x, wd, bd, wu, bu, res, act, s):
        return bottleneck_adapter(x, wd, bd, wu, bu, res, activation=act, scaling=s, backend="triton")

    def make(adapter_fn):
        def fn(h, inp, ln_w, ln_b, wd, bd, wu, bu, *mh):
            return placement_forward(placement, adapter_fn, h, inp, ln_w, ln_b, wd, bd, wu, bu, mh or None)
        return fn

    inputs = [h, inp, ln_w, ln_b, *adapter] + (second if placement == "double_seq_bn" else [])
    compare(placement, make(triton_adapter), make(bottleneck_adapter_reference), inputs, dtype)


# ------------------------------------------------------------------------------------------ merged inference


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_lora_fused_and_merged_agree(dtype):
    x, w, b, a, bb = [t.detach().to(dtype) for t in lora_inputs((3, 43, 80), 100, 8)]
    scaling = 1.25
    oracle = lora_linear_reference(*[t.double() for t in (x, w, b, a, bb)], scaling)
    eager = lora_linear_reference(x, w, b, a, bb, scaling)
    fused = lora_linear(x, w, b, a, bb, scaling, backend="triton")
    merged = F.linear(x, merge_lora(w, a, bb, scaling), b)
    within_budget("fused", fused, eager, oracle, dtype)
    within_budget("merged", merged, eager, oracle, dtype)
    within_budget("fused vs merged", fused, eager, merged.double(), dtype)
    restored = unmerge_lora(merge_lora(w, a, bb, scaling), a, bb, scaling)
    ulp = torch.finfo(dtype).eps * w.abs().max().item() * 2
    assert (restored.double() - w.double()).abs().max().item() <= ulp


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_ia3_fused_and_merged_agree(dtype):
    x, w, b = rand(2, 30, 48).to(dtype), rand(80, 48, scale=48 ** -0.5).to(dtype), rand(80).to(dtype)
    l = (1 + 0.3 * torch.randn(80)).to(dtype)
    oracle = ia3_linear_reference(x.double(), w.double(), b.double(), l.double())
    eager = ia3_linear_reference(x, w, b, l)
    fused = ia3_linear(x, w, b, l, backend="triton")
    mw, mb = merge_ia3(w, b, l)
    merged = F.linear(x, mw, mb)
    within_budget("fused", fused, eager, oracle, dtype)
    within_budget("merged (bias scaled)", merged, eager, oracle, dtype)
    within_budget("fused vs merged", fused, eager, merged.double(), dtype)
    # AdapterHub's merge leaves the bias unscaled: off by (l - 1) ⊙ b, far outside the budget.
    unscaled = F.linear(x.double(), mw.double(), b.double())
    assert (unscaled - oracle).abs().max() > 100 * (eager.double() - oracle).abs().max()
    rw, rb = unmerge_ia3(mw, mb, l)
    tol = 4 * torch.finfo(dtype).eps
    assert torch.allclose(rw.double(), w.double(), rtol=tol, atol=0)
    assert torch.allclose(rb.double(), b.double(), rtol=tol, atol=0)
    assert merge_ia3(w, None, l)[1] is None


def test_merge_errors():
    w = torch.randn(8, 6)
    with pytest.raises(ValueError, match="lora_A must be"):
        merge_lora(w, torch.randn(2, 5), torch.randn(8, 2), 1.0)
    with pytest.raises(ValueError, match="scale must have 8"):
        merge_ia3(w, None, torch.ones(7))
    with pytest.raises(ValueError, match="scale is 0 at output feature"):
        unmerge_ia3(w, None, torch.tensor([1.0] * 7 + [0.0]))


# ----------------------------------------------------------------------------------- dispatch and bad input


def test_bad_inputs_raise_clear_errors():
    x, w, b, a, bb = [t.detach() for t in lora_inputs((4, 48), 80, 4)]
    with pytest.raises(ValueError, match="lora_A must be"):
        lora_linear(x, w, b, torch.randn(4, 47), bb, 1.0)
    with pytest.raises(ValueError, match="lora_A must be"):
        lora_linear(x, w, b, a, torch.randn(80, 5), 1.0)
    with pytest.raises(ValueError, match="bias must be"):
        lora_linear(x, w, torch.randn(79), a, bb, 1.0)
    with pytest.raises(ValueError, match="weight must be"):
        lora_linear(x, torch.randn(80, 47), b, a, bb, 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear(x, w, b, a, bb, 1.0, 1.5)
    with pytest.raises(ValueError, match="seed"):
        lora_linear(x, w, b, a, bb, 1.0, 0.1, seed=-1)
    with pytest.raises(ValueError, match="k_weight must have"):
        lora_qkv(x, w, b, torch.randn(81, 48), b, w, b)
    with pytest.raises(ValueError, match="v_lora must be None or a tuple"):
        lora_qkv(x, w, b, w, b, w, b, None, None, (a, bb))
    with pytest.raises(ValueError, match="k: lora_A must be"):
        lora_qkv(x, w, b, w, b, w, b, None, (a, torch.randn(81, 4), 1.0))
    with pytest.raises(ValueError, match="scale must have 80"):
        ia3_linear(x, w, b, torch.ones(79))
    wd, bd, wu, bu = torch.randn(6, 48), torch.randn(6), torch.randn(48, 6), torch.randn(48)
    with pytest.raises(ValueError, match="activation must be one of"):
        bottleneck_adapter(x, wd, bd, wu, bu, activation="mish")
    with pytest.raises(ValueError, match="up_weight must be"):
        bottleneck_adapter(x, wd, bd, torch.randn(48, 5), bu)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        bottleneck_adapter(x, wd, bd, wu, bu, torch.randn(5, 48))
    with pytest.raises(ValueError, match="scaling must be"):
        bottleneck_adapter(x, wd, bd, wu, bu, scaling=torch.ones(7))


def test_triton_backend_reasons(monkeypatch):
    x, w, b, a, bb = [t.detach() for t in lora_inputs((4, 48), 80, 4)]
    wd, bd, wu, bu = torch.randn(6, 48), torch.randn(6), torch.randn(48, 6), torch.randn(48)
    with pytest.raises(BackendUnavailable, match="weight has dtype torch.float16"):
        lora_linear(x, w.half(), b, a, bb, 1.0, backend="triton")
    with pytest.raises(BackendUnavailable, match="LoRA rank 80 > 64"):
        lora_linear(x, w, b, torch.randn(80, 48), torch.randn(80, 80), 1.0, backend="triton")
    with pytest.raises(BackendUnavailable, match="dtype torch.float64"):
        bottleneck_adapter(x.double(), wd.double(), bd.double(), wu.double(), bu.double(), backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # what a CPU machine without the interpreter reports
    for call in (lambda: lora_linear(x, w, b, a, bb, 1.0, backend="triton"),
                 lambda: lora_qkv(x, w, b, w, b, w, b, (a, bb, 1.0), backend="triton"),
                 lambda: ia3_linear(x, w, b, torch.ones(80), backend="triton"),
                 lambda: bottleneck_adapter(x, wd, bd, wu, bu, backend="triton")):
        with pytest.raises(BackendUnavailable, match="x is on cpu: the triton kernels need CUDA"):
            call()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU choice of auto")
def test_auto_on_cpu_uses_the_reference():
    """Even under the interpreter, auto never picks the CUDA kernels for CPU tensors."""
    x, w, b, a, bb = [t.detach() for t in lora_inputs((4, 48), 80, 4)]
    # exact: auto must run the reference function itself on the same tensors
    assert torch.equal(lora_linear(x, w, b, a, bb, 0.5), lora_linear_reference(x, w, b, a, bb, 0.5))
    wd, bd, wu, bu = torch.randn(6, 48), torch.randn(6), torch.randn(48, 6), torch.randn(48)
    assert torch.equal(bottleneck_adapter(x, wd, bd, wu, bu, x, activation="gelu"),
                       bottleneck_adapter_reference(x, wd, bd, wu, bu, x, "gelu", 1.0))


def test_custom_ops_pass_opcheck():
    """Schemas, fake (meta) implementations and autograd registrations are consistent (torch.library)."""
    ops = torch.ops.deberta_fast
    x, w, b, a, bb = lora_inputs((2, 5, 48), 32, 4, weight_grad=True)
    torch.library.opcheck(ops.lora_projections.default, (x, [w], [b], [a], [bb], [0.5], 0.1, 3, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    absent_k = (x, [w, w, w], [b, b[:0], b], [a, a[:0], a], [bb, bb[:, :0], bb], [0.5, 0.0, 2.0], 0.0, 0, True)
    torch.library.opcheck(ops.lora_projections.default, absent_k,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    l = torch.ones(32, requires_grad=True)
    torch.library.opcheck(ops.ia3_linear.default, (x, w, b, l, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    wd, bd, wu, bu = rand(6, 48, grad=True), rand(6, grad=True), rand(48, 6, grad=True), rand(48, grad=True)
    torch.library.opcheck(ops.bottleneck_adapter.default, (x, wd, bd, wu, bu, x, "gelu", 1.0, torch.ones(48), True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_autocast_casts_inputs_and_keeps_fp32_gradients():
    """Under autocast (fp32 adapter weights, low-precision compute) the kernels run in the autocast dtype and
    the fp32 parameters get fp32 gradients, as with autocast's own linear layers."""
    x, w, b, a, bb = lora_inputs((2, 20, 48), 80, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, w, b, a, bb, 2.0, backend="triton")
        ref = lora_linear_reference(x, w, b, a, bb, 2.0)
    assert y.dtype == torch.bfloat16
    ga, gb = torch.autograd.grad(y.float().sum(), (a, bb))
    ra, rb = torch.autograd.grad(ref.float().sum(), (a, bb))
    assert ga.dtype == torch.float32 and gb.dtype == torch.float32
    oracle = lora_linear_reference(*[t.detach().bfloat16().double() for t in (x, w, b, a, bb)], 2.0)
    within_budget("autocast output", y, ref, oracle, torch.bfloat16)
    torch.testing.assert_close(ga, ra, rtol=2e-2, atol=2e-2 * ra.abs().max().item())
    torch.testing.assert_close(gb, rb, rtol=2e-2, atol=2e-2 * rb.abs().max().item())


def test_ops_compile_fullgraph():
    """The ops trace into one graph under torch.compile (fake impls, registered autograd)."""
    x, w, b, a, bb = lora_inputs((2, 7, 48), 32, 4)
    wd, bd, wu, bu = rand(6, 48, grad=True), rand(6, grad=True), rand(48, 6, grad=True), rand(48, grad=True)

    def f(x, a, bb, wd):
        y = lora_linear(x, w, b, a, bb, 0.5, 0.1, seed=3, backend="triton")
        z = bottleneck_adapter(x, wd, bd, wu, bu, x, activation="gelu", scaling=2.0, backend="triton")
        return z.sum() + y.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    inputs = (x, a, bb, wd)
    expected = torch.autograd.grad(f(*inputs), inputs)
    for got, want in zip(torch.autograd.grad(compiled(*inputs), inputs), expected):
        torch.testing.assert_close(got, want)


@pytest.mark.slow
def test_gpu_bench_script_dry_run(tmp_path):
    """The GPU adapter benchmark (bench/gpu_adapters.py) runs end to end on tiny shapes (interpreter) and writes its CSV."""
    out = tmp_path / "adapters.csv"
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-m", "deberta_fast.benchmark.gpu_adapters", "--dry-run", "--widths", "48",
                           "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = out.read_text()
    assert "correctness" in text and "timing" in text and "target" in text and "gpu" in text.splitlines()[0]


# --------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_adapters_at_deberta_widths(dtype):
    """bf16 (and fp16/fp32 with exact fp32 dots) at DeBERTa-base width on a real device."""
    inputs = lora_inputs((4, 300, 768), 768, 16)
    compare("lora", lambda x, w, b, a, bb: lora_linear(x, w, b, a, bb, 2.0, 0.1, seed=1, backend="triton"),
            lambda x, w, b, a, bb: lora_linear_reference(x, w, b, a, bb, 2.0, 0.1, seed=1), inputs, dtype)
    qkv = [rand(4, 300, 768, grad=True)] + [rand(768, 768, scale=768 ** -0.5), rand(768)] * 3
    lo = [rand(8, 768, scale=768 ** -0.5, grad=True), rand(768, 8, scale=8 ** -0.5, grad=True)]
    compare("qkv", lambda x, *p: lora_qkv(x, *p[:6], (p[6], p[7], 2.0), None, (p[6], p[7], 1.0), dropout_p=0.1,
                                          seed=2, backend="triton"),
            lambda x, *p: lora_qkv_reference(x, *p[:6], (p[6], p[7], 2.0), None, (p[6], p[7], 1.0), dropout_p=0.1,
                                             seed=2), qkv + lo, dtype)
    bn = bottleneck_inputs((4, 300, 768), 48, "channel", True)
    compare("bottleneck", lambda *t: bottleneck_adapter(*t[:6], activation="gelu", scaling=t[6], backend="triton"),
            lambda *t: bottleneck_adapter_reference(*t[:6], "gelu", t[6]), bn, dtype)
    ia3 = [rand(4, 300, 768, grad=True), rand(1024, 768, scale=768 ** -0.5, grad=True), rand(1024),
           (1 + 0.3 * torch.randn(1024)).requires_grad_()]
    compare("ia3", lambda *t: ia3_linear(*t, backend="triton"), ia3_linear_reference, ia3, dtype)


# ------------------------------------------------------------------------------- compile for a real GPU


def compile_for_hopper():
    """Compile every kernel variant for sm_90 with Triton's own compiler (no GPU needed): catches what the
    interpreter accepts but the compiler rejects. Run in a process without TRITON_INTERPRET."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from deberta_fast.triton_kernels import counter_rng, fused_linear, lora_linear

    def jit_of(kernel):
        while not isinstance(kernel, triton.runtime.jit.JITFunction):
            kernel = kernel.fn
        return kernel

    def build(kernel, pointers, constexprs, config):
        fn = jit_of(kernel)
        signature = {}
        for name in fn.arg_names:
            if name in constexprs or name in config.kwargs:
                signature[name] = "constexpr"
            elif name in pointers:
                signature[name] = pointers[name]
            elif name in ("keep_scale", "scale_value", "scal0", "scal1", "scal2"):
                signature[name] = "fp32"
            else:
                signature[name] = "i32"
        consts = {**constexprs, **config.kwargs}
        aligned = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items()
                   if t != "constexpr" and t != "fp32"}
        compiled = triton.compile(ASTSource(fn, signature, consts, attrs=aligned), target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
        assert "cubin" in compiled.asm
        return compiled

    def gpu_config(kernel, kind):
        return [c for c in kernel.configs if getattr(c, "kind", None) == kind][0]

    for dt, tl_dt, kind, variants in (("bf16", tl.bfloat16, "half", ((1, 1, False), (3, 5, False), (3, 7, True))),
                                      ("fp32", tl.float32, "fp32", ((3, 7, True),))):
        precision = "ieee" if dt == "fp32" else "tf32"
        lora_ptrs = {f"{n}{j}_ptr": f"*{dt}" for n in ("w", "bias", "a", "b") for j in range(3)}
        lora_ptrs.update({n: f"*{dt}" for n in ("x_ptr", "y_ptr", "dy_ptr", "dx_ptr")})
        lora_ptrs.update({n: "*fp32" for n in ("s_ptr", "ds_ptr", "da_ptr", "db_ptr")})
        for num_proj, mask, dropout in variants:
            build(lora_linear._lora_fwd_kernel, lora_ptrs,
                  dict(NUM_PROJ=num_proj, LORA_MASK=mask, BIAS_MASK=7 - mask, S_FROM_MEMORY=dropout, STORE_S=True,
                       R=16, DOT_DTYPE=tl_dt, PRECISION=precision, EVEN_K=True, K_ALIGN=16, N_ALIGN=8, RANK_ALIGN=4),
                  gpu_config(lora_linear._lora_fwd_kernel, kind))
            build(lora_linear._lora_bwd_dx_kernel, lora_ptrs,
                  dict(NUM_PROJ=num_proj, LORA_MASK=mask, NEED_DX=True, STORE_DS=True, DROPOUT=dropout, R=16,
                       DOT_DTYPE=tl_dt, PRECISION=precision, EVEN_N=False, K_ALIGN=8, N_ALIGN=16, RANK_ALIGN=1),
                  gpu_config(lora_linear._lora_bwd_dx_kernel, kind))
            build(lora_linear._lora_bwd_weight_kernel, lora_ptrs,
                  dict(NUM_PROJ=num_proj, LORA_MASK=mask, WHICH_FIRST=0, WHICH_COUNT=2, DROPOUT=dropout, R=16,
                       DOT_DTYPE=tl_dt, PRECISION=precision, K_ALIGN=8, N_ALIGN=16), gpu_config(lora_linear._lora_bwd_weight_kernel, kind))
        build(lora_linear._lora_down_kernel, lora_ptrs,
              dict(NUM_PROJ=3, LORA_MASK=7, R=32, DOT_DTYPE=tl_dt, PRECISION=precision, EVEN_K=False, K_ALIGN=8),
              gpu_config(lora_linear._lora_down_kernel, kind))
        fl_ptrs = {n: f"*{dt}" for n in ("a_ptr", "b_ptr", "bias_ptr", "residual_ptr", "aux_ptr", "out_ptr")}
        fl_ptrs.update(scale_ptr="*fp32", colsum_ptr="*fp32")
        for act, act_grad, scale_mode, colsum in ((2, False, 3, False), (4, True, 0, True), (3, False, 1, False)):
            build(fused_linear._fused_linear_kernel, fl_ptrs,
                  dict(HAS_BIAS=True, ACT=act, ACT_GRAD=act_grad, STORE_PRE=not act_grad, SCALE_MODE=scale_mode,
                       HAS_RESIDUAL=True, COLSUM_A=colsum, DOT_DTYPE=tl_dt, PRECISION=precision, EVEN_K=False),
                  gpu_config(fused_linear._fused_linear_kernel, kind))
    build(counter_rng._keep_mask_kernel, {"out_ptr": "*i8"}, dict(BLOCK_R=32, BLOCK_C=32),
          triton.Config({}, num_warps=4, num_stages=1))
    print("compiled")


@pytest.mark.slow
def test_kernels_compile_for_hopper():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"import runpy; runpy.run_path({__file__!r})['compile_for_hopper']()"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-4000:]
