// Backward pass, deterministic and without atomics: every output element has exactly one owner.
//
// With dS = P * (dP - delta), delta_i = dO_i . O_i, and G[i, sigma] / H[j, sigma] the sums of dS over the pairs of
// a query row / key row that read slot sigma:
//   dQ_i  = s (sum_j dS_ij K_j + sum_sigma G[i, sigma] Pk[sigma])          query-stationary tasks (own dQ rows)
//   dPk^T = s Q^T G                                                        per fixed chunk of 256 queries, summed
//   dK_j  = s (sum_i dS_ij Q_i + sum_sigma H[j, sigma] Pq[sigma])          key-stationary tasks (own dK, dV rows)
//   dV_j  = sum_i P_ij dO_i  (+ the mean of dO over rows that average V)
//   dPq^T = s K^T H                                                        per fixed chunk of 256 keys, summed
// Both passes recompute the scores tile by tile from the saved log-sum-exp. Per head, preparation tasks pack the
// transposed operands and the two positional tables, c2p [L, W] (query-major, query-row slot order) and p2c [L, W]
// (key-major, key-row slot order): each pass reads its own rows' table along the row and the other table column by
// column (score_rows.h). Preparation and both passes' tile tasks share one parallel region per group of heads
// (pipelined_tasks); afterwards the per-chunk positional partials are added in head and chunk order.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "attention_call.h"
#include "attention_dropout.h"
#include "disentangled_attention.h"
#include "pair_mask.h"
#include "score_rows.h"
#include "tile_gemm.h"

namespace deberta_fast_cpu {
namespace {

struct BackwardWorker {
  Block scores, grads, slot_grad, acc, acc_v, col_ok, col_scratch, col_terms, factor;
  bool ready = false;

