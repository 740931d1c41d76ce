// Fused hidden dropout + bias + residual + LayerNorm of DeBERTa's output blocks (semantics:
// deberta_fast/ops/residual_layernorm.py), CPU kernels.
//
// x, residual [..., H] (the same shape and dtype: fp32 / bf16 / fp16), bias, weight, beta [H] (any of those dtypes):
//   h = dropout(x + bias) + residual,  y = (h - mean(h)) * rstd * weight + beta,  rstd = 1 / sqrt(var(h) + eps)
// over the last dim (biased variance), computed in fp32 per row and returned in the dtype of x. The dropout keep mask
// is hidden_dropout.h's counter stream of the int64 [1] seed over the 2-D view [rows, H], regenerated in backward.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace deberta_fast_cpu {

// (y [..., H] in x's dtype; h [..., H] in x's dtype when keep_sum, else an empty tensor; mean [rows], rstd [rows]
// fp32).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_layernorm_forward(
    const at::Tensor& x, const std::optional<at::Tensor>& bias, const at::Tensor& residual, const at::Tensor& weight,
    const at::Tensor& beta, double eps, const std::optional<at::Tensor>& seed, double dropout_p, bool keep_sum);

// (d h = d residual [..., H]; d x [..., H] when dropout_p > 0, else an empty tensor (it equals d h); d bias [H] in
// weight's dtype when bias_grad, else empty; d weight, d beta [H] in weight's dtype). Deterministic: the column
// sums do not depend on the thread count.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_layernorm_backward(
    const at::Tensor& grad_y, const at::Tensor& h, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& weight, const std::optional<at::Tensor>& seed, double dropout_p, bool bias_grad);

// bool [rows, cols]: where the hidden dropout of `seed` keeps element (row, col) (tests, debugging).
at::Tensor hidden_dropout_keep_mask(const at::Tensor& seed, int64_t rows, int64_t cols, double dropout_p);

}  // namespace deberta_fast_cpu
