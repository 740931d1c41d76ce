// Fused hidden dropout + bias + residual + LayerNorm, forward and backward (residual_layernorm.h). One pass over
// each row in fp32, rows spread over threads with at::parallel_for; the backward's column sums (d weight, d beta,
// d bias) go through per-block partial rows (row_ops.h), so they do not depend on the thread count.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "hidden_dropout.h"
#include "residual_layernorm.h"
#include "row_ops.h"

namespace deberta_fast_cpu {
namespace {

at::Tensor as_float_vector(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

using rows::FVec;
constexpr int64_t kLanes = FVec::size();

template <typename T>
void forward_rows(const T* x, const float* bias, const T* residual, const float* gamma, const float* beta, float eps,
                  const HiddenDropout& drop, int64_t num_rows, int64_t width, T* y, T* h_out, float* mean,
                  float* rstd) {
  const int64_t vec_end = width - width % kLanes;
  const float inv_width = 1.f / static_cast<float>(width);
  at::parallel_for(0, num_rows, 8, [&](int64_t r0, int64_t r1) {
    std::vector<float> scratch(4 * width);
    float *xb = scratch.data(), *rb = xb + width, *hb = rb + width, *fb = hb + width;
    for (int64_t r = r0; r < r1; ++r) {
      const float* xs = rows::as_float(x + r * width, xb, width);
      const float* rs = rows::as_float(residual + r * width, rb, width);
      if (drop.on()) drop.row_factors(r, width, fb);
      // h = (x + bias) * factor + residual; the branches are the same for every column of the call.
      for (int64_t c = 0; c < vec_end; c += kLanes) {
        FVec v = FVec::loadu(xs + c);
        if (bias != nullptr) v = v + FVec::loadu(bias + c);
        if (drop.on()) v = v * FVec::loadu(fb + c);
        (v + FVec::loadu(rs + c)).store(hb + c);
      }
      for (int64_t c = vec_end; c < width; ++c) {
        float v = xs[c] + (bias != nullptr ? bias[c] : 0.f);
        if (drop.on()) v *= fb[c];
        hb[c] = v + rs[c];
      }
      rows::round_to<T>(hb, width);  // LayerNorm normalises h as the tensor dtype holds it
      const float m = rows::sum(hb, width) * inv_width;
      const float s = 1.f / std::sqrt(rows::squared_deviation(hb, m, width) * inv_width + eps);
      mean[r] = m;
      rstd[r] = s;
      if (h_out != nullptr) rows::store(hb, h_out + r * width, width);
      float* out = std::is_same_v<T, float> ? reinterpret_cast<float*>(y + r * width) : xb;
      const FVec mv(m), sv(s);
      for (int64_t c = 0; c < vec_end; c += kLanes) {
        const FVec xh = (FVec::loadu(hb + c) - mv) * sv;
        at::vec::fmadd(xh, FVec::loadu(gamma + c), FVec::loadu(beta + c)).store(out + c);
      }
      for (int64_t c = vec_end; c < width; ++c) out[c] = (hb[c] - m) * s * gamma[c] + beta[c];
      rows::store(out, y + r * width, width);
    }
  });
}

template <typename T>
void backward_rows(const T* dy, const T* h, const float* mean, const float* rstd, const float* gamma,
                   const HiddenDropout& drop, bool bias_grad, int64_t num_rows, int64_t width, T* dh_out, T* dx_out,
                   std::vector<float>& partial, int64_t block_rows, int64_t blocks) {
  const int64_t vec_end = width - width % kLanes;
  const float inv_width = 1.f / static_cast<float>(width);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> scratch(6 * width);
    float *dyb = scratch.data(), *hb = dyb + width, *xh = hb + width, *g = xh + width, *dh = g + width,
          *fb = dh + width;
    for (int64_t b = b0; b < b1; ++b) {
      float* p_gamma = partial.data() + b * 3 * width;
      float* p_beta = p_gamma + width;
      float* p_bias = p_beta + width;
      std::fill(p_gamma, p_gamma + 3 * width, 0.f);
      const int64_t end = std::min(num_rows, (b + 1) * block_rows);
      for (int64_t r = b * block_rows; r < end; ++r) {
        const float* dys = rows::as_float(dy + r * width, dyb, width);
        const float* hs = rows::as_float(h + r * width, hb, width);
        const float m = mean[r], s = rstd[r];
        // xhat, g = dy * gamma, the column partials of d gamma and d beta, and the row sums of g and g * xhat.
        const FVec mv(m), sv(s);
        FVec g_acc(0.f), gx_acc(0.f);
        for (int64_t c = 0; c < vec_end; c += kLanes) {
          const FVec d = FVec::loadu(dys + c);
          const FVec xv = (FVec::loadu(hs + c) - mv) * sv;
          const FVec gv = d * FVec::loadu(gamma + c);
          xv.store(xh + c);
          gv.store(g + c);
          at::vec::fmadd(d, xv, FVec::loadu(p_gamma + c)).store(p_gamma + c);
          (FVec::loadu(p_beta + c) + d).store(p_beta + c);
          g_acc = g_acc + gv;
          gx_acc = at::vec::fmadd(gv, xv, gx_acc);
        }
        float g_sum = rows::lanes_total(g_acc), gx_sum = rows::lanes_total(gx_acc);
        for (int64_t c = vec_end; c < width; ++c) {
          xh[c] = (hs[c] - m) * s;
          g[c] = dys[c] * gamma[c];
          p_gamma[c] += dys[c] * xh[c];
          p_beta[c] += dys[c];
          g_sum += g[c];
          gx_sum += g[c] * xh[c];
        }
        const float g_mean = g_sum * inv_width, gx_mean = gx_sum * inv_width;
        // d h = rstd (g - mean(g) - xhat mean(g xhat)); d x = d h * factor; d bias += d x.
        if (drop.on()) drop.row_factors(r, width, fb);
        const FVec gm(g_mean), gxm(gx_mean);
        for (int64_t c = 0; c < vec_end; c += kLanes) {
          const FVec dv = sv * (FVec::loadu(g + c) - gm - FVec::loadu(xh + c) * gxm);
          dv.store(dh + c);
          const FVec dxv = drop.on() ? dv * FVec::loadu(fb + c) : dv;
          if (drop.on()) dxv.store(fb + c);
          if (bias_grad) (FVec::loadu(p_bias + c) + dxv).store(p_bias + c);
        }
        for (int64_t c = vec_end; c < width; ++c) {
          dh[c] = s * (g[c] - g_mean - xh[c] * gx_mean);
          const float dxv = drop.on() ? dh[c] * fb[c] : dh[c];
          if (drop.on()) fb[c] = dxv;
          if (bias_grad) p_bias[c] += dxv;
        }
        rows::store(dh, dh_out + r * width, width);
        if (drop.on()) rows::store(fb, dx_out + r * width, width);
      }
    }
  });
}

void check_rows(const at::Tensor& t, const char* name, int64_t width) {
  TORCH_CHECK(t.device().is_cpu(), "deberta_fast_cpu: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() >= 1 && t.size(-1) == width, "deberta_fast_cpu: ", name, " must be [..., ", width, "]; got ",
              t.sizes());
}

void check_vector(const at::Tensor& t, const char* name, int64_t width) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 1 && t.size(0) == width, "deberta_fast_cpu: ", name,
              " must be a CPU tensor [", width, "]; got ", t.sizes());
}

