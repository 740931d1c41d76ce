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

// Horizontal sum / max of one vector (the generic Vectorized<float>::reduce_add of ATen's DEFAULT build does not
// compile, so that build reduces through memory).
inline float lanes_sum(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  return v.reduce_add();
#else
  alignas(64) float lanes[Vec::size()];
  v.store(lanes);
  float total = 0.f;
  for (int64_t k = 0; k < Vec::size(); ++k) total += lanes[k];
  return total;
#endif
}
inline float lanes_max(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  return v.reduce_max();
#else
  alignas(64) float lanes[Vec::size()];
  v.store(lanes);
  float best = lanes[0];
  for (int64_t k = 1; k < Vec::size(); ++k) best = lanes[k] > best ? lanes[k] : best;
  return best;
#endif
}

// base[idx[k]] for the Vec::size() lanes k, where idx is non-decreasing with steps of 0 or 1 (slot indices along a
// tile row or column), so every lane lies in base[idx[0] .. idx[0] + Vec::size()). One unaligned load and a lane
// permutation instead of a gather (several times faster); reads up to Vec::size() - 1 floats past the last index.
inline Vec lookup_window(const float* base, const int32_t* idx) {
  const int32_t lo = idx[0];
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i rel = _mm512_sub_epi32(_mm512_loadu_si512(idx), _mm512_set1_epi32(lo));
  return Vec(_mm512_permutexvar_ps(rel, _mm512_loadu_ps(base + lo)));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i rel =
      _mm256_sub_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx)), _mm256_set1_epi32(lo));
  return Vec(_mm256_permutevar8x32_ps(_mm256_loadu_ps(base + lo), rel));
#else
  alignas(64) float lanes[Vec::size()];
  for (int64_t k = 0; k < Vec::size(); ++k) lanes[k] = base[idx[k]];
  return Vec::loadu(lanes);
#endif
}

// Positional terms of one tile row, as read by add_positions_and_mask. Row terms and tables are read up to
// Vec::size() - 1 floats past their last slot (lookup_window): their rows have padded_pitch(W) floats.
struct RowPositions {
  TileKind kind = TileKind::kConstant;
  const int32_t* sigma = nullptr;     // sigma of each column of this row (SlotIndex::row_ptr)
  const float* row_term = nullptr;    // [W]: this row's own positional scores over sigma (c2p of a query, p2c of a key)
  const float* col_term = nullptr;    // [cols_padded]: the columns' positional scores for this row (build_column_terms)
};

// Scores of one row, masked (-inf where col_ok[c] == 0 unless every column is valid), stored; returns the max.
template <bool kMasked, typename Load>
inline float finish_row(float* row, int64_t cols_padded, const float* col_ok, const Load& load) {
  const Vec neg_inf(kNegInf), zero(0.f);
  Vec vmax0(kNegInf), vmax1(kNegInf);
  const int64_t w = Vec::size();
  int64_t c = 0;
  for (; c + 2 * w <= cols_padded; c += 2 * w) {  // two chains: the max has a latency of several cycles
    Vec v0 = load(c), v1 = load(c + w);
    if (kMasked) {
      v0 = Vec::blendv(neg_inf, v0, Vec::loadu(col_ok + c) != zero);
      v1 = Vec::blendv(neg_inf, v1, Vec::loadu(col_ok + c + w) != zero);
    }
    v0.store(row + c);
    v1.store(row + c + w);
    vmax0 = at::vec::maximum(vmax0, v0);
    vmax1 = at::vec::maximum(vmax1, v1);
  }
  for (; c < cols_padded; c += w) {
    Vec v = load(c);
    if (kMasked) v = Vec::blendv(neg_inf, v, Vec::loadu(col_ok + c) != zero);
    v.store(row + c);
    vmax0 = at::vec::maximum(vmax0, v);
  }
  return lanes_max(at::vec::maximum(vmax0, vmax1));
}

