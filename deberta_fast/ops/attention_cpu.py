"""Native CPU backend of disentangled attention (csrc/). Not built in this version yet."""

from __future__ import annotations


def unsupported_reasons(*call) -> list[str]:
    """Why the native CPU op cannot serve ``call`` (the argument tuple of ``disentangled_attention``)."""
    return ["the native CPU op of disentangled attention is not built in this version"]


def run(*call):
    raise RuntimeError("the native CPU op of disentangled attention is not built in this version")
