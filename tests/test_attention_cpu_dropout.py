"""Attention dropout and pair masks of the native CPU op (csrc/attention_dropout.h, csrc/pair_mask.h).

The dropout stream is counter-based (deberta_fast.ops.attention_dropout): the op's keep mask is compared exactly with
the pure-PyTorch Philox oracle (and the oracle with the Triton kernels' own mask under the interpreter); outputs and
gradients are compared with the reference backend given that same mask; the statistics of the stream (keep rate,
agreement between rows, heads, keys and successive calls) are checked against their binomial expectations.
"""

from __future__ import annotations

import math

import pytest
import torch

from deberta_fast.ops import attention_cpu, dispatch
from deberta_fast.ops.attention import CANDIDATES, OP_NAME, disentangled_attention
from deberta_fast.ops.attention_dropout import attention_keep_mask, draw_seed
from deberta_fast.ops.attention_reference import disentangled_attention_reference

from test_attention_cpu import assert_close_fp32, make_call


pytestmark = pytest.mark.usefixtures("native_ops")


def seed_tensor(value: int) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int64)


# ------------------------------------------------------------------------------------------------------------------
# the keep mask itself
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", (0, 12345, 2**40 + 977, 2**62 - 1))
@pytest.mark.parametrize("dropout_p", (0.1, 0.5, 0.9))
def test_native_keep_mask_equals_the_pytorch_oracle(seed, dropout_p):
    # num_keys 37: full 16-lane vectors and a scalar tail of the C++ generator.
    native = attention_cpu.dropout_keep_mask(seed_tensor(seed), 2, 3, 29, 37, dropout_p)
    oracle = attention_keep_mask(seed, 2, 3, 29, 37, dropout_p)
    assert native.dtype == torch.bool and native.shape == (2, 3, 29, 37)
    # Exact: integer Philox and one float32 conversion and product, identical on every x86 / ARM CPU.
    assert torch.equal(native, oracle), f"{(native != oracle).sum().item()} keep decisions differ"


def test_oracle_equals_the_triton_kernels_keep_mask():
    """The stream is the Triton kernels' (triton_kernels/_common.py dropout_keep): same seed, same mask."""
    from deberta_fast.ops import attention_triton

    if attention_triton.unsupported_reasons(*_tiny_call()):
        pytest.skip("the Triton kernels cannot run here (no CUDA and no TRITON_INTERPRET=1)")
    seed = seed_tensor(2**33 + 5)
    for dropout_p in (0.1, 0.6):
        triton_mask = attention_triton.dropout_keep_mask(seed, 2, 2, 40, 45, dropout_p)
        assert torch.equal(triton_mask.cpu(), attention_keep_mask(seed, 2, 2, 40, 45, dropout_p))


def _tiny_call():
    q = torch.zeros(1, 1, 2, 4)
    return (q, q, q, None, None, None, None, 1.0, 0.1, False, 0)


@pytest.mark.parametrize("dropout_p", (0.1, 0.3))
def test_keep_rate_and_independence_statistics(dropout_p):
    """Keep rate (1 - p) and agreement between neighbouring rows, heads, keys and successive draws (independent
    bits agree with probability p² + (1 - p)²), each within 5 binomial standard deviations."""
    torch.manual_seed(0)
    batch, heads, length = 2, 4, 256
    mask = attention_cpu.dropout_keep_mask(draw_seed(), batch, heads, length, length, dropout_p)
    following = attention_cpu.dropout_keep_mask(draw_seed(), batch, heads, length, length, dropout_p)
    keep = 1.0 - dropout_p

    def within(observed: float, expected: float, n: int, what: str):
        sigma = math.sqrt(expected * (1 - expected) / n)
        assert abs(observed - expected) <= 5 * sigma, f"{what}: {observed:.5f} vs {expected:.5f} (sigma {sigma:.2e})"

    within(mask.float().mean().item(), keep, mask.numel(), "keep rate")
    for b in range(batch):  # every row of every head keeps about 1 - p of its keys too
        rows = mask[b].float().mean(-1)
        assert (rows - keep).abs().max() <= 6 * math.sqrt(keep * (1 - keep) / length)
    agree = keep**2 + dropout_p**2
    pairs = {
        "rows i, i + 1": (mask[..., 1:, :], mask[..., :-1, :]),
        "keys k, k + 1": (mask[..., 1:], mask[..., :-1]),
        "heads h, h + 1": (mask[:, 1:], mask[:, :-1]),
        "batch rows": (mask[1:], mask[:-1]),
        "successive calls": (following, mask),
        "query i / key i swapped": (mask, mask.transpose(-1, -2)),
    }
    for what, (a, b) in pairs.items():
        within((a == b).float().mean().item(), agree, a.numel(), what)


