"""Fused hidden dropout + bias + residual + LayerNorm (csrc/residual_layernorm.cpp, ops/residual_layernorm.py).

The native op is compared with a float64 oracle of the formula (forward, and every gradient through autograd in
float64) given the same keep mask; its counter-based mask is compared exactly with the pure-PyTorch Philox mirror;
the stream's statistics (keep rate, agreement between neighbouring rows, columns, successive calls and the attention
stream of the same seed) are checked against their binomial expectations. The model blocks that use the op are
checked against transformers' blocks, and their fall-backs to transformers' forward.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

import deberta_fast
from deberta_fast.ops import dispatch, residual_layernorm as rln
from deberta_fast.ops.attention_dropout import attention_keep_mask, draw_seed
from configs import make_config

SHAPES = {  # name -> shape of x / residual [..., H]
    "tiny": (3, 5, 16),
    "tail": (2, 7, 37),  # H with a 16-lane vector part and a scalar tail
    "rows": (301, 24),  # many rows: several blocks of the column sums
    "base": (1, 64, 768),
}
# fp32: errors of a one-pass fp32 row computation against fp64, relative to the largest magnitude involved.
FP32_RTOL = 2e-6


pytestmark = pytest.mark.usefixtures("native_ops")


def make_inputs(shape, dtype=torch.float32, bias=True, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    width = shape[-1]
    tensors = {
        "x": torch.randn(shape, generator=g) * 2,
        "bias": torch.randn(width, generator=g) if bias else None,
        "residual": torch.randn(shape, generator=g),
        "weight": 1 + 0.5 * torch.randn(width, generator=g),
        "beta": 0.5 * torch.randn(width, generator=g),
    }
    return {k: (None if v is None else v.to(dtype).requires_grad_(requires_grad)) for k, v in tensors.items()}


def oracle(inputs, eps, dropout_p, keep):
    """float64 forward of the formula with an explicit keep mask [rows, H] (or None), and its leaf tensors."""
    leaves = {k: (None if v is None else v.detach().double().requires_grad_()) for k, v in inputs.items()}
    h = leaves["x"] if leaves["bias"] is None else leaves["x"] + leaves["bias"]
    if keep is not None:
        h = torch.where(keep.view(h.shape), h / (1 - dropout_p), torch.zeros((), dtype=h.dtype))
    y = F.layer_norm(h + leaves["residual"], (h.shape[-1],), leaves["weight"], leaves["beta"], eps)
    return y, leaves


def run_native(inputs, eps, dropout_p, torch_seed=5):
    """(y, the keep mask of the seed the op drew or None)."""
    torch.manual_seed(torch_seed)
    y = rln.residual_layernorm(*inputs.values(), eps, dropout_p, backend="cpu")
    keep = None
    if dropout_p > 0:
        torch.manual_seed(torch_seed)
        rows = inputs["x"].numel() // inputs["x"].shape[-1]
        keep = rln.hidden_keep_mask(draw_seed(), rows, inputs["x"].shape[-1], dropout_p)
    return y, keep


def assert_close(got, want, what, rtol=FP32_RTOL, floor=1e-6):
    scale = want.abs().max().item()
    error = (got.double() - want).abs().max().item()
    assert error <= rtol * scale + floor, f"{what}: max error {error:.3g} (scale {scale:.3g})"


def grads_of(y, tensors, grad_y):
    names = [k for k, v in tensors.items() if v is not None]
    grads = torch.autograd.grad(y, [tensors[k] for k in names], grad_y)
    return dict(zip(names, grads))


# ------------------------------------------------------------------------------------------------------------------
# the keep mask
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cols", (37, 200))  # scalar only; three 64-column vector calls and a scalar tail
@pytest.mark.parametrize("seed", (0, 12345, 2**40 + 977, 2**62 - 1))
@pytest.mark.parametrize("dropout_p", (0.1, 0.5, 0.9))
def test_native_keep_mask_equals_the_pytorch_mirror(seed, dropout_p, cols):
    native = torch.ops.deberta_fast_cpu.hidden_dropout_keep_mask(torch.tensor([seed]), 29, cols, dropout_p)
    mirror = rln.hidden_keep_mask(seed, 29, cols, dropout_p)
    # Exact: integer Philox and one float32 product and comparison, the same on every CPU.
    assert native.dtype == torch.bool and torch.equal(native, mirror), f"{(native != mirror).sum()} decisions differ"


def test_keep_rate_and_independence_statistics():
    """Keep rate 1 - p and agreement p² + (1 - p)² between neighbouring rows, columns, columns 16 apart (other words
    of the same Philox call), successive draws and the attention stream of the same seed, each within 5 binomial
    standard deviations."""
    dropout_p, rows, cols = 0.1, 512, 768
    torch.manual_seed(0)
    seed, following = draw_seed(), draw_seed()
    mask = torch.ops.deberta_fast_cpu.hidden_dropout_keep_mask(seed, rows, cols, dropout_p)
    after = torch.ops.deberta_fast_cpu.hidden_dropout_keep_mask(following, rows, cols, dropout_p)
    attention = attention_keep_mask(seed, 1, 1, rows, cols, dropout_p)[0, 0]

    def within(observed, expected, n, what):
        sigma = math.sqrt(expected * (1 - expected) / n)
        assert abs(observed - expected) <= 5 * sigma, f"{what}: {observed:.5f} vs {expected:.5f}"

    within(mask.float().mean().item(), 1 - dropout_p, mask.numel(), "keep rate")
    agree = (1 - dropout_p) ** 2 + dropout_p**2
    for what, (a, b) in {
        "rows": (mask[1:], mask[:-1]),
        "columns": (mask[:, 1:], mask[:, :-1]),
        "columns 16 apart": (mask[:, 16:], mask[:, :-16]),
        "successive calls": (after, mask),
        "attention stream, same seed": (attention, mask),
    }.items():
        within((a == b).float().mean().item(), agree, a.numel(), what)


# ------------------------------------------------------------------------------------------------------------------
# forward and backward against the float64 oracle
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dropout_p", (0.0, 0.1, 0.5))
@pytest.mark.parametrize("bias", (True, False), ids=("bias", "no_bias"))
@pytest.mark.parametrize("shape_name", sorted(SHAPES))
def test_fp32_forward_and_gradients_match_the_oracle(shape_name, bias, dropout_p):
    inputs = make_inputs(SHAPES[shape_name], bias=bias)
    y, keep = run_native(inputs, 1e-7, dropout_p)
    want, leaves = oracle(inputs, 1e-7, dropout_p, keep)
    assert y.dtype == torch.float32 and y.shape == inputs["x"].shape
    assert_close(y, want, "y")
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(9))
    got = grads_of(y, inputs, grad_y)
    expected = grads_of(want, leaves, grad_y.double())
    assert got.keys() == expected.keys()
    for name in expected:
        assert_close(got[name], expected[name], f"d{name}")


def test_eval_forward_matches_torch_layer_norm_within_1e_5():
    inputs = make_inputs(SHAPES["base"], requires_grad=False)
    y = rln.residual_layernorm(*inputs.values(), 1e-7, 0.0, backend="cpu")
    want = F.layer_norm(F.linear(inputs["x"], torch.eye(768), inputs["bias"]) + inputs["residual"], (768,),
                        inputs["weight"], inputs["beta"], 1e-7)
    assert (y - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_half_precision_within_twice_the_error_of_torch(dtype):
    """|native - fp64| <= 2 |torch ops in dtype - fp64| + floor, for y and every gradient."""
    inputs = make_inputs(SHAPES["base"], dtype=dtype)
    y, _ = run_native(inputs, 1e-7, 0.0)
    want, leaves = oracle(inputs, 1e-7, 0.0, None)
    torch_y = rln.residual_layernorm_reference(*inputs.values(), 1e-7, 0.0)
    assert y.dtype == dtype
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    got, by_torch = grads_of(y, inputs, grad_y), grads_of(torch_y, inputs, grad_y)
    expected = grads_of(want, leaves, grad_y.double())
    floor = {torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    for name, ours, theirs, exact in [("y", y, torch_y, want)] + [
        (f"d{k}", got[k], by_torch[k], expected[k]) for k in expected
    ]:
        our_error = (ours.double() - exact).abs().max().item()
        torch_error = (theirs.double() - exact).abs().max().item()
        scale = max(1.0, exact.abs().max().item())
        assert our_error <= 2 * torch_error + floor * scale, f"{name}: ours {our_error:.3g}, torch {torch_error:.3g}"


def test_backward_regenerates_exactly_the_forward_mask():
    """d x is zero exactly where the forward dropped (x + bias): both passes draw the same decisions."""
    inputs = make_inputs((4, 33, 64))
    y, keep = run_native(inputs, 1e-5, 0.3)
    (dx,) = torch.autograd.grad(y, [inputs["x"]], torch.randn(y.shape))
    assert torch.equal(dx.view(keep.shape) != 0, keep)
    want, _ = oracle(inputs, 1e-5, 0.3, keep)
    assert_close(y, want, "y")


def test_dropout_is_reproducible_under_manual_seed_and_advances_per_call():
    inputs = make_inputs(SHAPES["tail"], requires_grad=False)
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        runs.append([rln.residual_layernorm(*inputs.values(), 1e-7, 0.2, backend="cpu") for _ in range(2)])
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[0][1]), "successive calls must draw new masks"


def test_bitwise_identical_for_one_and_two_threads():
    # Each output element has one owner and a fixed order of operations; the column sums add fixed blocks of rows
    # in block order, so the thread count changes no rounding.
    inputs = make_inputs(SHAPES["rows"])
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            y, _ = run_native(inputs, 1e-7, 0.1)
            grads = grads_of(y, inputs, torch.ones_like(y) + torch.arange(y.shape[-1]) / 7)
            results.append([y] + list(grads.values()))
    finally:
        torch.set_num_threads(previous)
    for one, two in zip(*results):
        assert torch.equal(one, two)


# ------------------------------------------------------------------------------------------------------------------
# dispatch and bad input
# ------------------------------------------------------------------------------------------------------------------


def test_reference_backend_uses_torch_dropout():
    inputs = make_inputs(SHAPES["tail"], requires_grad=False)
    torch.manual_seed(3)
    got = rln.residual_layernorm(*inputs.values(), 1e-7, 0.3, backend="reference")
    torch.manual_seed(3)
    dropped = F.dropout(inputs["x"] + inputs["bias"], 0.3, training=True)
    want = F.layer_norm(dropped + inputs["residual"], (37,), inputs["weight"], inputs["beta"], 1e-7)
    assert torch.equal(got, want)


def test_auto_logs_once_and_falls_back_for_float64(caplog):
    inputs = make_inputs(SHAPES["tiny"], dtype=torch.float64, requires_grad=False)
    # once per process: an earlier test's float64 model (whose output tails run this op) may have logged it already
    dispatch._log_once_cached.cache_clear()
    with caplog.at_level(logging.WARNING, logger="deberta_fast"):
        got = rln.residual_layernorm(*inputs.values(), 1e-7, 0.0)
    want = rln.residual_layernorm_reference(*inputs.values(), 1e-7, 0.0)
    assert torch.equal(got, want)
    assert "residual_layernorm: auto skipped backend 'cpu'" in caplog.text and "torch.float64" in caplog.text
    with pytest.raises(dispatch.BackendUnavailable, match="float64"):
        rln.residual_layernorm(*inputs.values(), 1e-7, 0.0, backend="cpu")
    with pytest.raises(dispatch.BackendUnavailable, match="does not implement"):
        rln.residual_layernorm(*inputs.values(), 1e-7, 0.0, backend="triton")


@pytest.mark.parametrize("name,value,message", [
    ("residual", torch.zeros(3, 5, 15), "residual must have the shape of x"),
    ("bias", torch.zeros(15), r"bias must be \[H\] = \[16\]"),
    ("weight", torch.zeros(2, 16), r"weight must be \[H\] = \[16\]"),
    ("beta", None, r"beta must be \[H\]"),
])
def test_bad_input_names_the_argument(name, value, message):
    inputs = make_inputs(SHAPES["tiny"], requires_grad=False)
    inputs[name] = value
    with pytest.raises(ValueError, match=message):
        rln.residual_layernorm(*inputs.values(), 1e-7, 0.0)


@pytest.mark.parametrize("dropout_p", (1.0, -0.1))
def test_dropout_p_out_of_range_is_refused(dropout_p):
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        rln.residual_layernorm(*make_inputs(SHAPES["tiny"]).values(), 1e-7, dropout_p)


# ------------------------------------------------------------------------------------------------------------------
# the model blocks
# ------------------------------------------------------------------------------------------------------------------


def _blocks(dropout=0.0):
    config = make_config("v3", hidden_dropout_prob=dropout)
    torch.manual_seed(0)
    ours = (hf.DebertaV2SelfOutput(config), hf.DebertaV2Output(config))
    theirs = tuple(type(b)(config) for b in ours)
    for mine, other in zip(ours, theirs):
        with torch.no_grad():
            for p in mine.parameters():
                p.add_(0.1 * torch.randn(p.shape))
        other.load_state_dict(mine.state_dict())
    from deberta_fast.models.output_blocks import DebertaV2Output, DebertaV2SelfOutput

    ours[0].__class__, ours[1].__class__ = DebertaV2SelfOutput, DebertaV2Output
    return config, ours, theirs


def _count_native(monkeypatch):
    calls = []
    native = rln._RUN["cpu"]

    def counting(*call):
        calls.append(call)
        return native(*call)

    monkeypatch.setitem(rln._RUN, "cpu", counting)
    return calls


@pytest.mark.parametrize("block", (0, 1), ids=("self_output", "output"))
def test_blocks_match_transformers_in_eval_and_their_gradients(block, monkeypatch):
    config, ours, theirs = _blocks()
    mine, other = ours[block].eval(), theirs[block].eval()
    width = other.dense.in_features
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 40, width, generator=g, requires_grad=True)
    residual = torch.randn(2, 40, config.hidden_size, generator=g, requires_grad=True)
    calls = _count_native(monkeypatch)
    got = mine(hidden, residual)
    assert len(calls) == 1
    want = other(hidden, residual)
    assert (got - want).abs().max().item() <= 1e-5
    grad = torch.randn(got.shape, generator=g)
    leaves = [hidden, residual] + list(mine.parameters())
    for a, b, name in zip(torch.autograd.grad(got, leaves, grad),
                          torch.autograd.grad(want, [hidden, residual] + list(other.parameters()), grad),
                          ["hidden", "residual"] + [n for n, _ in mine.named_parameters()]):
        assert (a - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item()), name


def test_blocks_keep_transformers_forward_when_the_fused_path_does_not_apply(monkeypatch):
    config, ours, theirs = _blocks()
    mine, other = ours[0].eval(), theirs[0].eval()
    hidden, residual = torch.randn(1, 8, config.hidden_size), torch.randn(1, 8, config.hidden_size)
    calls = _count_native(monkeypatch)
    seen = []
    handle = mine.dense.register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        assert torch.equal(mine(hidden, residual), other(hidden, residual))
    finally:
        handle.remove()
    assert len(seen) == 1 and not calls  # a hooked dense runs as a module
    with dispatch.use_backend("triton"):  # no Triton kernels for this block: transformers' ops
        assert torch.equal(mine(hidden, residual), other(hidden, residual))
    assert not calls


def test_patched_model_uses_the_fused_blocks_and_matches_transformers_in_train_mode_on_the_reference():
    """On the reference backend the blocks draw torch's masks in transformers' order: same seed, same output."""
    config = make_config("v3", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    reference = hf.DebertaV2Model(config).train()
    fast = deberta_fast.patch_deberta(hf.DebertaV2Model(config)).train()
    fast.load_state_dict(reference.state_dict())
    kinds = {type(m).__module__ for m in fast.modules() if "Output" in type(m).__name__}
    assert kinds == {"deberta_fast.models.output_blocks"}
    ids = torch.randint(1, config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(7)
    want = reference(input_ids=ids).last_hidden_state
    with dispatch.use_backend("reference"):
        torch.manual_seed(7)
        got = fast(input_ids=ids).last_hidden_state
    assert (got - want).abs().max().item() <= 1e-5
    torch.manual_seed(7)
    native = fast(input_ids=ids).last_hidden_state  # auto: the counter stream, other masks
    assert (native - want).abs().max().item() > 1e-2


def test_reasons_name_the_device():
    vector = torch.zeros(4, device="meta")
    reasons = rln.unsupported_reasons(torch.zeros(2, 4, device="meta"), None, torch.zeros(2, 4, device="meta"),
                                      vector, vector, 1e-7, 0.0)
    assert reasons == ["it runs on CPU tensors; these are on meta"]
