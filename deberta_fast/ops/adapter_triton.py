"""Triton backends of the adapter ops (LoRA linear, IA³ linear, bottleneck). Not built in this version yet."""

from __future__ import annotations

_NOT_BUILT = "the triton adapter kernels are not built in this version"


def lora_linear_reasons(*call) -> list[str]:
    return [_NOT_BUILT]


def ia3_linear_reasons(*call) -> list[str]:
    return [_NOT_BUILT]


def bottleneck_reasons(*call) -> list[str]:
    return [_NOT_BUILT]


def lora_linear(*call):
    raise RuntimeError(_NOT_BUILT)


def ia3_linear(*call):
    raise RuntimeError(_NOT_BUILT)


def bottleneck(*call):
    raise RuntimeError(_NOT_BUILT)
