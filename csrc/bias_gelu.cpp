// Bias + exact GELU, forward and backward (bias_gelu.h). Φ(z) = (1 + erf(z / √2)) / 2 with erf from Abramowitz and
// Stegun 7.1.26 (absolute error below 1.5e-7, the form ATen's own vectorised erf uses) and exp from at::vec.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "bias_gelu.h"
#include "row_ops.h"

namespace deberta_fast_cpu {
namespace {

using rows::FVec;

constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kP = 0.3275911f, kA1 = 0.254829592f, kA2 = -0.284496736f, kA3 = 1.421413741f, kA4 = -1.453152027f,
                kA5 = 1.061405429f;

// (Φ(z), φ(z)) of 16 (or 8) lanes.
inline void normal_cdf_pdf(const FVec& z, FVec& cdf, FVec& pdf) {
  const FVec u = z * FVec(kSqrtHalf);
  const FVec a = u.abs();
  const FVec t = FVec(1.f) / at::vec::fmadd(FVec(kP), a, FVec(1.f));
  FVec poly = at::vec::fmadd(FVec(kA5), t, FVec(kA4));
  poly = at::vec::fmadd(poly, t, FVec(kA3));
  poly = at::vec::fmadd(poly, t, FVec(kA2));
  poly = at::vec::fmadd(poly, t, FVec(kA1));
  const FVec e = (FVec(0.f) - u * u).exp_u20();  // exp(-z² / 2)
  const FVec erf_abs = FVec(1.f) - poly * t * e;
  const FVec erf = FVec::blendv(erf_abs, FVec(0.f) - erf_abs, u < FVec(0.f));
  cdf = FVec(0.5f) * (FVec(1.f) + erf);
  pdf = e * FVec(kInvSqrt2Pi);
}

inline void normal_cdf_pdf(float z, float& cdf, float& pdf) {
  cdf = 0.5f * (1.f + std::erf(z * kSqrtHalf));
  pdf = std::exp(-0.5f * z * z) * kInvSqrt2Pi;
}

template <typename T>
void forward_rows(const T* x, const float* bias, int64_t num_rows, int64_t width, T* y) {
  at::parallel_for(0, num_rows, 4, [&](int64_t r0, int64_t r1) {
    std::vector<float> scratch(2 * width);
    float *xb = scratch.data(), *out = xb + width;
    for (int64_t r = r0; r < r1; ++r) {
      const float* xs = rows::as_float(x + r * width, xb, width);
      float* dst = std::is_same_v<T, float> ? reinterpret_cast<float*>(y + r * width) : out;
      int64_t c = 0;
      for (; c + FVec::size() <= width; c += FVec::size()) {
        FVec z = FVec::loadu(xs + c) + FVec::loadu(bias + c), cdf, pdf;
        z = rows::round_to<T>(z);  // gelu reads x + bias as the tensor dtype holds it
        normal_cdf_pdf(z, cdf, pdf);
        (z * cdf).store(dst + c);
      }
      for (; c < width; ++c) {
        float z = xs[c] + bias[c], cdf, pdf;
        if constexpr (!std::is_same_v<T, float>) z = static_cast<float>(static_cast<T>(z));
        normal_cdf_pdf(z, cdf, pdf);
        dst[c] = z * cdf;
      }
      rows::store(dst, y + r * width, width);
    }
  });
}

template <typename T>
void backward_rows(const T* dy, const T* x, const float* bias, int64_t num_rows, int64_t width, T* dx,
                   std::vector<float>& partial, int64_t block_rows, int64_t blocks) {
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> scratch(3 * width);
    float *dyb = scratch.data(), *xb = dyb + width, *out = xb + width;
    for (int64_t b = b0; b < b1; ++b) {
      float* p_bias = partial.data() + b * width;
      std::fill(p_bias, p_bias + width, 0.f);
      const int64_t end = std::min(num_rows, (b + 1) * block_rows);
      for (int64_t r = b * block_rows; r < end; ++r) {
        const float* dys = rows::as_float(dy + r * width, dyb, width);
        const float* xs = rows::as_float(x + r * width, xb, width);
        float* dst = std::is_same_v<T, float> ? reinterpret_cast<float*>(dx + r * width) : out;
        int64_t c = 0;
        for (; c + FVec::size() <= width; c += FVec::size()) {
          FVec z = FVec::loadu(xs + c) + FVec::loadu(bias + c), cdf, pdf;
          z = rows::round_to<T>(z);
          normal_cdf_pdf(z, cdf, pdf);
          const FVec g = FVec::loadu(dys + c) * at::vec::fmadd(z, pdf, cdf);
          g.store(dst + c);
        }
        for (; c < width; ++c) {
          float z = xs[c] + bias[c], cdf, pdf;
          if constexpr (!std::is_same_v<T, float>) z = static_cast<float>(static_cast<T>(z));
          normal_cdf_pdf(z, cdf, pdf);
          dst[c] = dys[c] * (cdf + z * pdf);
        }
        rows::round_to<T>(dst, width);  // d bias sums d x as the tensor dtype holds it
        for (int64_t k = 0; k < width; ++k) p_bias[k] += dst[k];
        rows::store(dst, dx + r * width, width);
      }
    }
  });
}

