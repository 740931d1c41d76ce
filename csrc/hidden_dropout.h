// Hidden-state dropout from the counter-based generator of attention_dropout.h: element (row, col) of the 2-D view
// [rows, hidden] of a tensor is kept when Philox4x32-10 with counters (row, 0, col, 1) and key (seed mod 2^32,
// seed div 2^32), first word folded as in attention_dropout.h, passes the same float32 threshold test. The last
// counter word (1; the attention stream uses 0) keeps this stream apart from the attention one. A decision depends
// only on (seed, row, col), so the backward pass regenerates the mask instead of storing it, and the result does not
// depend on the thread count. The pure-PyTorch mirror is deberta_fast/ops/residual_layernorm.py (hidden_keep_mask).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

#include "attention_dropout.h"

namespace deberta_fast_cpu {

constexpr uint32_t kHiddenStream = 1u;

class HiddenDropout {
 public:
  HiddenDropout() = default;
  HiddenDropout(int64_t seed, double dropout_p) {
    TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "deberta_fast_cpu: dropout_p must be in [0, 1); got ",
                dropout_p);
    if (dropout_p == 0.0) return;
    on_ = true;
    k0_ = static_cast<uint32_t>(static_cast<uint64_t>(seed) & 0xFFFFFFFFu);
    k1_ = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
    scale_ = static_cast<float>(1.0 / (1.0 - dropout_p));
    // Smallest folded word y with float(y) * kUniformScale >= p (monotone in y), as AttentionDropout does.
    const float p = static_cast<float>(dropout_p);
    int64_t lo = 0, hi = int64_t(0x7FFFFFFF);
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (static_cast<float>(static_cast<int32_t>(mid)) * kUniformScale >= p) {
        hi = mid;
      } else {
        lo = mid + 1;
      }
    }
    threshold_ = static_cast<int32_t>(lo);
  }

  bool on() const { return on_; }
  float scale() const { return scale_; }

  bool keep(int64_t row, int64_t col) const {
    return fold_word(philox_word0(static_cast<uint32_t>(row), 0u, static_cast<uint32_t>(col), kHiddenStream, k0_,
                                  k1_)) >= threshold_;
  }

  // factor[c] = keep(row, c) ? scale : 0 for c < n.
  void row_factors(int64_t row, int64_t n, float* factor) const {
    int64_t c = 0;
#if defined(CPU_CAPABILITY_AVX512)
    const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i rowv = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(row)));
    const __m512i zero = _mm512_setzero_si512(), stream = _mm512_set1_epi32(static_cast<int>(kHiddenStream));
    const __m512i threshold = _mm512_set1_epi32(threshold_);
    const __m512 kept = _mm512_set1_ps(scale_);
    for (; c + 16 <= n; c += 16) {
      const __m512i cols = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(c)), iota);
      const __m512i x = philox_word0_16(rowv, zero, cols, stream, k0_, k1_);
      const __m512i y = _mm512_xor_si512(x, _mm512_srai_epi32(x, 31));
      _mm512_storeu_ps(factor + c, _mm512_maskz_mov_ps(_mm512_cmpge_epi32_mask(y, threshold), kept));
    }
#elif defined(CPU_CAPABILITY_AVX2)
    const __m256i iota = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
    const __m256i rowv = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(row)));
    const __m256i zero = _mm256_setzero_si256(), stream = _mm256_set1_epi32(static_cast<int>(kHiddenStream));
    const __m256i below = _mm256_set1_epi32(threshold_ - 1);
    const __m256 kept = _mm256_set1_ps(scale_);
    for (; c + 8 <= n; c += 8) {
      const __m256i cols = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(c)), iota);
      const __m256i x = philox_word0_8(rowv, zero, cols, stream, k0_, k1_);
      const __m256i y = _mm256_xor_si256(x, _mm256_srai_epi32(x, 31));
      const __m256i keep = _mm256_cmpgt_epi32(y, below);  // y >= threshold; both in [0, 2^31)
      _mm256_storeu_ps(factor + c, _mm256_and_ps(_mm256_castsi256_ps(keep), kept));
    }
#endif
    for (; c < n; ++c) factor[c] = keep(row, c) ? scale_ : 0.f;
  }

 private:
  bool on_ = false;
  uint32_t k0_ = 0, k1_ = 0;
  int32_t threshold_ = 0;
  float scale_ = 1.f;
};

// The hidden dropout of a call from its optional int64 [1] seed (required when dropout_p > 0).
inline HiddenDropout make_hidden_dropout(const std::optional<at::Tensor>& seed, double dropout_p) {
  if (dropout_p == 0.0) return HiddenDropout();
  TORCH_CHECK(seed.has_value() && seed->scalar_type() == at::kLong && seed->numel() == 1 && seed->device().is_cpu(),
              "deberta_fast_cpu: dropout_p > 0 needs seed, an int64 CPU tensor with one element");
  return HiddenDropout(seed->contiguous().data_ptr<int64_t>()[0], dropout_p);
}

}  // namespace deberta_fast_cpu
