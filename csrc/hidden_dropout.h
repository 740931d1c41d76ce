// Hidden-state dropout from the counter-based generator of philox.h (Philox4x32-10, key (seed mod 2^32,
// seed div 2^32), a word folded to y = x < 0 ? ~x : x as int32 and kept when float(y) * 4.6566127342e-10f >= p).
// One Philox call gives four words, and each decides one element: element (row, col) of the 2-D view [rows, hidden]
// of a tensor uses word (col div 16) mod 4 of the call with counters (row, 0, 16 * (col div 64) + col mod 16, 1),
// so a 16-lane vector call covers 64 consecutive columns. The last counter word (1; the attention stream uses 0)
// keeps this stream apart from the attention one. A decision depends only on (seed, row, col), so the backward pass
// regenerates the mask instead of storing it, and the result does not depend on the thread count. The pure-PyTorch
// mirror is deberta_fast/ops/residual_layernorm.py (hidden_keep_mask).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

#include "philox.h"

namespace deberta_fast_cpu {

constexpr uint32_t kHiddenStream = 1u;

// The hidden dropout of one call (off when dropout_p == 0).
class HiddenDropout : public CounterDropout {
 public:
  using CounterDropout::CounterDropout;

  bool keep(int64_t row, int64_t col) const {
    uint32_t c[4] = {static_cast<uint32_t>(row), 0u, static_cast<uint32_t>(16 * (col >> 6) + (col & 15)),
                     kHiddenStream};
    philox4(c, k0_, k1_);
    return fold_word(c[(col >> 4) & 3]) >= threshold_;
  }

  // factor[c] = keep(row, c) ? scale : 0 for c < n.
  void row_factors(int64_t row, int64_t n, float* factor) const {
    int64_t c = 0;
#if defined(CPU_CAPABILITY_AVX512)
    const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i rowv = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(row)));
    const __m512i stream = _mm512_set1_epi32(static_cast<int>(kHiddenStream));
    const __m512i threshold = _mm512_set1_epi32(threshold_);
    const __m512 kept = _mm512_set1_ps(scale_);
    for (; c + 64 <= n; c += 64) {
      __m512i w[4] = {rowv, _mm512_setzero_si512(),
                      _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(c / 4)), iota), stream};
      philox4_16(w, k0_, k1_);
      for (int i = 0; i < 4; ++i) {
        const __m512i y = _mm512_xor_si512(w[i], _mm512_srai_epi32(w[i], 31));
        _mm512_storeu_ps(factor + c + 16 * i, _mm512_maskz_mov_ps(_mm512_cmpge_epi32_mask(y, threshold), kept));
      }
    }
#elif defined(CPU_CAPABILITY_AVX2)
    const __m256i iota = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
    const __m256i rowv = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(row)));
    const __m256i stream = _mm256_set1_epi32(static_cast<int>(kHiddenStream));
    const __m256i below = _mm256_set1_epi32(threshold_ - 1);
    const __m256 kept = _mm256_set1_ps(scale_);
    for (; c + 64 <= n; c += 64) {
      for (int half = 0; half < 2; ++half) {
        __m256i w[4] = {rowv, _mm256_setzero_si256(),
                        _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(c / 4 + 8 * half)), iota), stream};
        philox4_8(w, k0_, k1_);
        for (int i = 0; i < 4; ++i) {
          const __m256i y = _mm256_xor_si256(w[i], _mm256_srai_epi32(w[i], 31));
          const __m256i keep = _mm256_cmpgt_epi32(y, below);  // y >= threshold; both in [0, 2^31)
          _mm256_storeu_ps(factor + c + 16 * i + 8 * half, _mm256_and_ps(_mm256_castsi256_ps(keep), kept));
        }
      }
    }
#endif
    for (; c < n; ++c) factor[c] = keep(row, c) ? scale_ : 0.f;
  }
};

// The hidden dropout of a call from its optional int64 [1] seed (required when dropout_p > 0).
inline HiddenDropout make_hidden_dropout(const std::optional<at::Tensor>& seed, double dropout_p) {
  if (dropout_p == 0.0) return HiddenDropout();
  return HiddenDropout(dropout_seed_value(seed), dropout_p);
}

}  // namespace deberta_fast_cpu