  void init(const Geometry& g) {
    if (ready) return;
    ready = true;
    const int64_t cols = round_up(kBlockCols, 16);
    Carver plan;
    const int64_t o_s = plan.add(kBlockRows * cols), o_g = plan.add(kBlockRows * cols),
                  o_slot = plan.add(kBlockRows * g.window), o_acc = plan.add(kBlockRows * g.head_dim),
                  o_accv = plan.add(kBlockRows * g.value_dim), o_ok = plan.add(cols),
                  o_cs = plan.add(kBlockCols * round_up(kBlockRows, 16)), o_ct = plan.add(kBlockRows * cols),
                  o_f = plan.add(cols);
    float* base = thread_scratch(plan.total());
    scores.ptr = base + o_s;
    grads.ptr = base + o_g;
    slot_grad.ptr = base + o_slot;
    acc.ptr = base + o_acc;
    acc_v.ptr = base + o_accv;
    col_ok.ptr = base + o_ok;
    col_scratch.ptr = base + o_cs;
    col_terms.ptr = base + o_ct;
    factor.ptr = base + o_f;
  }
};

template <typename T>
struct BackwardInputs {
  Strided4<T> q, k, v, dout, out;
  const float* lse;
};

template <typename T>
void backward_kernel(const Geometry& g, const Slots& slots, const TokenMask& mask, const PairMask& pair,
                     const AttentionDropout& drop, const BackwardInputs<T>& in,
                     const std::optional<at::Tensor>& pos_key, const std::optional<at::Tensor>& pos_query, T* dq,
                     T* dk, T* dv, float* dpk_acc, float* dpq_acc) {
  const int64_t H = g.heads, L = g.length, P = g.prefix, N = g.keys, D = g.head_dim, Dv = g.value_dim, W = g.window;
  const int64_t ldL = round_up(L, 16), ldS = round_up(kBlockCols, 16), ldW = padded_pitch(W);
  const int64_t vw = vec_width();
  const float inf = std::numeric_limits<float>::infinity();

  // Positional windows. Query rows read slots in reversed order (slot_index.h), key rows in natural order.

  const bool pack_k = needs_row_pack(in.k), pack_v = needs_row_pack(in.v), pack_do = needs_row_pack(in.dout);
  const bool uniform_rows = (mask.present || pair.present) && P == 0;
  const int64_t n_chunks = (L + kChunkRows - 1) / kChunkRows;
  const int64_t n_prefix_chunks = (P + kChunkRows - 1) / kChunkRows;
  // Per head: K^T and V^T panels (content, then prefix), Q^T (scaled) and dO^T panels, rows where needed.
  const int64_t kt_size = panels_size(L, D) + panels_size(P, D), vt_size = panels_size(L, Dv) + panels_size(P, Dv);
  const int64_t qt_size = panels_size(L, D), dot_size = panels_size(L, Dv);
  const int64_t per_head =
      int64_t(sizeof(float)) *
      (kt_size + vt_size + qt_size + dot_size + (pack_k ? N * D : 0) + (pack_v ? N * Dv : 0) + L * D +
       (pack_do ? L * Dv : 0) + 2 * ldL + (g.p2c ? L * ldW : 0) + (g.c2p ? L * ldW : 0) + 2 * n_chunks * W * D);
  const int64_t total = g.batch * H;
  const int64_t G = heads_per_group(total, per_head);

  Carver plan;
  const int64_t o_pkt = plan.add(window_size(pos_key, g)), o_pk = plan.add(window_size(pos_key, g)),
                o_pqt = plan.add(window_size(pos_query, g)), o_pq = plan.add(window_size(pos_query, g)),
                o_kt = plan.add(G * kt_size), o_vt = plan.add(G * vt_size), o_kr = plan.add(pack_k ? G * N * D : 0),
                o_vr = plan.add(pack_v ? G * N * Dv : 0), o_qs = plan.add(G * L * D), o_qst = plan.add(G * qt_size),
                o_dor = plan.add(pack_do ? G * L * Dv : 0), o_dot = plan.add(G * dot_size),
                o_lse = plan.add(G * ldL), o_delta = plan.add(G * ldL), o_tp = plan.add(g.p2c ? G * L * ldW : 0),
                o_tc = plan.add(g.c2p ? G * L * ldW : 0), o_ep = plan.add(g.p2c ? G * 2 * ldL : 0),
                o_ec = plan.add(g.c2p ? G * 2 * ldL : 0), o_u = plan.add(uniform_rows ? G * Dv : 0),
                o_dpk = plan.add(g.c2p ? G * n_chunks * W * D : 0), o_dpq = plan.add(g.p2c ? G * n_chunks * W * D : 0);
  Workspace workspace(plan.total());
  float* base = workspace.data();
  const Block pk_t_rev{base + o_pkt}, pk_rev{base + o_pk}, pq_t{base + o_pqt}, pq{base + o_pq}, kt{base + o_kt},
      vt{base + o_vt}, krows{base + o_kr}, vrows{base + o_vr}, qs{base + o_qs}, qst{base + o_qst},
      dorows{base + o_dor}, dot{base + o_dot}, lse_pad{base + o_lse}, delta_pad{base + o_delta},
      tab_p2c{base + o_tp}, tab_c2p{base + o_tc}, p2c_edges{base + o_ep}, c2p_edges{base + o_ec},
      uniform{base + o_u}, dpk_part{base + o_dpk}, dpq_part{base + o_dpq};
  if (g.c2p) {
    pack_window<T>(*pos_key, g, true, true, 1.f, pk_t_rev.data());  // [D, W]: c2p table
    pack_window<T>(*pos_key, g, true, false, 1.f, pk_rev.data());   // [W, D]: dQ += G Pk
  }
  if (g.p2c) {
    pack_window<T>(*pos_query, g, false, true, g.scale, pq_t.data());  // [D, W]: p2c table
    pack_window<T>(*pos_query, g, false, false, g.scale, pq.data());   // [W, D]: dK += H Pq
  }
  // Constant tiles read the edge columns over whole padded tiles: keep the padding finite.
  auto zero_padding = [&](float* edges) {
    for (int64_t e = 0; e < G * 2; ++e) std::fill(edges + e * ldL + L, edges + (e + 1) * ldL, 0.f);
  };
  if (g.p2c) zero_padding(p2c_edges.data());
  if (g.c2p) zero_padding(c2p_edges.data());

  for (int64_t h0 = 0; h0 < total; h0 += G) {
    const int64_t count = std::min(G, total - h0);

    // Preparation, per head and chunk of 256 positions (pipelined with the tiles, attention_call.h): pack keys /
    // values (with the prefix in chunk 0) and queries / out grads, delta, the padded log-sum-exp, and the two
    // positional tables; per head, the uniform rows' mean of dO.
    auto prepare = [&](int64_t gi, int64_t chunk) {
      if (chunk == n_chunks) {
        const int64_t bh = h0 + gi;
        const T* doh = in.dout.at(bh / H, bh % H);
        float* u = uniform.data() + gi * Dv;
        std::fill(u, u + Dv, 0.f);
        for (int64_t i = 0; i < L; ++i) {
          if (in.lse[bh * L + i] != inf) continue;
          for (int64_t d = 0; d < Dv; ++d) u[d] += static_cast<float>(doh[i * in.dout.s2 + d * in.dout.s3]);
        }
        for (int64_t d = 0; d < Dv; ++d) u[d] /= static_cast<float>(L);
        return;
      }
      const int64_t bh = h0 + gi, b = bh / H, h = bh % H;
      const int64_t c0 = chunk * kChunkRows, c1 = std::min(L, c0 + kChunkRows), n = c1 - c0;
      const int64_t k0 = chunk == 0 ? 0 : P + c0, k1 = P + c1;
      const T* kh = in.k.at(b, h);
      const T* vh = in.v.at(b, h);
      float* kt_head = kt.data() + gi * kt_size;
      float* vt_head = vt.data() + gi * vt_size;
      pack_panels(kh + P * in.k.s2, in.k.s2, in.k.s3, c0, c1, D, 1.f, kt_head);
      pack_panels(vh + P * in.v.s2, in.v.s2, in.v.s3, c0, c1, Dv, 1.f, vt_head);
      if (chunk == 0 && P > 0) {
        pack_panels(kh, in.k.s2, in.k.s3, 0, P, D, 1.f, kt_head + panels_size(L, D));
        pack_panels(vh, in.v.s2, in.v.s3, 0, P, Dv, 1.f, vt_head + panels_size(L, Dv));
      }
      if (pack_k) pack_rows(kh + k0 * in.k.s2, in.k.s2, in.k.s3, k1 - k0, D, 1.f, krows.data() + (gi * N + k0) * D, D);
      if (pack_v) {
        pack_rows(vh + k0 * in.v.s2, in.v.s2, in.v.s3, k1 - k0, Dv, 1.f, vrows.data() + (gi * N + k0) * Dv, Dv);
      }
      const T* qh = in.q.at(b, h);
      const T* doh = in.dout.at(b, h);
      const T* oh = in.out.at(b, h);
      float* qsh = qs.data() + gi * L * D;
      pack_rows(qh + c0 * in.q.s2, in.q.s2, in.q.s3, n, D, g.scale, qsh + c0 * D, D);
      pack_panels(qh, in.q.s2, in.q.s3, c0, c1, D, g.scale, qst.data() + gi * qt_size);
      pack_panels(doh, in.dout.s2, in.dout.s3, c0, c1, Dv, 1.f, dot.data() + gi * dot_size);
      if (pack_do) {
        pack_rows(doh + c0 * in.dout.s2, in.dout.s2, in.dout.s3, n, Dv, 1.f, dorows.data() + (gi * L + c0) * Dv, Dv);
      }
      float* lp = lse_pad.data() + gi * ldL;
      float* dp = delta_pad.data() + gi * ldL;
      for (int64_t i = c0; i < c1; ++i) {
        lp[i] = in.lse[bh * L + i];
        float delta = 0.f;
        for (int64_t d = 0; d < Dv; ++d) {
          delta += static_cast<float>(doh[i * in.dout.s2 + d * in.dout.s3]) *
                   static_cast<float>(oh[i * in.out.s2 + d * in.out.s3]);
        }
        dp[i] = delta;
      }
      if (c1 == L) {
        for (int64_t i = L; i < ldL; ++i) {
          lp[i] = inf;
          dp[i] = 0.f;
        }
      }
      if (g.p2c) {
        const Rows kr = rows_view(in.k, b, h, krows.data() + gi * N * D, D);
        const int64_t pb = g.pos_query_batch == 1 ? 0 : b;
        float* table = tab_p2c.data() + gi * L * ldW;
        gemm_rr(n, W, D, kr.row(P + c0), kr.ld, pq_t.data() + (pb * H + h) * D * W, W, table + c0 * ldW, ldW, false);
        copy_table_edges(table, ldW, W, c0, c1, p2c_edges.data() + gi * 2 * ldL, ldL);
      }
      if (g.c2p) {
        const int64_t pb = g.pos_key_batch == 1 ? 0 : b;
        float* table = tab_c2p.data() + gi * L * ldW;
        gemm_rr(n, W, D, qsh + c0 * D, D, pk_t_rev.data() + (pb * H + h) * D * W, W, table + c0 * ldW, ldW, false);
        copy_table_edges(table, ldW, W, c0, c1, c2p_edges.data() + gi * 2 * ldL, ldL);
      }
    };

    // Tiles, per head: query-stationary chunks, then key-stationary chunks of content keys, then of prefix keys.
    auto work = [&](int64_t gi, int64_t task, BackwardWorker& w) {
      w.init(g);
      float* S = w.scores.data();
      float* dP = w.grads.data();
      float* col_ok = w.col_ok.data();
      if (task < n_chunks) {
        // ---- query rows: dQ and the c2p partial of this chunk ----
        const int64_t chunk = task, bh = h0 + gi, b = bh / H, h = bh % H;
        const float* kt_head = kt.data() + gi * kt_size;
        const float* vt_head = vt.data() + gi * vt_size;
        const Rows kr = rows_view(in.k, b, h, krows.data() + gi * N * D, D);
        const Rows dor = rows_view(in.dout, b, h, dorows.data() + gi * L * Dv, Dv);
        const float* lp = lse_pad.data() + gi * ldL;
        const float* dl = delta_pad.data() + gi * ldL;
        float* partial = g.c2p ? dpk_part.data() + (gi * n_chunks + chunk) * W * D : nullptr;
        if (partial) std::memset(partial, 0, sizeof(float) * W * D);
        const float* p2c_head = g.p2c ? tab_p2c.data() + gi * L * ldW : nullptr;
        const float* c2p_head = g.c2p ? tab_c2p.data() + gi * L * ldW : nullptr;
        const int64_t pb = g.pos_key_batch == 1 ? 0 : b;
        const int64_t r_end = std::min(L, (chunk + 1) * kChunkRows);
        for (int64_t i0 = chunk * kChunkRows; i0 < r_end; i0 += kBlockRows) {
          const int64_t bm = std::min(kBlockRows, r_end - i0);
          const float* qsb = qs.data() + (gi * L + i0) * D;
          const float* dob = dor.row(i0);
          float* acc = w.acc.data();
          std::memset(acc, 0, sizeof(float) * bm * D);
          bool row_ok[kBlockRows];
          int64_t valid_rows = 0;
          for (int64_t r = 0; r < bm; ++r) {
            row_ok[r] = mask.ok(b, i0 + r);
            valid_rows += row_ok[r];
          }
          float* gsl = w.slot_grad.data();
          if (g.c2p && valid_rows > 0) std::memset(gsl, 0, sizeof(float) * bm * W);
          for (int64_t p0 = 0; p0 < P; p0 += kBlockCols) {
            const int64_t pn = std::min(kBlockCols, P - p0), pnp = round_up(pn, vw);
            gemm_rr(bm, pn, D, qsb, D, panel_at(kt_head + panels_size(L, D), D, p0), kBlockCols, S, ldS, false);
            gemm_rr(bm, pn, Dv, dob, dor.ld, panel_at(vt_head + panels_size(L, Dv), Dv, p0), kBlockCols, dP, ldS,
                    false);
            for (int64_t c = 0; c < pnp; ++c) col_ok[c] = c < pn ? 1.f : 0.f;
            for (int64_t r = 0; r < bm; ++r) {
              add_positions_and_mask(S + r * ldS, pnp, nullptr, col_ok);
              if (drop.on()) {
                drop.factors(bh, i0 + r, 0, p0, 1, pn, pnp, drop.scale(), w.factor.data());
                multiply_row(dP + r * ldS, w.factor.data(), pnp);
              }
              score_grad_row(S + r * ldS, dP + r * ldS, pnp, lp[i0 + r], dl[i0 + r]);
            }
            gemm_rr(bm, D, pn, S, ldS, kr.row(p0), kr.ld, acc, D, true);
          }
          for (int64_t j0 = 0; valid_rows > 0 && j0 < L; j0 += kBlockCols) {
            const int64_t bn = std::min(kBlockCols, L - j0), bnp = round_up(bn, vw);
            if (mask.count(b, j0, j0 + bn) == 0 || !pair.tile_ok(b, h, i0, j0)) continue;
            gemm_rr(bm, bn, D, qsb, D, panel_at(kt_head, D, j0), kBlockCols, S, ldS, false);
            gemm_rr(bm, bn, Dv, dob, dor.ld, panel_at(vt_head, Dv, j0), kBlockCols, dP, ldS, false);
            mask.fill(b, j0, bn, bnp, col_ok);
            const bool all_valid = bn == bnp && mask.count(b, j0, j0 + bn) == bn;
            RowPositions rp;
            const float* col_terms = nullptr;
            int64_t col_stride = 0;
            if (g.positions()) {
              rp.kind = slots.query_rows.classify(i0, bm, j0, bnp);
              if (g.p2c) {
                col_terms = build_column_terms(p2c_head, ldW, W, p2c_edges.data() + gi * 2 * ldL, ldL,
                                               slots.key_rows, rp.kind, i0, bm, j0, bn, w.col_scratch.data(),
                                               w.col_terms.data(), ldS, &col_stride);
              }
            }
            for (int64_t r = 0; r < bm; ++r) {
              float* row = S + r * ldS;
              if (!row_ok[r]) {
                std::memset(row, 0, sizeof(float) * bnp);
                continue;
              }
              if (g.positions()) {
                rp.sigma = slots.query_rows.row_ptr(i0 + r, j0);
                rp.row_term = g.c2p ? c2p_head + (i0 + r) * ldW : nullptr;
                rp.col_term = g.p2c ? col_terms + r * col_stride : nullptr;
              }
              if (pair.present) pair.fill_row(b, h, i0 + r, j0, bn, bnp, col_ok);
              add_positions_and_mask(row, bnp, g.positions() ? &rp : nullptr, col_ok, all_valid && !pair.present);
              if (drop.on()) {
                drop.factors(bh, i0 + r, 0, P + j0, 1, bn, bnp, drop.scale(), w.factor.data());
                multiply_row(dP + r * ldS, w.factor.data(), bnp);
              }
              score_grad_row(row, dP + r * ldS, bnp, lp[i0 + r], dl[i0 + r]);
              if (g.c2p) scatter_to_slots(row, bn, rp.kind, rp.sigma, gsl + r * W);
            }
            gemm_rr(bm, D, bn, S, ldS, kr.row(P + j0), kr.ld, acc, D, true);
          }
          if (g.c2p && valid_rows > 0) {
            gemm_rr(bm, D, W, gsl, W, pk_rev.data() + (pb * H + h) * W * D, D, acc, D, true);
            // partial^T [D, W] += (s Q_blk)^T G: the block's queries are one panel of Q^T.
            gemm_rr(D, W, bm, panel_at(qst.data() + gi * qt_size, D, i0), kBlockCols, gsl, W, partial, W, true);
          }
          store_rows(acc, D, bm, D, g.scale, dq + ((b * L + i0) * H + h) * D, H * D, 1);
        }
        return;
      }
      const bool prefix_task = task >= 2 * n_chunks;
      const int64_t chunk = prefix_task ? task - 2 * n_chunks : task - n_chunks;
      const int64_t bh = h0 + gi, b = bh / H, h = bh % H;
      // ---- key rows: dK, dV and (content keys) the p2c partial of this chunk ----
      const Rows kr = rows_view(in.k, b, h, krows.data() + gi * N * D, D);
      const Rows vr = rows_view(in.v, b, h, vrows.data() + gi * N * Dv, Dv);
      const Rows dor = rows_view(in.dout, b, h, dorows.data() + gi * L * Dv, Dv);
      const float* qsh = qs.data() + gi * L * D;
      const float* qst_head = qst.data() + gi * qt_size;
      const float* dot_head = dot.data() + gi * dot_size;
      const float* lp = lse_pad.data() + gi * ldL;
      const float* dl = delta_pad.data() + gi * ldL;
      const bool pos = !prefix_task && g.positions();
      float* partial = (!prefix_task && g.p2c) ? dpq_part.data() + (gi * n_chunks + chunk) * W * D : nullptr;
      if (partial) std::memset(partial, 0, sizeof(float) * W * D);
      const float* c2p_head = g.c2p ? tab_c2p.data() + gi * L * ldW : nullptr;
      const float* p2c_head = g.p2c ? tab_p2c.data() + gi * L * ldW : nullptr;
      const int64_t pb = g.pos_query_batch == 1 ? 0 : b;
      const int64_t offset = prefix_task ? 0 : P;  // key index of row 0 of this span
      const int64_t span = prefix_task ? P : L;
      const int64_t r_end = std::min(span, (chunk + 1) * kChunkRows);
      for (int64_t j0 = chunk * kChunkRows; j0 < r_end; j0 += kBlockRows) {
        const int64_t bn = std::min(kBlockRows, r_end - j0);
        const float* kb = kr.row(offset + j0);
        const float* vb = vr.row(offset + j0);
        float* acc = w.acc.data();
        float* acc_v = w.acc_v.data();
        std::memset(acc, 0, sizeof(float) * bn * D);
        std::memset(acc_v, 0, sizeof(float) * bn * Dv);
        bool key_ok[kBlockRows];
        int64_t valid_keys = 0;
        for (int64_t r = 0; r < bn; ++r) {
          key_ok[r] = prefix_task || mask.ok(b, j0 + r);
          valid_keys += key_ok[r];
        }
        float* hsl = w.slot_grad.data();
        if (g.p2c && pos && valid_keys > 0) std::memset(hsl, 0, sizeof(float) * bn * W);
        for (int64_t i0 = 0; valid_keys > 0 && i0 < L; i0 += kBlockCols) {
          const int64_t bq = std::min(kBlockCols, L - i0), bqp = round_up(bq, vw);
          // Prefix keys serve every query; content keys only real queries.
          if (!prefix_task && (mask.count(b, i0, i0 + bq) == 0 || !pair.tile_ok(b, h, i0, j0))) continue;
          gemm_rr(bn, bq, D, kb, kr.ld, panel_at(qst_head, D, i0), kBlockCols, S, ldS, false);
          gemm_rr(bn, bq, Dv, vb, vr.ld, panel_at(dot_head, Dv, i0), kBlockCols, dP, ldS, false);
          if (prefix_task) {
            for (int64_t c = 0; c < bqp; ++c) col_ok[c] = c < bq ? 1.f : 0.f;
          } else {
            mask.fill(b, i0, bq, bqp, col_ok);
          }
          const bool all_valid = bq == bqp && (prefix_task || mask.count(b, i0, i0 + bq) == bq);
          RowPositions rp;
          const float* col_terms = nullptr;
          int64_t col_stride = 0;
          if (pos) {
            rp.kind = slots.key_rows.classify(j0, bn, i0, bqp);
            if (g.c2p) {
              col_terms = build_column_terms(c2p_head, ldW, W, c2p_edges.data() + gi * 2 * ldL, ldL,
                                             slots.query_rows, rp.kind, j0, bn, i0, bq, w.col_scratch.data(),
                                             w.col_terms.data(), ldS, &col_stride);
            }
          }
          for (int64_t r = 0; r < bn; ++r) {
            float* row = S + r * ldS;
            float* grow = dP + r * ldS;
            if (!key_ok[r]) {
              std::memset(row, 0, sizeof(float) * bqp);
              std::memset(grow, 0, sizeof(float) * bqp);
              continue;
            }
            if (pos) {
              rp.sigma = slots.key_rows.row_ptr(j0 + r, i0);
              rp.row_term = g.p2c ? p2c_head + (j0 + r) * ldW : nullptr;
              rp.col_term = g.c2p ? col_terms + r * col_stride : nullptr;
            }
            const bool pair_row = pair.present && !prefix_task;
            if (pair_row) pair.fill_column(b, h, j0 + r, i0, bq, bqp, col_ok);
            add_positions_and_mask(row, bqp, pos ? &rp : nullptr, col_ok, all_valid && !pair_row);
            if (drop.on()) {  // this key row against a column of queries: dP and (after) P are dropped
              drop.factors(bh, i0, 1, offset + j0 + r, 0, bq, bqp, drop.scale(), w.factor.data());
              multiply_row(grow, w.factor.data(), bqp);
            }
            score_grad_row_transposed(row, grow, bqp, lp + i0, dl + i0);
            if (drop.on()) multiply_row(row, w.factor.data(), bqp);
            if (pos && g.p2c) scatter_to_slots(grow, bq, rp.kind, rp.sigma, hsl + r * W);
          }
          gemm_rr(bn, Dv, bq, S, ldS, dor.row(i0), dor.ld, acc_v, Dv, true);
          gemm_rr(bn, D, bq, dP, ldS, qsh + i0 * D, D, acc, D, true);
        }
        if (g.p2c && pos && valid_keys > 0) {
          gemm_rr(bn, D, W, hsl, W, pq.data() + (pb * H + h) * W * D, D, acc, D, true);
          // partial^T [D, W] += K_blk^T H: the block's keys are one panel of K^T.
          gemm_rr(D, W, bn, panel_at(kt.data() + gi * kt_size, D, j0), kBlockCols, hsl, W, partial, W, true);
        }
        if (uniform_rows && drop.on()) {
          // Rows that attend uniformly (lse = +inf) to the L keys, dropped: dV_j += (1 / L) sum_i z_ij dO_i.
          const float inv_l = 1.f / static_cast<float>(L);
          for (int64_t i0 = 0; i0 < L; i0 += kBlockCols) {
            const int64_t bq = std::min(kBlockCols, L - i0);
            bool any = false;
            for (int64_t c = 0; c < bq; ++c) {
              col_ok[c] = lp[i0 + c] == inf ? inv_l : 0.f;
              any = any || col_ok[c] != 0.f;
            }
            if (!any) continue;
            for (int64_t r = 0; r < bn; ++r) {
              float* row = S + r * ldS;
              drop.factors(bh, i0, 1, offset + j0 + r, 0, bq, bq, drop.scale(), row);
              for (int64_t c = 0; c < bq; ++c) row[c] *= col_ok[c];
            }
            gemm_rr(bn, Dv, bq, S, ldS, dor.row(i0), dor.ld, acc_v, Dv, true);
          }
        } else if (uniform_rows) {
          const float* u = uniform.data() + gi * Dv;
          for (int64_t r = 0; r < bn; ++r) {
            for (int64_t d = 0; d < Dv; ++d) acc_v[r * Dv + d] += u[d];
          }
        }
        const int64_t key0 = offset + j0;
        store_rows(acc, D, bn, D, 1.f, dk + ((b * N + key0) * H + h) * D, H * D, 1);
        store_rows(acc_v, Dv, bn, Dv, 1.f, dv + ((b * N + key0) * H + h) * Dv, H * Dv, 1);
      }
    };
    pipelined_tasks<BackwardWorker>(count, n_chunks + (uniform_rows ? 1 : 0), 2 * n_chunks + n_prefix_chunks,
                                    prepare, work);

    // Positional partials of these heads, in head and chunk order.
    for (int64_t gi = 0; gi < count; ++gi) {
      const int64_t bh = h0 + gi, b = bh / H, h = bh % H;
      if (g.c2p) {
        float* dst = dpk_acc + ((g.pos_key_batch == 1 ? 0 : b) * H + h) * W * D;
        for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
          const float* src = dpk_part.data() + (gi * n_chunks + chunk) * W * D;
          for (int64_t e = 0; e < W * D; ++e) dst[e] += src[e];
        }
      }
      if (g.p2c) {
        float* dst = dpq_acc + ((g.pos_query_batch == 1 ? 0 : b) * H + h) * W * D;
        for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
          const float* src = dpq_part.data() + (gi * n_chunks + chunk) * W * D;
          for (int64_t e = 0; e < W * D; ++e) dst[e] += src[e];
        }
      }
    }
  }
}

