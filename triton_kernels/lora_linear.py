"""LoRA linear kernels: one or three projections of one input, forward and backward.

Projection j (j < P, P = 1 for a plain LoRA linear, 3 for q/k/v) of x [M, K]:

    S_j = drop_j(x) · A_jᵀ                      [M, R]   A_j [R, K]  (rank r_j zero-padded to R)
    Y_j = x · W_jᵀ + b_j + s_j · S_j · B_jᵀ     [M, N]   W_j [N, K], B_j [N, R]

drop_j keeps an element with probability 1-p (mask from ``counter_rng``, stream j) and scales it by 1/(1-p);
projections without LoRA (bit j of LORA_MASK clear) are the base linear alone.

Backward, given dY_j:

    dS_j = s_j · dY_j · B_j                    (dropout-free: S is linear in drop(x))
    dX   = Σ_j dY_j · W_j + mask_j ⊙ (dS_j · A_j) / (1-p)
    dA_j = dS_jᵀ · drop_j(x)        dB_j = s_j · dY_jᵀ · S_j

A_j, B_j, biases and scalings are passed per projection (pointers and scalars, ranks masked in-kernel), so a
call allocates nothing but its outputs: at 32k tokens the kernels run for tens of microseconds and host work
per call shows in the wall time.

Design (why two forward variants): x is read once either way.
- p = 0: ``_lora_fwd_kernel`` computes S in the base GEMM's K-loop from the x tile already in registers
  (R extra output columns, R/BLOCK_N ≈ 6-12% more MMA work) and adds s·S·Bᵀ in the epilogue, one launch.
- p > 0: the mask would be redrawn by every N-tile program (hashing costs more than the MMA it feeds), so a
  small row-block kernel ``_lora_down_kernel`` draws it once and writes S [P, M, R] (fp32, 64 B per row at
  R = 16); the GEMM kernel then loads S in its epilogue (the LoRAFusion split).
Backward: ``_lora_bwd_dx_kernel`` is the dX GEMM over N with dS computed in the same K-loop from the dY tile
(so dY is read once for dX and dS) and dS·A added in the epilogue; ``_lora_bwd_weight_kernel`` reduces
dA and dB (one launch for both) over rows in fp32 row-split partials, summed afterwards: deterministic, no
atomics.

Registers (ptxas must not spill in any fp16/bf16 config; compile-only evidence in the README "GPU readiness"):
- tile offsets are int32 and loop-invariant, only scalar int64 block pointers move;
- row strides (K, N, the rank of B) and the masks built on them are written with their power-of-two alignment
  (``_aligned``, ``_rank_ok``): Triton specialises integers only on divisibility by 16, so K = 72 or a rank-8
  B would otherwise load element by element, every pipelined stage held in registers;
- the dropout hash is split (``counter_rng.row_keys`` / ``col_keys`` hoisted out of the loops) and runs on the
  input-dtype tile; 1/(1-p) multiplies the fp32 result (or the small [BM, R] factor), not every element;
- dX loops over the projections at run time (unrolled, three projections' hoisted values stayed live together).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._config import bucket, dot_dtype, dot_precision, interpreting, make_configs, prune_by_dtype
from .counter_rng import col_keys, keep_from_keys, row_keys

MAX_RANK = 64


def _tiles(*entries):
    return [(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), warps, stages)
            for bm, bn, bk, warps, stages in entries]


_INTERPRETER_TILES = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=4)
# Forward: BLOCK_N is the output tile (x W_jᵀ columns); wider tiles amortise the R extra S columns. 128-row
# tiles take 8 warps, none is 256 wide, and 128 x 128 tiles take BLOCK_K 32: ptxas spills the others on sm_80 /
# sm_90 at rank 64 (compile-only evidence, README "GPU readiness").
_FWD_CONFIGS = make_configs(
    _INTERPRETER_TILES,
    half=_tiles((128, 64, 64, 8, 4), (128, 128, 32, 8, 4), (64, 64, 64, 4, 4)),
    fp32=_tiles((64, 64, 32, 4, 2), (32, 64, 32, 4, 2)),
)
# dX: BLOCK_N is the loop step over N, BLOCK_K the dX column tile. 8 warps and at most 32 accumulator elements
# per thread: the dropout epilogue holds the [BM, BK] low-rank product and its mask beside the accumulator; ptxas
# spilled 128 x 128 tiles, 128-wide steps and 4-warp 64 x 64 tiles at ranks 32-64 (three projections, dropout).
_DX_CONFIGS = make_configs(
    _INTERPRETER_TILES,
    half=_tiles((128, 64, 64, 8, 4), (128, 32, 64, 8, 4), (64, 64, 64, 8, 4)),
    fp32=_tiles((64, 32, 64, 4, 2), (32, 32, 64, 4, 2)),
)


def _align(n: int) -> int:
    """Largest power of two (at most 16) dividing ``n``: a row stride's alignment, for vectorised loads."""
    n = int(n)
    return 16 if n % 16 == 0 else (n & -n if n else 16)


