// Vectorised work on one row of a score tile: positional terms, masking, online softmax, probabilities and
// their gradients, and the scatter of score gradients onto the slot axis.
//
// A row holds `cols_padded` floats (a multiple of the vector width); columns past the tile's last column are
// masked by `col_ok` like masked keys, so full vectors can be processed everywhere.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <limits>

#include "slot_index.h"

namespace deberta_fast_cpu {

using Vec = at::vec::Vectorized<float>;
using IVec = at::vec::Vectorized<int32_t>;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t vec_width() { return Vec::size(); }

// Positional terms of one tile row, as read by add_positions_and_mask.
struct RowPositions {
  TileKind kind = TileKind::kConstant;
  const int32_t* sigma = nullptr;  // sigma of each column of this row (SlotIndex::row_ptr)
  const float* row_term = nullptr;  // [W]: this row's own positional scores over sigma (c2p of a query, p2c of a key)
  const float* col_table = nullptr;  // [W, ld]: the other side's scores, already offset to the tile's first column
  int64_t col_ld = 0;
};

// row[c] += row_term[sigma_c] + col_table[sigma_c * ld + c], then row[c] = -inf where col_ok[c] == 0.
// pos == nullptr: masking only. Returns the row maximum (-inf when every column is masked).
inline float add_positions_and_mask(float* row, int64_t cols_padded, const RowPositions* pos, const float* col_ok) {
  const Vec neg_inf(kNegInf), zero(0.f);
  Vec vmax(kNegInf);
  const int64_t w = Vec::size();
  if (pos == nullptr) {
    for (int64_t c = 0; c < cols_padded; c += w) {
      Vec v = Vec::blendv(neg_inf, Vec::loadu(row + c), Vec::loadu(col_ok + c) != zero);
      v.store(row + c);
      vmax = at::vec::maximum(vmax, v);
    }
    return vmax.reduce_max();
  }
  const float* rt = pos->row_term;
  const float* ct = pos->col_table;
  const int64_t ld = pos->col_ld;
  switch (pos->kind) {
    case TileKind::kConstant: {
      const int32_t s = pos->sigma[0];
      const Vec rv(rt ? rt[s] : 0.f);
      const float* crow = ct ? ct + s * ld : nullptr;
      for (int64_t c = 0; c < cols_padded; c += w) {
        Vec v = Vec::loadu(row + c) + rv;
        if (crow) v = v + Vec::loadu(crow + c);
        v = Vec::blendv(neg_inf, v, Vec::loadu(col_ok + c) != zero);
        v.store(row + c);
        vmax = at::vec::maximum(vmax, v);
      }
      break;
    }
    case TileKind::kLinear: {
      // sigma_c = s + c: the row term is contiguous, the column table is read along a diagonal.
      const int32_t s = pos->sigma[0];
      const IVec step = IVec::arange(0, 1) * IVec(static_cast<int32_t>(ld + 1));
      const float* cbase = ct ? ct + s * ld : nullptr;
      for (int64_t c = 0; c < cols_padded; c += w) {
        Vec v = Vec::loadu(row + c);
        if (rt) v = v + Vec::loadu(rt + s + c);
        if (cbase) v = v + at::vec::gather<4>(cbase + c * (ld + 1), step);
        v = Vec::blendv(neg_inf, v, Vec::loadu(col_ok + c) != zero);
        v.store(row + c);
        vmax = at::vec::maximum(vmax, v);
      }
      break;
    }
    case TileKind::kGeneral: {
      const IVec iota = IVec::arange(0, 1);
      const IVec ldv(static_cast<int32_t>(ld));
      for (int64_t c = 0; c < cols_padded; c += w) {
        const IVec sig = IVec::loadu(pos->sigma + c);
        Vec v = Vec::loadu(row + c);
        if (rt) v = v + at::vec::gather<4>(rt, sig);
        if (ct) v = v + at::vec::gather<4>(ct + c, sig * ldv + iota);
        v = Vec::blendv(neg_inf, v, Vec::loadu(col_ok + c) != zero);
        v.store(row + c);
        vmax = at::vec::maximum(vmax, v);
      }
      break;
    }
  }
  return vmax.reduce_max();
}

// row[c] = exp(row[c] - m); returns the sum. Masked entries (-inf) become 0.
inline float exp_and_sum(float* row, int64_t cols_padded, float m) {
  const Vec mv(m);
  Vec acc(0.f);
  for (int64_t c = 0; c < cols_padded; c += Vec::size()) {
    const Vec p = (Vec::loadu(row + c) - mv).exp_u20();
    p.store(row + c);
    acc = acc + p;
  }
  return acc.reduce_add();
}

// Backward, one row with a scalar log-sum-exp and delta (query rows):
//   p = exp(s - lse);  ds = p * (dp - delta)  written over `scores`.
inline void score_grad_row(float* scores, const float* dp, int64_t cols_padded, float lse, float delta) {
  const Vec lv(lse), dv(delta);
  for (int64_t c = 0; c < cols_padded; c += Vec::size()) {
    const Vec p = (Vec::loadu(scores + c) - lv).exp_u20();
    (p * (Vec::loadu(dp + c) - dv)).store(scores + c);
  }
}

// Backward, one key row against query columns with per-column log-sum-exp and delta:
//   p = exp(s - lse[c]) written over `scores`; ds = p * (dp - delta[c]) written over `dp`.
inline void score_grad_row_transposed(float* scores, float* dp, int64_t cols_padded, const float* lse,
                                      const float* delta) {
  for (int64_t c = 0; c < cols_padded; c += Vec::size()) {
    const Vec p = (Vec::loadu(scores + c) - Vec::loadu(lse + c)).exp_u20();
    p.store(scores + c);
    (p * (Vec::loadu(dp + c) - Vec::loadu(delta + c))).store(dp + c);
  }
}

// grad_row[sigma_c] += ds[c] for c < cols: the score gradient of one row summed per slot.
inline void scatter_to_slots(const float* ds, int64_t cols, TileKind kind, const int32_t* sigma, float* grad_row) {
  switch (kind) {
    case TileKind::kConstant: {
      float total = 0.f;
      int64_t c = 0;
      Vec acc(0.f);
      for (; c + Vec::size() <= cols; c += Vec::size()) acc = acc + Vec::loadu(ds + c);
      total = acc.reduce_add();
      for (; c < cols; ++c) total += ds[c];
      grad_row[sigma[0]] += total;
      break;
    }
    case TileKind::kLinear: {
      float* g = grad_row + sigma[0];
      int64_t c = 0;
      for (; c + Vec::size() <= cols; c += Vec::size()) (Vec::loadu(g + c) + Vec::loadu(ds + c)).store(g + c);
      for (; c < cols; ++c) g[c] += ds[c];
      break;
    }
    case TileKind::kGeneral: {
      // sigma is non-decreasing along the row: sum each run of equal slots before touching memory.
      int32_t current = sigma[0];
      float run = 0.f;
      for (int64_t c = 0; c < cols; ++c) {
        if (sigma[c] != current) {
          grad_row[current] += run;
          current = sigma[c];
          run = 0.f;
        }
        run += ds[c];
      }
      grad_row[current] += run;
      break;
    }
  }
}

// row[c] *= factor for c < n
inline void scale_row(float* row, int64_t n, float factor) {
  const Vec f(factor);
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) (Vec::loadu(row + c) * f).store(row + c);
  for (; c < n; ++c) row[c] *= factor;
}

}  // namespace deberta_fast_cpu
