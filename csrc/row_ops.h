// Row helpers of the token-wise fused ops (residual_layernorm.cpp, bias_gelu.cpp): rows of a 2-D [rows, width]
// view converted to fp32 scratch and back, fp32 row reductions in a fixed order, and column sums over rows that
// do not depend on the thread count (rows are cut into blocks by the row count alone; each block sums into its own
// partial row, and the partial rows are added in block order).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace deberta_fast_cpu {
namespace rows {

using FVec = at::vec::Vectorized<float>;

// A pointer to the fp32 values of src[0:n]: src itself for float rows, else `scratch` filled by conversion.
template <typename T>
inline const float* as_float(const T* src, float* scratch, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    using RVec = at::vec::Vectorized<T>;
    int64_t c = 0;
    for (; c + RVec::size() <= n; c += RVec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<T>(RVec::loadu(src + c));
      lo.store(scratch + c);
      hi.store(scratch + c + FVec::size());
    }
    for (; c < n; ++c) scratch[c] = static_cast<float>(src[c]);
    return scratch;
  }
}

// dst[0:n] = T(src[0:n]), rounded to nearest even as the scalar conversion does.
template <typename T>
inline void store(const float* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (src != dst) std::memcpy(dst, src, sizeof(float) * n);
  } else {
    using RVec = at::vec::Vectorized<T>;
    int64_t c = 0;
    for (; c + RVec::size() <= n; c += RVec::size()) {
      at::vec::convert_from_float<T>(FVec::loadu(src + c), FVec::loadu(src + c + FVec::size())).store(dst + c);
    }
    for (; c < n; ++c) dst[c] = static_cast<T>(src[c]);
  }
}

// Values as the tensor dtype holds them (a no-op for float): what torch computes from after each rounded op.
template <typename T>
inline FVec round_to(const FVec& v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return std::get<0>(at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(v, v)));
  }
}

template <typename T>
inline void round_to(float* row, int64_t n) {
  if constexpr (!std::is_same_v<T, float>) {
    int64_t c = 0;
    for (; c + FVec::size() <= n; c += FVec::size()) round_to<T>(FVec::loadu(row + c)).store(row + c);
    for (; c < n; ++c) row[c] = static_cast<float>(static_cast<T>(row[c]));
  }
}

inline float lanes_total(const FVec& v) {
  alignas(64) float lanes[FVec::size()];
  v.store(lanes);
  float total = 0.f;
  for (int64_t k = 0; k < FVec::size(); ++k) total += lanes[k];
  return total;
}

inline float sum(const float* a, int64_t n) {
  FVec acc(0.f);
  int64_t c = 0;
  for (; c + FVec::size() <= n; c += FVec::size()) acc = acc + FVec::loadu(a + c);
  float total = lanes_total(acc);
  for (; c < n; ++c) total += a[c];
  return total;
}

inline float dot(const float* a, const float* b, int64_t n) {
  FVec acc(0.f);
  int64_t c = 0;
  for (; c + FVec::size() <= n; c += FVec::size()) acc = at::vec::fmadd(FVec::loadu(a + c), FVec::loadu(b + c), acc);
  float total = lanes_total(acc);
  for (; c < n; ++c) total += a[c] * b[c];
  return total;
}

// sum((a - m)^2)
inline float squared_deviation(const float* a, float m, int64_t n) {
  const FVec mv(m);
  FVec acc(0.f);
  int64_t c = 0;
  for (; c + FVec::size() <= n; c += FVec::size()) {
    const FVec d = FVec::loadu(a + c) - mv;
    acc = at::vec::fmadd(d, d, acc);
  }
  float total = lanes_total(acc);
  for (; c < n; ++c) total += (a[c] - m) * (a[c] - m);
  return total;
}

// Rows per block of the column sums: a function of the row count only (never of the thread count).
inline int64_t rows_per_block(int64_t num_rows) { return std::max<int64_t>(16, (num_rows + 511) / 512); }

// out[k][c] = sum over blocks b (in order) of partial[(b * parts + k) * width + c], for k < parts.
inline void reduce_partials(const std::vector<float>& partial, int64_t blocks, int64_t parts, int64_t width,
                            const std::vector<float*>& out) {
  at::parallel_for(0, width, 256, [&](int64_t c0, int64_t c1) {
    for (int64_t k = 0; k < parts; ++k) {
      float* dst = out[k];
      if (dst == nullptr) continue;
      for (int64_t c = c0; c < c1; ++c) dst[c] = 0.f;
      for (int64_t b = 0; b < blocks; ++b) {
        const float* src = partial.data() + (b * parts + k) * width;
        for (int64_t c = c0; c < c1; ++c) dst[c] += src[c];
      }
    }
  });
}

}  // namespace rows
}  // namespace deberta_fast_cpu