# ------------------------------------------------------------------------------------------------------------------
# the op with dropout against the reference given the same mask
# ------------------------------------------------------------------------------------------------------------------


def native_with_mask(tensors, mask, kwargs, dropout_p, torch_seed=123, grad_seed=1):
    """(out, grads) of the native op with dropout, and the oracle keep mask of the seed it drew."""
    torch.manual_seed(torch_seed)
    out, _ = disentangled_attention(*tensors, mask, backend="cpu", dropout_p=dropout_p, **kwargs)
    torch.manual_seed(torch_seed)
    seed = draw_seed()  # the draw that the op made: the same generator state
    query, key = tensors[0], tensors[1]
    keep = attention_keep_mask(seed, query.shape[0], query.shape[1], query.shape[2], key.shape[2], dropout_p)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.dtype)
    grads = torch.autograd.grad(out, tensors, grad_out, allow_unused=True)
    return out, grads, keep, grad_out


def reference_with_mask(tensors, mask, kwargs, dropout_p, keep, grad_out):
    out, _ = disentangled_attention_reference(*tensors, mask, kwargs["spec"], kwargs["softmax_scale"], dropout_p,
                                              False, kwargs["num_prefix_keys"], dropout_keep=keep)
    grads = torch.autograd.grad(out, tensors, grad_out, allow_unused=True)
    return out, grads


def assert_matches_reference(tensors, mask, kwargs, dropout_p):
    out, grads, keep, grad_out = native_with_mask(tensors, mask, kwargs, dropout_p)
    ref_out, ref_grads = reference_with_mask(tensors, mask, kwargs, dropout_p, keep, grad_out)
    assert_close_fp32(out, ref_out, "out")
    for name, grad, ref in zip(("query", "key", "value", "pos_key", "pos_query"), grads, ref_grads):
        assert_close_fp32(grad, ref, f"d{name}")


@pytest.mark.parametrize("mask_kind", ("none", "right", "holes", "single"))
@pytest.mark.parametrize("length", (1, 65, 129, 300))
@pytest.mark.parametrize("spec_name", ("v3", "c2p_only", "p2c_only", "no_positions"))
def test_dropout_matches_reference_with_the_same_mask(spec_name, length, mask_kind):
    tensors, mask, kwargs = make_call(spec_name, length, mask_kind)
    assert_matches_reference(tensors, mask, kwargs, 0.1)


@pytest.mark.parametrize(
    "case",
    [
        dict(spec_name="v3", length=300, mask_kind="holes", prefix=3, dropout_p=0.3),
        dict(spec_name="small_buckets", length=129, mask_kind="single", prefix=130, dropout_p=0.1),
        dict(spec_name="v3", length=129, mask_kind="right", pos_batch=3, strided=True, dropout_p=0.5),
        dict(spec_name="c2p_only", length=65, mask_kind="holes", value_dim=24, dropout_p=0.1),
    ],
    ids=lambda case: "-".join(f"{k}={v}" for k, v in case.items()),
)
def test_dropout_matches_reference_variants(case):
    case = dict(case)
    dropout_p = case.pop("dropout_p")
    tensors, mask, kwargs = make_call(case.pop("spec_name"), case.pop("length"), case.pop("mask_kind"), **case)
    assert_matches_reference(tensors, mask, kwargs, dropout_p)


