"""auto never crashes a model because a kernel failed to build or launch (issue 11, item 4).

Kernels are made to fail inside the tests: the Triton launcher's kernel object (the launch raises what Triton raises
for a jit function that reads a non-constexpr global), and the native CPU op's loader and entry point. ``auto``
must log the first failure of a backend for a call signature once, with the error, serve the call (and later calls
of that signature) on the next candidate, and try the failed backend again for another signature; an explicitly
requested backend raises with the kernel's message.
"""

from __future__ import annotations

import importlib
import logging

import pytest
import torch
from configs import make_config

import deberta_fast
from deberta_fast.ops import attention, attention_cpu, dispatch, disentangled_attention
from deberta_fast.ops.positions import RelativePositionSpec

SPEC = RelativePositionSpec(c2p=True, p2c=True, position_buckets=8, max_relative_positions=24)
COMPILER_MESSAGE = "Cannot access global variable NEG_INIT from within @jit'ed function (simulated)"


@pytest.fixture
def fresh_dispatch(monkeypatch):
    """The attention op with a dispatcher that remembers nothing yet (the module's own keeps its state)."""
    dispatcher = dispatch.OpDispatcher(attention.OP_NAME, attention.CANDIDATES, attention._RUN)
    monkeypatch.setattr(attention, "_DISPATCH", dispatcher)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    return dispatcher


def _inputs(head_dim=8, dtype=torch.float32, length=11, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 2, length, head_dim, generator=generator, dtype=dtype) for _ in range(3))
    pk, pq = (torch.randn(1, 2, SPEC.num_slots, head_dim, generator=generator, dtype=dtype) for _ in range(2))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, length - 4:] = 0
    return (q, k, v, pk, pq, mask)


def _call(inputs, **kwargs):
    return disentangled_attention(*inputs, spec=SPEC, softmax_scale=0.3, **kwargs)[0]


def _messages(caplog, needle):
    return [r for r in caplog.records if needle in r.getMessage()]


def test_native_op_that_fails_at_run_time_falls_back_once_per_signature(monkeypatch, fresh_dispatch, caplog):
    calls = []

    def broken_native_op(*call):
        calls.append(call[0].shape[-1])
        raise RuntimeError("undefined symbol: _ZN2at6native (simulated load failure)")

    monkeypatch.setitem(attention._RUN, "cpu", broken_native_op)
    first, second = _inputs(head_dim=8), _inputs(head_dim=16, seed=1)
    with caplog.at_level(logging.WARNING, logger="deberta_fast"):
        for _ in range(3):
            got = _call(first)
            torch.testing.assert_close(got, _call(first, backend="reference"), rtol=0, atol=0)
        assert calls == [8], "the failed backend must not be tried again for the same signature"
        _call(second)  # another head dim: another signature, the native op is tried once more
    assert calls == [8, 16]
    logged = _messages(caplog, "backend 'cpu' failed")
    assert len(logged) == 2 and all("simulated load failure" in r.getMessage() for r in logged)
    assert logged[0].levelno == logging.WARNING
    assert len(fresh_dispatch.failures()) == 2
    with pytest.raises(RuntimeError, match="simulated load failure"):
        _call(first, backend="cpu")


def test_native_op_loader_that_raises_falls_back(monkeypatch, fresh_dispatch, caplog):
    """A loader that raises (rather than reporting a build error) is a failure of that backend, not of the call."""
    def loader():
        raise OSError("libgomp.so.1: cannot open shared object file (simulated)")

    monkeypatch.setattr(attention_cpu, "extension", loader)
    inputs = _inputs()
    with caplog.at_level(logging.WARNING, logger="deberta_fast"):
        got = _call(inputs)
        _call(inputs)
    torch.testing.assert_close(got, _call(inputs, backend="reference"), rtol=0, atol=0)
    assert len(_messages(caplog, "cannot open shared object file (simulated)")) == 1
    with pytest.raises(OSError, match="cannot open shared object file"):
        _call(inputs, backend="cpu")


