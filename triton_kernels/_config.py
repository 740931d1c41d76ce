"""Launch settings shared by the adapter kernels: interpreter detection, dot dtypes, autotune configs.

Under ``TRITON_INTERPRET=1`` bf16 arithmetic is wrong (values are held as raw uint16), so kernels upcast what
they load to fp32 there; on a GPU they feed ``tl.dot`` the input dtype (fp32 inputs use exact "ieee" dots,
not TF32). Every autotuned kernel lists one small interpreter config first; ``prune_for_device`` keeps only it
when interpreting and drops it otherwise, at call time, so importing a kernel module does no work.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_dtype(dtype: torch.dtype):
    """The dtype ``tl.dot`` operands are cast to for inputs of ``dtype``."""
    if interpreting() and dtype == torch.bfloat16:
        return tl.float32
    return _TL_DTYPES[dtype]


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots in full precision ("ieee"); the setting is ignored for fp16/bf16 operands."""
    return "ieee" if dot_dtype(dtype) == tl.float32 else "tf32"


def interpreter_config(**meta) -> triton.Config:
    config = triton.Config(dict(meta), num_warps=4, num_stages=1)
    config.interpreter_only = True
    return config


def prune_for_device(configs, named_args, **kwargs):
    """``early_config_prune`` hook: the interpreter config alone when interpreting, the others on a GPU."""
    wanted = interpreting()
    kept = [c for c in configs if getattr(c, "interpreter_only", False) == wanted]
    return kept or list(configs[:1])


def bucket(n: int) -> int:
    """Power-of-two bucket of a row count: the autotune key, so a new batch shape does not re-tune."""
    return triton.next_power_of_2(max(int(n), 1))
