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
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace deberta_fast_cpu {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u, kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u, kPhiloxRoundB = 0xCD9E8D57u;
constexpr int kPhiloxRounds = 10;
constexpr float kUniformScale = 4.6566127342e-10f;  // Triton's uint_to_uniform_float for 32-bit words

// First output word of Philox4x32-10 for counters (c0, c1, c2, c3) and key (k0, k1).
inline uint32_t philox_word0(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint64_t a = uint64_t(kPhiloxRoundA) * c0, b = uint64_t(kPhiloxRoundB) * c2;
    const uint32_t n0 = uint32_t(b >> 32) ^ c1 ^ k0, n2 = uint32_t(a >> 32) ^ c3 ^ k1;
    c1 = uint32_t(b);
    c3 = uint32_t(a);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return c0;
}

// y = x < 0 ? ~x : x for the word read as int32 (an arithmetic shift gives the all-ones mask of negative words).
inline int32_t fold_word(uint32_t x) {
  const int32_t v = static_cast<int32_t>(x);
  return v ^ (v >> 31);
}

#if defined(CPU_CAPABILITY_AVX512)
// Lanes hold 32-bit words; _mm512_mul_epu32 multiplies the even lanes into 64 bits, the odd ones after a shift.
inline void mul_wide16(__m512i x, __m512i factor, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(x, factor), odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), factor);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

inline __m512i philox_word0_16(__m512i c0, __m512i c1, __m512i c2, __m512i c3, uint32_t k0, uint32_t k1) {
  const __m512i ra = _mm512_set1_epi32(static_cast<int>(kPhiloxRoundA));
  const __m512i rb = _mm512_set1_epi32(static_cast<int>(kPhiloxRoundB));
  for (int round = 0; round < kPhiloxRounds; ++round) {
    __m512i a_hi, a_lo, b_hi, b_lo;
    mul_wide16(c0, ra, a_hi, a_lo);
    mul_wide16(c2, rb, b_hi, b_lo);
    c0 = _mm512_xor_si512(_mm512_xor_si512(b_hi, c1), _mm512_set1_epi32(static_cast<int>(k0)));
    c2 = _mm512_xor_si512(_mm512_xor_si512(a_hi, c3), _mm512_set1_epi32(static_cast<int>(k1)));
    c1 = b_lo;
    c3 = a_lo;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return c0;
}
#elif defined(CPU_CAPABILITY_AVX2)
inline void mul_wide8(__m256i x, __m256i factor, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(x, factor), odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), factor);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

inline __m256i philox_word0_8(__m256i c0, __m256i c1, __m256i c2, __m256i c3, uint32_t k0, uint32_t k1) {
  const __m256i ra = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundA));
  const __m256i rb = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundB));
  for (int round = 0; round < kPhiloxRounds; ++round) {
    __m256i a_hi, a_lo, b_hi, b_lo;
    mul_wide8(c0, ra, a_hi, a_lo);
    mul_wide8(c2, rb, b_hi, b_lo);
    c0 = _mm256_xor_si256(_mm256_xor_si256(b_hi, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    c2 = _mm256_xor_si256(_mm256_xor_si256(a_hi, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c1 = b_lo;
    c3 = a_lo;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return c0;
}
#endif

// The dropout of one call. Off when dropout_p == 0 (every factor is 1 and nothing is generated).
// Smallest folded word y in [0, 2^31 - 1] with float(y) * kUniformScale >= p (the test is monotone in y; y = 2^31 - 1
// always passes for p < 1 in float32): an element is kept when its word reaches this threshold.
inline int32_t dropout_threshold(float p) {
  int64_t lo = 0, hi = int64_t(0x7FFFFFFF);
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (static_cast<float>(static_cast<int32_t>(mid)) * kUniformScale >= p) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return static_cast<int32_t>(lo);
}

class AttentionDropout {
 public:
  AttentionDropout() = default;
  AttentionDropout(int64_t seed, double dropout_p) {
    TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "deberta_fast_cpu: dropout_p must be in [0, 1); got ",
                dropout_p);
    if (dropout_p == 0.0) return;
    on_ = true;
    k0_ = static_cast<uint32_t>(static_cast<uint64_t>(seed) & 0xFFFFFFFFu);
    k1_ = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
    const float p = static_cast<float>(dropout_p);
    scale_ = static_cast<float>(1.0 / (1.0 - dropout_p));
    threshold_ = dropout_threshold(p);
  }

  bool on() const { return on_; }
  float scale() const { return scale_; }

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

 private:
  bool on_ = false;
  uint32_t k0_ = 0, k1_ = 0;
  int32_t threshold_ = 0;
  float scale_ = 1.f;
};

// The value of a call's optional int64 [1] seed tensor, which every dropout of the library needs when dropout_p > 0.
inline int64_t dropout_seed_value(const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(seed.has_value() && seed->scalar_type() == at::kLong && seed->numel() == 1 && seed->device().is_cpu(),
              "deberta_fast_cpu: dropout_p > 0 needs seed, an int64 CPU tensor with one element");
  return seed->contiguous().data_ptr<int64_t>()[0];
}

// The dropout of a call from its optional int64 [1] seed (required when dropout_p > 0).
inline AttentionDropout make_dropout(const std::optional<at::Tensor>& seed, double dropout_p) {
  if (dropout_p == 0.0) return AttentionDropout();
  return AttentionDropout(dropout_seed_value(seed), dropout_p);
}

}  // namespace deberta_fast_cpu
