"""Counter-based dropout masks: keep(row, col) is a pure function of (stream key, row, col).

The mask of element (row, col) of a 2-D view [rows, cols] is regenerated wherever it is needed (forward,
backward, several programs of one launch) instead of being stored, and the pure-PyTorch mirror in
``deberta_fast.ops.counter_dropout`` computes bit-identical masks, so the reference backend reproduces the
kernels' dropout exactly from the same seed.

Hash (all uint32, wrapping): ``fmix`` is MurmurHash3's 32-bit finaliser.

    row_key = fmix(row · 0x9E3779B9 + key)
    h       = fmix(fmix(row_key ^ (col · 0x85EBCA77)) + key)
    keep    = (h >> 8) >= threshold,         threshold = round(p · 2^24)

Two finaliser rounds per element cost ~14 integer ops: cheap in the memory-bound kernels that draw the mask
(never inside a tensor-core K-loop that would redraw it once per output tile).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def fmix32(h):
    """MurmurHash3 32-bit finaliser on a uint32 tensor."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def row_keys(key, rows):
    """uint32 [len(rows)]: the per-row half of the hash (row_key above)."""
    return fmix32(rows.to(tl.uint32) * 0x9E3779B9 + key.to(tl.uint32))


@triton.jit
def col_keys(cols):
    """uint32 [len(cols)]: the per-column term col · 0x85EBCA77."""
    return cols.to(tl.uint32) * 0x85EBCA77


@triton.jit
def keep_from_keys(key, row_key, col_key, threshold):
    """Boolean [len(row_key), len(col_key)] keep mask from the per-row / per-column halves of the hash.

    Kernels that draw the mask tile by tile inside a loop hoist whichever half is loop-invariant: only the two
    per-element finaliser rounds stay in the loop, which keeps the live set of the hash small."""
    h = fmix32(row_key[:, None] ^ col_key[None, :])
    h = fmix32(h + key.to(tl.uint32))
    return (h >> 8).to(tl.int32) >= threshold


@triton.jit
def keep_mask(key, rows, cols, threshold):
    """Boolean [len(rows), len(cols)] keep mask of the stream ``key`` (int, 0 <= key < 2^31)."""
    return keep_from_keys(key, row_keys(key, rows), col_keys(cols), threshold)


@triton.jit(do_not_specialize=["key", "threshold"])
def _keep_mask_kernel(out_ptr, key, threshold, n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = keep_mask(key, rows, cols, threshold)
    ptrs = out_ptr + rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))


def materialize_keep_mask(out, key: int, threshold: int) -> None:
    """Write the keep mask of stream ``key`` into the int8 tensor ``out`` [rows, cols] (debugging and tests)."""
    n_rows, n_cols = out.shape
    grid = (triton.cdiv(n_rows, 32), triton.cdiv(n_cols, 32))
    _keep_mask_kernel[grid](out, key, threshold, n_rows, n_cols, BLOCK_R=32, BLOCK_C=32)