def test_native_op_build_error_is_a_reason_logged_once_and_raised_when_requested(monkeypatch, fresh_dispatch,
                                                                                  caplog):
    from deberta_fast.ops.attention_cpu import BuildStatus

    monkeypatch.setattr(attention_cpu, "extension", lambda: BuildStatus(error="g++: not found (simulated)"))
    inputs = _inputs(head_dim=12)
    with caplog.at_level(logging.WARNING, logger="deberta_fast"):
        for _ in range(2):
            got = _call(inputs)
    torch.testing.assert_close(got, _call(inputs, backend="reference"), rtol=0, atol=0)
    assert len(_messages(caplog, "g++: not found (simulated)")) == 1
    with pytest.raises(dispatch.BackendUnavailable, match=r"could not be built \(g\+\+: not found \(simulated\)\)"):
        _call(inputs, backend="cpu")


class _KernelThatDoesNotCompile:
    """Stands in for a @triton.jit function: ``kernel[grid](...)`` raises as Triton's front end does."""

    def __init__(self):
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            raise NameError(COMPILER_MESSAGE)

        return launch


def test_triton_kernel_that_fails_to_compile_falls_back(monkeypatch, fresh_dispatch, caplog):
    """The production launcher runs up to the launch, which raises; auto (called for a CUDA device, the tensors
    are CPU tensors that the Triton interpreter could run) serves the call on the next candidate for CUDA, the
    reference, and remembers the failure for the signature; an explicit request raises the compiler's message."""
    launcher = importlib.import_module("deberta_fast.triton_kernels.disentangled_attention_fwd")
    kernel = _KernelThatDoesNotCompile()
    monkeypatch.setattr(launcher, "_disentangled_fwd_kernel", kernel)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    inputs = _inputs(head_dim=16)
    call = (*inputs, SPEC, 0.3, 0.0, False, 0)
    with caplog.at_level(logging.WARNING, logger="deberta_fast"):
        for _ in range(2):
            out, _ = fresh_dispatch(None, "cuda", *call)
    assert kernel.launches == 1
    torch.testing.assert_close(out, _call(inputs, backend="reference"), rtol=0, atol=0)
    logged = _messages(caplog, "backend 'triton' failed")
    assert len(logged) == 1 and COMPILER_MESSAGE in logged[0].getMessage()
    ((signature, failed),) = fresh_dispatch.failures().items()
    assert signature[0] == "cuda" and list(failed) == ["triton"]
    with pytest.raises(NameError, match="NEG_INIT"):
        fresh_dispatch("triton", "cuda", *call)


def test_last_candidate_errors_propagate_and_are_not_remembered(monkeypatch, fresh_dispatch):
    def broken(*call):
        raise RuntimeError("reference failed (simulated)")

    monkeypatch.setitem(attention._RUN, "reference", broken)
    inputs = _inputs()
    with dispatch.use_backend("auto"), pytest.raises(RuntimeError, match="reference failed"):
        # output_attentions: only the reference serves it, so it is the last (and only) candidate left
        disentangled_attention(*inputs, spec=SPEC, softmax_scale=0.3, output_attentions=True)
    assert fresh_dispatch.failures() == {}


def test_out_of_memory_is_not_a_broken_kernel(monkeypatch, fresh_dispatch):
    def out_of_memory(*call):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setitem(attention._RUN, "cpu", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        _call(_inputs())
    assert fresh_dispatch.failures() == {}


def test_model_forward_survives_a_failing_native_op(monkeypatch, fresh_dispatch):
    """End to end: a model on auto gives the reference backend's output when the native op raises."""
    torch.manual_seed(0)
    model = deberta_fast.DebertaV2ForSequenceClassification(make_config("v3")).eval()
    ids = torch.randint(1, 97, (2, 10))
    # The attention on the reference, every other op (the fused output blocks) on auto, as in the run below.
    deberta_fast.set_attention_backend(model, "reference")
    with dispatch.use_backend("auto"):
        expected = model(input_ids=ids).logits
    deberta_fast.set_attention_backend(model, None)

    def broken_native_op(*call):
        raise RuntimeError("simulated launch failure")

    monkeypatch.setitem(attention._RUN, "cpu", broken_native_op)
    with dispatch.use_backend("auto"):
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with dispatch.use_backend("cpu"), pytest.raises(RuntimeError, match="simulated launch failure"):
        model(input_ids=ids)
