// Forward pass: query-stationary tiles with an online softmax.
//
// Per head, preparation tasks pack K^T in panels (and V, K rows when they are not fp32 rows) and the key-major p2c
// table
//   p2c[j, tau] = s K_j . Pq[lo + tau]        [L, W], W <= 2S slots reachable at this length;
// tile tasks, one per (head, two blocks of 128 queries), compute each block's c2p scores against every slot of the window
// (Q_blk Pk^T, [128, W]), then for each block of 128 keys the content scores Q_blk K_blk^T plus the positional terms
// (c2p picked along each query row, p2c built key by key and transposed; constant / linear / general tiles, see
// slot_index.h), masking and the online softmax update of the running output. The log-sum-exp of every row is
// saved for the backward pass. Both kinds of task share one parallel region per group of heads (pipelined_tasks).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "attention_call.h"
#include "attention_dropout.h"
#include "bf16_tiles.h"
#include "disentangled_attention.h"
#include "pair_mask.h"
#include "score_rows.h"
#include "tile_gemm.h"

namespace deberta_fast_cpu {
namespace {

constexpr int64_t kPackChunk = 256;
constexpr int64_t kTaskBlocks = 2;  // row blocks per tile task

struct ForwardWorker {
  Block qs, c2p, scores, acc, col_ok, row_max, row_sum, col_scratch, col_terms, factor, uniform_out, qs16, scores16;
  bool ready = false;

