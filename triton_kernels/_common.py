"""Pieces shared by the disentangled-attention kernels: relative-position slots, dropout bits, tile loads.

Positions. For a query at position i and a content key at position j the positional tables are read at
``slot(i - j)`` (``deberta_fast.ops.positions``). A tile of BLOCK_M queries (first row m0) and BLOCK_N keys
(first column n0) sees the distances d = m0 - n0 - (BLOCK_N - 1) + w for w in [0, BLOCK_M + BLOCK_N - 1); the
kernels evaluate ``slot`` once per distance of that window (WIN = next power of two of BLOCK_M + BLOCK_N - 1
entries), multiply the tile by the WIN table rows of those slots with ``tl.dot``, and pick the element of each
(query, key) pair with ``tl.gather`` at w = a - b + BLOCK_N - 1 (a, b: row / column inside the tile).

Saturation. Every distance d >= SAT_HI has slot 2S - 1 and every d <= SAT_LO has slot 0. A tile whose
distances all lie on one side needs one table row: c2p becomes a per-query constant and p2c a per-key constant.
SAT_HI / SAT_LO come from host arithmetic widened by two distances, so that a one-ulp difference of ``log``
between the host and the device (the |d| = max_position - 1 knee) can never make the shortcut wrong.

Bucket formula on device. transformers computes, in float32 on the model's device,
``ceil(log(|d| / mid) / log((max_position - 1) / mid) * (mid - 1)) + mid``; the denominator is a 0-dim CPU
tensor. On CUDA PyTorch divides by a CPU scalar as a multiplication with its float32 reciprocal, and its
``log`` is CUDA's ``logf``: the kernel does the same (libdevice ``log``, reciprocals from the host). On the CPU
(Triton interpreter) PyTorch divides exactly and its ``log`` rounds correctly; the interpreter's float32
``np.log`` does not, so the kernel takes the float64 log and rounds it to float32.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .attention_tiles import current_target

LOG2E = 1.4426950408889634
# Sizes and positional scalars are runtime values: no recompilation per length (Triton would otherwise
# specialise integers equal to 1 or divisible by 16). HEAD_DIM stays specialised: Triton then marks it divisible
# by 16 when it is, the head-dim mask `dcol < HEAD_DIM` holds for whole 16-column groups, and every
# [rows, BLOCK_D] load is a 16-byte vector load (unspecialised, each element was its own 2-byte load).
NO_SPECIALIZE_FWD = ["H", "L", "P", "S", "MID", "SAT_HI", "SAT_LO"]
NO_SPECIALIZE_BWD = NO_SPECIALIZE_FWD + ["B", "B_PER_TABLE", "NUM_GROUPS", "SLOT_LO", "SLOT_HI"]
NEVER = 2**30  # a saturation distance no tile reaches (int32 arithmetic on it stays in range)


# ----------------------------------------------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def slot_of_distance(d, S, MID, MID_F, MID_M1_F, INV_MID, DEN, INV_DEN, BUCKETED: tl.constexpr,
                     INTERPRET: tl.constexpr):
    """int32 slot(d) = clamp(bucket(d) + S, 0, 2S - 1) for an int32 tensor of distances d."""
    if BUCKETED:
        inside = (d < MID) & (d > -MID)
        ad = tl.where(d < 0, -d, d)
        ap = tl.where(inside, MID - 1, ad)
        # ap >= 1 except for mid == 1 at d == 0, whose log value is discarded below anyway.
        apf = tl.maximum(ap, 1).to(tl.float32)
        if INTERPRET:
            x = apf / MID_F
            lg = tl.log(x.to(tl.float64)).to(tl.float32)
            r = lg / DEN
        else:
            x = apf * INV_MID
            lg = libdevice.log(x)
            r = lg * INV_DEN
        r = r * MID_M1_F
        lp = tl.math.ceil(r) + MID_F
        bucket = tl.where(ap <= MID, d.to(tl.float32), tl.where(d < 0, -lp, lp)).to(tl.int32)
    else:
        bucket = d
    return tl.minimum(tl.maximum(bucket + S, 0), 2 * S - 1)


@triton.jit
def window_slots(m0, n0, S, MID, MID_F, MID_M1_F, INV_MID, DEN, INV_DEN, BUCKETED: tl.constexpr,
                 INTERPRET: tl.constexpr, BLOCK_N: tl.constexpr, WIN: tl.constexpr):
    """[WIN] slots of the distances m0 - n0 - (BLOCK_N - 1) + w of a tile (monotone non-decreasing in w)."""
    d = (m0 - n0 - (BLOCK_N - 1)) + tl.arange(0, WIN)
    return slot_of_distance(d, S, MID, MID_F, MID_M1_F, INV_MID, DEN, INV_DEN, BUCKETED, INTERPRET)


@triton.jit
def load_rows(base, rows, row_ok, stride_r, stride_d, dcol, HEAD_DIM, INTERPRET: tl.constexpr):
    """[R, BLOCK_D] tile base[rows, :HEAD_DIM] (zeros elsewhere); float32 under the interpreter."""
    ptrs = base + rows[:, None].to(tl.int64) * stride_r + dcol[None, :] * stride_d
    x = tl.load(ptrs, mask=row_ok[:, None] & (dcol[None, :] < HEAD_DIM), other=0.0)
    if INTERPRET:
        # The interpreter's bf16 arithmetic is broken: compute in float32 there.
        x = x.to(tl.float32)
    return x


@triton.jit
def load_vec(row_base, stride_d, HEAD_DIM, BLOCK_D: tl.constexpr):
    """float32 [BLOCK_D] row row_base[:HEAD_DIM] (zero-padded)."""
    dcol = tl.arange(0, BLOCK_D)
    return tl.load(row_base + dcol * stride_d, mask=dcol < HEAD_DIM, other=0.0).to(tl.float32)


@triton.jit
def mm(a, b, PREC: tl.constexpr):
    """a @ b with float32 accumulation; PREC ("ieee" | "tf32") only matters for float32 operands."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision=PREC)
    else:
        return tl.dot(a, b)


