"""Seeded, counter-based dropout masks shared by the reference and the Triton adapter kernels.

A mask is a pure function of (seed, stream, row, col) over the 2-D view [rows, cols] of the dropped tensor
(leading dims flattened into rows), so the Triton kernels regenerate it in backward instead of storing it, and
the same seed gives the same mask on every backend and every device. The hash is documented in
``deberta_fast/triton_kernels/counter_rng.py``; this file is its bit-exact PyTorch mirror.

Streams: one call may need several independent masks (q, k and v LoRAs each drop their own copy of x);
stream j of a seed is ``stream_key(seed, j)``.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
THRESHOLD_BITS = 24


def _fmix32_int(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK32
    h ^= h >> 16
    return h


def stream_key(seed: int, stream: int = 0) -> int:
    """The kernel key (0 <= key < 2^31) of mask stream ``stream`` of ``seed`` (0 <= seed < 2^64)."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64); got {seed!r}")
    low, high = seed & _MASK32, seed >> 32
    key = _fmix32_int(low ^ _fmix32_int(high ^ _fmix32_int((stream + 0x632BE5AB) & _MASK32)))
    return key & 0x7FFFFFFF


def keep_threshold(p: float) -> int:
    """Integer threshold on the hash's top 24 bits: an element is kept when ``hash >> 8 >= threshold``."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1]; got {p}")
    return int(round(p * (1 << THRESHOLD_BITS)))


def keep_scale(p: float) -> float:
    """Factor applied to kept elements (0 when everything is dropped, as torch's dropout at p = 1)."""
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def draw_seed() -> int:
    """A fresh seed from torch's default CPU generator (so ``torch.manual_seed`` makes runs repeatable)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    # (h · c) mod 2^32 from two 16-bit halves, so no int64 product overflows.
    return ((h & 0xFFFF) * c + ((((h >> 16) * c) & 0xFFFF) << 16)) & _MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def keep_mask(seed: int, rows: int, cols: int, p: float, stream: int = 0, device=None) -> torch.Tensor:
    """Boolean [rows, cols] mask (True = kept) of stream ``stream`` of ``seed`` at drop probability ``p``."""
    key = stream_key(seed, stream)
    threshold = keep_threshold(p)
    r = torch.arange(rows, dtype=torch.int64, device=device) & _MASK32
    c = torch.arange(cols, dtype=torch.int64, device=device) & _MASK32
    row_key = _fmix32((_mul32(r, 0x9E3779B9) + key) & _MASK32)
    h = _fmix32(row_key[:, None] ^ _mul32(c, 0x85EBCA77)[None, :])
    h = _fmix32((h + key) & _MASK32)
    return (h >> 8) >= threshold


def apply_dropout(x: torch.Tensor, seed: int, p: float, stream: int = 0) -> torch.Tensor:
    """``x`` with the counter mask of (seed, stream) applied over its 2-D view [-1, x.shape[-1]], kept values
    scaled by 1/(1-p): what the Triton kernels feed to their LoRA branch."""
    if p == 0.0:
        return x
    cols = x.shape[-1]
    rows = x.numel() // cols if cols else 0
    mask = keep_mask(seed, rows, cols, p, stream, device=x.device).reshape(x.shape)
    return torch.where(mask, x * keep_scale(p), torch.zeros((), dtype=x.dtype, device=x.device))
