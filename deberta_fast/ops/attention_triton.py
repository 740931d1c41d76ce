"""Triton backend of disentangled attention (CUDA). Not built in this version yet."""

from __future__ import annotations


def unsupported_reasons(*call) -> list[str]:
    """Why the triton backend cannot serve ``call`` (the argument tuple of ``disentangled_attention``)."""
    return ["the triton backend of disentangled attention is not built in this version"]


def run(*call):
    raise RuntimeError("the triton backend of disentangled attention is not built in this version")