template <bool kMasked, bool kScaled>
inline float add_positions_and_mask_impl(float* row, int64_t cols_padded, const RowPositions* pos,
                                         const float* col_ok, float scale) {
  const float* rt = pos ? pos->row_term : nullptr;
  const float* ct = pos ? pos->col_term : nullptr;
  const TileKind kind = rt ? pos->kind : TileKind::kConstant;
  const Vec sv(scale);
  auto base = [&](int64_t c) { return kScaled ? Vec::loadu(row + c) * sv : Vec::loadu(row + c); };
  if (kind == TileKind::kConstant) {
    const Vec rv(rt ? rt[pos->sigma[0]] : 0.f);
    if (ct) {
      return finish_row<kMasked>(row, cols_padded, col_ok,
                                 [&](int64_t c) { return base(c) + rv + Vec::loadu(ct + c); });
    }
    return finish_row<kMasked>(row, cols_padded, col_ok, [&](int64_t c) { return base(c) + rv; });
  }
  if (kind == TileKind::kLinear) {  // sigma_c = sigma_0 + c: the row term is contiguous
    const float* rts = rt + pos->sigma[0];
    if (ct) {
      return finish_row<kMasked>(row, cols_padded, col_ok, [&](int64_t c) {
        return base(c) + Vec::loadu(rts + c) + Vec::loadu(ct + c);
      });
    }
    return finish_row<kMasked>(row, cols_padded, col_ok,
                               [&](int64_t c) { return base(c) + Vec::loadu(rts + c); });
  }
  const int32_t* sigma = pos->sigma;
  if (ct) {
    return finish_row<kMasked>(row, cols_padded, col_ok, [&](int64_t c) {
      return base(c) + lookup_window(rt, sigma + c) + Vec::loadu(ct + c);
    });
  }
  return finish_row<kMasked>(row, cols_padded, col_ok,
                             [&](int64_t c) { return base(c) + lookup_window(rt, sigma + c); });
}

// row[c] = scale * row[c] + row_term[sigma_c] + col_term[c], then row[c] = -inf where col_ok[c] == 0; all_valid: no
// column is masked (col_ok is not read). pos == nullptr: masking only. scale == 1 multiplies nothing (the fp32 tiles
// fold the scale into their queries). Returns the row maximum (-inf when all are masked).
inline float add_positions_and_mask(float* row, int64_t cols_padded, const RowPositions* pos, const float* col_ok,
                                    bool all_valid = false, float scale = 1.f) {
  if (scale != 1.f) {
    return all_valid ? add_positions_and_mask_impl<false, true>(row, cols_padded, pos, col_ok, scale)
                     : add_positions_and_mask_impl<true, true>(row, cols_padded, pos, col_ok, scale);
  }
  return all_valid ? add_positions_and_mask_impl<false, false>(row, cols_padded, pos, col_ok, scale)
                   : add_positions_and_mask_impl<true, false>(row, cols_padded, pos, col_ok, scale);
}

// The positional scores that belong to the tile's columns (p2c of the keys in a query tile, c2p of the queries in a
// key tile), laid out like the tile: out[r * ld_out + c] = table[(col0 + c) * ld_tab + sigma'(col0 + c, row0 + r)],
// where `other` is the slot index oriented with the columns as rows. Read column by column, each column is a
// contiguous run (linear tiles) or a gather within one table row, then transposed; reading the tile row by row
// instead would touch a different table row in every lane.
// Constant tiles need one value per column, shared by every row, and sit almost always on the saturated first or
// last slot: `edges` ([2, edge_ld]) holds those two table columns contiguously (copy_table_edges).
// Returns the terms of tile row r at result + r * (*row_stride); the stride is 0 for constant tiles.
inline const float* build_column_terms(const float* table, int64_t ld_tab, int64_t window, const float* edges,
                                       int64_t edge_ld, const SlotIndex& other, TileKind kind, int64_t row0,
                                       int64_t rows, int64_t col0, int64_t cols, float* scratch, float* out,
                                       int64_t ld_out, int64_t* row_stride) {
  if (kind == TileKind::kConstant) {
    *row_stride = 0;
    const int32_t s = other.row_ptr(col0, row0)[0];
    if (s == 0 || s == window - 1) return edges + (s == 0 ? 0 : edge_ld) + col0;
    for (int64_t c = 0; c < cols; ++c) out[c] = table[(col0 + c) * ld_tab + s];
    return out;
  }
  *row_stride = ld_out;
  const int64_t w = Vec::size();
  const int64_t rows_padded = (rows + w - 1) / w * w;
  for (int64_t c = 0; c < cols; ++c) {
    const float* trow = table + (col0 + c) * ld_tab;
    const int32_t* sig = other.row_ptr(col0 + c, row0);
    float* dst = scratch + c * rows_padded;
    if (kind == TileKind::kLinear) {
      const float* src = trow + sig[0];
      int64_t r = 0;
      for (; r + w <= rows; r += w) Vec::loadu(src + r).store(dst + r);
      for (; r < rows; ++r) dst[r] = src[r];
    } else {
      for (int64_t r = 0; r < rows_padded; r += w) lookup_window(trow, sig + r).store(dst + r);
    }
  }
  at::vec::transpose_mxn<float>(scratch, rows_padded, out, ld_out, static_cast<int>(cols), static_cast<int>(rows));
  return out;
}

