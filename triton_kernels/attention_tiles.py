"""Tile sizes of the attention kernels: the tuned table ``tuned_tiles.json`` when it has an entry, else defaults.

The table is written by the GPU check's tile sweep (``python -m deberta_fast.benchmark.gpu_check``) and committed;
its keys are ``"<kernel>/<target>/<dtype>/<BLOCK_D>"`` (kernel ``forward`` | ``backward``, target ``sm_90``,
BLOCK_D the padded head dim the kernel is compiled for), its values ``BLOCK_M``, ``BLOCK_N``, ``num_warps``,
``num_stages`` (and, for the record, the GPU and time that chose them). The target is the one Triton compiles
for (its active driver), so the compile-only tests, which stand in a driver for each target, see the entries
production would use.

Defaults (no entry), from the compile-only evidence (registers, spills, shared memory per target; README "GPU
readiness"): fp16/bf16 forward 32 x 32 tiles, 8 warps, 2 stages (3 on sm_100); backward 16 x 16 tiles, 8 warps,
1 stage (both spill-free; see ``default_tiles``). Exact fp32 (FMA dots): forward 32 x 32 up to BLOCK_D 64 and
16 x 16 above, backward 16 x 16, 4 warps, 1 stage (64 x 64 fp32 tiles need 256 KiB of shared memory at BLOCK_D
128). Tiles never exceed the next power of two of the length (min 16).
"""

from __future__ import annotations

import functools
import json
import os

import torch

TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned_tiles.json")
KINDS = ("forward", "backward")
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@functools.lru_cache(maxsize=1)
def _table() -> dict:
    if not os.path.exists(TABLE_PATH):
        return {}
    with open(TABLE_PATH, encoding="utf-8") as handle:
        data = json.load(handle)
    return data.get("entries", {})


def table_entries() -> list[dict]:
    """Every entry of the tuned table as dicts with kind, target, dtype, head_dim (= BLOCK_D) and the tiles."""
    entries = []
    for key, value in sorted(_table().items()):
        kind, target, dtype, bd = key.split("/")
        entries.append(dict(kind=kind, target=target, dtype=dtype, head_dim=int(bd), **value))
    return entries


def table_key(kind: str, target: str, dtype: torch.dtype | str, bd: int) -> str:
    name = dtype if isinstance(dtype, str) else _DTYPE_NAMES[dtype]
    return f"{kind}/{target}/{name}/{bd}"


def current_target() -> str | None:
    """``sm_<arch>`` of the GPU Triton compiles for (its active driver), None when that is not a CUDA target."""
    try:
        from triton.runtime.driver import driver

        target = driver.active.get_current_target()
    except Exception:  # no usable driver: no tuned entry applies
        return None
    if getattr(target, "backend", None) != "cuda":
        return None
    return f"sm_{target.arch}"


def _cap(length: int) -> int:
    block = 16
    while block < length and block < 128:
        block *= 2
    return block


def default_tiles(kind: str, dtype: torch.dtype, bd: int, interpret: bool, target: str | None = None) -> dict:
    if interpret:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=1, num_stages=1)
    if dtype == torch.float32:
        # Exact fp32 dots are FMA loops over register tiles: small tiles, or ptxas spills tens of KiB (and takes
        # minutes to compile); one stage, as the fp32 operands would double the shared memory.
        block = 32 if (kind == "forward" and bd <= 64) else 16
        return dict(BLOCK_M=block, BLOCK_N=block, num_warps=4, num_stages=1)
    if kind == "forward":
        # 32 x 32: each tile also multiplies a [BM, WIN] and a [WIN, BN] window of the positional tables
        # (WIN = next power of two of BM + BN - 1) and gathers from them; at 64 x 64 (and 64 x 32, WIN = 128)
        # that fp32 live set spilled 50-700 bytes with 8 warps (1-3 KiB with 4) on every target, at 32 x 32
        # (WIN = 64) nothing spills. The positional flops per score are the same (WIN / BN = 2), only the key /
        # value tiles are read twice as often. 8 warps: with 4, 32 x 32 still spills at BLOCK_D 128 and on
        # sm_120 (up to 250 bytes); two stages: the window tables are then copied to shared memory
        # asynchronously instead of through registers (one stage spilled at BLOCK_D 128). sm_100 takes three: with
        # two, ptxas there spilled 28 bytes inside the tile loops in the branch with the largest live set (both
        # positional terms, mask, dropout, prefix keys, BLOCK_D 128); three spill nothing and use 112 KiB of
        # shared memory (sm_120's limit, 99 KiB, rules three out there).
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=3 if target == "sm_100" else 2)
    # Backward 16 x 16, 8 warps: the only shape measured spill-free (every fp16/bf16 branch, every target, since the
    # backward derives its addresses per tile; see disentangled_attention_bwd). Measured before that change, in the
    # largest-live-set branch (fp16, per kernel and target, triton 3.9): 16 x 16 with 8 warps 0-72 bytes; 32 x 32
    # with 8 warps 84-788; 32 x 16 with 8 warps 120-492, with 4 warps 520-1064; 16 x 32 with 4 warps 472-1084;
    # 32 x 32 with 4 warps 736-1260. One stage: a tile's partial read-modify-write must not be prefetched before the
    # previous tile's store.
    return dict(BLOCK_M=16, BLOCK_N=16, num_warps=8, num_stages=1)


def attention_tiles(kind: str, dtype: torch.dtype, bd: int, length: int, interpret: bool) -> dict:
    """BLOCK_M, BLOCK_N, num_warps, num_stages for one launch (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    target = None if interpret else current_target()
    tiles = default_tiles(kind, dtype, bd, interpret, target)
    if target:
        entry = _table().get(table_key(kind, target, dtype, bd))
        if entry:
            tiles = {name: int(entry[name]) for name in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")}
    cap = _cap(length)
    tiles["BLOCK_M"] = min(tiles["BLOCK_M"], cap)
    tiles["BLOCK_N"] = min(tiles["BLOCK_N"], cap)
    return tiles
