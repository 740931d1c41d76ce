// bf16 tile products with fp32 accumulation, for the forward pass of bf16 calls on CPUs with bf16 dot-product
// instructions (AVX-512 BF16, AMX-BF16): about twice the throughput of the fp32 tiles there.
//
// The right-hand operand of a bf16 product is stored in the VNNI layout that the dot-product instructions read:
// element (k, n) of a [K, N] operand with leading dimension ld sits at (k / 2) * 2 * ld + 2 * n + k % 2 (pairs of
// consecutive k side by side), K padded to even with zeros. The left-hand operand is plain row-major bf16.
#pragma once

#include <ATen/Context.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#include "aligned_buffer.h"

namespace deberta_fast_cpu {

using bf16 = c10::BFloat16;

// bf16 elements of a VNNI operand with K rows (padded to even) and leading dimension ld.
inline int64_t vnni_elements(int64_t k, int64_t ld) { return round_up(k, 2) * ld; }

// Floats that hold n bf16 values (workspace blocks are counted in floats).
inline int64_t bf16_floats(int64_t n) { return (n + 1) / 2; }

// C[m, n] (+)= A[m, k] . B[k, n]: A row-major bf16, B in VNNI layout with leading dimension ldb, k even.
inline void gemm_bf16(int64_t m, int64_t n, int64_t k, const bf16* a, int64_t lda, const bf16* b, int64_t ldb,
                      float* c, int64_t ldc, bool accumulate) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    if (!accumulate) {
      for (int64_t r = 0; r < m; ++r) std::memset(c + r * ldc, 0, sizeof(float) * n);
    }
    return;
  }
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c, /*is_vnni=*/true);
}

// Ends the bf16 products of the calling thread (releases the tile configuration on AMX; cheap elsewhere).
inline void release_bf16_tiles() { at::native::cpublas::brgemm_release(/*is_vnni=*/true); }

// Whether this process can run bf16 tile products: an AVX-512 build of the op, a CPU with bf16 dot products, oneDNN
// enabled in torch, and a probe product that runs and gives the exact answer (a torch build without oneDNN's
// micro-kernels raises instead). Evaluated once; oneDNN being switched off later is checked on every call.
inline bool bf16_tiles_available() {
#if defined(CPU_CAPABILITY_AVX512) && (defined(__x86_64__) || defined(_M_X64))
  static const bool probe = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512bf16") && !__builtin_cpu_supports("amx-bf16")) return false;
    try {
      // [3, 6] . [6, 48] of small integers (exact in bf16 and in fp32 sums): an odd number of pairs of k and a
      // number of columns that is not a multiple of 32, so a layout other than the plain VNNI one would show.
      constexpr int M = 3, N = 48, K = 6;
      bf16 a[M * K], b[K * N];
      float c[M * N];
      for (int m = 0; m < M; ++m) {
        for (int k = 0; k < K; ++k) a[m * K + k] = bf16(static_cast<float>(m + k + 1));
      }
      for (int k = 0; k < K; ++k) {
        for (int n = 0; n < N; ++n) b[(k / 2) * 2 * N + 2 * n + k % 2] = bf16(static_cast<float>(n % 7 - k));
      }
      at::native::cpublas::brgemm(M, N, K, K, N, N, false, a, b, c, /*is_vnni=*/true);
      release_bf16_tiles();
      for (int m = 0; m < M; ++m) {
        for (int n = 0; n < N; ++n) {
          float expected = 0.f;
          for (int k = 0; k < K; ++k) expected += static_cast<float>((m + k + 1) * (n % 7 - k));
          if (c[m * N + n] != expected) return false;
        }
      }
      return true;
    } catch (...) {
      return false;
    }
  }();
  return probe && at::globalContext().userEnabledMkldnn();
#else
  return false;
#endif
}

// dst[r * ld + c] = bf16(src[r * rs + c * cs])   for r < rows, c < cols (bf16 source: a copy)
inline void pack_rows_bf16(const bf16* src, int64_t rs, int64_t cs, int64_t rows, int64_t cols, bf16* dst,
                           int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const bf16* s = src + r * rs;
    bf16* d = dst + r * ld;
    if (cs == 1) {
      std::memcpy(d, s, sizeof(bf16) * cols);
    } else {
      for (int64_t c = 0; c < cols; ++c) d[c] = s[c * cs];
    }
  }
}

// VNNI operand from a source indexed (k, n) -> src[k * ks + n * ns]: dst as described at the top, K rows padded to
// even with zeros, columns n < N of leading dimension ld.
inline void pack_vnni(const bf16* src, int64_t ks, int64_t ns, int64_t K, int64_t N, bf16* dst, int64_t ld) {
  const bf16 zero(0.f);
  for (int64_t k = 0; k < K; k += 2) {
    bf16* d = dst + (k / 2) * 2 * ld;
    const bf16* s0 = src + k * ks;
    if (k + 1 < K) {
      const bf16* s1 = s0 + ks;
      if (ks == 1) {  // pairs of k are adjacent in the source: 32-bit words, moved whole
        for (int64_t n = 0; n < N; ++n) std::memcpy(d + 2 * n, s0 + n * ns, 2 * sizeof(bf16));
      } else {
        for (int64_t n = 0; n < N; ++n) {
          d[2 * n] = s0[n * ns];
          d[2 * n + 1] = s1[n * ns];
        }
      }
    } else {
      for (int64_t n = 0; n < N; ++n) {
        d[2 * n] = s0[n * ns];
        d[2 * n + 1] = zero;
      }
    }
  }
}

// dst[c] = bf16(src[c]) (round to nearest even) for c < n, n a multiple of 16 where AVX-512 is built.
inline void round_row_bf16(const float* src, bf16* dst, int64_t n) {
  int64_t c = 0;
#if defined(CPU_CAPABILITY_AVX512)
  for (; c + 16 <= n; c += 16) {
    const __m256i packed = at::vec::cvtfp32_bf16(_mm512_loadu_ps(src + c));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c), packed);
  }
#endif
  for (; c < n; ++c) dst[c] = bf16(src[c]);
}

}  // namespace deberta_fast_cpu
