"""Backend selection shared by every op: ``auto | reference | triton | cpu``.

The backend is chosen, in this order, by the ``backend=`` argument of a call (or a module's ``backend``
attribute), the innermost ``use_backend(...)`` context, the ``DEBERTA_FAST_BACKEND`` environment variable,
and finally ``auto``. ``auto`` walks the op's candidates fastest first and takes the first that can serve the
call among those made for the tensors' device; it logs once why it skipped one of them. An explicitly requested
backend that cannot serve the call raises :class:`BackendUnavailable` with every reason.

A backend that fails while it runs (a kernel that does not compile, a launch error, a native op that does not
load) is, under ``auto``, logged once with the error and never tried again for that call signature
(:class:`OpDispatcher`); the next candidate serves the call. Explicitly requested, the error propagates.

torch.compile / torch.export: every decision here is plain Python over shapes, dtypes, devices and arguments,
never tensor data. The ``use_backend`` choice is read through a C-level property, which dynamo evaluates while
tracing and guards on (a compiled model recompiles when the choice changes); ``ContextVar.get`` itself is not
traceable. The environment variable is read when a graph is traced: a compiled graph keeps that value.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.utils.checkpoint

logger = logging.getLogger("deberta_fast")

BACKENDS = ("auto", "reference", "triton", "cpu")
ENV_VAR = "DEBERTA_FAST_BACKEND"

# A context variable, not a thread-local: asyncio tasks keep their own choice. A new thread starts with an empty
# context, so it does not see the use_backend(...) of the thread that started it. No default: it is read through
# _ContextView, whose property passes the view itself as ContextVar.get's default, so "unset" reads as the view.
_context_backend: contextvars.ContextVar[str] = contextvars.ContextVar("deberta_fast_backend")


class _ContextView:
    # property(<builtin method>) is a C-level descriptor: dynamo evaluates it while tracing and installs a guard that
    # re-reads it (in the caller's context) before reusing a compiled graph; ContextVar.get() is not traceable.
    __slots__ = ()
    backend = property(_context_backend.get)


_CONTEXT_VIEW = _ContextView()


def _context_choice() -> str | None:
    value = _CONTEXT_VIEW.backend
    return None if value is _CONTEXT_VIEW else value


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot serve a call."""