  void init(const Geometry& g) {
    if (ready) return;
    ready = true;
    const int64_t cols = round_up(kBlockCols, 16);
    Carver plan;
    const int64_t rows = kTaskBlocks * kBlockRows;
    const int64_t o_qs = plan.add(rows * g.head_dim), o_c2p = plan.add(rows * padded_pitch(g.window)),
                  o_scores = plan.add(kBlockRows * cols), o_acc = plan.add(rows * g.value_dim),
                  o_ok = plan.add(cols), o_max = plan.add(rows), o_sum = plan.add(rows),
                  o_cs = plan.add(kBlockCols * round_up(kBlockRows, 16)), o_ct = plan.add(kBlockRows * cols),
                  o_f = plan.add(cols), o_u = plan.add(kBlockRows * g.value_dim),
                  o_qs16 = plan.add(bf16_floats(rows * g.head_dim)), o_s16 = plan.add(bf16_floats(kBlockRows * cols));
    float* base = thread_scratch(plan.total());
    qs.ptr = base + o_qs;
    c2p.ptr = base + o_c2p;
    scores.ptr = base + o_scores;
    acc.ptr = base + o_acc;
    col_ok.ptr = base + o_ok;
    row_max.ptr = base + o_max;
    row_sum.ptr = base + o_sum;
    col_scratch.ptr = base + o_cs;
    col_terms.ptr = base + o_ct;
    factor.ptr = base + o_f;
    uniform_out.ptr = base + o_u;
    qs16.ptr = base + o_qs16;
    scores16.ptr = base + o_s16;
  }
};

// Online softmax update of one row whose scores (masked, -inf) are in `row`; leaves exp(score - m_new) there.
inline void online_update(float* row, int64_t cols_padded, float row_max, float& m, float& l, float* acc_row,
                          int64_t value_dim) {
  const float m_new = std::max(m, row_max);
  if (m_new == kNegInf) {  // nothing valid in this row so far
    std::memset(row, 0, sizeof(float) * cols_padded);
    return;
  }
  const float alpha = m_new == m ? 1.f : std::exp(m - m_new);
  const float sum = exp_and_sum(row, cols_padded, m_new);
  l = l * alpha + sum;
  m = m_new;
  if (alpha != 1.f) scale_row(acc_row, value_dim, alpha);
}

// The slots [lo, lo + W) of one positional table [PB, H, 2S, D] as bf16 VNNI operands [D, W] per (pb, h), unscaled
// (bf16_tiles.h); `reversed` stores slot lo + W - 1 - sigma at sigma.
void pack_window_vnni(const at::Tensor& table, const Geometry& g, bool reversed, bf16* out) {
  const Strided4<bf16> t(table);
  const int64_t W = g.window, D = g.head_dim, per_table = vnni_elements(D, W);
  for (int64_t task = 0; task < table.size(0) * g.heads; ++task) {
    const bf16* src = t.at(task / g.heads, task % g.heads);
    const bf16* first = src + (reversed ? g.slot_lo + W - 1 : g.slot_lo) * t.s2;
    pack_vnni(first, t.s3, reversed ? -t.s2 : t.s2, D, W, out + task * per_table, W);
  }
}

// kLowp (bf16 inputs only, bf16_tiles_available(), no dropout, even head dim and prefix): the tile products run in
// bf16 with fp32 accumulation. Their operands are the inputs' own bf16 values, unscaled (the softmax scale is
// applied to the fp32 products), so scores, positional terms and the saved log-sum-exp are those of the fp32 tiles
// up to the order of fp32 sums; the only extra rounding is of the probabilities (to bf16) in the product with V.
template <typename T, bool kLowp>
void forward_kernel(const Geometry& g, const Slots& slots, const TokenMask& mask, const PairMask& pair,
                    const AttentionDropout& drop, const at::Tensor& query,
                    const at::Tensor& key, const at::Tensor& value, const std::optional<at::Tensor>& pos_key,
                    const std::optional<at::Tensor>& pos_query, T* out, float* lse) {
  const Strided4<T> q(query), k(key), v(value);
  const int64_t H = g.heads, L = g.length, P = g.prefix, N = g.keys, D = g.head_dim, Dv = g.value_dim, W = g.window;
  const int64_t ldL = round_up(L, 16), ldS = round_up(kBlockCols, 16), ldW = padded_pitch(W);
  const int64_t vw = vec_width();

  // c2p: [D, W] with query-row slot order (reversed); p2c: [D, W] scaled, natural slot order.

  const bool pack_v = !kLowp && needs_row_pack(v);
  const bool pack_k = g.p2c && (kLowp ? k.s3 != 1 : needs_row_pack(k));
  const bool uniform_rows = (mask.present || pair.present) && P == 0;  // rows without any valid key average V
  const int64_t kt_content = panels_size(L, D), kt_prefix = panels_size(P, D);
  // bf16 operands (kLowp) take half the bytes of fp32 ones: counted as fp32 here, the grouping stays conservative.
  const int64_t per_head = int64_t(sizeof(float)) * (kt_content + kt_prefix + (pack_v ? N * Dv : 0) +
                                                     (kLowp ? vnni_elements(N, Dv) : 0) + (pack_k ? N * D : 0) +
                                                     (g.p2c ? L * ldW : 0));
  const int64_t total = g.batch * H;
  const int64_t G = heads_per_group(total, per_head);
  Carver plan;
  // kLowp: the same buffers hold bf16 operands: windows and K^T panels in VNNI layout, V as a VNNI operand over
  // the keys [round_up(N, 2), Dv], K rows [N, D] (when the input's rows are not contiguous).
  const int64_t win_vnni = g.positions() ? vnni_elements(D, W) : 0, v_vnni = vnni_elements(N, Dv);
  auto window_floats = [&](const std::optional<at::Tensor>& table) {
    if (!kLowp) return window_size(table, g);
    return table.has_value() ? bf16_floats(table->size(0) * H * win_vnni) : int64_t(0);
  };
  const int64_t kt_floats = kLowp ? bf16_floats(G * (kt_content + kt_prefix)) : G * (kt_content + kt_prefix);
  const int64_t v_floats = kLowp ? bf16_floats(G * v_vnni) : (pack_v ? G * N * Dv : 0);
  const int64_t k_floats = !pack_k ? 0 : (kLowp ? bf16_floats(G * N * D) : G * N * D);
  const int64_t o_pk = plan.add(window_floats(pos_key)), o_pq = plan.add(window_floats(pos_query)),
                o_kt = plan.add(kt_floats), o_v = plan.add(v_floats), o_k = plan.add(k_floats),
                o_p2c = plan.add(g.p2c ? G * L * ldW : 0), o_edges = plan.add(g.p2c ? G * 2 * ldL : 0),
                o_mean = plan.add(uniform_rows ? G * Dv : 0);
  Workspace workspace(plan.total());
  float* base = workspace.data();
  const Block pk_t_rev{base + o_pk}, pq_t{base + o_pq}, kt{base + o_kt}, vrows{base + o_v}, krows{base + o_k},
      p2c{base + o_p2c}, p2c_edges{base + o_edges}, mean_v{base + o_mean};
  bf16* const pk16 = reinterpret_cast<bf16*>(base + o_pk);
  bf16* const pq16 = reinterpret_cast<bf16*>(base + o_pq);
  bf16* const kt16 = reinterpret_cast<bf16*>(base + o_kt);
  bf16* const v16 = reinterpret_cast<bf16*>(base + o_v);
  bf16* const k16 = reinterpret_cast<bf16*>(base + o_k);
  if constexpr (kLowp) {
    if (g.c2p) pack_window_vnni(*pos_key, g, /*reversed=*/true, pk16);
    if (g.p2c) pack_window_vnni(*pos_query, g, /*reversed=*/false, pq16);
  } else {
    if (g.c2p) pack_window<T>(*pos_key, g, /*reversed=*/true, /*transposed=*/true, 1.f, pk_t_rev.data());
    if (g.p2c) pack_window<T>(*pos_query, g, /*reversed=*/false, /*transposed=*/true, g.scale, pq_t.data());
  }
  if (g.p2c) {
    // Constant tiles read the edge columns over whole padded tiles: keep the padding finite.
    for (int64_t e = 0; e < G * 2; ++e) {
      std::fill(p2c_edges.data() + e * ldL + L, p2c_edges.data() + (e + 1) * ldL, 0.f);
    }
  }

  const int64_t n_chunks = (L + kPackChunk - 1) / kPackChunk;
  const int64_t n_tasks = (L + kTaskBlocks * kBlockRows - 1) / (kTaskBlocks * kBlockRows);
  for (int64_t h0 = 0; h0 < total; h0 += G) {
    const int64_t count = std::min(G, total - h0);

    // Preparation, per head (pipelined with the tiles, attention_call.h): K^T panels, V / K rows and the p2c table
    // by chunks of keys; the mean of V.
    auto prepare = [&](int64_t gi, int64_t chunk) {
      if (chunk == n_chunks) {
        const int64_t bh = h0 + gi;
        const T* vh = v.at(bh / H, bh % H);
        float* mv = mean_v.data() + gi * Dv;
        for (int64_t d = 0; d < Dv; ++d) {
          float sum = 0.f;
          for (int64_t j = 0; j < N; ++j) sum += static_cast<float>(vh[j * v.s2 + d * v.s3]);
          mv[d] = sum / static_cast<float>(N);
        }
        return;
      }
      const int64_t bh = h0 + gi, b = bh / H, h = bh % H;
      const int64_t c0 = chunk * kPackChunk, c1 = std::min(L, c0 + kPackChunk);
      const int64_t k0 = chunk == 0 ? 0 : P + c0, k1 = P + c1;  // the first chunk also handles the prefix keys
      const T* kh = k.at(b, h);
      if constexpr (kLowp) {
        bf16* kt_head = kt16 + gi * (kt_content + kt_prefix);
        for (int64_t t = c0; t < c1; t += kBlockCols) {  // chunks start on panel boundaries
          pack_vnni(kh + (P + t) * k.s2, k.s3, k.s2, D, std::min(kBlockCols, c1 - t), kt_head + t * D, kBlockCols);
        }
        for (int64_t t = 0; chunk == 0 && t < P; t += kBlockCols) {
          pack_vnni(kh + t * k.s2, k.s3, k.s2, D, std::min(kBlockCols, P - t), kt_head + kt_content + t * D,
                    kBlockCols);
        }
        // k0 is even (P is), so the pairs of keys of the VNNI layout never straddle two chunks.
        pack_vnni(v.at(b, h) + k0 * v.s2, v.s2, v.s3, k1 - k0, Dv, v16 + gi * v_vnni + k0 * Dv, Dv);
        if (g.p2c) {
          const bf16* krow = kh + (P + c0) * k.s2;
          int64_t ldk = k.s2;
          if (pack_k) {
            bf16* kp = k16 + gi * N * D;
            pack_rows_bf16(kh + k0 * k.s2, k.s2, k.s3, k1 - k0, D, kp + k0 * D, D);
            krow = kp + (P + c0) * D;
            ldk = D;
          }
          const int64_t pb = g.pos_query_batch == 1 ? 0 : b;
          float* table = p2c.data() + gi * L * ldW;
          gemm_bf16(c1 - c0, W, D, krow, ldk, pq16 + (pb * H + h) * win_vnni, W, table + c0 * ldW, ldW, false);
          for (int64_t t = c0; t < c1; ++t) scale_row(table + t * ldW, W, g.scale);
          copy_table_edges(table, ldW, W, c0, c1, p2c_edges.data() + gi * 2 * ldL, ldL);
        }
        release_bf16_tiles();
        return;
      }
      float* kt_head = kt.data() + gi * (kt_content + kt_prefix);
      pack_panels(kh + P * k.s2, k.s2, k.s3, c0, c1, D, 1.f, kt_head);
      if (chunk == 0 && P > 0) pack_panels(kh, k.s2, k.s3, 0, P, D, 1.f, kt_head + kt_content);
      if (pack_v) {
        pack_rows(v.at(b, h) + k0 * v.s2, v.s2, v.s3, k1 - k0, Dv, 1.f, vrows.data() + (gi * N + k0) * Dv, Dv);
      }
      if (g.p2c) {
        if (pack_k) pack_rows(kh + k0 * k.s2, k.s2, k.s3, k1 - k0, D, 1.f, krows.data() + (gi * N + k0) * D, D);
        const Rows kr = rows_view(k, b, h, krows.data() + gi * N * D, D);
        const int64_t pb = g.pos_query_batch == 1 ? 0 : b;
        float* table = p2c.data() + gi * L * ldW;
        gemm_rr(c1 - c0, W, D, kr.row(P + c0), kr.ld, pq_t.data() + (pb * H + h) * D * W, W, table + c0 * ldW, ldW,
                false);
        copy_table_edges(table, ldW, W, c0, c1, p2c_edges.data() + gi * 2 * ldL, ldL);
      }
    };

    // Tiles: one task per (head, kTaskBlocks blocks of query rows). Key blocks are the outer loop, so a key block's
    // K^T panel, V rows and p2c table rows are read from cache by every row block of the task. Each row still sees
    // the key blocks in the same order, so the grouping does not change any result.
    auto attend = [&](int64_t gi, int64_t task, ForwardWorker& w) {
      w.init(g);
      const int64_t bh = h0 + gi, b = bh / H, h = bh % H;
      const int64_t row0 = task * kTaskBlocks * kBlockRows;
      const int64_t blocks = std::min(kTaskBlocks, (L - row0 + kBlockRows - 1) / kBlockRows);
      const float* kt_head = kt.data() + gi * (kt_content + kt_prefix);
      const Rows vr = rows_view(v, b, h, vrows.data() + gi * N * Dv, Dv);
      const float* p2c_head = g.p2c ? p2c.data() + gi * L * ldW : nullptr;
      float* S = w.scores.data();
      bf16* S16 = reinterpret_cast<bf16*>(w.scores16.data());
      const bf16* kt16_head = kt16 + gi * (kt_content + kt_prefix);
      const bf16* v16_head = v16 + gi * v_vnni;
      float* col_ok = w.col_ok.data();
      bool row_ok[kTaskBlocks][kBlockRows];
      int64_t valid_rows[kTaskBlocks];
      int64_t any_valid_rows = 0;
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t i0 = row0 + blk * kBlockRows, bm = std::min(kBlockRows, L - i0);
        float* qs = w.qs.data() + blk * kBlockRows * D;
        bf16* qs16 = reinterpret_cast<bf16*>(w.qs16.data()) + blk * kBlockRows * D;
        if constexpr (kLowp) {
          pack_rows_bf16(q.at(b, h) + i0 * q.s2, q.s2, q.s3, bm, D, qs16, D);
        } else {
          pack_rows(q.at(b, h) + i0 * q.s2, q.s2, q.s3, bm, D, g.scale, qs, D);
        }
        std::memset(w.acc.data() + blk * kBlockRows * Dv, 0, sizeof(float) * bm * Dv);
        valid_rows[blk] = 0;
        for (int64_t r = 0; r < bm; ++r) {
          w.row_max.data()[blk * kBlockRows + r] = kNegInf;
          w.row_sum.data()[blk * kBlockRows + r] = 0.f;
          row_ok[blk][r] = mask.ok(b, i0 + r);
          valid_rows[blk] += row_ok[blk][r];
        }
        any_valid_rows += valid_rows[blk];
        if (g.c2p && valid_rows[blk] > 0) {
          const int64_t pb = g.pos_key_batch == 1 ? 0 : b;
          float* c2p_blk = w.c2p.data() + blk * kBlockRows * ldW;
          if constexpr (kLowp) {
            gemm_bf16(bm, W, D, qs16, D, pk16 + (pb * H + h) * win_vnni, W, c2p_blk, ldW, false);
            for (int64_t r = 0; r < bm; ++r) scale_row(c2p_blk + r * ldW, W, g.scale);
          } else {
            gemm_rr(bm, W, D, qs, D, pk_t_rev.data() + (pb * H + h) * D * W, W, c2p_blk, ldW, false);
          }
        }
      }

      // Prefix keys: valid for every query, no positional term.
      for (int64_t p0 = 0; p0 < P; p0 += kBlockCols) {
        const int64_t pn = std::min(kBlockCols, P - p0), pnp = round_up(pn, vw);
        for (int64_t c = 0; c < pnp; ++c) col_ok[c] = c < pn ? 1.f : 0.f;
        for (int64_t blk = 0; blk < blocks; ++blk) {
          const int64_t i0 = row0 + blk * kBlockRows, bm = std::min(kBlockRows, L - i0);
          float* acc = w.acc.data() + blk * kBlockRows * Dv;
          float* m = w.row_max.data() + blk * kBlockRows;
          float* l = w.row_sum.data() + blk * kBlockRows;
          if constexpr (kLowp) {
            gemm_bf16(bm, pn, D, reinterpret_cast<const bf16*>(w.qs16.data()) + blk * kBlockRows * D, D,
                      kt16_head + kt_content + p0 * D, kBlockCols, S, ldS, false);
          } else {
            gemm_rr(bm, pn, D, w.qs.data() + blk * kBlockRows * D, D, panel_at(kt_head + kt_content, D, p0),
                    kBlockCols, S, ldS, false);
          }
          for (int64_t r = 0; r < bm; ++r) {
            float* row = S + r * ldS;
            const float mx = add_positions_and_mask(row, pnp, nullptr, col_ok, pn == pnp, kLowp ? g.scale : 1.f);
            online_update(row, pnp, mx, m[r], l[r], acc + r * Dv, Dv);
            if (drop.on()) {
              drop.factors(bh, i0 + r, 0, p0, 1, pn, pnp, drop.scale(), w.factor.data());
              multiply_row(row, w.factor.data(), pnp);
            }
            if constexpr (kLowp) round_row_bf16(row, S16 + r * ldS, pnp);
          }
          if constexpr (kLowp) {  // p0 and pn are even (P is): whole pairs of keys
            gemm_bf16(bm, Dv, pn, S16, ldS, v16_head + p0 * Dv, Dv, acc, Dv, true);
          } else {
            gemm_rr(bm, Dv, pn, S, ldS, vr.row(p0), vr.ld, acc, Dv, true);
          }
        }
      }

      // Content keys.
      for (int64_t j0 = 0; any_valid_rows > 0 && j0 < L; j0 += kBlockCols) {
        const int64_t bn = std::min(kBlockCols, L - j0), bnp = round_up(bn, vw);
        const int64_t valid_keys = mask.count(b, j0, j0 + bn);
        if (valid_keys == 0) continue;  // every pair masked: contributes exactly nothing
        mask.fill(b, j0, bn, bnp, col_ok);
        const bool all_valid = bn == bnp && valid_keys == bn;
        for (int64_t blk = 0; blk < blocks; ++blk) {
          if (valid_rows[blk] == 0) continue;
          const int64_t i0 = row0 + blk * kBlockRows, bm = std::min(kBlockRows, L - i0);
          if (!pair.tile_ok(b, h, i0, j0)) continue;  // every pair masked: contributes exactly nothing
          float* acc = w.acc.data() + blk * kBlockRows * Dv;
          float* m = w.row_max.data() + blk * kBlockRows;
          float* l = w.row_sum.data() + blk * kBlockRows;
          const float* c2p_blk = w.c2p.data() + blk * kBlockRows * ldW;
          if constexpr (kLowp) {
            gemm_bf16(bm, bn, D, reinterpret_cast<const bf16*>(w.qs16.data()) + blk * kBlockRows * D, D,
                      kt16_head + j0 * D, kBlockCols, S, ldS, false);
          } else {
            gemm_rr(bm, bn, D, w.qs.data() + blk * kBlockRows * D, D, panel_at(kt_head, D, j0), kBlockCols, S, ldS,
                    false);
          }
          RowPositions rp;
          const float* col_terms = nullptr;
          int64_t col_stride = 0;
          if (g.positions()) {
            rp.kind = slots.query_rows.classify(i0, bm, j0, bnp);
            if (g.p2c) {
              col_terms = build_column_terms(p2c_head, ldW, W, p2c_edges.data() + gi * 2 * ldL, ldL, slots.key_rows,
                                             rp.kind, i0, bm, j0, bn, w.col_scratch.data(), w.col_terms.data(), ldS,
                                             &col_stride);
            }
          }
          for (int64_t r = 0; r < bm; ++r) {
            float* row = S + r * ldS;
            if (!row_ok[blk][r]) {
              std::memset(row, 0, sizeof(float) * bnp);
              if constexpr (kLowp) std::memset(S16 + r * ldS, 0, sizeof(bf16) * bnp);
              continue;
            }
            if (g.positions()) {
              rp.sigma = slots.query_rows.row_ptr(i0 + r, j0);
              rp.row_term = g.c2p ? c2p_blk + r * ldW : nullptr;
              rp.col_term = g.p2c ? col_terms + r * col_stride : nullptr;
            }
            if (pair.present) pair.fill_row(b, h, i0 + r, j0, bn, bnp, col_ok);
            const float mx = add_positions_and_mask(row, bnp, g.positions() ? &rp : nullptr, col_ok,
                                                    all_valid && !pair.present, kLowp ? g.scale : 1.f);
            online_update(row, bnp, mx, m[r], l[r], acc + r * Dv, Dv);
            if (drop.on()) {
              drop.factors(bh, i0 + r, 0, P + j0, 1, bn, bnp, drop.scale(), w.factor.data());
              multiply_row(row, w.factor.data(), bnp);
            }
            if constexpr (kLowp) round_row_bf16(row, S16 + r * ldS, bnp);
          }
          if constexpr (kLowp) {  // an odd last block reads one more key: a zero row of V, a zero column of S16
            gemm_bf16(bm, Dv, round_up(bn, 2), S16, ldS, v16_head + (P + j0) * Dv, Dv, acc, Dv, true);
          } else {
            gemm_rr(bm, Dv, bn, S, ldS, vr.row(P + j0), vr.ld, acc, Dv, true);
          }
        }
      }

      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t i0 = row0 + blk * kBlockRows, bm = std::min(kBlockRows, L - i0);
        const float* acc = w.acc.data() + blk * kBlockRows * Dv;
        const float* m = w.row_max.data() + blk * kBlockRows;
        const float* l = w.row_sum.data() + blk * kBlockRows;
        // Rows without any valid key attend uniformly to the L keys; dropped, they are (1 / L) sum_j z_ij V_j,
        // computed for all such rows of the block at once: factor rows in S, products in uniform_out.
        int64_t uniform_index[kBlockRows];
        int64_t n_uniform = 0;
        if (drop.on()) {
          for (int64_t r = 0; r < bm; ++r) uniform_index[r] = l[r] > 0.f ? -1 : n_uniform++;
        }
        if (n_uniform > 0) {
          TORCH_CHECK(uniform_rows && !kLowp, "deberta_fast_cpu: a score row without any valid key");
          for (int64_t j0 = 0; j0 < L; j0 += kBlockCols) {
            const int64_t bn = std::min(kBlockCols, L - j0);
            for (int64_t r = 0; r < bm; ++r) {
              if (uniform_index[r] < 0) continue;
              drop.factors(bh, i0 + r, 0, j0, 1, bn, bn, drop.scale() / static_cast<float>(L),
                           S + uniform_index[r] * ldS);
            }
            gemm_rr(n_uniform, Dv, bn, S, ldS, vr.row(j0), vr.ld, w.uniform_out.data(), Dv, j0 > 0);
          }
        }
        for (int64_t r = 0; r < bm; ++r) {
          const int64_t i = i0 + r;
          T* o = out + ((b * L + i) * H + h) * Dv;
          float* row_lse = lse + bh * L + i;
          if (l[r] > 0.f) {
            const float inv = 1.f / l[r];
            for (int64_t d = 0; d < Dv; ++d) o[d] = static_cast<T>(acc[r * Dv + d] * inv);
            *row_lse = m[r] + std::log(l[r]);
          } else if (drop.on()) {
            const float* ur = w.uniform_out.data() + uniform_index[r] * Dv;
            for (int64_t d = 0; d < Dv; ++d) o[d] = static_cast<T>(ur[d]);
            *row_lse = std::numeric_limits<float>::infinity();
          } else {
            TORCH_CHECK(uniform_rows, "deberta_fast_cpu: a score row without any valid key");
            const float* mv = mean_v.data() + gi * Dv;
            for (int64_t d = 0; d < Dv; ++d) o[d] = static_cast<T>(mv[d]);
            *row_lse = std::numeric_limits<float>::infinity();
          }
        }
      }
      if constexpr (kLowp) release_bf16_tiles();
    };
    pipelined_tasks<ForwardWorker>(count, n_chunks + (uniform_rows ? 1 : 0), n_tasks, prepare, attend);
  }
}