def test_forward_and_backward_regenerate_exactly_the_oracle_mask():
    """With V = identity, out[i, k] = P_ik · z_ik: nonzero exactly where the forward kept (i, k); with dO = identity,
    dV[k, i] = P_ik · z_ik: nonzero exactly where the key-row backward pass kept it. Softmax probabilities of random
    scores are all > 0, so any difference in one decision shows."""
    batch, heads, length, prefix, dim, dropout_p = 2, 2, 150, 3, 16, 0.4
    tensors, _, kwargs = make_call("v3", length, "none", batch=batch, heads=heads, dim=dim, prefix=prefix)
    keys = prefix + length
    tensors[2] = torch.eye(keys).expand(batch, heads, keys, keys).clone().requires_grad_()
    torch.manual_seed(7)
    out, _ = disentangled_attention(*tensors, None, backend="cpu", dropout_p=dropout_p, **kwargs)
    torch.manual_seed(7)
    keep = attention_keep_mask(draw_seed(), batch, heads, length, keys, dropout_p)
    assert torch.equal(out.detach() != 0, keep)
    grad_out = torch.eye(length, keys).expand(batch, heads, length, keys)
    (dvalue,) = torch.autograd.grad(out, [tensors[2]], grad_out)
    assert torch.equal(dvalue[..., :length].transpose(-1, -2) != 0, keep)


def test_dropout_is_reproducible_under_manual_seed_and_advances_per_call():
    tensors, mask, kwargs = make_call("v3", 65, "holes")
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        first, _ = disentangled_attention(*tensors, mask, backend="cpu", dropout_p=0.2, **kwargs)
        second, _ = disentangled_attention(*tensors, mask, backend="cpu", dropout_p=0.2, **kwargs)
        runs.append((first, second))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[0][1]), "successive calls must draw new masks"


def test_dropout_is_bitwise_identical_for_one_and_two_threads():
    tensors, mask, kwargs = make_call("v3", 300, "holes", prefix=3, pos_batch=3)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out, grads, _, _ = native_with_mask(tensors, mask, kwargs, 0.1)
            results.append([out] + [g for g in grads if g is not None])
    finally:
        torch.set_num_threads(previous)
    for one, two in zip(*results):
        # Each output element has one owner and a fixed order of operations whatever the thread count.
        assert torch.equal(one, two)


def test_auto_takes_the_native_op_in_train_mode():
    tensors, mask, kwargs = make_call("v3", 7, "right")
    call = (*tensors, mask, kwargs["spec"], kwargs["softmax_scale"], 0.1, False, 0)
    assert attention_cpu.unsupported_reasons(*call) == []
    assert dispatch.select(OP_NAME, "auto", CANDIDATES, "cpu", *call) == "cpu"


def test_dropout_p_of_one_is_refused_with_the_reason():
    tensors, mask, kwargs = make_call("v3", 7, "right")
    with pytest.raises(dispatch.BackendUnavailable, match=r"dropout_p must be in \[0, 1\)"):
        disentangled_attention(*tensors, mask, backend="cpu", dropout_p=1.0, **kwargs)


# ------------------------------------------------------------------------------------------------------------------
# pair masks
# ------------------------------------------------------------------------------------------------------------------