def check_backend_name(name: str, source: str = "backend") -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside the block on ``name`` unless a call asks for a backend itself.

    The choice follows contextvars: it holds in this thread (and asyncio task) inside the block; a thread started
    inside the block does not inherit it (run its work under its own ``use_backend``, or copy the context with
    ``contextvars.copy_context().run``).
    """
    token = _context_backend.set(check_backend_name(name))
    try:
        yield
    finally:
        _context_backend.reset(token)


@torch.compiler.assume_constant_result
def _environment_backend() -> str:
    # Constant for a compiled graph: dynamo calls this once while tracing (os.environ is not guarded).
    from_env = os.environ.get(ENV_VAR)
    if from_env:
        return check_backend_name(from_env.strip(), source=f"environment variable {ENV_VAR}")
    return "auto"


def requested_backend(explicit: str | None = None) -> str:
    """The backend a call asks for: argument, then context, then environment, then ``auto``."""
    if explicit is not None:
        return check_backend_name(explicit)
    from_context = _context_choice()
    if from_context is not None:
        return from_context
    return _environment_backend()


@dataclass(frozen=True)
class Candidate:
    """One backend of an op.

    device_type: the device its kernels are for ("cuda", "cpu") or None for any device. ``auto`` considers a
    backend only for tensors on its device, and logs once (warning) why it skipped one that was meant for them.
    reasons: returns why it cannot serve a call; empty when it can.
    """

    name: str
    device_type: str | None
    reasons: Callable[..., Sequence[str]]


@functools.lru_cache(maxsize=256)
def _log_once_cached(level: int, message: str) -> None:
    logger.log(level, message)


@torch.compiler.assume_constant_result
def log_once(level: int, message: str) -> None:
    """Log each distinct message once per process (under torch.compile: while tracing, without a graph break)."""
    _log_once_cached(level, message)


@torch.compiler.assume_constant_result
def module_available(name: str) -> bool:
    """Whether ``import name`` can find the module (a Python constant for torch.compile)."""
    import importlib.util

    return importlib.util.find_spec(name) is not None


def select(op_name: str, requested: str, candidates: Sequence[Candidate], device_type: str, *call) -> str:
    """Name of the backend that runs this call (see module docstring); ``OpDispatcher`` also runs it."""
    by_name = {c.name: c for c in candidates}
    if requested != "auto":
        if requested not in by_name:
            raise BackendUnavailable(f"{op_name}: backend {requested!r} does not implement this op")
        reasons = list(by_name[requested].reasons(*call))
        if reasons:
            raise BackendUnavailable(f"{op_name}: backend {requested!r} cannot run this call: " + "; ".join(reasons))
        return requested
    for candidate in candidates:
        if candidate.device_type not in (None, device_type):
            # auto never sends tensors to a backend made for another device (the Triton interpreter can run CUDA
            # kernels on CPU tensors, slowly: only an explicit request takes it there).
            continue
        reasons = list(candidate.reasons(*call))
        if not reasons:
            return candidate.name
        log_once(logging.WARNING, f"{op_name}: auto skipped backend {candidate.name!r}: " + "; ".join(reasons))
    raise BackendUnavailable(f"{op_name}: no backend can run this call")


def default_signature(device_type: str, *call) -> tuple:
    """What makes two calls of an op the same kernel build: device, and per argument its dtype and rank (tensors)
    and last dimension (the head dim / features a kernel is specialised for), or its value (bool / int / float / str /
    None / frozen dataclass, as the kernels' constexprs). Other sizes are left out on purpose: they change every
    batch and do not change which kernel is built."""
    parts: list = [device_type]
    for arg in call:
        if isinstance(arg, torch.Tensor):
            last = arg.shape[-1] if arg.dim() else None
            parts.append((arg.dtype, arg.dim(), last if isinstance(last, int) else None))
        elif arg is None or isinstance(arg, (bool, str)):
            parts.append(arg)
        elif isinstance(arg, (int, float)):
            parts.append(arg)
        elif isinstance(arg, (tuple, list)):
            parts.append(default_signature(device_type, *arg)[1:])
        elif dataclasses.is_dataclass(arg) and arg.__dataclass_params__.frozen:
            parts.append(arg)  # e.g. the RelativePositionSpec: its fields are the kernels' constexprs
        else:
            parts.append(type(arg).__name__)
    return tuple(parts)


def _is_fallback_error(error: BaseException) -> bool:
    # Out of memory is not a broken kernel: a slower backend would need at least as much memory. Non-reentrant
    # activation checkpointing stops a recomputation by raising from inside whichever op saves its last tensor:
    # control flow that must reach the checkpoint, not a failure of that op's backend.
    stop_recomputation = getattr(torch.utils.checkpoint, "_StopRecomputationError", ())
    return isinstance(error, Exception) and not isinstance(error, (torch.OutOfMemoryError, stop_recomputation))


class OpDispatcher:
    """Runs one op on the backend ``select`` picks, and remembers backends that failed at run time.

    ``run[name](*call)`` runs backend ``name``. Under ``auto``, an exception raised by a backend or by its check (a
    Triton kernel that does not compile or launch, a native op that does not build or load) is logged once with the
    error, the pair (backend, ``signature(device_type, *call)``) is remembered in this object, and the next
    candidate serves the call (and every later call of that signature). The last candidate left (the reference)
    has nothing to fall back to: its errors propagate and are not remembered; so do out-of-memory errors. An
    explicitly requested backend's error propagates unchanged. Only the forward is covered: a backward kernel that
    fails raises from ``backward()``.

    Under torch.compile the remembered failures are read (the graph uses the backend eager would use) but a
    failure inside a compiled graph raises: the graph is fixed once traced.
    """

    def __init__(self, op_name: str, candidates: Sequence[Candidate], run: Mapping[str, Callable],
                 signature: Callable[..., tuple] = default_signature):
        self.op_name = op_name
        self.candidates = tuple(candidates)
        self.run = run  # looked up at call time, so a test can replace one entry
        self.signature = signature
        self._failed: dict[tuple, dict[str, str]] = {}
        self._lock = threading.Lock()

    def failures(self) -> dict[tuple, dict[str, str]]:
        """signature -> {backend: error} of every recorded run-time failure (a copy)."""
        with self._lock:
            return {key: dict(value) for key, value in self._failed.items()}

    def __call__(self, backend: str | None, device_type: str, *call):
        requested = requested_backend(backend)
        if requested != "auto":
            return self.run[select(self.op_name, requested, self.candidates, device_type, *call)](*call)
        signature = self.signature(device_type, *call)
        failed = self._failed.get(signature, {})
        # auto never sends tensors to a backend made for another device (see select).
        eligible = [c for c in self.candidates if c.device_type in (None, device_type) and c.name not in failed]
        compiling = torch.compiler.is_compiling()
        for index, candidate in enumerate(eligible):
            if compiling or index == len(eligible) - 1:
                # The last resort's errors are the call's errors (never remembered); a graph being traced cannot
                # catch what its kernels raise later, at run time.
                reasons = list(candidate.reasons(*call))
                if not reasons:
                    return self.run[candidate.name](*call)
                self._log_skip(candidate, reasons)
                continue
            try:
                reasons = list(candidate.reasons(*call))
                if not reasons:
                    return self.run[candidate.name](*call)
            except Exception as error:
                if not _is_fallback_error(error):
                    raise
                self._record_failure(signature, candidate.name, error)
                continue
            self._log_skip(candidate, reasons)
        raise BackendUnavailable(f"{self.op_name}: no backend can run this call")

    def _log_skip(self, candidate: Candidate, reasons: Sequence[str]) -> None:
        log_once(logging.WARNING, f"{self.op_name}: auto skipped backend {candidate.name!r}: " + "; ".join(reasons))

    def _record_failure(self, signature: tuple, backend: str, error: Exception) -> dict[str, str]:
        message = " ".join(f"{type(error).__name__}: {error}".split())
        if len(message) > 2000:
            message = message[:2000] + " ..."
        with self._lock:
            failed = dict(self._failed.get(signature, {}))
            first = backend not in failed
            failed[backend] = message
            self._failed[signature] = failed
        if not first:  # another thread failed on the same signature at the same time and logged it
            return failed
        logger.warning(
            "%s: backend %r failed for calls of signature %s; auto uses the next backend for them from now on. "
            "Error: %s", self.op_name, backend, signature, message,
        )
        return failed