void check_dtype(const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "deberta_fast_cpu: residual_layernorm serves float32, bfloat16 and float16; got ", dtype);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_layernorm_forward(
    const at::Tensor& x, const std::optional<at::Tensor>& bias, const at::Tensor& residual, const at::Tensor& weight,
    const at::Tensor& beta, double eps, const std::optional<at::Tensor>& seed, double dropout_p, bool keep_sum) {
  const int64_t width = weight.numel();
  check_dtype(x);
  check_rows(x, "x", width);
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(),
              "deberta_fast_cpu: residual must have the shape and dtype of x");
  check_rows(residual, "residual", width);
  check_vector(weight, "weight", width);
  check_vector(beta, "beta", width);
  if (bias.has_value()) check_vector(*bias, "bias", width);
  const HiddenDropout drop = make_hidden_dropout(seed, dropout_p);
  const at::Tensor xc = x.contiguous(), rc = residual.contiguous();
  const at::Tensor gamma = as_float_vector(weight), shift = as_float_vector(beta);
  const at::Tensor bias_f = bias.has_value() ? as_float_vector(*bias) : at::Tensor();
  const int64_t num_rows = width ? x.numel() / width : 0;
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor h = keep_sum ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor mean = at::empty({num_rows}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({num_rows}, x.options().dtype(at::kFloat));
  const float* bias_ptr = bias.has_value() ? bias_f.data_ptr<float>() : nullptr;
  auto run = [&](auto tag) {
    using T = decltype(tag);
    forward_rows<T>(xc.data_ptr<T>(), bias_ptr, rc.data_ptr<T>(), gamma.data_ptr<float>(), shift.data_ptr<float>(),
                    static_cast<float>(eps), drop, num_rows, width, y.data_ptr<T>(),
                    keep_sum ? h.data_ptr<T>() : nullptr, mean.data_ptr<float>(), rstd.data_ptr<float>());
  };
  switch (x.scalar_type()) {
    case at::kFloat: run(float()); break;
    case at::kBFloat16: run(c10::BFloat16()); break;
    default: run(c10::Half()); break;
  }
  return {y, h, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_layernorm_backward(
    const at::Tensor& grad_y, const at::Tensor& h, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& weight, const std::optional<at::Tensor>& seed, double dropout_p, bool bias_grad) {
  const int64_t width = weight.numel();
  check_dtype(h);
  check_rows(h, "h", width);
  check_vector(weight, "weight", width);
  TORCH_CHECK(grad_y.sizes() == h.sizes(), "deberta_fast_cpu: grad_y must have the shape of h");
  const int64_t num_rows = width ? h.numel() / width : 0;
  TORCH_CHECK(mean.numel() == num_rows && rstd.numel() == num_rows && mean.scalar_type() == at::kFloat &&
                  rstd.scalar_type() == at::kFloat,
              "deberta_fast_cpu: mean and rstd must be float32 [rows]");
  const HiddenDropout drop = make_hidden_dropout(seed, dropout_p);
  const at::Tensor dyc = grad_y.to(h.scalar_type()).contiguous(), hc = h.contiguous();
  const at::Tensor meanc = mean.contiguous(), rstdc = rstd.contiguous(), gamma = as_float_vector(weight);
  at::Tensor dh = at::empty(h.sizes(), h.options());
  at::Tensor dx = drop.on() ? at::empty(h.sizes(), h.options()) : at::empty({0}, h.options());
  const int64_t block_rows = rows::rows_per_block(num_rows);
  const int64_t blocks = (num_rows + block_rows - 1) / block_rows;
  std::vector<float> partial(static_cast<size_t>(blocks * 3 * width));
  auto run = [&](auto tag) {
    using T = decltype(tag);
    backward_rows<T>(dyc.data_ptr<T>(), hc.data_ptr<T>(), meanc.data_ptr<float>(), rstdc.data_ptr<float>(),
                     gamma.data_ptr<float>(), drop, bias_grad, num_rows, width, dh.data_ptr<T>(),
                     drop.on() ? dx.data_ptr<T>() : nullptr, partial, block_rows, blocks);
  };
  switch (h.scalar_type()) {
    case at::kFloat: run(float()); break;
    case at::kBFloat16: run(c10::BFloat16()); break;
    default: run(c10::Half()); break;
  }
  const auto fopts = h.options().dtype(at::kFloat);
  at::Tensor d_gamma = at::empty({width}, fopts), d_beta = at::empty({width}, fopts);
  at::Tensor d_bias = bias_grad ? at::empty({width}, fopts) : at::empty({0}, fopts);
  rows::reduce_partials(partial, blocks, 3, width,
                        {d_gamma.data_ptr<float>(), d_beta.data_ptr<float>(),
                         bias_grad ? d_bias.data_ptr<float>() : nullptr});
  const auto pdtype = weight.scalar_type();
  return {dh, dx, d_bias.to(pdtype), d_gamma.to(pdtype), d_beta.to(pdtype)};
}

at::Tensor hidden_dropout_keep_mask(const at::Tensor& seed, int64_t rows, int64_t cols, double dropout_p) {
  TORCH_CHECK(rows >= 0 && cols >= 0, "deberta_fast_cpu: sizes must be >= 0");
  const HiddenDropout drop = make_hidden_dropout(seed, dropout_p);
  at::Tensor keep = at::empty({rows, cols}, seed.options().dtype(at::kBool));
  bool* dst = keep.data_ptr<bool>();
  std::vector<float> factor(cols);
  for (int64_t r = 0; r < rows; ++r) {
    if (drop.on()) drop.row_factors(r, cols, factor.data());
    for (int64_t c = 0; c < cols; ++c) dst[r * cols + c] = !drop.on() || factor[c] != 0.f;
  }
  return keep;
}

}  // namespace deberta_fast_cpu

TORCH_LIBRARY_FRAGMENT(deberta_fast_cpu, m) {
  m.def(
      "residual_layernorm_forward(Tensor x, Tensor? bias, Tensor residual, Tensor weight, Tensor beta, float eps, "
      "Tensor? seed, float dropout_p, bool keep_sum) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "residual_layernorm_backward(Tensor grad_y, Tensor h, Tensor mean, Tensor rstd, Tensor weight, Tensor? seed, "
      "float dropout_p, bool bias_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("hidden_dropout_keep_mask(Tensor seed, int rows, int cols, float dropout_p) -> Tensor");
}

TORCH_LIBRARY_IMPL(deberta_fast_cpu, CPU, m) {
  m.impl("residual_layernorm_forward", &deberta_fast_cpu::residual_layernorm_forward);
  m.impl("residual_layernorm_backward", &deberta_fast_cpu::residual_layernorm_backward);
  m.impl("hidden_dropout_keep_mask", &deberta_fast_cpu::hidden_dropout_keep_mask);
}