void check_inputs(const at::Tensor& x, const at::Tensor& bias) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "deberta_fast_cpu: bias_gelu serves float32, bfloat16 and float16; got ", dtype);
  TORCH_CHECK(x.device().is_cpu() && bias.device().is_cpu(), "deberta_fast_cpu: bias_gelu runs on CPU tensors");
  TORCH_CHECK(bias.dim() == 1 && x.dim() >= 1 && x.size(-1) == bias.size(0), "deberta_fast_cpu: bias must be [",
              x.dim() ? x.size(-1) : 0, "] for x ", x.sizes(), "; got ", bias.sizes());
}

}  // namespace

at::Tensor bias_gelu_forward(const at::Tensor& x, const at::Tensor& bias) {
  check_inputs(x, bias);
  const int64_t width = bias.numel();
  const int64_t num_rows = width ? x.numel() / width : 0;
  const at::Tensor xc = x.contiguous(), bias_f = bias.to(at::kFloat).contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  auto run = [&](auto tag) {
    using T = decltype(tag);
    forward_rows<T>(xc.data_ptr<T>(), bias_f.data_ptr<float>(), num_rows, width, y.data_ptr<T>());
  };
  switch (x.scalar_type()) {
    case at::kFloat: run(float()); break;
    case at::kBFloat16: run(c10::BFloat16()); break;
    default: run(c10::Half()); break;
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                      const at::Tensor& bias) {
  check_inputs(x, bias);
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "deberta_fast_cpu: grad_y must have the shape of x");
  const int64_t width = bias.numel();
  const int64_t num_rows = width ? x.numel() / width : 0;
  const at::Tensor dyc = grad_y.to(x.scalar_type()).contiguous(), xc = x.contiguous();
  const at::Tensor bias_f = bias.to(at::kFloat).contiguous();
  at::Tensor dx = at::empty(x.sizes(), x.options());
  const int64_t block_rows = rows::rows_per_block(num_rows);
  const int64_t blocks = (num_rows + block_rows - 1) / block_rows;
  std::vector<float> partial(static_cast<size_t>(blocks * width));
  auto run = [&](auto tag) {
    using T = decltype(tag);
    backward_rows<T>(dyc.data_ptr<T>(), xc.data_ptr<T>(), bias_f.data_ptr<float>(), num_rows, width,
                     dx.data_ptr<T>(), partial, block_rows, blocks);
  };
  switch (x.scalar_type()) {
    case at::kFloat: run(float()); break;
    case at::kBFloat16: run(c10::BFloat16()); break;
    default: run(c10::Half()); break;
  }
  at::Tensor d_bias = at::empty({width}, x.options().dtype(at::kFloat));
  rows::reduce_partials(partial, blocks, 1, width, {d_bias.data_ptr<float>()});
  return {dx, d_bias.to(bias.scalar_type())};
}

}  // namespace deberta_fast_cpu

TORCH_LIBRARY_FRAGMENT(deberta_fast_cpu, m) {
  m.def("bias_gelu_forward(Tensor x, Tensor bias) -> Tensor");
  m.def("bias_gelu_backward(Tensor grad_y, Tensor x, Tensor bias) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(deberta_fast_cpu, CPU, m) {
  m.impl("bias_gelu_forward", &deberta_fast_cpu::bias_gelu_forward);
  m.impl("bias_gelu_backward", &deberta_fast_cpu::bias_gelu_backward);
}
