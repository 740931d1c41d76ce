"""Backend selection: argument, context manager, environment, auto; explicit requests that cannot run raise."""

from __future__ import annotations

import logging

import pytest
import torch

from deberta_fast.ops import BackendUnavailable, disentangled_attention, requested_backend, use_backend
from deberta_fast.ops import dispatch


def test_precedence(monkeypatch):
    monkeypatch.delenv("DEBERTA_FAST_BACKEND", raising=False)
    assert requested_backend() == "auto"
    monkeypatch.setenv("DEBERTA_FAST_BACKEND", "reference")
    assert requested_backend() == "reference"
    with use_backend("cpu"):
        assert requested_backend() == "cpu"
        assert requested_backend("triton") == "triton"
        with use_backend("reference"):
            assert requested_backend() == "reference"
        assert requested_backend() == "cpu"


def _always(reasons):
    return lambda *call: reasons


def test_auto_takes_the_first_backend_that_can_run_and_logs_skips_once(caplog):
    candidates = (
        dispatch.Candidate("triton", "cpu", _always(["kernel not ready (test)"])),
        dispatch.Candidate("reference", None, _always([])),
    )
    with caplog.at_level(logging.DEBUG, logger="deberta_fast"):
        for _ in range(3):
            assert dispatch.select("test_op_a", "auto", candidates, "cpu") == "reference"
    skipped = [r for r in caplog.records if "kernel not ready (test)" in r.getMessage()]
    assert len(skipped) == 1 and skipped[0].levelno == logging.WARNING


def test_skip_of_a_backend_for_another_device_is_quiet(caplog):
    candidates = (
        dispatch.Candidate("triton", "cuda", _always(["needs CUDA tensors (test)"])),
        dispatch.Candidate("reference", None, _always([])),
    )
    with caplog.at_level(logging.INFO, logger="deberta_fast"):
        assert dispatch.select("test_op_b", "auto", candidates, "cpu") == "reference"
    assert not [r for r in caplog.records if "needs CUDA tensors (test)" in r.getMessage()]


def test_explicit_backend_that_cannot_run_raises_with_reasons():
    candidates = (dispatch.Candidate("cpu", "cpu", _always(["reason one", "reason two"])),)
    with pytest.raises(BackendUnavailable, match="backend 'cpu' cannot run this call: reason one; reason two"):
        dispatch.select("test_op_c", "cpu", candidates, "cpu")
    with pytest.raises(BackendUnavailable, match="does not implement this op"):
        dispatch.select("test_op_c", "triton", candidates, "cpu")


def test_auto_never_sends_cpu_tensors_to_triton(monkeypatch):
    """Even when the Triton interpreter could run them (TRITON_INTERPRET=1), auto keeps CPU tensors off triton."""
    from deberta_fast.ops import attention

    def refuse(*call):
        raise AssertionError("auto chose the triton backend for CPU tensors")

    monkeypatch.setitem(attention._RUN, "triton", refuse)
    q = torch.randn(1, 2, 8, 16)
    out, _ = disentangled_attention(q, q, q, spec=None, softmax_scale=0.25)
    assert out.shape == q.shape


def test_reference_backend_by_context():
    q = torch.randn(1, 2, 8, 16)
    with use_backend("reference"):
        out, probs = disentangled_attention(q, q, q, spec=None, softmax_scale=0.25)
    expected = torch.softmax(q @ q.transpose(-1, -2) * 0.25, -1) @ q
    torch.testing.assert_close(out, expected)
    assert probs is None


def test_a_thread_started_inside_use_backend_does_not_inherit_it(monkeypatch):
    """contextvars semantics, as the README says: a new thread starts from an empty context (environment, then
    auto); copying the context carries the choice over."""
    import contextvars
    import threading

    monkeypatch.delenv("DEBERTA_FAST_BACKEND", raising=False)
    seen = {}

    def record(key):
        seen[key] = requested_backend()

    with use_backend("reference"):
        plain = threading.Thread(target=record, args=("plain",))
        copied = threading.Thread(target=contextvars.copy_context().run, args=(record, "copied"))
        for thread in (plain, copied):
            thread.start()
            thread.join()
        assert requested_backend() == "reference"
    assert seen == {"plain": "auto", "copied": "reference"}
    assert requested_backend() == "auto"