@triton.jit
def dropout_keep(seed, bh, rows, kcols, dropout_p):
    """[R, C] bool: keep attention probability (bh, row, key) — Philox on counters (row, bh, key, 0).

    The counters never overflow (no products of indices), and forward and backward draw the same bits.
    """
    zero = rows[:, None] * 0 + kcols[None, :] * 0
    r0, _, _, _ = tl.philox(seed, rows[:, None] + zero, bh + zero, kcols[None, :] + zero, zero)
    return tl.uint_to_uniform_float(r0) >= dropout_p


@triton.jit
def _keep_mask_kernel(SEED, OUT, NH, L, NK, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Debug kernel: OUT[bh, i, k] = 1 where dropout keeps probability (i, k) of head bh."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    seed = tl.load(SEED)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    for n0 in range(0, NK, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        keep = dropout_keep(seed, bh, rows, cols, dropout_p)
        ptrs = OUT + bh.to(tl.int64) * L * NK + rows[:, None] * NK + cols[None, :]
        tl.store(ptrs, keep.to(tl.int8), mask=(rows[:, None] < L) & (cols[None, :] < NK))


@triton.jit
def _slots_kernel(OUT, L, S, MID, MID_F, MID_M1_F, INV_MID, DEN, INV_DEN, BUCKETED: tl.constexpr,
                  INTERPRET: tl.constexpr, BLOCK: tl.constexpr):
    """Debug kernel: OUT[t] = slot(t - (L - 1)) for t in [0, 2L - 1), with the kernels' own slot function."""
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    d = t - (L - 1)
    s = slot_of_distance(d, S, MID, MID_F, MID_M1_F, INV_MID, DEN, INV_DEN, BUCKETED, INTERPRET)
    tl.store(OUT + t, s, mask=t < 2 * L - 1)


MODE_WINDOW: tl.constexpr = tl.constexpr(0)
MODE_SAT_HI: tl.constexpr = tl.constexpr(1)
MODE_SAT_LO: tl.constexpr = tl.constexpr(2)


@triton.jit
def opaque_offset(x, INTERPRET: tl.constexpr):
    """x (a scalar int64 offset), hidden from LLVM's loop strength reduction.

    A tile's element addresses are tile base + loop-invariant int32 offsets. When LLVM can see that the base
    advances by a constant each iteration, it turns every per-thread vector address into its own 64-bit
    induction variable (two registers each, carried across the key loop, where they spilled). Passing the
    base offset through an empty asm move keeps one scalar per tile; each address is then one add at its load.
    """
    if INTERPRET:
        return x
    else:
        return tl.inline_asm_elementwise("mov.b64 $0, $1;", "=l,l", [x], dtype=tl.int64, is_pure=True, pack=1)


@triton.jit
def per_iteration(x, INTERPRET: tl.constexpr):
    """x (a scalar int32), recomputed in every iteration of the loop that uses it.

    An asm move with a side effect, which LLVM may not hoist: values derived from x in a loop body then stay
    in that body, instead of being hoisted to the kernel's start and holding registers through the inner loops.
    """
    if INTERPRET:
        return x
    else:
        return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def wide(x):
    """A non-negative int32 (stride, index) as int64 by zero extension: its high word is the constant 0, so a
    64-bit product of two such values is one 32 x 32 -> 64-bit multiply and keeps no sign word in a register."""
    return tl.cast(tl.cast(x, tl.uint32, bitcast=True), tl.int64)


@triton.jit
def load_tile(tile_base, first, n_ok, stride_r, stride_d, dcol, HEAD_DIM, R: tl.constexpr,
              INTERPRET: tl.constexpr, ZERO_EXTEND: tl.constexpr):
    """[R, BLOCK_D] rows first + [0, R) of a [rows, HEAD_DIM] matrix at tile_base (zeros at rows >= n_ok or
    columns >= HEAD_DIM); float32 under the interpreter.

    The tile's first row moves the (scalar, 64-bit) base pointer; the element offsets are int32 and relative
    to it (< R · stride_r + BLOCK_D · stride_d), so they are the same for every tile of a loop: a few
    loop-invariant registers, where [R, BLOCK_D] 64-bit pointers became one 64-bit induction variable per
    loaded vector (and spilled). ZERO_EXTEND widens first and stride_r (both >= 0) without sign words: the
    backward kernels need those registers; in the forward it made ptxas spill 4 bytes in one variant (sm_90).
    """
    r = tl.arange(0, R)
    # The stride multiplies the opaque row after the asm: Triton then still knows the base's alignment
    # (stride divisible by 16), which the vector loads need; opaque(first · stride) made every load 2 bytes wide.
    if ZERO_EXTEND:
        base = tile_base + opaque_offset(wide(first), INTERPRET) * wide(stride_r)
    else:
        base = tile_base + opaque_offset(tl.cast(first, tl.int64), INTERPRET) * stride_r
    x = tl.load(base + (r[:, None] * stride_r + dcol[None, :] * stride_d),
                mask=(r < n_ok - first)[:, None] & (dcol[None, :] < HEAD_DIM), other=0.0)
    if INTERPRET:
        # The interpreter's bf16 arithmetic is broken: compute in float32 there.
        x = x.to(tl.float32)
    return x


@triton.jit
def load_slot_rows(table_base, slots, stride_s, stride_d, dcol, HEAD_DIM, INTERPRET: tl.constexpr):
    """[WIN, BLOCK_D] table rows ``slots`` (all in [0, 2S)) with int32 offsets (the launcher checks that
    2S · stride_s fits); float32 under the interpreter."""
    x = tl.load(table_base + (slots[:, None] * stride_s + dcol[None, :] * stride_d),
                mask=dcol[None, :] < HEAD_DIM, other=0.0)
    if INTERPRET:
        x = x.to(tl.float32)
    return x


@triton.jit
def content_tile_ranges(m0, L, SAT_HI, SAT_LO, HAS_POS: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    """Key tiles of query block m0: [0, n_hi) all saturated high, [n_hi, t_lo) band, [t_lo, n_tiles) low."""
    n_tiles = tl.cdiv(L, BLOCK_N)
    if HAS_POS:
        # Tile t is saturated high when its smallest distance m0 - (t·BN + BN - 1) >= SAT_HI.
        x = m0 - (BLOCK_N - 1) - SAT_HI
        n_hi = tl.where(x >= 0, tl.maximum(x, 0) // BLOCK_N + 1, 0)
        n_hi = tl.minimum(n_hi, n_tiles)
        # ... and saturated low when its largest distance m0 + BM - 1 - t·BN <= SAT_LO (< 0).
        y = m0 + (BLOCK_M - 1) - SAT_LO
        t_lo = (y + BLOCK_N - 1) // BLOCK_N
        t_lo = tl.minimum(tl.maximum(t_lo, n_hi), n_tiles)
    else:
        n_hi = n_tiles * 0
        t_lo = n_tiles
    return n_hi, t_lo, n_tiles


@triton.jit
def masked_scores(s, row_ok, col_ok, col_in, P):
    """Masked pairs -> -inf; an invalid query row without prefix keys -> 0 on every in-range key (uniform)."""
    valid = row_ok[:, None] & col_ok[None, :]
    uniform = (~row_ok)[:, None] & col_in[None, :] & (P == 0)
    return tl.where(valid, s, tl.where(uniform, 0.0, float("-inf"))), valid


# ----------------------------------------------------------------------------------------------------------------
# launch helpers (host side)
# ----------------------------------------------------------------------------------------------------------------


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1, read when triton.jit decorated them)."""
    return type(_slots_kernel).__name__ == "InterpretedFunction"


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def window_size(block_m: int, block_n: int) -> int:
    return triton.next_power_of_2(block_m + block_n - 1)


@functools.lru_cache(maxsize=64)
def position_constants(position_buckets: int, max_relative_positions: int) -> dict:
    """Scalars the kernels need for slot(d) and the saturation shortcut: cached per spec, never per length.

    Keys: S, MID, MID_F, MID_M1_F, INV_MID, DEN, INV_DEN (float32-exact floats), SAT_HI, SAT_LO, BUCKETED, and
    BUCKETS / MAX_REL (the spec itself).
    """
    bucketed = position_buckets > 0
    span = position_buckets if bucketed else max_relative_positions
    mid = max(position_buckets // 2, 1) if bucketed else 1
    f32 = np.float32
    # transformers: torch.log(torch.tensor((max_position - 1) / mid)), a float32 CPU scalar.
    den = f32(torch.log(torch.tensor((max_relative_positions - 1) / mid)).item()) if bucketed else f32(1.0)
    consts = dict(
        S=int(span), MID=int(mid), MID_F=float(f32(mid)), MID_M1_F=float(f32(mid - 1)),
        INV_MID=float(f32(1.0) / f32(mid)), DEN=float(den), INV_DEN=float(f32(1.0) / den),
        BUCKETED=bool(bucketed), BUCKETS=int(position_buckets), MAX_REL=int(max_relative_positions),
    )
    slots = _host_slots(consts)
    reach = int(max(max_relative_positions, span)) + 8
    d = torch.arange(-reach, reach + 1, dtype=torch.long)
    s = slots(d)
    # slot is monotone in d: the last d below the top slot and the first d above slot 0 bound the saturation.
    # With mid = 1 the log buckets stop at -1, so slot 0 is never reached: no low shortcut then (NEVER).
    top = 2 * span - 1
    sat_hi = int(d[s < top].max()) + 1 + 2 if bool((s == top).any()) else NEVER
    sat_lo = int(d[s > 0].min()) - 1 - 2 if bool((s == 0).any()) else -NEVER
    consts.update(SAT_HI=sat_hi, SAT_LO=sat_lo)
    return consts


def _host_slots(consts: dict):
    """transformers' float32 bucket formula on the host (the ops of deberta_fast.ops.positions), d -> slot."""
    span, bucketed = consts["S"], consts["BUCKETED"]

    def slots(distances: torch.Tensor) -> torch.Tensor:
        rel = distances
        if bucketed:
            mid, max_position = consts["BUCKETS"] // 2, consts["MAX_REL"]
            sign = torch.sign(rel)
            inside = (rel < mid) & (rel > -mid)
            abs_pos = torch.where(inside, torch.tensor(mid - 1).type_as(rel), torch.abs(rel))
            log_pos = torch.ceil(
                torch.log(abs_pos / mid) / torch.log(torch.tensor((max_position - 1) / mid)) * (mid - 1)
            ) + mid
            rel = torch.where(abs_pos <= mid, rel.type_as(log_pos), log_pos * sign)
        return torch.clamp(rel.long() + span, 0, 2 * span - 1)

    return slots


def reachable_slots(length: int, consts: dict) -> tuple[int, int]:
    """[lo, hi] (inclusive) slots that distances |d| <= length - 1 reach on any device (widened by one slot)."""
    ends = _host_slots(consts)(torch.tensor([-(length - 1), length - 1], dtype=torch.long)).tolist()
    return max(ends[0] - 1, 0), min(ends[1] + 1, 2 * consts["S"] - 1)


def kernel_position_args(consts: dict) -> tuple:
    """The positional scalars in kernel argument order (S ... SAT_LO)."""
    return (consts["S"], consts["MID"], consts["MID_F"], consts["MID_M1_F"], consts["INV_MID"], consts["DEN"],
            consts["INV_DEN"], consts["SAT_HI"], consts["SAT_LO"])


def distance_slots(length: int, position_buckets: int, max_relative_positions: int, device) -> torch.Tensor:
    """Debug helper: int32 [2L - 1], entry t = slot(t - (L - 1)) as the kernels compute it on ``device``."""
    consts = position_constants(position_buckets, max_relative_positions)
    out = torch.empty(2 * length - 1, dtype=torch.int32, device=device)
    block = 128
    _slots_kernel[(triton.cdiv(2 * length - 1, block),)](
        out, length, consts["S"], consts["MID"], consts["MID_F"], consts["MID_M1_F"], consts["INV_MID"],
        consts["DEN"], consts["INV_DEN"], BUCKETED=consts["BUCKETED"], INTERPRET=interpreting(), BLOCK=block,
    )
    return out


def dropout_keep_mask(seed: torch.Tensor, batch: int, heads: int, length: int, num_keys: int,
                      dropout_p: float) -> torch.Tensor:
    """Debug helper: bool [B, H, L, NK], True where the kernels keep attention probability (b, h, i, k)."""
    out = torch.empty(batch * heads, length, num_keys, dtype=torch.int8, device=seed.device)
    grid = (triton.cdiv(length, 32), batch * heads)
    _keep_mask_kernel[grid](seed, out, batch * heads, length, num_keys, float(dropout_p), BLOCK_M=32, BLOCK_N=32)
    return out.view(batch, heads, length, num_keys).bool()


def device_programs(device: torch.device) -> int:
    """Backward programs per launch that own a positional-gradient partial: two per SM on CUDA (enough to fill
    the device, few enough that the fp32 partials stay small), a handful under the interpreter."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def mask_arg(attention_mask: torch.Tensor | None, query: torch.Tensor):
    """(tensor, stride_b, stride_l) of a [B, L] token mask readable by the kernels (bool viewed as uint8)."""
    if attention_mask is None:
        return query, 0, 0  # never read: HAS_MASK=False
    mask = attention_mask.view(torch.uint8) if attention_mask.dtype == torch.bool else attention_mask
    return mask, mask.stride(0), mask.stride(1)


def table_strides(table: torch.Tensor | None):
    """Strides of a [1 or B, H, 2S, D] table; the batch stride is 0 when the batch dimension broadcasts."""
    if table is None:
        return 0, 0, 0, 0
    return (0 if table.shape[0] == 1 else table.stride(0)), table.stride(1), table.stride(2), table.stride(3)


def check_int32_offsets(**tensors) -> None:
    """The kernel addresses a key / value tile (rows < its BLOCK_N past the tile's first row) and a whole
    positional table [.., 2S, D] with int32 element offsets: raise if one of them could exceed int32."""
    for name, (tensor, rows) in tensors.items():
        if tensor is None:
            continue
        rows = tensor.shape[-2] if rows is None else rows
        reach = rows * tensor.stride(-2) + tensor.shape[-1] * tensor.stride(-1)
        if reach >= 2**31:
            raise ValueError(f"{name}: row stride {tensor.stride(-2)} x {rows} rows needs offsets beyond int32 "
                             f"({reach} elements); pass a contiguous [B, L, H, D] / [.., 2S, H, D] layout")


def register_cap(interpret: bool) -> dict:
    """Launch option maxnreg=255 when compiling for sm_80: without it ptxas (13.x) caps some 8-warp variants there
    at 128 registers and spills (32 x 32 tiles with dropout). Not on the other targets, where the explicit cap
    made ptxas allocate differently and spill (sm_120). The interpreter takes no such option."""
    return {"maxnreg": 255} if not interpret and current_target() == "sm_80" else {}
