// Attention dropout from a counter-based generator: the keep decision of probability (bh, query i, key k) is a pure
// function of (seed, bh, i, k), regenerated wherever a kernel needs it (forward, both backward passes) instead of
// being stored, so nothing of size [B, H, L, L] exists and the result does not depend on tiling or threads.
//
// The stream is the Triton kernels' (triton_kernels/_common.py, dropout_keep): Philox4x32 with 10 rounds, key
// (seed mod 2^32, seed div 2^32), counters (i, bh, k, 0); the first output word x, read as int32 and folded to
// y = x < 0 ? ~x : x, is kept when float(y) * 4.6566127342e-10f >= dropout_p (all in float32). Here that test is
// the equivalent integer test y >= threshold, with threshold the smallest y that passes it. Kept probabilities are
// scaled by 1 / (1 - dropout_p). The pure-PyTorch mirror is deberta_fast/ops/attention_dropout.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

#include "philox.h"

namespace deberta_fast_cpu {

// First output word of Philox4x32-10 for counters (c0, c1, c2, c3) and key (k0, k1): the attention stream reads one
// word per call.
inline uint32_t philox_word0(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  uint32_t c[4] = {c0, c1, c2, c3};
  philox4(c, k0, k1);
  return c[0];
}

#if defined(CPU_CAPABILITY_AVX512)
inline __m512i philox_word0_16(__m512i c0, __m512i c1, __m512i c2, __m512i c3, uint32_t k0, uint32_t k1) {
  __m512i c[4] = {c0, c1, c2, c3};
  philox4_16(c, k0, k1);
  return c[0];
}
#elif defined(CPU_CAPABILITY_AVX2)
inline __m256i philox_word0_8(__m256i c0, __m256i c1, __m256i c2, __m256i c3, uint32_t k0, uint32_t k1) {
  __m256i c[4] = {c0, c1, c2, c3};
  philox4_8(c, k0, k1);
  return c[0];
}
#endif

// The attention dropout of one call (off when dropout_p == 0).
class AttentionDropout : public CounterDropout {
 public:
  using CounterDropout::CounterDropout;

  bool keep(int64_t bh, int64_t query, int64_t key) const {
    return fold_word(philox_word0(static_cast<uint32_t>(query), static_cast<uint32_t>(bh),
                                  static_cast<uint32_t>(key), 0u, k0_, k1_)) >= threshold_;
  }

  // factor[c] = keep(bh, query0 + c * dq, key0 + c * dk) ? value : 0 for c < n, 0 for n <= c < n_padded:
  // dq = 0, dk = 1 walks a row of keys, dq = 1, dk = 0 a column of queries.
  void factors(int64_t bh, int64_t query0, int64_t dq, int64_t key0, int64_t dk, int64_t n, int64_t n_padded,
               float value, float* factor) const {
    int64_t c = 0;
#if defined(CPU_CAPABILITY_AVX512)
    const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i step_q = dq ? iota : _mm512_setzero_si512(), step_k = dk ? iota : _mm512_setzero_si512();
    const __m512i bhv = _mm512_set1_epi32(static_cast<int>(bh)), zero = _mm512_setzero_si512();
    const __m512i threshold = _mm512_set1_epi32(threshold_);
    const __m512 kept = _mm512_set1_ps(value);
    for (; c + 16 <= n; c += 16) {
      const __m512i cq = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(query0 + c * dq)), step_q);
      const __m512i ck = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(key0 + c * dk)), step_k);
      const __m512i x = philox_word0_16(cq, bhv, ck, zero, k0_, k1_);
      const __m512i y = _mm512_xor_si512(x, _mm512_srai_epi32(x, 31));
      const __mmask16 keep = _mm512_cmpge_epi32_mask(y, threshold);
      _mm512_storeu_ps(factor + c, _mm512_maskz_mov_ps(keep, kept));
    }
#elif defined(CPU_CAPABILITY_AVX2)
    const __m256i iota = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
    const __m256i step_q = dq ? iota : _mm256_setzero_si256(), step_k = dk ? iota : _mm256_setzero_si256();
    const __m256i bhv = _mm256_set1_epi32(static_cast<int>(bh)), zero = _mm256_setzero_si256();
    const __m256i below = _mm256_set1_epi32(threshold_ - 1);
    const __m256 kept = _mm256_set1_ps(value);
    for (; c + 8 <= n; c += 8) {
      const __m256i cq = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(query0 + c * dq)), step_q);
      const __m256i ck = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(key0 + c * dk)), step_k);
      const __m256i x = philox_word0_8(cq, bhv, ck, zero, k0_, k1_);
      const __m256i y = _mm256_xor_si256(x, _mm256_srai_epi32(x, 31));
      const __m256i keep = _mm256_cmpgt_epi32(y, below);  // y >= threshold; y, threshold in [0, 2^31)
      _mm256_storeu_ps(factor + c, _mm256_and_ps(_mm256_castsi256_ps(keep), kept));
    }
#endif
    for (; c < n; ++c) factor[c] = keep(bh, query0 + c * dq, key0 + c * dk) ? value : 0.f;
    for (; c < n_padded; ++c) factor[c] = 0.f;
  }
};

// The dropout of a call from its optional int64 [1] seed (required when dropout_p > 0).
inline AttentionDropout make_dropout(const std::optional<at::Tensor>& seed, double dropout_p) {
  if (dropout_p == 0.0) return AttentionDropout();
  return AttentionDropout(dropout_seed_value(seed), dropout_p);
}

}  // namespace deberta_fast_cpu
