"""What every op of csrc/'s native library shares on the Python side: building the library and registering an op's
Python rules once, and the reasons and errors its ``cpu`` backend reports.

The library is one (``attention_cpu.extension``: built or loaded once per process, never at import); each op module
registers its own fake-tensor and autograd rules on top of it through ``registration``, once, on its first call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def registration(register: Callable[[], None]) -> Callable[[], str]:
    """The ``build_error()`` of one op: the first call builds or loads the native library and then runs ``register``
    (the op's ``torch.library`` fake-tensor and autograd rules) once; it returns "" when the op is ready, else why
    not. A constant for torch.compile."""

    @functools.lru_cache(maxsize=None)
    def registered() -> str:
        from . import attention_cpu  # attention_cpu imports this module; its extension() is looked up per call

        status = attention_cpu.extension()
        if not status.ok:
            return status.error
        register()
        return ""

    @torch.compiler.assume_constant_result
    def build_error() -> str:
        return registered()

    build_error.__doc__ = ("Empty when the native op is registered (with its Python rules), else why not (a constant "
                           "for torch.compile).")
    return build_error


def tensor_reasons(x: torch.Tensor) -> list[str]:
    """Why the native ops cannot take ``x``: not a CPU tensor, or a dtype they do not compute."""
    reasons = []
    if x.device.type != "cpu":
        reasons.append(f"it runs on CPU tensors; these are on {x.device}")
    if x.dtype not in SUPPORTED_DTYPES:
        reasons.append(f"dtype {x.dtype} is not supported (float32, bfloat16, float16 are)")
    return reasons


def with_build_reason(reasons: list[str], build_error: Callable[[], str]) -> list[str]:
    """``reasons`` when there are any; else the build error as the one reason (so the library is only built for a
    call it could serve), or none."""
    if reasons:
        return reasons
    error = build_error()
    return [f"the native CPU op could not be built ({error})"] if error else []


def require_built(op: str, build_error: Callable[[], str]) -> None:
    """Raise RuntimeError naming ``op`` when the native op cannot run (a backend called without its reasons check)."""
    error = build_error()
    if error:
        raise RuntimeError(f"the native CPU op of {op} could not be built: {error}")
