"""Backward kernels of DeBERTa-v2 disentangled attention: no atomics, deterministic, fp32 accumulation.

With p = softmax probabilities (recomputed from the saved LSE), keep/(1 - dropout_p) the dropout factor
z (regenerated from the seed), s = softmax_scale and delta_i = dO_i·O_i:

    dV_k   = Σ_i p_ik z_ik dO_i
    dS_ik  = s · p_ik (z_ik dO_i·V_k - delta_i)           (0 for masked pairs, so no gradient through them)
    dQ_i   = Σ_k dS_ik (K_k + [c2p] Pk[slot(i - j)])
    dK_k   = Σ_i dS_ik (Q_i + [p2c] Pq[slot(i - j)])        (content keys; prefix keys without the Pq term)
    dPk[r] = Σ_{(i, j): slot(i - j) = r} dS_ij Q_i,   dPq[r] = Σ_{(i, j): slot(i - j) = r} dS_ij K_j

Ownership instead of atomics: a query-stationary program owns dQ and delta of its query blocks and the c2p
gradient they produce; a key-stationary program owns dK, dV of its key blocks and their p2c gradient. The
positional gradients go into a float32 partial [R, D] per program (R = slots reachable at this length): per
tile the distance window's rows are folded onto distinct slots (a one-hot ``tl.dot`` where slots repeat) and
added to the partial by the program itself, in a fixed order; a run of saturated tiles sums its rows / columns
and adds one table row's gradient to the partial at the end of the run (no BLOCK_D-wide vector is kept live
across the band loop, where the register pressure peaks). The partials are summed by the launcher in a fixed
order (and over the batch when the tables broadcast over it). Each program walks a fixed list of (batch, block)
items, so the number of partials stays near a few per SM whatever B and L are.

Register pressure (ptxas -v, compile-only; python -m deberta_fast.benchmark.triton_compile). With 16 x 16 tiles
and 8 warps (``attention_tiles``) both kernels spill nothing on sm_80 / 90 / 100 / 120 in every fp16 / bf16 branch
of the compile layer, at 232-255 registers in the branch with the largest live set (c2p + p2c, token mask,
dropout, prefix keys, head dim 128): CI fails on any spill. Little is spare. Triton gives every ``tl.dot`` linked
to another one in a loop body the MMA warp layout of one of them, [1, num_warps] here (the [BLOCK_M, BLOCK_D]
gradient accumulators), so each warp holds the whole left operand of the score products (Q and dO: 32 registers
per thread each at BLOCK_D 128). What freed the last registers was address arithmetic, measured in that branch
(spill bytes of dQ and of dK / dV on sm_80 / 90 / 100 / 120):
  * before: dQ 40 / 52 / 48 / 48, dK / dV 0 / 40 / 24 / 72; the spilled values were addresses and offsets LLVM
    had hoisted out of the item loop (64-bit pointers, the sign words of int32 strides widened to 64 bits);
  * products of non-negative int32 indices and strides zero-extended (``wide``): dQ 8 / 36 / 12 / 40;
  * every address derived per item from the int32 indices (``per_iteration``, an asm move LLVM may not hoist,
    keeps the derivation in the loop body): dQ 8 / 28 / 4 / 32, dK / dV 0 / 20 / 36 / 56;
  * and again per tile inside the key / query ranges (``_item_tables``), the partial addressed through its
    virtual slot-0 row, a saturated row's partial offset derived where it is added: 0 everywhere.
The price is integer work per tile: the band loop body has 7% (dQ) and 10% (dK / dV) more SASS instructions than
before, the saturated loops 9-12% (sm_90, that branch; most of it the division of the program index by H), not yet
timed on a GPU. Cheaper variants (no division per tile; K / V / mask bases per range rather than per tile) had 3-4%
more instructions but spilled 4-20 bytes in one branch (sm_90, head dim 80, no dropout), so they were not taken;
nor were key-major scores in the dK / dV kernel (S^T = K Q^T, so that K is only ever a left operand): 8-24 bytes of
spills on every target and a band loop 24% longer. Measured earlier, all before the address work: laying the score
products out on their own ([2, 4] warps through tl.trans boundaries) or accumulating dQ / dK / dV transposed raised
the spills; 32 x 32 tiles spilled 84-788 bytes, 32 x 16 / 16 x 32 more than 16 x 16; parking the band's dS and
taking the c2p terms after the band, reloading Q and dO per band tile, or loading K, V and the table windows
transposed left dQ spilling on at least two targets. Kept from then: HEAD_DIM is specialised so that
[rows, BLOCK_D] loads are 16-byte vectors, and the p2c window product is taken as K Pq^T, gathered, transposed (its
left operand is then the [BN, BD] key tile, not the [WIN, BD] table window).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    MODE_SAT_HI,
    MODE_SAT_LO,
    MODE_WINDOW,
    NO_SPECIALIZE_BWD,
    LOG2E,
    block_d,
    check_int32_offsets,
    content_tile_ranges,
    device_programs,
    dropout_keep,
    interpreting,
    kernel_position_args,
    load_slot_rows,
    load_tile,
    load_vec,
    mask_arg,
    masked_scores,
    mm,
    opaque_offset,
    per_iteration,
    position_constants,
    reachable_slots,
    register_cap,
    table_strides,
    window_size,
    window_slots,
    wide,
)
from .attention_tiles import attention_tiles


@triton.jit
def _add_rows_to_partial(part_slot0, slot_rows, ok, val, BLOCK_D: tl.constexpr):
    """partial[slot_rows - SLOT_LO, :] += val for distinct slot_rows (ok masks rows outside the partial);
    part_slot0 points at the partial's (virtual) slot-0 row.

    Only this program touches its partial; the barrier orders this store before the next tile's load.
    """
    dcol = tl.arange(0, BLOCK_D)
    ptrs = part_slot0 + (slot_rows * BLOCK_D)[:, None] + dcol[None, :]
    old = tl.load(ptrs, mask=ok[:, None], other=0.0, volatile=True)
    tl.store(ptrs, old + val, mask=ok[:, None])
    tl.debug_barrier()


@triton.jit
def _add_vec_to_partial(part_slot0, slot, val, SLOT_LO, SLOT_HI, BLOCK_D: tl.constexpr, INTERPRET: tl.constexpr):
    """partial[slot - SLOT_LO, :] += val (skipped when the slot lies outside the partial)."""
    dcol = tl.arange(0, BLOCK_D)
    # slot is often loop-invariant (a saturated row); per_iteration keeps part_slot0 + its offset from being
    # hoisted out of the item loop as one more 64-bit pointer.
    row = per_iteration(slot, INTERPRET) + dcol * 0
    ok = (row >= SLOT_LO) & (row <= SLOT_HI)
    ptrs = part_slot0 + row * BLOCK_D + dcol
    old = tl.load(ptrs, mask=ok, other=0.0, volatile=True)
    tl.store(ptrs, old + val, mask=ok)
    tl.debug_barrier()


@triton.jit
def _fold_onto_slots(dwin, slots, WIN: tl.constexpr, PREC: tl.constexpr, AXIS: tl.constexpr):
    """Sum the window entries (axis AXIS of dwin, indexed by w) that share a slot, onto u = slot - min(slots).

    Returns (folded, smin); the window is monotone, so u covers [0, max - min]. Identity when slots are distinct.
    """
    smin = tl.min(slots, 0)
    smax = tl.max(slots, 0)
    if smax - smin == WIN - 1:
        folded = dwin.to(tl.float32)
    else:
        u = tl.arange(0, WIN)
        if AXIS == 1:
            # dwin [R, WIN(w)] @ onehot [WIN(w), WIN(u)]
            onehot = ((slots[:, None] - smin) == u[None, :]).to(dwin.dtype)
            folded = mm(dwin, onehot, PREC)
        else:
            # onehot [WIN(u), WIN(w)] @ dwin [WIN(w), C]
            onehot = ((slots[None, :] - smin) == u[:, None]).to(dwin.dtype)
            folded = mm(onehot, dwin, PREC)
    return folded, smin, smax


# ----------------------------------------------------------------------------------------------------------------
# query-stationary: dQ, delta, dPk
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _item_tables(PK, spkb, spkh, PQ, spqb, spqh, PART, g, NUM_GROUPS, b, tb_h, H, SLOT_LO, SLOT_HI,
                 BLOCK_D: tl.constexpr, INTERPRET: tl.constexpr):
    """(b, h as int64, Pk rows, Pq rows, partial) of batch b in program (g, tb_h = table batch · H + head).

    Called where the pointers are used, per tile (``_dq_item_bases``, ``_dkv_item_bases``): 64-bit pointers held
    across the tile loops cost two registers each where the live set peaks (and spilled). The int32 inputs pass
    through ``per_iteration`` so that LLVM cannot hoist the derivation back out of the loop; products are
    zero-extended (``wide``). The partial pointer is that of its virtual slot-0 row (the partial holds rows
    SLOT_LO..SLOT_HI), so no ``- SLOT_LO`` offset is kept.
    """
    b = wide(per_iteration(b, INTERPRET))
    tb_h = per_iteration(tb_h, INTERPRET)
    h = wide(tb_h % H)
    tb = wide(tb_h // H)
    part = PART + ((tb_h * NUM_GROUPS + per_iteration(g, INTERPRET)) * (SLOT_HI - SLOT_LO + 1)
                   - per_iteration(SLOT_LO, INTERPRET)).to(tl.int64) * BLOCK_D
    return b, h, PK + tb * wide(spkb) + h * wide(spkh), PQ + tb * wide(spqb) + h * wide(spqh), part


@triton.jit
def _dq_item_bases(K, skb, skh, V, svb, svh, PK, spkb, spkh, PQ, spqb, spqh, MASK, smb, PART, g, NUM_GROUPS, b, tb_h,
                   H, SLOT_LO, SLOT_HI, BLOCK_D: tl.constexpr, INTERPRET: tl.constexpr):
    """(K, V, Pk, Pq, mask, partial) base pointers of batch b in program (g, tb_h); see ``_item_tables``."""
    b, h, pk, pq, part = _item_tables(PK, spkb, spkh, PQ, spqb, spqh, PART, g, NUM_GROUPS, b, tb_h, H, SLOT_LO,
                                      SLOT_HI, BLOCK_D, INTERPRET)
    return K + b * wide(skb) + h * wide(skh), V + b * wide(svb) + h * wide(svh), pk, pq, MASK + b * wide(smb), part


@triton.jit
def _dq_content_range(dq, q, do, lse, delta, t_start, t_stop, m0, rows, row_ok, bh, seed,
                      K, skb, skh, skl, skd, V, svb, svh, svl, svd, PK, spkb, spkh, spks, spkd,
                      PQ, spqb, spqh, spqs, spqd, MASK, smb, sml, PART, g, NUM_GROUPS, b, tb_h, H,
                      dcol, L, P, HEAD_DIM, S, MID, MID_F, MID_M1_F, INV_MID, DEN, INV_DEN,
                      SLOT_LO, SLOT_HI, qk_scale, softmax_scale, dropout_p, inv_keep,
                      MODE: tl.constexpr, HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, BUCKETED: tl.constexpr,
                      HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WIN: tl.constexpr):
    """dq += the content key tiles [t_start, t_stop) of query block m0, all in one MODE; their c2p gradient goes to
    the partial. The saturated table rows are read here, per range, so no BLOCK_D-wide vector stays live in the
    kernel across the band range, where the register pressure peaks."""
    k_base, v_base, pk_base, pq_base, mask_base, part_base = _dq_item_bases(
        K, skb, skh, V, svb, svh, PK, spkb, spkh, PQ, spqb, spqh, MASK, smb, PART, g, NUM_GROUPS, b, tb_h, H,
        SLOT_LO, SLOT_HI, BLOCK_D, INTERPRET)
    if MODE == MODE_WINDOW:
        rel = tl.arange(0, BLOCK_M)[:, None] - tl.arange(0, BLOCK_N)[None, :] + (BLOCK_N - 1)
        # dC[a, w] = dS[a, b] with b = a + BN - 1 - w: the inverse of the forward gather, itself a gather.
        inv = tl.arange(0, BLOCK_M)[:, None] + (BLOCK_N - 1) - tl.arange(0, WIN)[None, :]
        inv_ok = (inv >= 0) & (inv < BLOCK_N)
        inv = tl.minimum(tl.maximum(inv, 0), BLOCK_N - 1)
    else:
        if MODE == MODE_SAT_HI:
            sat_slot = 2 * S - 1
        else:
            sat_slot = S * 0
        c_row = tl.zeros([BLOCK_M], tl.float32)
        if HAS_C2P:
            c_row = tl.sum(q.to(tl.float32) * load_vec(pk_base + sat_slot * spks, spkd, HEAD_DIM, BLOCK_D)[None, :], 1)
        if HAS_P2C:
            pq_sat = load_vec(pq_base + sat_slot * spqs, spqd, HEAD_DIM, BLOCK_D)
    rs = tl.zeros([BLOCK_M], tl.float32)
    for t in range(t_start, t_stop):
        k_base, v_base, pk_base, pq_base, mask_base, part_base = _dq_item_bases(
            K, skb, skh, V, svb, svh, PK, spkb, spkh, PQ, spqb, spqh, MASK, smb, PART, g, NUM_GROUPS, b, tb_h, H,
            SLOT_LO, SLOT_HI, BLOCK_D, INTERPRET)
        n0 = t * BLOCK_N
        cols = n0 + tl.arange(0, BLOCK_N)
        # 32-bit bound against the scalar L - n0, tile base + int32 offsets: see the forward's content loop.
        col_in = tl.arange(0, BLOCK_N) < L - n0
        k = load_tile(k_base, P + n0, P + L, skl, skd, dcol, HEAD_DIM, BLOCK_N, INTERPRET, True)
        v = load_tile(v_base, P + n0, P + L, svl, svd, dcol, HEAD_DIM, BLOCK_N, INTERPRET, True)
        if HAS_MASK:
            mask_tile = mask_base + opaque_offset(wide(n0) * wide(sml), INTERPRET)
            col_ok = (tl.load(mask_tile + tl.arange(0, BLOCK_N) * sml, mask=col_in, other=0) != 0) & col_in
        else:
            col_ok = col_in
        if MODE == MODE_WINDOW and (HAS_C2P or HAS_P2C):
            slots = window_slots(m0, n0, S, MID, MID_F, MID_M1_F, INV_MID, DEN, INV_DEN, BUCKETED, INTERPRET,
                                 BLOCK_N, WIN)
            s = mm(q, tl.trans(k), PREC)
            if HAS_C2P:
                pkw = load_slot_rows(pk_base, slots, spks, spkd, dcol, HEAD_DIM, INTERPRET).to(q.dtype)
                s += tl.gather(mm(q, tl.trans(pkw), PREC), rel, 1)
            if HAS_P2C:
                pqw = load_slot_rows(pq_base, slots, spqs, spqd, dcol, HEAD_DIM, INTERPRET).to(k.dtype)
                s += tl.trans(tl.gather(mm(k, tl.trans(pqw), PREC), tl.trans(rel), 1))
        else:
            s = mm(q, tl.trans(k), PREC)
            if MODE != MODE_WINDOW:
                if HAS_C2P:
                    s += c_row[:, None]
                if HAS_P2C:
                    s += tl.sum(k.to(tl.float32) * pq_sat[None, :], 1)[None, :]
        s, valid = masked_scores(s * qk_scale, row_ok, col_ok, col_in, P)
        p = tl.math.exp2(s - lse[:, None])
        dp = mm(do, tl.trans(v), PREC)
        if DROPOUT:
            keep = dropout_keep(seed, bh, rows, P + cols, dropout_p)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        ds = tl.where(valid, p * (dp - delta[:, None]), 0.0) * softmax_scale
        dq += mm(ds.to(k.dtype), k, PREC)
        if HAS_C2P:
            if MODE == MODE_WINDOW:
                dc = tl.where(inv_ok, tl.gather(ds, inv, 1), 0.0)
                dq += mm(dc.to(pkw.dtype), pkw, PREC)
                dcu, smin, smax = _fold_onto_slots(dc.to(q.dtype), slots, WIN, PREC, 1)
                dpk = mm(tl.trans(dcu.to(q.dtype)), q, PREC)
                urows = smin + tl.arange(0, WIN)
                _add_rows_to_partial(part_base, urows, (urows <= smax) & (urows >= SLOT_LO) & (urows <= SLOT_HI),
                                     dpk, BLOCK_D)
            else:
                rs += tl.sum(ds, 1)
    if MODE != MODE_WINDOW:
        if HAS_C2P:
            if t_stop > t_start:
                k_base, v_base, pk_base, pq_base, mask_base, part_base = _dq_item_bases(
                    K, skb, skh, V, svb, svh, PK, spkb, spkh, PQ, spqb, spqh, MASK, smb, PART, g, NUM_GROUPS, b,
                    tb_h, H, SLOT_LO, SLOT_HI, BLOCK_D, INTERPRET)
                # Saturated tiles: dQ_i += (Σ_k dS_ik) Pk[slot], dPk[slot] += Σ_i (Σ_k dS_ik) Q_i.
                pk_sat = load_vec(pk_base + sat_slot * spks, spkd, HEAD_DIM, BLOCK_D)
                dq += rs[:, None] * pk_sat[None, :]
                _add_vec_to_partial(part_base, sat_slot, tl.sum(rs[:, None] * q.to(tl.float32), 0), SLOT_LO,
                                    SLOT_HI, BLOCK_D, INTERPRET)
    return dq


@triton.jit(do_not_specialize=NO_SPECIALIZE_BWD)
def _disentangled_bwd_dq_kernel(
    Q, K, V, PK, PQ, MASK, SEED, OUT, DOUT, LSE, DELTA, DQ, PART,
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
    spkb, spkh, spks, spkd, spqb, spqh, spqs, spqd, sob, soh, sol, sod, sdob, sdoh, sdol, sdod,
    sdqb, sdqh, sdql, sdqd, smb, sml,
    B, H, L, P, HEAD_DIM, B_PER_TABLE, NUM_GROUPS,
    S, MID, MID_F, MID_M1_F, INV_MID, DEN, INV_DEN, SAT_HI, SAT_LO, SLOT_LO, SLOT_HI,
    qk_scale, softmax_scale, dropout_p, inv_keep,
    HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, BUCKETED: tl.constexpr, HAS_MASK: tl.constexpr,
    DROPOUT: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WIN: tl.constexpr,
):
    g = tl.program_id(0)
    tb_h = tl.program_id(1)  # (table batch, head)
    dcol = tl.arange(0, BLOCK_D)
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)
    HAS_POS: tl.constexpr = HAS_C2P or HAS_P2C

    n_mblocks = tl.cdiv(L, BLOCK_M)
    for item in range(g, B_PER_TABLE * n_mblocks, NUM_GROUPS):
        # Addresses are derived per item (and per tile inside the ranges: ``_dq_item_bases``) from the int32
        # indices b and tb_h; see the module docstring.
        tb_h_item = per_iteration(tb_h, INTERPRET)
        h = wide(tb_h_item % H)
        b32 = (tb_h_item // H) * B_PER_TABLE + item // n_mblocks
        b = wide(b32)
        bh = (b * H + h).to(tl.int32)
        m0 = (item % n_mblocks) * BLOCK_M
        rows = m0 + tl.arange(0, BLOCK_M)
        row_in = tl.arange(0, BLOCK_M) < L - m0
        q = load_tile(Q + b * wide(sqb) + h * wide(sqh), m0, L, sql, sqd, dcol, HEAD_DIM, BLOCK_M, INTERPRET, True)
        do = load_tile(DOUT + b * wide(sdob) + h * wide(sdoh), m0, L, sdol, sdod, dcol, HEAD_DIM, BLOCK_M, INTERPRET,
                       True)
        o = load_tile(OUT + b * wide(sob) + h * wide(soh), m0, L, sol, sod, dcol, HEAD_DIM, BLOCK_M, INTERPRET, True)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        tl.store(DELTA + (b * H + h) * L + rows, delta, mask=row_in)
        lse = tl.load(LSE + (b * H + h) * L + rows, mask=row_in, other=float("inf"))
        k_base, v_base, _, _, mask_base, _ = _dq_item_bases(
            K, skb, skh, V, svb, svh, PK, spkb, spkh, PQ, spqb, spqh, MASK, smb, PART, g, NUM_GROUPS, b32, tb_h, H,
            SLOT_LO, SLOT_HI, BLOCK_D, INTERPRET)
        if HAS_MASK:
            row_ok = (tl.load(mask_base + rows * sml, mask=row_in, other=0) != 0) & row_in
        else:
            row_ok = row_in
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        for n0 in range(0, P, BLOCK_N):
            kc = n0 + tl.arange(0, BLOCK_N)
            k_in = tl.arange(0, BLOCK_N) < P - n0
            k = load_tile(k_base, n0, P, skl, skd, dcol, HEAD_DIM, BLOCK_N, INTERPRET, True)
            v = load_tile(v_base, n0, P, svl, svd, dcol, HEAD_DIM, BLOCK_N, INTERPRET, True)
            valid = row_in[:, None] & k_in[None, :]
            p = tl.math.exp2(tl.where(valid, mm(q, tl.trans(k), PREC) * qk_scale, float("-inf")) - lse[:, None])
            dp = mm(do, tl.trans(v), PREC)
            if DROPOUT:
                keep = dropout_keep(seed, bh, rows, kc, dropout_p)
                dp = tl.where(keep, dp * inv_keep, 0.0)
            ds = tl.where(valid, p * (dp - delta[:, None]), 0.0) * softmax_scale
            dq += mm(ds.to(k.dtype), k, PREC)

        n_hi, t_lo, n_tiles = content_tile_ranges(m0, L, SAT_HI, SAT_LO, HAS_POS, BLOCK_M, BLOCK_N)
        dq = _dq_content_range(
            dq, q, do, lse, delta, 0, n_hi, m0, rows, row_ok, bh, seed,
            K, skb, skh, skl, skd, V, svb, svh, svl, svd, PK, spkb, spkh, spks, spkd,
            PQ, spqb, spqh, spqs, spqd, MASK, smb, sml, PART, g, NUM_GROUPS, b32, tb_h, H,
            dcol, L, P, HEAD_DIM, S, MID, MID_F, MID_M1_F, INV_MID, DEN, INV_DEN, SLOT_LO, SLOT_HI,
            qk_scale, softmax_scale, dropout_p, inv_keep, MODE_SAT_HI, HAS_C2P, HAS_P2C, BUCKETED, HAS_MASK,
            DROPOUT, INTERPRET, PREC, BLOCK_M, BLOCK_N, BLOCK_D, WIN)
        dq = _dq_content_range(
            dq, q, do, lse, delta, n_hi, t_lo, m0, rows, row_ok, bh, seed,
            K, skb, skh, skl, skd, V, svb, svh, svl, svd, PK, spkb, spkh, spks, spkd,
            PQ, spqb, spqh, spqs, spqd, MASK, smb, sml, PART, g, NUM_GROUPS, b32, tb_h, H,
            dcol, L, P, HEAD_DIM, S, MID, MID_F, MID_M1_F, INV_MID, DEN, INV_DEN, SLOT_LO, SLOT_HI,
            qk_scale, softmax_scale, dropout_p, inv_keep, MODE_WINDOW, HAS_C2P, HAS_P2C, BUCKETED, HAS_MASK,
            DROPOUT, INTERPRET, PREC, BLOCK_M, BLOCK_N, BLOCK_D, WIN)
        dq = _dq_content_range(
            dq, q, do, lse, delta, t_lo, n_tiles, m0, rows, row_ok, bh, seed,
            K, skb, skh, skl, skd, V, svb, svh, svl, svd, PK, spkb, spkh, spks, spkd,
            PQ, spqb, spqh, spqs, spqd, MASK, smb, sml, PART, g, NUM_GROUPS, b32, tb_h, H,
            dcol, L, P, HEAD_DIM, S, MID, MID_F, MID_M1_F, INV_MID, DEN, INV_DEN, SLOT_LO, SLOT_HI,
            qk_scale, softmax_scale, dropout_p, inv_keep, MODE_SAT_LO, HAS_C2P, HAS_P2C, BUCKETED, HAS_MASK,
            DROPOUT, INTERPRET, PREC, BLOCK_M, BLOCK_N, BLOCK_D, WIN)
        dq_ptrs = DQ + b * wide(sdqb) + h * wide(sdqh) + rows[:, None].to(tl.int64) * sdql + dcol[None, :] * sdqd
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_in[:, None] & (dcol[None, :] < HEAD_DIM))



# ----------------------------------------------------------------------------------------------------------------
# key-stationary: dK, dV, dPq
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _dkv_item_bases(Q, sqb, sqh, DOUT, sdob, sdoh, PK, spkb, spkh, PQ, spqb, spqh, MASK, smb, PART, g, NUM_GROUPS,
                    b, tb_h, H, L, SLOT_LO, SLOT_HI, BLOCK_D: tl.constexpr, INTERPRET: tl.constexpr):
    """(Q, dO, Pk, Pq, mask, partial) base pointers of batch b in program (g, tb_h) and the offset of (b, h)'s
    row 0 in LSE / DELTA; see ``_item_tables``."""
    b, h, pk, pq, part = _item_tables(PK, spkb, spkh, PQ, spqb, spqh, PART, g, NUM_GROUPS, b, tb_h, H, SLOT_LO,
                                      SLOT_HI, BLOCK_D, INTERPRET)
    return (Q + b * wide(sqb) + h * wide(sqh), DOUT + b * wide(sdob) + h * wide(sdoh), pk, pq, MASK + b * wide(smb),
            part, (b * wide(H) + h) * wide(L))


@triton.jit
def _dkv_content_range(dk, dv, k, v, t_start, t_stop, n0, cols, col_ok, col_in, bh, seed,
                       Q, sqb, sqh, sql, sqd, DOUT, sdob, sdoh, sdol, sdod, PK, spkb, spkh, spks, spkd,
                       PQ, spqb, spqh, spqs, spqd, MASK, smb, sml, PART, g, NUM_GROUPS, b, tb_h,
                       LSE, DELTA, dcol, H, L, P, HEAD_DIM,
                       S, MID, MID_F, MID_M1_F, INV_MID, DEN, INV_DEN, SLOT_LO, SLOT_HI,
                       qk_scale, softmax_scale, dropout_p, inv_keep,
                       MODE: tl.constexpr, HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, BUCKETED: tl.constexpr,
                       HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WIN: tl.constexpr):
    """dk, dv += the query tiles [t_start, t_stop) of content key block n0, all in one MODE; their p2c gradient goes
    to the partial. The saturated table rows are read here, per range (see ``_dq_content_range``)."""
    q_base, do_base, pk_base, pq_base, mask_base, part_base, row_base = _dkv_item_bases(
        Q, sqb, sqh, DOUT, sdob, sdoh, PK, spkb, spkh, PQ, spqb, spqh, MASK, smb, PART, g, NUM_GROUPS, b, tb_h, H,
        L, SLOT_LO, SLOT_HI, BLOCK_D, INTERPRET)
    if MODE == MODE_WINDOW:
        rel = tl.arange(0, BLOCK_M)[:, None] - tl.arange(0, BLOCK_N)[None, :] + (BLOCK_N - 1)
        # dP[w, b] = dS[a, b] with a = w + b - (BN - 1): the inverse of the forward gather along axis 0.
        inv = tl.arange(0, WIN)[:, None] + tl.arange(0, BLOCK_N)[None, :] - (BLOCK_N - 1)
        inv_ok = (inv >= 0) & (inv < BLOCK_M)
        inv = tl.minimum(tl.maximum(inv, 0), BLOCK_M - 1)
    else:
        if MODE == MODE_SAT_HI:
            sat_slot = 2 * S - 1
        else:
            sat_slot = S * 0
        kc_sat = tl.zeros([BLOCK_N], tl.float32)
        if HAS_P2C:
            kc_sat = tl.sum(k.to(tl.float32) * load_vec(pq_base + sat_slot * spqs, spqd, HEAD_DIM, BLOCK_D)[None, :], 1)
        if HAS_C2P:
            pk_sat = load_vec(pk_base + sat_slot * spks, spkd, HEAD_DIM, BLOCK_D)
    cs = tl.zeros([BLOCK_N], tl.float32)
    for t in range(t_start, t_stop):
        q_base, do_base, pk_base, pq_base, mask_base, part_base, row_base = _dkv_item_bases(
            Q, sqb, sqh, DOUT, sdob, sdoh, PK, spkb, spkh, PQ, spqb, spqh, MASK, smb, PART, g, NUM_GROUPS, b, tb_h,
            H, L, SLOT_LO, SLOT_HI, BLOCK_D, INTERPRET)
        m0 = t * BLOCK_M
        rows = m0 + tl.arange(0, BLOCK_M)
        # 32-bit bound against the scalar L - m0, tile base + int32 offsets: see the forward's content loop.
        row_in = tl.arange(0, BLOCK_M) < L - m0
        q = load_tile(q_base, m0, L, sql, sqd, dcol, HEAD_DIM, BLOCK_M, INTERPRET, True)
        do = load_tile(do_base, m0, L, sdol, sdod, dcol, HEAD_DIM, BLOCK_M, INTERPRET, True)
        row_vec = row_base + m0
        lse = tl.load(LSE + row_vec + tl.arange(0, BLOCK_M), mask=row_in, other=float("inf"))
        delta = tl.load(DELTA + row_vec + tl.arange(0, BLOCK_M), mask=row_in, other=0.0)
        if HAS_MASK:
            mask_tile = mask_base + opaque_offset(wide(m0) * wide(sml), INTERPRET)
            row_ok = (tl.load(mask_tile + tl.arange(0, BLOCK_M) * sml, mask=row_in, other=0) != 0) & row_in
        else:
            row_ok = row_in
        if MODE == MODE_WINDOW and (HAS_C2P or HAS_P2C):
            slots = window_slots(m0, n0, S, MID, MID_F, MID_M1_F, INV_MID, DEN, INV_DEN, BUCKETED, INTERPRET,
                                 BLOCK_N, WIN)
            s = mm(q, tl.trans(k), PREC)
            if HAS_C2P:
                pkw = load_slot_rows(pk_base, slots, spks, spkd, dcol, HEAD_DIM, INTERPRET).to(q.dtype)
                s += tl.gather(mm(q, tl.trans(pkw), PREC), rel, 1)
            if HAS_P2C:
                pqw = load_slot_rows(pq_base, slots, spqs, spqd, dcol, HEAD_DIM, INTERPRET).to(k.dtype)
                s += tl.trans(tl.gather(mm(k, tl.trans(pqw), PREC), tl.trans(rel), 1))
        else:
            s = mm(q, tl.trans(k), PREC)
            if MODE != MODE_WINDOW:
                if HAS_C2P:
                    s += tl.sum(q.to(tl.float32) * pk_sat[None, :], 1)[:, None]
                if HAS_P2C:
                    s += kc_sat[None, :]
        s, valid = masked_scores(s * qk_scale, row_ok, col_ok, col_in, P)
        p = tl.where(row_in[:, None], tl.math.exp2(s - lse[:, None]), 0.0)
        dp = mm(do, tl.trans(v), PREC)
        if DROPOUT:
            keep = dropout_keep(seed, bh, rows, P + cols, dropout_p)
            dv += mm(tl.trans(tl.where(keep, p * inv_keep, 0.0).to(do.dtype)), do, PREC)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        else:
            dv += mm(tl.trans(p.to(do.dtype)), do, PREC)
        ds = tl.where(valid, p * (dp - delta[:, None]), 0.0) * softmax_scale
        dk += mm(tl.trans(ds.to(q.dtype)), q, PREC)
        if HAS_P2C:
            if MODE == MODE_WINDOW:
                dpw = tl.where(inv_ok, tl.gather(ds, inv, 0), 0.0)
                dk += mm(tl.trans(dpw.to(pqw.dtype)), pqw, PREC)
                dpu, smin, smax = _fold_onto_slots(dpw.to(k.dtype), slots, WIN, PREC, 0)
                urows = smin + tl.arange(0, WIN)
                dpq = mm(dpu.to(k.dtype), k, PREC)
                _add_rows_to_partial(part_base, urows, (urows <= smax) & (urows >= SLOT_LO) & (urows <= SLOT_HI),
                                     dpq, BLOCK_D)
            else:
                cs += tl.sum(ds, 0)
    if MODE != MODE_WINDOW:
        if HAS_P2C:
            if t_stop > t_start:
                q_base, do_base, pk_base, pq_base, mask_base, part_base, row_base = _dkv_item_bases(
                    Q, sqb, sqh, DOUT, sdob, sdoh, PK, spkb, spkh, PQ, spqb, spqh, MASK, smb, PART, g, NUM_GROUPS,
                    b, tb_h, H, L, SLOT_LO, SLOT_HI, BLOCK_D, INTERPRET)
                # Saturated tiles: dK_k += (Σ_i dS_ik) Pq[slot], dPq[slot] += Σ_k (Σ_i dS_ik) K_k.
                pq_sat = load_vec(pq_base + sat_slot * spqs, spqd, HEAD_DIM, BLOCK_D)
                dk += cs[:, None] * pq_sat[None, :]
                _add_vec_to_partial(part_base, sat_slot, tl.sum(cs[:, None] * k.to(tl.float32), 0), SLOT_LO,
                                    SLOT_HI, BLOCK_D, INTERPRET)
    return dk, dv


@triton.jit(do_not_specialize=NO_SPECIALIZE_BWD)
def _disentangled_bwd_dkv_kernel(
    Q, K, V, PK, PQ, MASK, SEED, DOUT, LSE, DELTA, DK, DV, PART,
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
    spkb, spkh, spks, spkd, spqb, spqh, spqs, spqd, sdob, sdoh, sdol, sdod,
    sdkb, sdkh, sdkl, sdkd, sdvb, sdvh, sdvl, sdvd, smb, sml,
    B, H, L, P, HEAD_DIM, B_PER_TABLE, NUM_GROUPS,
    S, MID, MID_F, MID_M1_F, INV_MID, DEN, INV_DEN, SAT_HI, SAT_LO, SLOT_LO, SLOT_HI,
    qk_scale, softmax_scale, dropout_p, inv_keep,
    HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, BUCKETED: tl.constexpr, HAS_MASK: tl.constexpr,
    DROPOUT: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WIN: tl.constexpr,
):
    g = tl.program_id(0)
    tb_h = tl.program_id(1)
    dcol = tl.arange(0, BLOCK_D)
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)
    HAS_POS: tl.constexpr = HAS_C2P or HAS_P2C

    n_prefix_blocks = tl.cdiv(P, BLOCK_N)
    n_blocks = n_prefix_blocks + tl.cdiv(L, BLOCK_N)
    n_mtiles = tl.cdiv(L, BLOCK_M)
    for item in range(g, B_PER_TABLE * n_blocks, NUM_GROUPS):
        # Addresses are derived per item (and per tile inside the ranges: ``_dq_item_bases``) from the int32
        # indices b and tb_h; see the module docstring.
        tb_h_item = per_iteration(tb_h, INTERPRET)
        h = wide(tb_h_item % H)
        b32 = (tb_h_item // H) * B_PER_TABLE + item // n_blocks
        b = wide(b32)
        bh = (b * H + h).to(tl.int32)
        blk = item % n_blocks
        q_base, do_base, _, _, mask_base, _, _ = _dkv_item_bases(
            Q, sqb, sqh, DOUT, sdob, sdoh, PK, spkb, spkh, PQ, spqb, spqh, MASK, smb, PART, g, NUM_GROUPS, b32, tb_h,
            H, L, SLOT_LO, SLOT_HI, BLOCK_D, INTERPRET)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        is_prefix = blk < n_prefix_blocks
        n0 = (blk - n_prefix_blocks) * BLOCK_N  # content block start (meaningless for a prefix block)
        cols = n0 + tl.arange(0, BLOCK_N)
        kidx = tl.where(is_prefix, blk * BLOCK_N + tl.arange(0, BLOCK_N), P + cols)
        k_first = tl.where(is_prefix, blk * BLOCK_N, P + n0)
        k_stop = tl.where(is_prefix, P, P + L)
        k_in = tl.arange(0, BLOCK_N) < k_stop - k_first
        k = load_tile(K + b * wide(skb) + h * wide(skh), k_first, k_stop, skl, skd, dcol, HEAD_DIM, BLOCK_N,
                      INTERPRET, True)
        v = load_tile(V + b * wide(svb) + h * wide(svh), k_first, k_stop, svl, svd, dcol, HEAD_DIM, BLOCK_N,
                      INTERPRET, True)
        if is_prefix:
            for t in range(0, n_mtiles):
                m0 = t * BLOCK_M
                rows = m0 + tl.arange(0, BLOCK_M)
                row_in = tl.arange(0, BLOCK_M) < L - m0
                q = load_tile(q_base, m0, L, sql, sqd, dcol, HEAD_DIM, BLOCK_M, INTERPRET, True)
                do = load_tile(do_base, m0, L, sdol, sdod, dcol, HEAD_DIM, BLOCK_M, INTERPRET, True)
                row_vec = opaque_offset(wide(bh) * wide(L) + m0, INTERPRET)
                lse = tl.load(LSE + row_vec + tl.arange(0, BLOCK_M), mask=row_in, other=float("inf"))
                delta = tl.load(DELTA + row_vec + tl.arange(0, BLOCK_M), mask=row_in, other=0.0)
                valid = row_in[:, None] & k_in[None, :]
                s = tl.where(valid, mm(q, tl.trans(k), PREC) * qk_scale, float("-inf"))
                p = tl.math.exp2(s - lse[:, None])
                dp = mm(do, tl.trans(v), PREC)
                if DROPOUT:
                    keep = dropout_keep(seed, bh, rows, kidx, dropout_p)
                    dv += mm(tl.trans(tl.where(keep, p * inv_keep, 0.0).to(do.dtype)), do, PREC)
                    dp = tl.where(keep, dp * inv_keep, 0.0)
                else:
                    dv += mm(tl.trans(p.to(do.dtype)), do, PREC)
                ds = tl.where(valid, p * (dp - delta[:, None]), 0.0) * softmax_scale
                dk += mm(tl.trans(ds.to(q.dtype)), q, PREC)
        else:
            if HAS_MASK:
                col_ok = (tl.load(mask_base + cols * sml, mask=k_in, other=0) != 0) & k_in
            else:
                col_ok = k_in
            # Query tiles of this key block: [0, c_lo) saturated low, [c_lo, c_hi) band, [c_hi, n) high.
            if HAS_POS:
                z = n0 - (BLOCK_M - 1) + SAT_LO
                c_lo = tl.where(z >= 0, tl.maximum(z, 0) // BLOCK_M + 1, 0)
                c_lo = tl.minimum(c_lo, n_mtiles)
                w = n0 + (BLOCK_N - 1) + SAT_HI
                c_hi = (w + BLOCK_M - 1) // BLOCK_M
                c_hi = tl.minimum(tl.maximum(c_hi, c_lo), n_mtiles)
            else:
                c_lo = n_mtiles * 0
                c_hi = n_mtiles
            dk, dv = _dkv_content_range(
                dk, dv, k, v, 0, c_lo, n0, cols, col_ok, k_in, bh, seed,
                Q, sqb, sqh, sql, sqd, DOUT, sdob, sdoh, sdol, sdod, PK, spkb, spkh, spks, spkd,
                PQ, spqb, spqh, spqs, spqd, MASK, smb, sml, PART, g, NUM_GROUPS, b32, tb_h,
                LSE, DELTA, dcol, H, L, P, HEAD_DIM, S, MID, MID_F, MID_M1_F, INV_MID, DEN, INV_DEN,
                SLOT_LO, SLOT_HI, qk_scale, softmax_scale, dropout_p, inv_keep, MODE_SAT_LO, HAS_C2P, HAS_P2C,
                BUCKETED, HAS_MASK, DROPOUT, INTERPRET, PREC, BLOCK_M, BLOCK_N, BLOCK_D, WIN)
            dk, dv = _dkv_content_range(
                dk, dv, k, v, c_lo, c_hi, n0, cols, col_ok, k_in, bh, seed,
                Q, sqb, sqh, sql, sqd, DOUT, sdob, sdoh, sdol, sdod, PK, spkb, spkh, spks, spkd,
                PQ, spqb, spqh, spqs, spqd, MASK, smb, sml, PART, g, NUM_GROUPS, b32, tb_h,
                LSE, DELTA, dcol, H, L, P, HEAD_DIM, S, MID, MID_F, MID_M1_F, INV_MID, DEN, INV_DEN,
                SLOT_LO, SLOT_HI, qk_scale, softmax_scale, dropout_p, inv_keep, MODE_WINDOW, HAS_C2P, HAS_P2C,
                BUCKETED, HAS_MASK, DROPOUT, INTERPRET, PREC, BLOCK_M, BLOCK_N, BLOCK_D, WIN)
            dk, dv = _dkv_content_range(
                dk, dv, k, v, c_hi, n_mtiles, n0, cols, col_ok, k_in, bh, seed,
                Q, sqb, sqh, sql, sqd, DOUT, sdob, sdoh, sdol, sdod, PK, spkb, spkh, spks, spkd,
                PQ, spqb, spqh, spqs, spqd, MASK, smb, sml, PART, g, NUM_GROUPS, b32, tb_h,
                LSE, DELTA, dcol, H, L, P, HEAD_DIM, S, MID, MID_F, MID_M1_F, INV_MID, DEN, INV_DEN,
                SLOT_LO, SLOT_HI, qk_scale, softmax_scale, dropout_p, inv_keep, MODE_SAT_HI, HAS_C2P, HAS_P2C,
                BUCKETED, HAS_MASK, DROPOUT, INTERPRET, PREC, BLOCK_M, BLOCK_N, BLOCK_D, WIN)
        out_mask = k_in[:, None] & (dcol[None, :] < HEAD_DIM)
        dk_ptrs = DK + b * wide(sdkb) + h * wide(sdkh) + kidx[:, None].to(tl.int64) * sdkl + dcol[None, :] * sdkd
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=out_mask)
        dv_ptrs = DV + b * wide(sdvb) + h * wide(sdvh) + kidx[:, None].to(tl.int64) * sdvl + dcol[None, :] * sdvd
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=out_mask)



# ----------------------------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------------------------


def backward_config(length: int, head_dim: int, interpret: bool, dtype: torch.dtype = torch.float16) -> dict:
    """Tile sizes: the tuned table's entry, else 16 x 16 tiles, 8 warps (the one shape measured spill-free) and
    one pipeline stage (the partial read-modify-write of a tile must not be prefetched before the previous tile's
    store); see ``attention_tiles``. The interpreter takes 64 x 64 tiles (fewer Python-level steps); the tests
    cover 16, 32 and 64."""
    return attention_tiles("backward", dtype, block_d(head_dim), length, interpret)


def _groups(items: int, tables_heads: int, programs: int) -> int:
    return max(1, min(items, -(-programs // tables_heads)))


def _reduce_partial(part, tables, heads, groups, lo, hi, table, head_dim):
    """[T·H·G, R, BD] float32 partials -> gradient shaped like ``table`` [1 or T, H, 2S, D] in its dtype.

    Fixed-order sums over the groups, and over the batch when the table broadcasts over it.
    """
    summed = part.view(tables, heads, groups, hi - lo + 1, part.shape[-1]).sum(2)[..., :head_dim]
    if table.shape[0] != tables:
        summed = summed.sum(0, keepdim=True)
    full = torch.zeros(table.shape[0], heads, table.shape[2], head_dim, dtype=torch.float32, device=part.device)
    full[:, :, lo : hi + 1] = summed
    return full.to(table.dtype)


def disentangled_attention_backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pos_key: torch.Tensor | None,
    pos_query: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    seed: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
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
    programs: int | None = None,
    tiles: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch the two backward kernels; returns (dq, dk, dv, dpk, dpq) shaped like their inputs (dpk / dpq None
    when the term is off). dq / dk / dv are transposed views of [B, L, H, D] buffers.

    ``programs``: how many programs each kernel spreads its (batch, block) items over (default: by device).
    ``tiles``: BLOCK_M, BLOCK_N, num_warps, num_stages instead of ``backward_config`` (the tile sweep).
    """
    batch, heads, length, head_dim = query.shape
    num_keys = key.shape[2]
    device = query.device
    interpret = interpreting()
    config = tiles or backward_config(length, head_dim, interpret, query.dtype)
    bm = block_m or config["BLOCK_M"]
    bn = block_n or config["BLOCK_N"]
    bd = block_d(head_dim)
    consts = position_constants(position_buckets, max_relative_positions)
    lo, hi = reachable_slots(length, consts) if (c2p or p2c) else (0, 0)
    programs = programs or device_programs(device)
    dropout = dropout_p > 0.0
    mask, smb, sml = mask_arg(attention_mask, query)
    pk = pos_key if c2p else query
    pq = pos_query if p2c else query
    # Programs are grouped per table batch: the batch when a table is per example, else one group for all.
    table_batches = {t.shape[0] for t, used in ((pos_key, c2p), (pos_query, p2c)) if used}
    tables = batch if batch in table_batches else 1
    b_per_table = batch // tables

    dq = torch.empty(batch, length, heads, head_dim, dtype=query.dtype, device=device).transpose(1, 2)
    dk = torch.empty(batch, num_keys, heads, head_dim, dtype=key.dtype, device=device).transpose(1, 2)
    dv = torch.empty(batch, num_keys, heads, value.shape[-1], dtype=value.dtype, device=device).transpose(1, 2)
    delta = torch.empty(batch, heads, length, dtype=torch.float32, device=device)
    common = dict(
        HAS_C2P=bool(c2p), HAS_P2C=bool(p2c), BUCKETED=consts["BUCKETED"], HAS_MASK=attention_mask is not None,
        DROPOUT=dropout, INTERPRET=interpret, PREC="tf32" if allow_tf32 else "ieee",
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, WIN=window_size(bm, bn),
        num_warps=config["num_warps"], num_stages=config["num_stages"], **register_cap(interpret),
    )
    scalars = (
        *kernel_position_args(consts), lo, hi,
        float(softmax_scale * LOG2E), float(softmax_scale), float(dropout_p),
        float(1.0 / (1.0 - dropout_p)) if dropout else 1.0,
    )
    seed_arg = seed if dropout else query
    check_int32_offsets(query=(query, bm), out=(out, bm), grad_out=(grad_out, bm), key=(key, bn),
                         value=(value, bn), pos_key=(pos_key if c2p else None, None),
                         pos_query=(pos_query if p2c else None, None))
    pk_strides = table_strides(pos_key if c2p else None)
    pq_strides = table_strides(pos_query if p2c else None)

    groups_q = _groups(b_per_table * triton.cdiv(length, bm), tables * heads, programs)
    part = torch.zeros(tables * heads * groups_q if c2p else 1, hi - lo + 1, bd, dtype=torch.float32, device=device)
    _disentangled_bwd_dq_kernel[(groups_q, tables * heads)](
        query, key, value, pk, pq, mask, seed_arg, out, grad_out, lse, delta, dq, part,
        *query.stride(), *key.stride(), *value.stride(), *pk_strides, *pq_strides, *out.stride(),
        *grad_out.stride(), *dq.stride(), smb, sml,
        batch, heads, length, num_prefix_keys, head_dim, b_per_table, groups_q, *scalars, **common,
    )
    dpk = None
    if c2p:
        dpk = _reduce_partial(part, tables, heads, groups_q, lo, hi, pos_key, head_dim)
    del part  # its memory serves the p2c partial below

    blocks = triton.cdiv(num_prefix_keys, bn) + triton.cdiv(length, bn)
    groups_k = _groups(b_per_table * blocks, tables * heads, programs)
    part = torch.zeros(tables * heads * groups_k if p2c else 1, hi - lo + 1, bd, dtype=torch.float32, device=device)
    _disentangled_bwd_dkv_kernel[(groups_k, tables * heads)](
        query, key, value, pk, pq, mask, seed_arg, grad_out, lse, delta, dk, dv, part,
        *query.stride(), *key.stride(), *value.stride(), *pk_strides, *pq_strides, *grad_out.stride(),
        *dk.stride(), *dv.stride(), smb, sml,
        batch, heads, length, num_prefix_keys, head_dim, b_per_table, groups_k, *scalars, **common,
    )
    dpq = None
    if p2c:
        dpq = _reduce_partial(part, tables, heads, groups_k, lo, hi, pos_query, head_dim)
    return dq, dk, dv, dpk, dpq
