// Philox4x32-10, the counter-based generator of every dropout of the native op (the Triton kernels' stream,
// triton_kernels/_common.py): key (seed mod 2^32, seed div 2^32), four 32-bit counters in, four words out, scalar and
// 16- / 8-lane. A word x is used folded, y = x < 0 ? ~x : x read as int32, and keeps its element when
// float(y) * 4.6566127342e-10f >= dropout_p (all in float32), here the equivalent integer test y >= threshold.
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

// The four output words of Philox4x32-10, in place over the counters c[0..3].
inline void philox4(uint32_t* c, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint64_t a = uint64_t(kPhiloxRoundA) * c[0], b = uint64_t(kPhiloxRoundB) * c[2];
    const uint32_t n0 = uint32_t(b >> 32) ^ c[1] ^ k0, n2 = uint32_t(a >> 32) ^ c[3] ^ k1;
    c[1] = uint32_t(b);
    c[3] = uint32_t(a);
    c[0] = n0;
    c[2] = n2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
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

inline void philox4_16(__m512i* c, uint32_t k0, uint32_t k1) {
  const __m512i ra = _mm512_set1_epi32(static_cast<int>(kPhiloxRoundA));
  const __m512i rb = _mm512_set1_epi32(static_cast<int>(kPhiloxRoundB));
  for (int round = 0; round < kPhiloxRounds; ++round) {
    __m512i a_hi, a_lo, b_hi, b_lo;
    mul_wide16(c[0], ra, a_hi, a_lo);
    mul_wide16(c[2], rb, b_hi, b_lo);
    c[0] = _mm512_xor_si512(_mm512_xor_si512(b_hi, c[1]), _mm512_set1_epi32(static_cast<int>(k0)));
    c[2] = _mm512_xor_si512(_mm512_xor_si512(a_hi, c[3]), _mm512_set1_epi32(static_cast<int>(k1)));
    c[1] = b_lo;
    c[3] = a_lo;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
}
#elif defined(CPU_CAPABILITY_AVX2)
inline void mul_wide8(__m256i x, __m256i factor, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(x, factor), odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), factor);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

inline void philox4_8(__m256i* c, uint32_t k0, uint32_t k1) {
  const __m256i ra = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundA));
  const __m256i rb = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundB));
  for (int round = 0; round < kPhiloxRounds; ++round) {
    __m256i a_hi, a_lo, b_hi, b_lo;
    mul_wide8(c[0], ra, a_hi, a_lo);
    mul_wide8(c[2], rb, b_hi, b_lo);
    c[0] = _mm256_xor_si256(_mm256_xor_si256(b_hi, c[1]), _mm256_set1_epi32(static_cast<int>(k0)));
    c[2] = _mm256_xor_si256(_mm256_xor_si256(a_hi, c[3]), _mm256_set1_epi32(static_cast<int>(k1)));
    c[1] = b_lo;
    c[3] = a_lo;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
}
#endif

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

// What a counter-based dropout call needs: the Philox key from the seed, the keep threshold of dropout_p and the
// scale 1 / (1 - dropout_p) of kept values. Off when dropout_p == 0 (every factor is 1 and nothing is generated).
class CounterDropout {
 public:
  CounterDropout() = default;
  CounterDropout(int64_t seed, double dropout_p) {
    TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "deberta_fast_cpu: dropout_p must be in [0, 1); got ",
                dropout_p);
    if (dropout_p == 0.0) return;
    on_ = true;
    k0_ = static_cast<uint32_t>(static_cast<uint64_t>(seed) & 0xFFFFFFFFu);
    k1_ = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
    scale_ = static_cast<float>(1.0 / (1.0 - dropout_p));
    threshold_ = dropout_threshold(static_cast<float>(dropout_p));
  }

  bool on() const { return on_; }
  float scale() const { return scale_; }

 protected:
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

}  // namespace deberta_fast_cpu
