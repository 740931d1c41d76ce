"""Backend selection shared by every op: ``auto | reference | triton | cpu``.

The backend is chosen, in this order, by the ``backend=`` argument of a call (or a module's ``backend``
attribute), the innermost ``use_backend(...)`` context, the ``DEBERTA_FAST_BACKEND`` environment variable,
and finally ``auto``. ``auto`` walks the op's candidates fastest first and takes the first that can serve the
call among those made for the tensors' device; it logs once why it skipped one of them. An explicitly requested
backend that cannot serve the call raises :class:`BackendUnavailable` with every reason.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

logger = logging.getLogger("deberta_fast")

BACKENDS = ("auto", "reference", "triton", "cpu")
ENV_VAR = "DEBERTA_FAST_BACKEND"

_context_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("deberta_fast_backend", default=None)


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot serve a call."""


def check_backend_name(name: str, source: str = "backend") -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside the block on ``name`` unless a call asks for a backend itself."""
    token = _context_backend.set(check_backend_name(name))
    try:
        yield
    finally:
        _context_backend.reset(token)


def requested_backend(explicit: str | None = None) -> str:
    """The backend a call asks for: argument, then context, then environment, then ``auto``."""
    if explicit is not None:
        return check_backend_name(explicit)
    from_context = _context_backend.get()
    if from_context is not None:
        return from_context
    from_env = os.environ.get(ENV_VAR)
    if from_env:
        return check_backend_name(from_env.strip(), source=f"environment variable {ENV_VAR}")
    return "auto"


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
def log_once(level: int, message: str) -> None:
    """Log each distinct message once per process."""
    logger.log(level, message)


def select(op_name: str, requested: str, candidates: Sequence[Candidate], device_type: str, *call) -> str:
    """Name of the backend that runs this call (see module docstring)."""
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