// edges[0, t] = table[t, 0], edges[1, t] = table[t, W - 1] for t in [t0, t1): the saturated slots, contiguous.
inline void copy_table_edges(const float* table, int64_t ld_tab, int64_t window, int64_t t0, int64_t t1,
                             float* edges, int64_t edge_ld) {
  for (int64_t t = t0; t < t1; ++t) {
    edges[t] = table[t * ld_tab];
    edges[edge_ld + t] = table[t * ld_tab + window - 1];
  }
}

// row[c] = exp(row[c] - m); returns the sum. Masked entries (-inf) become 0.
inline float exp_and_sum(float* row, int64_t cols_padded, float m) {
  const Vec mv(m);
  const int64_t w = Vec::size();
  Vec acc0(0.f), acc1(0.f);
  int64_t c = 0;
  for (; c + 2 * w <= cols_padded; c += 2 * w) {
    const Vec p0 = (Vec::loadu(row + c) - mv).exp_u20();
    const Vec p1 = (Vec::loadu(row + c + w) - mv).exp_u20();
    p0.store(row + c);
    p1.store(row + c + w);
    acc0 = acc0 + p0;
    acc1 = acc1 + p1;
  }
  for (; c < cols_padded; c += w) {
    const Vec p = (Vec::loadu(row + c) - mv).exp_u20();
    p.store(row + c);
    acc0 = acc0 + p;
  }
  return lanes_sum(acc0 + acc1);
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

#if defined(CPU_CAPABILITY_AVX512)
// grad_row[sigma[c]] += ds[c] for 16 lanes whose slots are non-decreasing with steps of 0 or 1: a segmented
// inclusive scan (lanes add their left neighbours of the same slot) leaves each run's sum in its last lane; the run
// ends, compressed to the low lanes, are the sums of the consecutive slots sigma[0], sigma[0] + 1, ...
inline void scatter_runs16(const float* ds, const int32_t* sigma, float* grad_row) {
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i slots = _mm512_loadu_si512(sigma);
  __m512 sums = _mm512_loadu_ps(ds);
  for (int shift = 1; shift < 16; shift *= 2) {
    const __m512i from = _mm512_sub_epi32(iota, _mm512_set1_epi32(shift));
    const __mmask16 inside = static_cast<__mmask16>(0xFFFFu << shift);
    const __mmask16 same =
        _mm512_mask_cmpeq_epi32_mask(inside, _mm512_permutexvar_epi32(from, slots), slots);
    sums = _mm512_mask_add_ps(sums, same, sums, _mm512_permutexvar_ps(from, sums));
  }
  const __m512i next = _mm512_permutexvar_epi32(_mm512_min_epi32(_mm512_add_epi32(iota, _mm512_set1_epi32(1)),
                                                                 _mm512_set1_epi32(15)),
                                                slots);
  const __mmask16 ends = static_cast<__mmask16>(_mm512_cmpneq_epi32_mask(next, slots) | 0x8000u);
  const __m512 runs = _mm512_maskz_compress_ps(ends, sums);
  const __mmask16 used = static_cast<__mmask16>((1u << __builtin_popcount(ends)) - 1u);
  float* g = grad_row + sigma[0];
  _mm512_mask_storeu_ps(g, used, _mm512_add_ps(_mm512_maskz_loadu_ps(used, g), runs));
}
#endif

// grad_row[sigma_c] += ds[c] for c < cols: the score gradient of one row summed per slot.
inline void scatter_to_slots(const float* ds, int64_t cols, TileKind kind, const int32_t* sigma, float* grad_row) {
  switch (kind) {
    case TileKind::kConstant: {
      float total = 0.f;
      int64_t c = 0;
      Vec acc(0.f);
      for (; c + Vec::size() <= cols; c += Vec::size()) acc = acc + Vec::loadu(ds + c);
      total = lanes_sum(acc);
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
      int64_t c0 = 0;
#if defined(CPU_CAPABILITY_AVX512)
      for (; c0 + 16 <= cols; c0 += 16) scatter_runs16(ds + c0, sigma + c0, grad_row);
      if (c0 == cols) break;
#endif
      int32_t current = sigma[c0];
      float run = 0.f;
      for (int64_t c = c0; c < cols; ++c) {
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

// row[c] *= factor[c] for c < n_padded (a multiple of the vector width): dropout factors 0 or 1 / (1 - p).
inline void multiply_row(float* row, const float* factor, int64_t n_padded) {
  for (int64_t c = 0; c < n_padded; c += Vec::size()) (Vec::loadu(row + c) * Vec::loadu(factor + c)).store(row + c);
}

}  // namespace deberta_fast_cpu