// Writes the window accumulator [PB, H, D, W] into the table [PB, H, 2S, D] (reversed: sigma -> lo + W-1-sigma).
template <typename T>
void store_window(const float* acc, const Geometry& g, bool reversed, float scale, at::Tensor& table) {
  // Any strides (the table is allocated in the layout of its input); the slots outside the window get zero.
  T* dst = table.data_ptr<T>();
  const int64_t pb_count = table.size(0), rows = table.size(2), W = g.window, D = g.head_dim;
  const int64_t s0 = table.stride(0), s1 = table.stride(1), s2 = table.stride(2), s3 = table.stride(3);
  for (int64_t pb = 0; pb < pb_count; ++pb) {
    for (int64_t h = 0; h < g.heads; ++h) {
      const float* src = acc + (pb * g.heads + h) * D * W;
      T* base = dst + pb * s0 + h * s1;
      for (int64_t slot = 0; slot < rows; ++slot) {
        T* row = base + slot * s2;
        const int64_t sigma = reversed ? g.slot_lo + W - 1 - slot : slot - g.slot_lo;
        if (sigma < 0 || sigma >= W) {
          for (int64_t d = 0; d < D; ++d) row[d * s3] = static_cast<T>(0.f);
        } else {
          for (int64_t d = 0; d < D; ++d) row[d * s3] = static_cast<T>(scale * src[d * W + sigma]);
        }
      }
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> disentangled_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& pos_key, const std::optional<at::Tensor>& pos_query,
    const std::optional<at::Tensor>& token_mask, const std::optional<at::Tensor>& slot_table, const at::Tensor& out,
    const at::Tensor& lse, double softmax_scale, int64_t num_prefix_keys, const std::optional<at::Tensor>& pair_mask,
    const std::optional<at::Tensor>& seed, double dropout_p) {
  Geometry g = make_geometry(query, key, value, pos_key, pos_query, token_mask, slot_table, softmax_scale,
                             num_prefix_keys);
  TORCH_CHECK(grad_out.dim() == 4 && out.dim() == 4 && grad_out.sizes() == out.sizes() &&
                  out.size(0) == g.batch && out.size(1) == g.heads && out.size(2) == g.length &&
                  out.size(3) == g.value_dim,
              "deberta_fast_cpu: grad_out and out must be [B, H, L, Dv]");
  TORCH_CHECK(grad_out.scalar_type() == query.scalar_type() && out.scalar_type() == query.scalar_type(),
              "deberta_fast_cpu: grad_out and out must have the dtype of query");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == g.batch &&
                  lse.size(1) == g.heads && lse.size(2) == g.length,
              "deberta_fast_cpu: lse must be float32 [B, H, L]");
  const int64_t table_rows = pos_key ? pos_key->size(2) : (pos_query ? pos_query->size(2) : 0);
  const Slots slots(g, slot_table, table_rows);
  TORCH_CHECK(!(token_mask.has_value() && pair_mask.has_value()),
              "deberta_fast_cpu: pass either a token_mask or a pair_mask, not both");
  const TokenMask mask(g, token_mask);
  const PairMask pair(g, pair_mask, /*transposed=*/true);
  const AttentionDropout drop = make_dropout(seed, dropout_p);
  const at::Tensor lse_c = lse.contiguous();

  at::Tensor dq = at::empty({g.batch, g.length, g.heads, g.head_dim}, query.options());
  at::Tensor dk = at::empty({g.batch, g.keys, g.heads, g.head_dim}, query.options());
  at::Tensor dv = at::empty({g.batch, g.keys, g.heads, g.value_dim}, query.options());
  // The positional gradients take the layout of their tables (the model's [PB, 2S, H, D] viewed as [PB, H, 2S, D]),
  // so the projection backward reads them without a copy; store_window writes every element.
  at::Tensor dpk = g.c2p ? at::empty_like(*pos_key) : at::empty({0}, query.options());
  at::Tensor dpq = g.p2c ? at::empty_like(*pos_query) : at::empty({0}, query.options());
  const int64_t W = g.window;
  AlignedBuffer<float> dpk_acc(g.c2p ? g.pos_key_batch * g.heads * W * g.head_dim : 0);
  AlignedBuffer<float> dpq_acc(g.p2c ? g.pos_query_batch * g.heads * W * g.head_dim : 0);

  auto run = [&](auto tag) {
    using T = decltype(tag);
    BackwardInputs<T> in{Strided4<T>(query), Strided4<T>(key), Strided4<T>(value), Strided4<T>(grad_out),
                         Strided4<T>(out), lse_c.data_ptr<float>()};
    if (g.batch * g.heads * g.length > 0) {
      backward_kernel<T>(g, slots, mask, pair, drop, in, pos_key, pos_query, dq.data_ptr<T>(), dk.data_ptr<T>(),
                         dv.data_ptr<T>(), dpk_acc.data(), dpq_acc.data());
    }
    if (g.c2p) store_window<T>(dpk_acc.data(), g, /*reversed=*/true, 1.f, dpk);
    if (g.p2c) store_window<T>(dpq_acc.data(), g, /*reversed=*/false, g.scale, dpq);
  };
  switch (query.scalar_type()) {
    case at::kFloat: run(float()); break;
    case at::kBFloat16: run(at::BFloat16()); break;
    case at::kHalf: run(at::Half()); break;
    default: TORCH_CHECK(false, "deberta_fast_cpu: unsupported dtype ", query.scalar_type());
  }
  return {dq.permute({0, 2, 1, 3}), dk.permute({0, 2, 1, 3}), dv.permute({0, 2, 1, 3}), dpk, dpq};
}

}  // namespace deberta_fast_cpu
