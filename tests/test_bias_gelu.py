"""Bias + exact GELU of the intermediate layer (csrc/bias_gelu.cpp, ops/bias_gelu.py): forward and the fused
backward (d x and d bias in one pass) against a float64 oracle, half precision against torch's own error, the
thread-count independence of d bias, dispatch, and the model block against transformers'."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

from deberta_fast.ops import bias_gelu as bg
from deberta_fast.ops import dispatch
from configs import make_config

SHAPES = {"tiny": (3, 5, 16), "tail": (2, 7, 53), "rows": (301, 24), "ffn": (1, 64, 3072)}
FP32_RTOL = 2e-6


pytestmark = pytest.mark.usefixtures("native_ops")


def make_inputs(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(shape, generator=g)).to(dtype).requires_grad_()
    bias = torch.randn(shape[-1], generator=g).to(dtype).requires_grad_()
    return x, bias


def oracle(x, bias, grad_y):
    xd, bd = x.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    y = F.gelu(xd + bd)
    return y, torch.autograd.grad(y, [xd, bd], grad_y.double())


@pytest.mark.parametrize("shape_name", sorted(SHAPES))
def test_fp32_forward_and_gradients_match_the_oracle(shape_name):
    x, bias = make_inputs(SHAPES[shape_name])
    y = bg.bias_gelu(x, bias, backend="cpu")
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
    want, (dx_want, db_want) = oracle(x, bias, grad_y)
    dx, db = torch.autograd.grad(y, [x, bias], grad_y)
    for name, got, exact in (("y", y, want), ("dx", dx, dx_want), ("dbias", db, db_want)):
        error = (got.double() - exact).abs().max().item()
        assert error <= FP32_RTOL * exact.abs().max().item() + 1e-6, f"{name}: {error:.3g}"
    assert (y - F.gelu(x + bias)).abs().max().item() <= 1e-5  # transformers' activation in fp32


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_half_precision_within_twice_the_error_of_torch(dtype):
    x, bias = make_inputs(SHAPES["ffn"], dtype=dtype)
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    ours = bg.bias_gelu(x, bias, backend="cpu")
    theirs = bg.bias_gelu_reference(x, bias)
    want, exact_grads = oracle(x, bias, grad_y)
    floor = {torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    pairs = [("y", ours, theirs, want)] + [
        (name, a, b, e) for name, a, b, e in zip(("dx", "dbias"), torch.autograd.grad(ours, [x, bias], grad_y),
                                                 torch.autograd.grad(theirs, [x, bias], grad_y), exact_grads)
    ]
    for name, a, b, exact in pairs:
        our_error = (a.double() - exact).abs().max().item()
        torch_error = (b.double() - exact).abs().max().item()
        scale = max(1.0, exact.abs().max().item())
        assert our_error <= 2 * torch_error + floor * scale, f"{name}: ours {our_error:.3g}, torch {torch_error:.3g}"


def test_bitwise_identical_for_one_and_two_threads():
    # One owner per element; d bias adds fixed blocks of rows in block order whatever the thread count.
    x, bias = make_inputs(SHAPES["rows"])
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            y = bg.bias_gelu(x, bias, backend="cpu")
            results.append([y, *torch.autograd.grad(y, [x, bias], torch.ones_like(y))])
    finally:
        torch.set_num_threads(previous)
    for one, two in zip(*results):
        assert torch.equal(one, two)


def test_auto_logs_once_and_falls_back_for_float64(caplog):
    x, bias = make_inputs(SHAPES["tiny"], dtype=torch.float64)
    # once per process: an earlier test's float64 model (whose output tails run this op) may have logged it already
    dispatch._log_once_cached.cache_clear()
    with caplog.at_level(logging.WARNING, logger="deberta_fast"):
        got = bg.bias_gelu(x, bias)
    assert torch.equal(got, F.gelu(x + bias))
    assert "bias_gelu: auto skipped backend 'cpu'" in caplog.text
    with pytest.raises(dispatch.BackendUnavailable, match="float64"):
        bg.bias_gelu(x, bias, backend="cpu")


def test_bad_bias_names_the_argument():
    x, _ = make_inputs(SHAPES["tiny"])
    with pytest.raises(ValueError, match=r"bias must be \[F\] = \[16\]"):
        bg.bias_gelu(x, torch.zeros(15))


def test_intermediate_block_matches_transformers_and_falls_back_for_other_activations(monkeypatch):
    from deberta_fast.models.output_blocks import DebertaV2Intermediate

    config = make_config("v3")
    torch.manual_seed(0)
    other = hf.DebertaV2Intermediate(config)
    mine = hf.DebertaV2Intermediate(config)
    mine.load_state_dict(other.state_dict())
    mine.__class__ = DebertaV2Intermediate
    calls = []
    native = bg._RUN["cpu"]
    monkeypatch.setitem(bg._RUN, "cpu", lambda *call: calls.append(call) or native(*call))
    hidden = torch.randn(2, 30, config.hidden_size, requires_grad=True)
    got, want = mine(hidden), other(hidden)
    assert len(calls) == 1 and (got - want).abs().max().item() <= 1e-5
    grad = torch.randn(got.shape)
    for a, b in zip(torch.autograd.grad(got, [hidden, *mine.parameters()], grad),
                    torch.autograd.grad(want, [hidden, *other.parameters()], grad)):
        assert (a - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item())
    from transformers.activations import ACT2FN

    mine.intermediate_act_fn = other.intermediate_act_fn = ACT2FN["gelu_new"]  # tanh form: not this op
    assert torch.equal(mine(hidden), other(hidden)) and len(calls) == 1