def random_pair_mask(batch, mask_heads, length, *, seed=5, dtype=torch.bool):
    """[B, Hm, L, L]: random pairs (about 60 % valid), a fully masked query row and a block-diagonal part (whole
    128 x 128 tiles masked) in batch row 0."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, mask_heads, length, length, generator=generator) > 0.4
    mask[:, :, length // 2] = False
    if length > 128:
        mask[0, :, :128, 128:] = False
    return mask.to(dtype)


@pytest.mark.parametrize("dropout_p", (0.0, 0.2))
@pytest.mark.parametrize("mask_heads", (1, 2))
@pytest.mark.parametrize(
    "spec_name,length,prefix", [("v3", 1, 0), ("v3", 65, 0), ("v3", 300, 0), ("p2c_only", 129, 4), ("no_positions", 130, 0)]
)
def test_pair_masks_match_the_reference(spec_name, length, prefix, mask_heads, dropout_p):
    tensors, _, kwargs = make_call(spec_name, length, "none", prefix=prefix)
    mask = random_pair_mask(3, mask_heads, length)
    if dropout_p == 0.0:
        out, _ = disentangled_attention(*tensors, mask, backend="cpu", **kwargs)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        grads = torch.autograd.grad(out, tensors, grad_out, allow_unused=True)
        ref_out, _ = disentangled_attention(*tensors, mask, backend="reference", **kwargs)
        ref_grads = torch.autograd.grad(ref_out, tensors, grad_out, allow_unused=True)
    else:
        out, grads, keep, grad_out = native_with_mask(tensors, mask, kwargs, dropout_p)
        ref_out, ref_grads = reference_with_mask(tensors, mask, kwargs, dropout_p, keep, grad_out)
    assert_close_fp32(out, ref_out, "out")
    for name, grad, ref in zip(("query", "key", "value", "pos_key", "pos_query"), grads, ref_grads):
        assert_close_fp32(grad, ref, f"d{name}")


def test_pair_mask_of_a_token_mask_equals_the_token_mask():
    tensors, token_mask, kwargs = make_call("v3", 129, "right")
    pair = (token_mask[:, None, :, None] * token_mask[:, None, None, :]).float()  # float masks: nonzero = valid
    out, _ = disentangled_attention(*tensors, pair, backend="cpu", **kwargs)
    ref, _ = disentangled_attention(*tensors, token_mask, backend="cpu", **kwargs)
    assert_close_fp32(out, ref, "out")


def test_auto_takes_the_native_op_for_pair_masks():
    tensors, _, kwargs = make_call("v3", 7, "none")
    call = (*tensors, random_pair_mask(3, 1, 7), kwargs["spec"], kwargs["softmax_scale"], 0.0, False, 0)
    assert dispatch.select(OP_NAME, "auto", CANDIDATES, "cpu", *call) == "cpu"



def test_custom_op_with_pair_mask_and_dropout_passes_opcheck():
    tensors, _, kwargs = make_call("v3", 65, "none")
    from deberta_fast.ops.positions import distance_slot_table

    args = (*tensors, None, distance_slot_table(65, kwargs["spec"]), kwargs["softmax_scale"], 0,
            random_pair_mask(3, 2, 65), seed_tensor(99), 0.25)
    torch.library.opcheck(torch.ops.deberta_fast_cpu.disentangled_attention_forward.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_train_mode_model_runs_attention_on_the_native_op(monkeypatch):
    """A model in train mode with attention dropout sends every attention call to the native op under auto."""
    import deberta_fast
    import deberta_fast.ops.attention as attention_op
    from configs import make_config

    seen = []
    run = attention_cpu.run
    monkeypatch.setitem(attention_op._RUN, "cpu", lambda *call: seen.append(call[8]) or run(*call))
    config = make_config("v3", attention_probs_dropout_prob=0.1, hidden_dropout_prob=0.1)
    torch.manual_seed(0)
    model = deberta_fast.DebertaV2Model(config).train()
    ids = torch.randint(1, config.vocab_size, (2, 33))
    mask = torch.ones(2, 33, dtype=torch.long)
    mask[1, 20:] = 0
    with dispatch.use_backend("auto"):
        torch.manual_seed(1)
        first = model(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.manual_seed(1)
        again = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert seen and all(p == 0.1 for p in seen) and len(seen) == 2 * config.num_hidden_layers
    assert torch.equal(first, again)  # torch.manual_seed fixes the attention masks too
    first.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) > 10 and all(torch.isfinite(g).all() for g in grads)


def test_gradient_checkpointing_redraws_the_same_attention_masks():
    """Recomputation under activation checkpointing restores the RNG state, so the native op draws the same seed and
    the gradients equal those of the run without checkpointing."""
    import deberta_fast
    from configs import make_config

    config = make_config("v3", attention_probs_dropout_prob=0.2, hidden_dropout_prob=0.0)
    torch.manual_seed(0)
    model = deberta_fast.DebertaV2Model(config).train()
    ids = torch.randint(1, config.vocab_size, (2, 40))
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.zero_grad()
        torch.manual_seed(3)
        with dispatch.use_backend("cpu"):
            model(input_ids=ids).last_hidden_state.pow(2).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 10
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
