"""Forward kernel of DeBERTa-v2 disentangled attention (online softmax, positions computed per tile).

For query i and key k (the P prefix keys first, then content key j = k - P), with s = softmax_scale:

    score(i, k) = s · Q_i·K_k                                                         k < P (prefix)
    score(i, k) = s · (Q_i·K_k + [c2p] Q_i·Pk[slot(i - j)] + [p2c] K_k·Pq[slot(i - j)])  content key
    out_i = Σ_k dropout(softmax_k(score(i, ·)))_k V_k,     LSE_i = log2 Σ_k exp2(log2(e) · score(i, k))

A [B, L] token mask makes (i, j) valid when tokens i and j are real; prefix keys are valid for every query.
A query row with no valid content key has every content score 0 when there are no prefix keys (the uniform
average of transformers' finfo.min rows) and -inf otherwise (it attends to the prefix keys only).

Nothing of size [L, L] or [L, 2S] exists: per tile the positional scores come from WIN table rows
(``_common``), or from one row when the tile's distances are all saturated. The key loop runs in three
ranges (saturated high, window band, saturated low) so that each range is compiled for its case.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    MODE_SAT_HI,
    MODE_SAT_LO,
    MODE_WINDOW,
    NO_SPECIALIZE_FWD,
    LOG2E,
    block_d,
    check_int32_offsets,
    content_tile_ranges,
    dropout_keep,
    interpreting,
    kernel_position_args,
    load_rows,
    load_slot_rows,
    load_tile,
    load_vec,
    mask_arg,
    masked_scores,
    mm,
    opaque_offset,
    position_constants,
    register_cap,
    table_strides,
    window_size,
    window_slots,
)
from .attention_tiles import attention_tiles

# Running max before any key: finite, so fully masked tiles give exp2(-inf) = 0, never NaN. A constexpr: a jit
# function may only read module-level values that are tl.constexpr (the interpreter does not enforce it).
NEG_INIT: tl.constexpr = tl.constexpr(-1.0e30)

# HEAD_DIM is specialised (vector loads): see NO_SPECIALIZE_FWD.
NO_SPECIALIZE = NO_SPECIALIZE_FWD

@triton.jit
def content_scores(q, k, m0, n0, pk_base, spks, spkd, pq_base, spqs, spqd, dcol, HEAD_DIM, c_row, pq_sat,
                   S, MID, MID_F, MID_M1_F, INV_MID, DEN, INV_DEN,
                   MODE: tl.constexpr, HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, BUCKETED: tl.constexpr,
                   INTERPRET: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   WIN: tl.constexpr):
    """Unscaled content + positional scores [BM, BN] of a tile (float32).

    c_row [BM]: Q_i·Pk[saturated slot] (saturated modes); pq_sat [BD]: Pq[saturated slot] (saturated modes).
    """
    if MODE == MODE_WINDOW and (HAS_C2P or HAS_P2C):
        slots = window_slots(m0, n0, S, MID, MID_F, MID_M1_F, INV_MID, DEN, INV_DEN, BUCKETED, INTERPRET,
                             BLOCK_N, WIN)
        rel = tl.arange(0, BLOCK_M)[:, None] - tl.arange(0, BLOCK_N)[None, :] + (BLOCK_N - 1)
        # The positional terms first, the content dot last with their sum as its accumulator: no [BM, BN]
        # score tile is live while a [BM, WIN] / [WIN, BN] window product exists.
        if HAS_C2P:
            pkw = load_slot_rows(pk_base, slots, spks, spkd, dcol, HEAD_DIM, INTERPRET)
            pos = tl.gather(mm(q, tl.trans(pkw.to(q.dtype)), PREC), rel, 1)
            if HAS_P2C:
                pqw = load_slot_rows(pq_base, slots, spqs, spqd, dcol, HEAD_DIM, INTERPRET)
                pos += tl.gather(mm(pqw.to(k.dtype), tl.trans(k), PREC), rel, 0)
        else:
            pqw = load_slot_rows(pq_base, slots, spqs, spqd, dcol, HEAD_DIM, INTERPRET)
            pos = tl.gather(mm(pqw.to(k.dtype), tl.trans(k), PREC), rel, 0)
        s = mm(q, tl.trans(k), PREC) + pos
    else:
        s = mm(q, tl.trans(k), PREC)
        if MODE != MODE_WINDOW:
            if HAS_C2P:
                s += c_row[:, None]
            if HAS_P2C:
                s += tl.sum(k.to(tl.float32) * pq_sat[None, :], 1)[None, :]
    return s


@triton.jit
def _online_update(s, v, m_i, l_i, acc, seed, bh, rows, kcols, dropout_p, inv_keep, DROPOUT: tl.constexpr,
                   PREC: tl.constexpr):
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        p = tl.where(dropout_keep(seed, bh, rows, kcols, dropout_p), p * inv_keep, 0.0)
    acc = acc * alpha[:, None] + mm(p.to(v.dtype), v, PREC)
    return m_new, l_i, acc


@triton.jit
def _fwd_content_range(acc, m_i, l_i, q, t_start, t_stop, m0, rows, row_ok, bh, seed, c_row, pq_sat,
                       k_base, skl, skd, v_base, svl, svd, pk_base, spks, spkd, pq_base, spqs, spqd,
                       mask_base, sml, dcol, L, P, HEAD_DIM, S, MID, MID_F, MID_M1_F, INV_MID, DEN, INV_DEN,
                       qk_scale, dropout_p, inv_keep,
                       MODE: tl.constexpr, HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, BUCKETED: tl.constexpr,
                       HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WIN: tl.constexpr):
    for t in range(t_start, t_stop):
        n0 = t * BLOCK_N
        cols = n0 + tl.arange(0, BLOCK_N)
        # As `cols < L`, but against the scalar L - n0: LLVM widened `n0 + j < L` to 64 bits with one hoisted
        # 64-bit bound per column (kept across the loop, spilled).
        col_in = tl.arange(0, BLOCK_N) < L - n0
        k = load_tile(k_base, P + n0, P + L, skl, skd, dcol, HEAD_DIM, BLOCK_N, INTERPRET, False)
        v = load_tile(v_base, P + n0, P + L, svl, svd, dcol, HEAD_DIM, BLOCK_N, INTERPRET, False)
        if HAS_MASK:
            mask_tile = mask_base + opaque_offset(tl.cast(n0, tl.int64) * sml, INTERPRET)
            col_ok = (tl.load(mask_tile + tl.arange(0, BLOCK_N) * sml, mask=col_in, other=0) != 0) & col_in
        else:
            col_ok = col_in
        s = content_scores(q, k, m0, n0, pk_base, spks, spkd, pq_base, spqs, spqd, dcol, HEAD_DIM, c_row, pq_sat,
                           S, MID, MID_F, MID_M1_F, INV_MID, DEN, INV_DEN, MODE, HAS_C2P, HAS_P2C, BUCKETED,
                           INTERPRET, PREC, BLOCK_M, BLOCK_N, WIN)
        s, _ = masked_scores(s * qk_scale, row_ok, col_ok, col_in, P)
        m_i, l_i, acc = _online_update(s, v, m_i, l_i, acc, seed, bh, rows, P + cols, dropout_p, inv_keep, DROPOUT,
                                       PREC)
    return acc, m_i, l_i


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _disentangled_fwd_kernel(
    Q, K, V, PK, PQ, MASK, SEED, OUT, LSE,
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
    spkb, spkh, spks, spkd, spqb, spqh, spqs, spqd, sob, soh, sol, sod, smb, sml,
    H, L, P, HEAD_DIM,
    S, MID, MID_F, MID_M1_F, INV_MID, DEN, INV_DEN, SAT_HI, SAT_LO,
    qk_scale, dropout_p, inv_keep,
    HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, BUCKETED: tl.constexpr, HAS_MASK: tl.constexpr,
    DROPOUT: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WIN: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    row_in = rows < L
    dcol = tl.arange(0, BLOCK_D)

    q = load_rows(Q + b * sqb + h * sqh, rows, row_in, sql, sqd, dcol, HEAD_DIM, INTERPRET)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    pk_base = PK + b * spkb + h * spkh
    pq_base = PQ + b * spqb + h * spqh
    mask_base = MASK + b * smb
    if HAS_MASK:
        row_ok = (tl.load(mask_base + rows * sml, mask=row_in, other=0) != 0) & row_in
    else:
        row_ok = row_in
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)

    m_i = tl.full([BLOCK_M], NEG_INIT, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # Prefix keys: content score only, valid for every query row.
    for n0 in range(0, P, BLOCK_N):
        kc = n0 + tl.arange(0, BLOCK_N)
        k_in = tl.arange(0, BLOCK_N) < P - n0
        k = load_tile(k_base, n0, P, skl, skd, dcol, HEAD_DIM, BLOCK_N, INTERPRET, False)
        v = load_tile(v_base, n0, P, svl, svd, dcol, HEAD_DIM, BLOCK_N, INTERPRET, False)
        s = tl.where(k_in[None, :], mm(q, tl.trans(k), PREC) * qk_scale, float("-inf"))
        m_i, l_i, acc = _online_update(s, v, m_i, l_i, acc, seed, bh, rows, kc, dropout_p, inv_keep, DROPOUT, PREC)

    HAS_POS: tl.constexpr = HAS_C2P or HAS_P2C
    n_hi, t_lo, n_tiles = content_tile_ranges(m0, L, SAT_HI, SAT_LO, HAS_POS, BLOCK_M, BLOCK_N)
    zero_row = tl.zeros([BLOCK_M], tl.float32)
    zero_vec = tl.zeros([BLOCK_D], tl.float32)
    c_hi = zero_row
    c_lo = zero_row
    pq_hi = zero_vec
    pq_lo = zero_vec
    if HAS_C2P:
        c_hi = tl.sum(q.to(tl.float32) * load_vec(pk_base + (2 * S - 1) * spks, spkd, HEAD_DIM, BLOCK_D)[None, :], 1)
        c_lo = tl.sum(q.to(tl.float32) * load_vec(pk_base, spkd, HEAD_DIM, BLOCK_D)[None, :], 1)
    if HAS_P2C:
        pq_hi = load_vec(pq_base + (2 * S - 1) * spqs, spqd, HEAD_DIM, BLOCK_D)
        pq_lo = load_vec(pq_base, spqd, HEAD_DIM, BLOCK_D)

    acc, m_i, l_i = _fwd_content_range(
        acc, m_i, l_i, q, 0, n_hi, m0, rows, row_ok, bh, seed, c_hi, pq_hi, k_base, skl, skd, v_base, svl, svd,
        pk_base, spks, spkd, pq_base, spqs, spqd, mask_base, sml, dcol, L, P, HEAD_DIM,
        S, MID, MID_F, MID_M1_F, INV_MID, DEN, INV_DEN, qk_scale, dropout_p, inv_keep,
        MODE_SAT_HI, HAS_C2P, HAS_P2C, BUCKETED, HAS_MASK, DROPOUT, INTERPRET, PREC, BLOCK_M, BLOCK_N, WIN)
    acc, m_i, l_i = _fwd_content_range(
        acc, m_i, l_i, q, n_hi, t_lo, m0, rows, row_ok, bh, seed, zero_row, zero_vec, k_base, skl, skd, v_base,
        svl, svd, pk_base, spks, spkd, pq_base, spqs, spqd, mask_base, sml, dcol, L, P, HEAD_DIM,
        S, MID, MID_F, MID_M1_F, INV_MID, DEN, INV_DEN, qk_scale, dropout_p, inv_keep,
        MODE_WINDOW, HAS_C2P, HAS_P2C, BUCKETED, HAS_MASK, DROPOUT, INTERPRET, PREC, BLOCK_M, BLOCK_N, WIN)
    acc, m_i, l_i = _fwd_content_range(
        acc, m_i, l_i, q, t_lo, n_tiles, m0, rows, row_ok, bh, seed, c_lo, pq_lo, k_base, skl, skd, v_base,
        svl, svd, pk_base, spks, spkd, pq_base, spqs, spqd, mask_base, sml, dcol, L, P, HEAD_DIM,
        S, MID, MID_F, MID_M1_F, INV_MID, DEN, INV_DEN, qk_scale, dropout_p, inv_keep,
        MODE_SAT_LO, HAS_C2P, HAS_P2C, BUCKETED, HAS_MASK, DROPOUT, INTERPRET, PREC, BLOCK_M, BLOCK_N, WIN)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # only rows past L can have l = 0; they are not stored
    out = acc / l_safe[:, None]
    o_ptrs = OUT + b * sob + h * soh + rows[:, None].to(tl.int64) * sol + dcol[None, :] * sod
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_in[:, None] & (dcol[None, :] < HEAD_DIM))
    tl.store(LSE + (b * H + h) * L + rows, m_i + tl.math.log2(l_safe), mask=row_in)


# ----------------------------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------------------------


def forward_config(length: int, head_dim: int, interpret: bool, dtype: torch.dtype = torch.float16) -> dict:
    """Tile sizes: the tuned table's entry for this target / dtype / head dim, else the defaults
    (``attention_tiles``)."""
    return attention_tiles("forward", dtype, block_d(head_dim), length, interpret)


def disentangled_attention_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pos_key: torch.Tensor | None,
    pos_query: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    seed: torch.Tensor | None,
    *,
    c2p: bool,
    p2c: bool,
    position_buckets: int,
    max_relative_positions: int,
    softmax_scale: float,
    dropout_p: float,
    num_prefix_keys: int,
    allow_tf32: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
    tiles: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Shapes as ``deberta_fast.ops.attention`` (any strides); returns
    (out [B, H, L, D] as a transposed view of a [B, L, H, D] buffer, lse [B, H, L] float32 in log2 units).
    ``tiles``: BLOCK_M, BLOCK_N, num_warps, num_stages instead of ``forward_config`` (the GPU check's tile sweep)."""
    batch, heads, length, head_dim = query.shape
    interpret = interpreting()
    config = tiles or forward_config(length, head_dim, interpret, query.dtype)
    bm = block_m or config["BLOCK_M"]
    bn = block_n or config["BLOCK_N"]
    check_int32_offsets(key=(key, bn), value=(value, bn), pos_key=(pos_key if c2p else None, None),
                         pos_query=(pos_query if p2c else None, None))
    out = torch.empty(batch, length, heads, head_dim, dtype=query.dtype, device=query.device).transpose(1, 2)
    lse = torch.empty(batch, heads, length, dtype=torch.float32, device=query.device)
    consts = position_constants(position_buckets, max_relative_positions)
    mask, smb, sml = mask_arg(attention_mask, query)
    pk = pos_key if (c2p and pos_key is not None) else query
    pq = pos_query if (p2c and pos_query is not None) else query
    dropout = dropout_p > 0.0
    grid = (triton.cdiv(length, bm), batch * heads)
    _disentangled_fwd_kernel[grid](
        query, key, value, pk, pq, mask, seed if dropout else query, out, lse,
        *query.stride(), *key.stride(), *value.stride(),
        *table_strides(pos_key if c2p else None), *table_strides(pos_query if p2c else None),
        *out.stride(), smb, sml,
        heads, length, num_prefix_keys, head_dim,
        *kernel_position_args(consts),
        float(softmax_scale * LOG2E), float(dropout_p), float(1.0 / (1.0 - dropout_p)) if dropout else 1.0,
        HAS_C2P=bool(c2p), HAS_P2C=bool(p2c), BUCKETED=consts["BUCKETED"], HAS_MASK=attention_mask is not None,
        DROPOUT=dropout, INTERPRET=interpret, PREC="tf32" if allow_tf32 else "ieee",
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d(head_dim), WIN=window_size(bm, bn),
        num_warps=config["num_warps"], num_stages=config["num_stages"], **register_cap(interpret),
    )
    return out, lse
