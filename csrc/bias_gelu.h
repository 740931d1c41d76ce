// Bias + exact GELU of DeBERTa's intermediate (feed-forward) layer (semantics: deberta_fast/ops/bias_gelu.py), CPU
// kernels. x [..., F] (the linear's output without its bias; fp32 / bf16 / fp16), bias [F]:
//   y = gelu(x + bias) = z · Φ(z),  z = x + bias,  Φ the standard normal CDF (erf form)
// The backward pass recomputes z from the saved x and returns d x = d y · (Φ(z) + z · φ(z)) together with
// d bias = Σ_rows d x, in one pass over the rows.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace deberta_fast_cpu {

at::Tensor bias_gelu_forward(const at::Tensor& x, const at::Tensor& bias);

// (d x [..., F] in x's dtype, d bias [F] in bias's dtype). Deterministic: d bias does not depend on the thread count.
std::tuple<at::Tensor, at::Tensor> bias_gelu_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                      const at::Tensor& bias);

}  // namespace deberta_fast_cpu