// Whether a bf16 call runs its tile products in bf16 (forward_kernel's kLowp): inference-style calls (no dropout)
// with even head dim and prefix (pairs of the VNNI layout), on a machine with bf16 dot products.
bool bf16_tiles_apply(const Geometry& g, const AttentionDropout& drop) {
  return !drop.on() && g.head_dim % 2 == 0 && g.prefix % 2 == 0 && bf16_tiles_available();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> disentangled_attention_forward(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const std::optional<at::Tensor>& pos_key,
    const std::optional<at::Tensor>& pos_query, const std::optional<at::Tensor>& token_mask,
    const std::optional<at::Tensor>& slot_table, double softmax_scale, int64_t num_prefix_keys,
    const std::optional<at::Tensor>& pair_mask, const std::optional<at::Tensor>& seed, double dropout_p) {
  Geometry g = make_geometry(query, key, value, pos_key, pos_query, token_mask, slot_table, softmax_scale,
                             num_prefix_keys);
  TORCH_CHECK(!(token_mask.has_value() && pair_mask.has_value()),
              "deberta_fast_cpu: pass either a token_mask or a pair_mask, not both");
  const int64_t table_rows = pos_key ? pos_key->size(2) : (pos_query ? pos_query->size(2) : 0);
  TORCH_CHECK(!(pos_key && pos_query) || pos_key->size(2) == pos_query->size(2),
              "deberta_fast_cpu: pos_key and pos_query must have the same number of slots");
  const Slots slots(g, slot_table, table_rows);
  const TokenMask mask(g, token_mask);
  const PairMask pair(g, pair_mask, /*transposed=*/false);
  const AttentionDropout drop = make_dropout(seed, dropout_p);
  // Stored [B, L, H, Dv]: the [B, H, L, Dv] result is a permuted view, and merging heads back is free.
  at::Tensor out = at::empty({g.batch, g.length, g.heads, g.value_dim}, query.options());
  at::Tensor lse = at::empty({g.batch, g.heads, g.length}, query.options().dtype(at::kFloat));
  if (g.batch * g.heads * g.length > 0) {
    AT_DISPATCH_SWITCH(query.scalar_type(), "deberta_fast_cpu::disentangled_attention_forward",
                       AT_DISPATCH_CASE(at::kFloat, [&] {
                         forward_kernel<scalar_t, false>(g, slots, mask, pair, drop, query, key, value, pos_key,
                                                  pos_query, out.data_ptr<scalar_t>(), lse.data_ptr<float>());
                       }) AT_DISPATCH_CASE(at::kBFloat16, [&] {
                         if (bf16_tiles_apply(g, drop)) {
                           forward_kernel<scalar_t, true>(g, slots, mask, pair, drop, query, key, value, pos_key,
                                                          pos_query, out.data_ptr<scalar_t>(), lse.data_ptr<float>());
                         } else {
                           forward_kernel<scalar_t, false>(g, slots, mask, pair, drop, query, key, value, pos_key,
                                                           pos_query, out.data_ptr<scalar_t>(), lse.data_ptr<float>());
                         }
                       }) AT_DISPATCH_CASE(at::kHalf, [&] {
                         forward_kernel<scalar_t, false>(g, slots, mask, pair, drop, query, key, value, pos_key,
                                                  pos_query, out.data_ptr<scalar_t>(), lse.data_ptr<float>());
                       }));
  }
  return {out.permute({0, 2, 1, 3}), lse};
}

bool bf16_tile_products() { return bf16_tiles_available(); }

at::Tensor dropout_keep_mask(const at::Tensor& seed, int64_t batch_heads, int64_t length, int64_t num_keys,
                             double dropout_p) {
  TORCH_CHECK(batch_heads >= 0 && length >= 0 && num_keys >= 0, "deberta_fast_cpu: sizes must be >= 0");
  const AttentionDropout drop = make_dropout(seed, dropout_p);
  at::Tensor keep = at::empty({batch_heads, length, num_keys}, seed.options().dtype(at::kBool));
  bool* dst = keep.data_ptr<bool>();
  std::vector<float> factor(num_keys);
  for (int64_t bh = 0; bh < batch_heads; ++bh) {
    for (int64_t i = 0; i < length; ++i) {
      if (drop.on()) drop.factors(bh, i, 0, 0, 1, num_keys, num_keys, 1.f, factor.data());
      for (int64_t k = 0; k < num_keys; ++k) dst[(bh * length + i) * num_keys + k] = !drop.on() || factor[k] != 0.f;
    }
  }
  return keep;
}

}  // namespace deberta_fast_cpu
