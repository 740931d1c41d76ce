"""Triton backend of the adapter ops: why a call cannot run (``*_reasons``) and how it runs.

Each ``*_reasons(*call)`` takes the dispatch call tuple of its op (``lora.py``, ``lora_qkv.py``, ``ia3.py``,
``bottleneck.py``) and returns what stops the kernels (empty when they can serve the call); the run functions
take the same tuple. The kernels run on CUDA tensors, and on CPU tensors only under ``TRITON_INTERPRET=1``
(tests) and only when the triton backend is asked for explicitly: ``auto`` never picks a backend meant for
another device (``dispatch.select``). Under ``torch.autocast`` the floating-point inputs are cast to the autocast
dtype first, as autocast does for a linear layer (mixed-precision training keeps fp32 adapter weights; their
gradients flow back through the cast). The custom ops behind the run functions live in ``lora_triton.py``,
``ia3_triton.py`` and ``bottleneck_triton.py``.
"""

from __future__ import annotations

import os

import torch

from .dispatch import module_available

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_LORA_RANK = 64  # the kernels keep an [rows, rank] fp32 accumulator in registers
BOTTLENECK_ACTIVATIONS = ("relu", "gelu", "swish", "silu", "tanh")


def _autocast_dtype(device_type: str):
    """The dtype autocast casts linear-layer inputs to on this device, or None outside autocast."""
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _autocast(*tensors):
    """The tensors cast to the autocast dtype of their device (unchanged outside autocast)."""
    ref = next(t for t in tensors if isinstance(t, torch.Tensor))
    dtype = _autocast_dtype(ref.device.type)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


def _tensor_reasons(named: dict, reference_name: str) -> list[str]:
    """Device, dtype and availability reasons shared by every adapter op."""
    reasons = []
    if not module_available("triton"):
        return ["triton is not installed"]
    ref = named[reference_name]
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if ref.device.type != "cuda" and not (ref.device.type == "cpu" and interpreting):
        reasons.append(f"{reference_name} is on {ref.device.type}: the triton kernels need CUDA tensors "
                       "(CPU tensors run only under TRITON_INTERPRET=1, for tests)")
    autocast_dtype = _autocast_dtype(ref.device.type)
    if autocast_dtype is not None:
        if autocast_dtype not in _DTYPES:
            reasons.append(f"autocast dtype {autocast_dtype}; the kernels take float16, bfloat16 or float32")
    elif ref.dtype not in _DTYPES:
        reasons.append(f"{reference_name} has dtype {ref.dtype}; the kernels take float16, bfloat16 or float32")
    for name, tensor in named.items():
        if tensor is None or name == reference_name:
            continue
        if tensor.device != ref.device:
            reasons.append(f"{name} is on {tensor.device} but {reference_name} on {ref.device}")
        if autocast_dtype is None and tensor.dtype != ref.dtype:
            reasons.append(f"{name} has dtype {tensor.dtype} but {reference_name} {ref.dtype}")
    return reasons


def _rank_reasons(prefix: str, lora_A) -> list[str]:
    if lora_A.shape[0] > MAX_LORA_RANK:
        return [f"{prefix}LoRA rank {lora_A.shape[0]} > {MAX_LORA_RANK} (the fused kernels keep the rank in registers)"]
    return []


# ---------------------------------------------------------------------------------------------------- LoRA


def lora_linear_reasons(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, seed=None) -> list[str]:
    named = dict(x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)
    return _tensor_reasons(named, "x") + _rank_reasons("", lora_A)


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, seed=None):
    from . import lora_triton

    x, weight, bias, lora_A, lora_B = _autocast(x, weight, bias, lora_A, lora_B)
    return lora_triton.run(x, [weight], [bias], [lora_A], [lora_B], [scaling], dropout_p, seed)[0]


def lora_qkv_reasons(x, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, q_lora=None, k_lora=None,
                     v_lora=None, dropout_p=0.0, seed=None) -> list[str]:
    named = dict(x=x, q_weight=q_weight, q_bias=q_bias, k_weight=k_weight, k_bias=k_bias, v_weight=v_weight,
                 v_bias=v_bias)
    reasons = []
    for name, lora in (("q", q_lora), ("k", k_lora), ("v", v_lora)):
        if lora is not None:
            named[f"{name}_lora A"], named[f"{name}_lora B"] = lora[0], lora[1]
            reasons += _rank_reasons(f"{name}: ", lora[0])
    return _tensor_reasons(named, "x") + reasons


def lora_qkv(x, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, q_lora=None, k_lora=None, v_lora=None,
             dropout_p=0.0, seed=None):
    from . import lora_triton

    loras = [None if lora is None else (*_autocast(x, lora[0], lora[1])[1:], lora[2])
             for lora in (q_lora, k_lora, v_lora)]
    x, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias = _autocast(x, q_weight, q_bias, k_weight, k_bias,
                                                                        v_weight, v_bias)
    y = lora_triton.run(
        x, [q_weight, k_weight, v_weight], [q_bias, k_bias, v_bias],
        [lora[0] if lora is not None else None for lora in loras],
        [lora[1] if lora is not None else None for lora in loras],
        [float(lora[2]) if lora is not None else 0.0 for lora in loras], dropout_p, seed,
    )
    return tuple(y.unbind(0))


# ----------------------------------------------------------------------------------------------------- IA³


def ia3_linear_reasons(x, weight, bias, scale) -> list[str]:
    return _tensor_reasons(dict(x=x, weight=weight, bias=bias, scale=scale), "x")


def ia3_linear(x, weight, bias, scale):
    from . import ia3_triton

    return ia3_triton.run(*_autocast(x, weight, bias, scale))


# ---------------------------------------------------------------------------------------------- bottleneck


def bottleneck_reasons(x, down_weight, down_bias, up_weight, up_bias, residual, activation, scaling) -> list[str]:
    named = dict(x=x, down_weight=down_weight, down_bias=down_bias, up_weight=up_weight, up_bias=up_bias,
                 residual=residual)
    reasons = _tensor_reasons(named, "x")
    if activation not in BOTTLENECK_ACTIVATIONS:
        reasons.append(f"activation {activation!r} has no kernel (kernels: {', '.join(BOTTLENECK_ACTIVATIONS)})")
    if isinstance(scaling, torch.Tensor):
        if scaling.numel() not in (1, x.shape[-1]):
            reasons.append(f"scaling tensor must have 1 or {x.shape[-1]} entries; got {tuple(scaling.shape)}")
        if scaling.device != x.device:
            reasons.append(f"scaling is on {scaling.device} but x on {x.device}")
    return reasons


def bottleneck(x, down_weight, down_bias, up_weight, up_bias, residual, activation, scaling):
    from . import bottleneck_triton

    x, down_weight, down_bias, up_weight, up_bias, residual = _autocast(x, down_weight, down_bias, up_weight, up_bias,
                                                                         residual)
    return bottleneck_triton.run(x, down_weight, down_bias, up_weight, up_bias, residual, activation, scaling)