def _rank_align(args) -> int:
    """Alignment of every LoRA's B row stride (its rank)."""
    return _align(math.gcd(*(int(args[f"rank{j}"]) for j in range(3))))


@triton.jit
def _aligned(stride, ALIGN: tl.constexpr):
    """``stride`` (a multiple of ALIGN) written so the compiler sees the multiple: Triton only specialises
    integers on divisibility by 16, and a row stride of 72 would otherwise force element-wise loads (one 64-bit
    address per element, pipelined stages in registers)."""
    if ALIGN > 1:
        stride = (stride // ALIGN) * ALIGN
    return stride


@triton.jit
def _rank_ok(offs_r, rank, ALIGN: tl.constexpr):
    """offs_r < rank for a rank that is a multiple of ALIGN, written so the mask is seen constant over ALIGN
    neighbours (a rank mask along the contiguous axis would otherwise make every load element-wise)."""
    return (offs_r // ALIGN) < (rank // ALIGN)


@triton.jit
def _pick(j, p0, p1, p2, NUM_PROJ: tl.constexpr):
    """p0, p1 or p2 by projection index j (runtime or constexpr)."""
    if NUM_PROJ == 1:
        return p0
    else:
        if j == 0:
            out = p0
        elif j == 1:
            out = p1
        else:
            out = p2
        return out


@triton.jit
def _swizzle(pid, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M row tiles share their column tiles while those are hot in L2."""
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_size = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    return pid_m, pid_n


@triton.jit
def _fwd_mainloop(x_ptr, w_ptr, a_ptr, rank, row0, col0, M, N, K, row_stride,
                  WITH_S: tl.constexpr, EVEN_K: tl.constexpr, R: tl.constexpr, DOT_DTYPE: tl.constexpr,
                  PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """x·W_jᵀ [BM, BN] and, when WITH_S, x·A_jᵀ [BM, R] from the same x tiles (fp32 accumulators).

    row_stride: K (x, W and A rows), written so the compiler sees its alignment (``_aligned``)."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R)
    r_ok = offs_r < rank
    # Rows / columns past M / N re-read the last one (loads stay in bounds, the store is masked). Offsets inside
    # the tile are int32 and loop-invariant; only the scalar block pointers move along K.
    rows = tl.minimum(row0 + tl.arange(0, BLOCK_M), M - 1) - row0
    cols = tl.minimum(col0 + tl.arange(0, BLOCK_N), N - 1) - col0
    x_offs = rows[:, None] * row_stride + offs_k[None, :]
    w_offs = cols[None, :] * row_stride + offs_k[:, None]  # W_jᵀ [BK, BN]
    a_offs = offs_r[None, :] * row_stride + offs_k[:, None]  # A_jᵀ [BK, R]
    x_blk = x_ptr + row0.to(tl.int64) * row_stride
    w_blk = w_ptr + col0.to(tl.int64) * row_stride
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    s_acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            xt = tl.load(x_blk + x_offs)
            wt = tl.load(w_blk + w_offs)
        else:
            k_ok = offs_k < K - k0
            xt = tl.load(x_blk + x_offs, mask=k_ok[None, :], other=0.0)
            wt = tl.load(w_blk + w_offs, mask=k_ok[:, None], other=0.0)
        xt = xt.to(DOT_DTYPE)
        acc = tl.dot(xt, wt.to(DOT_DTYPE), acc, input_precision=PRECISION)
        if WITH_S:
            if EVEN_K:
                at = tl.load(a_ptr + a_offs, mask=r_ok[None, :], other=0.0)
            else:
                at = tl.load(a_ptr + a_offs, mask=(offs_k < K - k0)[:, None] & r_ok[None, :], other=0.0)
            s_acc = tl.dot(xt, at.to(DOT_DTYPE), s_acc, input_precision=PRECISION)
        x_blk += BLOCK_K
        w_blk += BLOCK_K
        a_ptr += BLOCK_K
    return acc, s_acc


@triton.autotune(configs=_FWD_CONFIGS,
                 key=["M_BUCKET", "N", "K", "NUM_PROJ", "LORA_MASK", "S_FROM_MEMORY", "BIAS_MASK"],
                 prune_configs_by={"early_config_prune": prune_by_dtype("x_ptr")})
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0, "K_ALIGN": lambda args: _align(args["K"]),
                    "N_ALIGN": lambda args: _align(args["N"]), "RANK_ALIGN": _rank_align})
@triton.jit(do_not_specialize=["rank0", "rank1", "rank2"])
def _lora_fwd_kernel(
    x_ptr, w0_ptr, w1_ptr, w2_ptr, bias0_ptr, bias1_ptr, bias2_ptr, a0_ptr, a1_ptr, a2_ptr, b0_ptr, b1_ptr, b2_ptr,
    s_ptr, y_ptr, M, N, K, M_BUCKET, rank0, rank1, rank2, scal0, scal1, scal2,
    NUM_PROJ: tl.constexpr, LORA_MASK: tl.constexpr, BIAS_MASK: tl.constexpr,
    S_FROM_MEMORY: tl.constexpr, STORE_S: tl.constexpr, R: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr, K_ALIGN: tl.constexpr,
    N_ALIGN: tl.constexpr, RANK_ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Y_j tile = x·W_jᵀ + b_j + s_j·S_j·B_jᵀ; S computed in the K-loop, or loaded when S_FROM_MEMORY."""
    N = _aligned(N, N_ALIGN)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_jn = _swizzle(tl.program_id(0), tiles_m, tiles_n * NUM_PROJ, GROUP_M)
    proj = pid_jn // tiles_n
    pid_n = pid_jn % tiles_n
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = col0 + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R)
    K = _aligned(K, K_ALIGN)  # also in the K masks: a mask's alignment decides the load width too
    row_stride = K
    w_ptr = _pick(proj, w0_ptr, w1_ptr, w2_ptr, NUM_PROJ)
    a_ptr = _pick(proj, a0_ptr, a1_ptr, a2_ptr, NUM_PROJ)
    rank = _pick(proj, rank0, rank1, rank2, NUM_PROJ)
    has_lora = ((LORA_MASK >> proj) & 1) != 0

    if (not S_FROM_MEMORY) and LORA_MASK != 0:
        if has_lora:
            acc, s_acc = _fwd_mainloop(x_ptr, w_ptr, a_ptr, rank, row0, col0, M, N, K, row_stride, True, EVEN_K, R,
                                       DOT_DTYPE, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        else:
            acc, s_acc = _fwd_mainloop(x_ptr, w_ptr, a_ptr, rank, row0, col0, M, N, K, row_stride, False, EVEN_K, R,
                                       DOT_DTYPE, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        acc, s_acc = _fwd_mainloop(x_ptr, w_ptr, a_ptr, rank, row0, col0, M, N, K, row_stride, False, EVEN_K, R,
                                   DOT_DTYPE, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)

    m_ok = offs_m < M
    n_ok = offs_n < N
    if LORA_MASK != 0:
        if has_lora:
            s_ptrs = s_ptr + (proj * M + offs_m).to(tl.int64)[:, None] * R + offs_r[None, :]
            if S_FROM_MEMORY:
                s_acc = tl.load(s_ptrs, mask=m_ok[:, None], other=0.0)
            elif STORE_S:
                if pid_n == 0:
                    tl.store(s_ptrs, s_acc, mask=m_ok[:, None])
            b_ptr = _pick(proj, b0_ptr, b1_ptr, b2_ptr, NUM_PROJ)
            scal = _pick(proj, scal0, scal1, scal2, NUM_PROJ)
            rank_stride = _aligned(rank, RANK_ALIGN)
            b_offs = (tl.minimum(offs_n, N - 1) - col0)[None, :] * rank_stride + offs_r[:, None]
            bt = tl.load(b_ptr + col0.to(tl.int64) * rank_stride + b_offs, mask=_rank_ok(offs_r, rank, RANK_ALIGN)[:, None],
                         other=0.0)  # B_jᵀ [R, BN]
            # Accumulate into acc (a separate [BM, BN] result would double the accumulator registers).
            acc = tl.dot((s_acc * scal).to(DOT_DTYPE), bt.to(DOT_DTYPE), acc, input_precision=PRECISION)
    if BIAS_MASK != 0:
        if ((BIAS_MASK >> proj) & 1) != 0:
            bias_ptr = _pick(proj, bias0_ptr, bias1_ptr, bias2_ptr, NUM_PROJ)
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_stride = N
    y_offs = tl.arange(0, BLOCK_M)[:, None] * y_stride + offs_n[None, :]
    y_blk = y_ptr + (proj * M + row0).to(tl.int64) * y_stride
    tl.store(y_blk + y_offs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# Down: the mask hash (two finaliser rounds per x element) is the work; the [BM, R] accumulator is small. Tiles of
# at most 32 x elements per thread keep hash + x tile + accumulator in registers at R = 64 (ptxas spilled with 64
# per thread: README "GPU readiness").
@triton.autotune(configs=make_configs(dict(BLOCK_M=64, BLOCK_K=32),
                                      half=[(dict(BLOCK_M=64, BLOCK_K=64), 4, 3),
                                            (dict(BLOCK_M=64, BLOCK_K=128), 8, 3),
                                            (dict(BLOCK_M=128, BLOCK_K=32), 8, 4)],
                                      fp32=[(dict(BLOCK_M=64, BLOCK_K=64), 4, 2)]),
                 key=["M_BUCKET", "K", "R"], prune_configs_by={"early_config_prune": prune_by_dtype("x_ptr")})
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0,
                    "K_ALIGN": lambda args: _align(args["K"])})
@triton.jit(do_not_specialize=["key0", "key1", "key2", "threshold", "rank0", "rank1", "rank2"])
def _lora_down_kernel(
    x_ptr, a0_ptr, a1_ptr, a2_ptr, s_ptr, M, K, M_BUCKET, rank0, rank1, rank2, key0, key1, key2, threshold,
    keep_scale, NUM_PROJ: tl.constexpr, LORA_MASK: tl.constexpr, R: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr, K_ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """S_j[rows] = drop_j(x[rows]) · A_jᵀ; grid (row tiles, P). The mask is drawn once per element.

    The 1/(1-p) scale is applied to the fp32 result, not to each x element (one multiply per S element, and the
    x tile stays in its input dtype)."""
    pid_m = tl.program_id(0)
    proj = tl.program_id(1)
    if ((LORA_MASK >> proj) & 1) != 0:
        key = _pick(proj, key0, key1, key2, NUM_PROJ)
        a_ptr = _pick(proj, a0_ptr, a1_ptr, a2_ptr, NUM_PROJ)
        rank = _pick(proj, rank0, rank1, rank2, NUM_PROJ)
        K = _aligned(K, K_ALIGN)  # also in the K masks: a mask's alignment decides the load width too
        row_stride = K
        row0 = pid_m * BLOCK_M
        offs_m = row0 + tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_K)
        offs_r = tl.arange(0, R)
        r_ok = offs_r < rank
        # Rows past M re-read row M-1 (unmasked loads; their S rows are not stored). Offsets inside the row block
        # are int32 and loop-invariant; only the scalar block pointers move.
        x_offs = (tl.minimum(offs_m, M - 1) - row0)[:, None] * row_stride + offs_k[None, :]
        a_offs = offs_r[None, :] * row_stride + offs_k[:, None]  # A_jᵀ [BK, R]
        x_blk = x_ptr + row0.to(tl.int64) * row_stride
        row_key = row_keys(key, offs_m)
        s_acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                xt = tl.load(x_blk + x_offs)
                at = tl.load(a_ptr + a_offs, mask=r_ok[None, :], other=0.0)
            else:
                k_ok = offs_k < K - k0
                xt = tl.load(x_blk + x_offs, mask=k_ok[None, :], other=0.0)
                at = tl.load(a_ptr + a_offs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            keep = keep_from_keys(key, row_key, col_keys(k0 + offs_k), threshold)
            xt = xt.to(DOT_DTYPE)
            xt = tl.where(keep, xt, tl.zeros_like(xt))
            s_acc = tl.dot(xt, at.to(DOT_DTYPE), s_acc, input_precision=PRECISION)
            x_blk += BLOCK_K
            a_ptr += BLOCK_K
        s_ptrs = s_ptr + (proj * M + offs_m).to(tl.int64)[:, None] * R + offs_r[None, :]
        tl.store(s_ptrs, s_acc * keep_scale, mask=(offs_m < M)[:, None])


@triton.autotune(configs=_DX_CONFIGS, key=["M_BUCKET", "N", "K", "NUM_PROJ", "LORA_MASK", "NEED_DX", "DROPOUT"],
                 prune_configs_by={"early_config_prune": prune_by_dtype("dy_ptr")})
@triton.heuristics({"EVEN_N": lambda args: args["N"] % args["BLOCK_N"] == 0, "K_ALIGN": lambda args: _align(args["K"]),
                    "N_ALIGN": lambda args: _align(args["N"]), "RANK_ALIGN": _rank_align})
@triton.jit(do_not_specialize=["key0", "key1", "key2", "threshold", "rank0", "rank1", "rank2"])
def _lora_bwd_dx_kernel(
    dy_ptr, w0_ptr, w1_ptr, w2_ptr, a0_ptr, a1_ptr, a2_ptr, b0_ptr, b1_ptr, b2_ptr, dx_ptr, ds_ptr,
    M, N, K, M_BUCKET, rank0, rank1, rank2, scal0, scal1, scal2, key0, key1, key2, threshold, keep_scale,
    NUM_PROJ: tl.constexpr, LORA_MASK: tl.constexpr, NEED_DX: tl.constexpr, STORE_DS: tl.constexpr,
    DROPOUT: tl.constexpr, R: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    EVEN_N: tl.constexpr, K_ALIGN: tl.constexpr, N_ALIGN: tl.constexpr, RANK_ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dX tile [BM, BK] = Σ_j dY_j·W_j + mask_j ⊙ (dS_j·A_j)/(1-p), dS_j = s_j·dY_j·B_j from the same dY tiles.

    The K-loop runs over N. Without NEED_DX the grid has one column of programs computing dS only.
    """
    K = _aligned(K, K_ALIGN)  # also in the masks: a mask's alignment decides the load width too
    N = _aligned(N, N_ALIGN)
    tiles_m = tl.cdiv(M, BLOCK_M)
    if NEED_DX:
        pid_m, pid_k = _swizzle(tl.program_id(0), tiles_m, tl.cdiv(K, BLOCK_K), GROUP_M)
    else:
        pid_m = tl.program_id(0)
        pid_k = 0
    row0 = pid_m * BLOCK_M
    col0 = pid_k * BLOCK_K
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_k = col0 + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R)
    m_ok = offs_m < M
    k_ok = offs_k < K
    k_stride = K
    n_stride = N
    # Rows / columns past M / K re-read the last one (loads stay in bounds, the store is masked). Offsets inside
    # the tile are int32 and loop-invariant; only the scalar block pointers move along N.
    rows = tl.minimum(offs_m, M - 1) - row0
    cols = tl.minimum(offs_k, K - 1) - col0
    dy_offs = rows[:, None] * n_stride + offs_n[None, :]
    w_offs = offs_n[:, None] * k_stride + cols[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for j in range(NUM_PROJ):  # a runtime loop: unrolled, the projections' hoisted values stay live together
        w_blk = _pick(j, w0_ptr, w1_ptr, w2_ptr, NUM_PROJ) + col0
        a_ptr = _pick(j, a0_ptr, a1_ptr, a2_ptr, NUM_PROJ)
        b_blk = _pick(j, b0_ptr, b1_ptr, b2_ptr, NUM_PROJ)
        rank = _pick(j, rank0, rank1, rank2, NUM_PROJ)
        rank_stride = _aligned(rank, RANK_ALIGN)
        r_ok = _rank_ok(offs_r, rank, RANK_ALIGN)
        dy_blk = dy_ptr + (j * M + row0).to(tl.int64) * n_stride
        b_offs = offs_n[:, None] * rank_stride + offs_r[None, :]
        ds = tl.zeros((BLOCK_M, R), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            if EVEN_N:
                dyt = tl.load(dy_blk + dy_offs)
            else:
                dyt = tl.load(dy_blk + dy_offs, mask=(offs_n < N - n0)[None, :], other=0.0)
            dyt = dyt.to(DOT_DTYPE)
            if NEED_DX:
                if EVEN_N:
                    wt = tl.load(w_blk + w_offs)
                else:
                    wt = tl.load(w_blk + w_offs, mask=(offs_n < N - n0)[:, None], other=0.0)
                acc = tl.dot(dyt, wt.to(DOT_DTYPE), acc, input_precision=PRECISION)
            if ((LORA_MASK >> j) & 1) != 0:
                bt = tl.load(b_blk + b_offs, mask=(offs_n < N - n0)[:, None] & r_ok[None, :], other=0.0)
                ds = tl.dot(dyt, bt.to(DOT_DTYPE), ds, input_precision=PRECISION)
            dy_blk += BLOCK_N
            w_blk += BLOCK_N * k_stride
            b_blk += BLOCK_N * rank_stride
        if ((LORA_MASK >> j) & 1) != 0:
            ds = ds * _pick(j, scal0, scal1, scal2, NUM_PROJ)
            if STORE_DS:
                if pid_k == 0:
                    ds_offs = tl.arange(0, BLOCK_M)[:, None] * R + offs_r[None, :]
                    tl.store(ds_ptr + (j * M + row0).to(tl.int64) * R + ds_offs, ds, mask=m_ok[:, None])
            if NEED_DX:
                at = tl.load(a_ptr + col0 + offs_r[:, None] * k_stride + cols[None, :], mask=r_ok[:, None],
                             other=0.0)  # A_j [R, BK]
                if DROPOUT:
                    # 1/(1-p) on the [BM, R] factor, not on the [BM, BK] product.
                    low_rank = tl.dot((ds * keep_scale).to(DOT_DTYPE), at.to(DOT_DTYPE), input_precision=PRECISION)
                    key = _pick(j, key0, key1, key2, NUM_PROJ)
                    keep = keep_from_keys(key, row_keys(key, offs_m), col_keys(offs_k), threshold)
                    acc += tl.where(keep, low_rank, 0.0)
                else:
                    acc = tl.dot(ds.to(DOT_DTYPE), at.to(DOT_DTYPE), acc, input_precision=PRECISION)
    if NEED_DX:
        dx_offs = tl.arange(0, BLOCK_M)[:, None] * k_stride + tl.arange(0, BLOCK_K)[None, :]
        dx_blk = dx_ptr + row0.to(tl.int64) * k_stride + col0
        tl.store(dx_blk + dx_offs, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :])


# Weights: at most 32 elements of the [BT, BC] input tile per thread (the dropout hash runs on each of them,
# beside the [R, BC] accumulator and the [R, BT] operand); 64 per thread spilled at R = 64.
@triton.autotune(configs=make_configs(dict(BLOCK_T=32, BLOCK_C=64),
                                      half=[(dict(BLOCK_T=64, BLOCK_C=128), 8, 3),
                                            (dict(BLOCK_T=32, BLOCK_C=128), 4, 4),
                                            (dict(BLOCK_T=32, BLOCK_C=256), 8, 3)],
                                      fp32=[(dict(BLOCK_T=32, BLOCK_C=64), 4, 2)]),
                 key=["K", "N", "R", "NUM_PROJ", "WHICH_FIRST", "WHICH_COUNT", "DROPOUT"],
                 prune_configs_by={"early_config_prune": prune_by_dtype("x_ptr")})
@triton.heuristics({"K_ALIGN": lambda args: _align(args["K"]), "N_ALIGN": lambda args: _align(args["N"])})
@triton.jit(do_not_specialize=["key0", "key1", "key2", "threshold"])
def _lora_bwd_weight_kernel(
    ds_ptr, x_ptr, da_ptr, s_ptr, dy_ptr, db_ptr, M, K, N, rows_per_split, scal0, scal1, scal2,
    key0, key1, key2, threshold, keep_scale,
    NUM_PROJ: tl.constexpr, LORA_MASK: tl.constexpr, WHICH_FIRST: tl.constexpr, WHICH_COUNT: tl.constexpr,
    DROPOUT: tl.constexpr, R: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    K_ALIGN: tl.constexpr, N_ALIGN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Row-split partials of the LoRA weight gradients; grid (WHICH_COUNT·P, column tiles, splits).

    which 0: dA_j [R, K] += dS_jᵀ · drop_j(x)      (x shared by all j, mask j regenerated)
    which 1: dB_jᵀ [R, N] += s_j · S_jᵀ · dY_j
    Outputs [P, splits, R, C] fp32. The projection is the fastest grid axis, so the programs reading one x
    block run together (L2).
    """
    which = WHICH_FIRST + tl.program_id(0) // NUM_PROJ
    proj = tl.program_id(0) % NUM_PROJ
    pid_c = tl.program_id(1)
    split = tl.program_id(2)
    if which == 0:
        C = _aligned(K, K_ALIGN)
        p_ptr = ds_ptr
        q_ptr = x_ptr
        out_ptr = da_ptr
        q_row0 = 0
        scale = keep_scale if DROPOUT else 1.0  # drop(x) = mask ⊙ x / (1-p): the 1/(1-p) goes on the result
    else:
        C = _aligned(N, N_ALIGN)
        p_ptr = s_ptr
        q_ptr = dy_ptr
        out_ptr = db_ptr
        q_row0 = M
        scale = _pick(proj, scal0, scal1, scal2, NUM_PROJ)
    if (((LORA_MASK >> proj) & 1) != 0) & (pid_c * BLOCK_C < C):
        offs_t = tl.arange(0, BLOCK_T)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_r = tl.arange(0, R)
        c_ok = offs_c < C
        start = split * rows_per_split
        stop = min(start + rows_per_split, M)
        # int32 offsets inside a row block (loop-invariant); only the scalar block pointers move.
        p_offs = offs_t[None, :] * R + offs_r[:, None]  # P_jᵀ [R, BT]
        q_offs = offs_t[:, None] * C + offs_c[None, :]
        p_blk = p_ptr + (proj * M + start).to(tl.int64) * R
        q_blk = q_ptr + (proj * q_row0 + start).to(tl.int64) * C
        if DROPOUT:
            key = _pick(proj, key0, key1, key2, NUM_PROJ)
            col_key = col_keys(offs_c)
        acc = tl.zeros((R, BLOCK_C), dtype=tl.float32)
        for t0 in range(start, stop, BLOCK_T):
            t_ok = offs_t < stop - t0
            pt = tl.load(p_blk + p_offs, mask=t_ok[None, :], other=0.0)
            qt = tl.load(q_blk + q_offs, mask=t_ok[:, None] & c_ok[None, :], other=0.0).to(DOT_DTYPE)
            if DROPOUT:
                if which == 0:
                    keep = keep_from_keys(key, row_keys(key, t0 + offs_t), col_key, threshold)
                    qt = tl.where(keep, qt, tl.zeros_like(qt))
            acc = tl.dot(pt.to(DOT_DTYPE), qt, acc, input_precision=PRECISION)
            p_blk += BLOCK_T * R
            q_blk += BLOCK_T * C
        out_ptrs = out_ptr + (proj * tl.num_programs(2) + split).to(tl.int64) * R * C + offs_r[:, None] * C
        tl.store(out_ptrs + offs_c[None, :], acc * scale, mask=c_ok[None, :])


# ----------------------------------------------------------------------------------------------- launchers


def padded_rank(rank: int) -> int:
    """Rank padded for ``tl.dot`` (at least 16, a power of two)."""
    return max(16, triton.next_power_of_2(int(rank)))


def _three(items):
    items = list(items)
    return items + [items[0]] * (3 - len(items))


def _loras(x, lora_As, lora_Bs, scalings):
    """Per-projection pointers (a real tensor where a projection has no LoRA), ranks, scalings, mask, R."""
    ranks = [a.shape[0] if a is not None else 0 for a in lora_As]
    mask = sum(1 << j for j, r in enumerate(ranks) if r > 0)
    R = padded_rank(max(ranks)) if mask else 16
    a = [t if t is not None and t.numel() else x for t in lora_As]
    b = [t if t is not None and t.numel() else x for t in lora_Bs]
    return _three(a), _three(b), _three(ranks), _three([float(s) for s in scalings]), mask, R


def lora_forward(x, weights, biases, lora_As, lora_Bs, scalings, keys, threshold: int, keep_scale: float,
                 store_s: bool):
    """Launch the forward. x [M, K] contiguous; weights: P contiguous [N, K]; biases: P of [N] or None; lora_As:
    P of contiguous [r_j, K] or None, lora_Bs P of contiguous [N, r_j] or None; scalings: P floats.
    Returns (Y [P, M, N] in x's dtype, S [P, M, R] fp32 when stored or needed for dropout, else an empty tensor)."""
    M, K = x.shape
    P = len(weights)
    N = weights[0].shape[0]
    a, b, ranks, scal, mask, R = _loras(x, lora_As, lora_Bs, scalings)
    bias_mask = sum(1 << j for j, t in enumerate(biases) if t is not None)
    bias = _three([t if t is not None else x for t in biases])
    y = torch.empty((P, M, N), dtype=x.dtype, device=x.device)
    from_memory = threshold > 0 and mask != 0
    keep_s = mask != 0 and (store_s or from_memory)
    s = torch.empty((P, M, R) if keep_s else (0,), dtype=torch.float32, device=x.device)
    common = dict(NUM_PROJ=P, LORA_MASK=mask, R=R, DOT_DTYPE=dot_dtype(x.dtype), PRECISION=dot_precision(x.dtype))
    if from_memory:
        k0, k1, k2 = _three(keys)
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), P)  # noqa: E731
        _lora_down_kernel[grid](x, *a, s, M, K, bucket(M), *ranks, k0, k1, k2, threshold, keep_scale, **common)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]) * P,)  # noqa: E731
    _lora_fwd_kernel[grid](
        x, *_three(weights), *bias, *a, *b, s if keep_s else y, y, M, N, K, bucket(M), *ranks, *scal,
        BIAS_MASK=bias_mask, S_FROM_MEMORY=from_memory, STORE_S=keep_s, **common,
    )
    return y, s


