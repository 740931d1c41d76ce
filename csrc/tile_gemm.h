// Small single-threaded fp32 GEMMs on row-major tiles, the building block of every tile product.
#pragma once

#include <ATen/native/CPUBlas.h>

#include <cstdint>
#include <cstring>

namespace deberta_fast_cpu {

// C[m, n] = A[m, k] · B[k, n]   (accumulate: C += A · B), row-major with leading dimensions.
// cpublas::brgemm is ATen's exported batch-reduce GEMM (oneDNN micro-kernels where the CPU has them, BLAS
// otherwise); it is called from inside parallel regions, one tile per call, without any threading of its own.
inline void gemm_rr(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                    float* c, int64_t ldc, bool accumulate) {
  if (m <= 0 || n <= 0) {
    return;
  }
  if (k <= 0) {
    if (!accumulate) {
      for (int64_t r = 0; r < m; ++r) {
        std::memset(c + r * ldc, 0, sizeof(float) * n);
      }
    }
    return;
  }
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c, /*is_vnni=*/false);
}

}  // namespace deberta_fast_cpu
