// Conversion of strided input tiles (fp32 / bf16 / fp16) into dense fp32 buffers, plain or transposed, and
// the way back. Every kernel computes in fp32 whatever the input dtype.
#pragma once

#include <cstdint>

namespace deberta_fast_cpu {

// dst[r * ld + c] = scale * src[r * rs + c * cs]    for r < rows, c < cols
template <typename T>
inline void pack_rows(const T* src, int64_t rs, int64_t cs, int64_t rows, int64_t cols, float scale, float* dst,
                      int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * rs;
    float* d = dst + r * ld;
    if (cs == 1) {
      for (int64_t c = 0; c < cols; ++c) d[c] = scale * static_cast<float>(s[c]);
    } else {
      for (int64_t c = 0; c < cols; ++c) d[c] = scale * static_cast<float>(s[c * cs]);
    }
  }
}

// dst[c * ld + r] = scale * src[r * rs + c * cs]    (a transposed copy), in cache-friendly 16-row strips
template <typename T>
inline void pack_transposed(const T* src, int64_t rs, int64_t cs, int64_t rows, int64_t cols, float scale,
                            float* dst, int64_t ld) {
  constexpr int64_t kStrip = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += kStrip) {
    const int64_t r1 = r0 + kStrip < rows ? r0 + kStrip : rows;
    for (int64_t c = 0; c < cols; ++c) {
      float* d = dst + c * ld;
      for (int64_t r = r0; r < r1; ++r) d[r] = scale * static_cast<float>(src[r * rs + c * cs]);
    }
  }
}

// dst[r * rs + c * cs] = T(scale * src[r * ld + c])
template <typename T>
inline void store_rows(const float* src, int64_t ld, int64_t rows, int64_t cols, float scale, T* dst, int64_t rs,
                       int64_t cs) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + r * ld;
    T* d = dst + r * rs;
    for (int64_t c = 0; c < cols; ++c) d[c * cs] = static_cast<T>(scale * s[c]);
  }
}

// A dense fp32 matrix: rows `ld` apart. Either the caller's tensor (fp32 with unit column stride) or a packed copy.
struct Rows {
  const float* data = nullptr;
  int64_t ld = 0;
  const float* row(int64_t r) const { return data + r * ld; }
};

}  // namespace deberta_fast_cpu