def lora_backward(dy, x, weights, lora_As, lora_Bs, scalings, s, keys, threshold: int, keep_scale: float,
                  need_dx: bool, need_a: bool, need_b: bool):
    """Gradients from dY [P, M, N] contiguous and the forward's S [P, M, R] (needed when need_b).
    Returns (dX [M, K] or None, dA [P, R, K] fp32 or None, dBᵀ [P, R, N] fp32 or None); rows past r_j are 0."""
    P, M, N = dy.shape
    K = x.shape[1]
    a, b, ranks, scal, mask, R = _loras(x, lora_As, lora_Bs, scalings)
    need_a, need_b = need_a and mask != 0, need_b and mask != 0
    k0, k1, k2 = _three(keys)
    dtype_args = dict(DOT_DTYPE=dot_dtype(dy.dtype), PRECISION=dot_precision(dy.dtype))
    dx = torch.empty((M, K), dtype=dy.dtype, device=dy.device) if need_dx else None
    ds = torch.empty((P, M, R), dtype=torch.float32, device=dy.device) if need_a else None
    if need_dx or need_a:
        def grid(meta):
            tiles = triton.cdiv(M, meta["BLOCK_M"])
            return (tiles * triton.cdiv(K, meta["BLOCK_K"]) if need_dx else tiles,)

        _lora_bwd_dx_kernel[grid](
            dy, *_three(weights), *a, *b, dx if need_dx else dy, ds if need_a else dy,
            M, N, K, bucket(M), *ranks, *scal, k0, k1, k2, threshold, keep_scale,
            NUM_PROJ=P, LORA_MASK=mask, NEED_DX=need_dx, STORE_DS=need_a, DROPOUT=threshold > 0, R=R,
            **dtype_args,
        )
    if not (need_a or need_b):
        return dx, None, None
    # Enough row splits to fill the GPU (~4 programs per SM), each a multiple of the largest BLOCK_T.
    target = 8 if interpreting() else 4 * _sm_count(dy.device)
    columns = triton.cdiv(max(K, N), 64)
    splits = max(1, min(triton.cdiv(M, 256), triton.cdiv(target, P * columns * (need_a + need_b))))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), 256) * 256
    splits = triton.cdiv(M, rows_per_split)
    da = torch.empty((P, splits, R, K) if need_a else (1,), dtype=torch.float32, device=dy.device)
    db = torch.empty((P, splits, R, N) if need_b else (1,), dtype=torch.float32, device=dy.device)
    which_first, which_count = (0 if need_a else 1), (int(need_a) + int(need_b))
    grid = lambda meta: (which_count * P, triton.cdiv(max(K, N), meta["BLOCK_C"]), splits)  # noqa: E731
    _lora_bwd_weight_kernel[grid](
        ds if need_a else da, x, da, s if need_b else db, dy, db, M, K, N, rows_per_split, *scal,
        k0, k1, k2, threshold, keep_scale, NUM_PROJ=P, LORA_MASK=mask, WHICH_FIRST=which_first,
        WHICH_COUNT=which_count, DROPOUT=threshold > 0, R=R, **dtype_args,
    )
    return dx, (da.sum(1) if need_a else None), (db.sum(1) if need_b else None)


def _sm_count(device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count
