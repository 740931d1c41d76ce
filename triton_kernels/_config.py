"""Launch settings shared by the adapter kernels: interpreter detection, dot dtypes, autotune configs.

Under ``TRITON_INTERPRET=1`` bf16 arithmetic is wrong (values are held as raw uint16), so kernels upcast what
they load to fp32 there; on a GPU they feed ``tl.dot`` the input dtype (fp32 inputs use exact "ieee" dots,
not TF32). Every autotuned kernel has three config lists, chosen at call time by ``prune_by_dtype``: one small
config for the interpreter, tensor-core tiles for fp16/bf16, and small tiles for exact fp32 (FMA dots, whose
large tiles spill registers and take minutes to compile). ``DEBERTA_FAST_AUTOTUNE=0`` keeps only the first
config of a list (correctness runs that should not pay for tuning); ``DEBERTA_FAST_AUTOTUNE_CONFIG=i`` keeps the i-th
(modulo the list's length).
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


def make_configs(interpreter: dict, half, fp32) -> list[triton.Config]:
    """Configs tagged with the inputs they are for. half / fp32: lists of (meta dict, num_warps, num_stages)."""
    configs = [triton.Config(dict(interpreter), num_warps=4, num_stages=1)]
    configs[0].kind = "interpreter"
    for kind, entries in (("half", half), ("fp32", fp32)):
        for meta, warps, stages in entries:
            config = triton.Config(dict(meta), num_warps=warps, num_stages=stages)
            config.kind = kind
            configs.append(config)
    return configs


def prune_by_dtype(tensor_arg: str):
    """``early_config_prune`` hook choosing the config list by the dtype of the kernel argument ``tensor_arg``."""

    def prune(configs, named_args, **kwargs):
        if interpreting():
            kind = "interpreter"
        else:
            kind = "fp32" if named_args[tensor_arg].dtype == torch.float32 else "half"
        kept = [c for c in configs if getattr(c, "kind", None) == kind] or list(configs[:1])
        if os.environ.get("DEBERTA_FAST_AUTOTUNE", "1") == "0":
            kept = kept[:1]
        pick = os.environ.get("DEBERTA_FAST_AUTOTUNE_CONFIG")
        if pick is not None:
            # One config of the list (index modulo its length): the compile-only tests spread the configs over
            # their cases instead of compiling every config in every case.
            kept = [kept[int(pick) % len(kept)]]
        return kept

    return prune


def bucket(n: int) -> int:
    """Power-of-two bucket of a row count: the autotune key, so a new batch shape does not re-tune."""
    return triton.next_power_of_2(max(int(n), 1))
