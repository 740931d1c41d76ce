// Native CPU disentangled attention of DeBERTa-v2/v3 (semantics: deberta_fast/ops/attention.py).
//
// query [B, H, L, D], key [B, H, P + L, D], value [B, H, P + L, Dv] (any strides, fp32 / bf16 / fp16),
// pos_key / pos_query [1 or B, H, 2S, D] (c2p / p2c term, absent when not used), token_mask [B, L] (nonzero = real
// token), slot_table [2L - 1] (slot of the distance t - (L - 1), non-decreasing), softmax_scale s:
//   score(i, j) = s (Q_i.K_j + Q_i.Pk[slot(i - j)] + K_j.Pq[slot(i - j)]),  score(i, p) = s Q_i.K_p (prefix keys)
//   out = softmax(score masked to pairs of real tokens, prefix keys always valid) . V, a row without any valid key
//   being the mean of V (transformers' behaviour). Computed in fp32 tiles (the forward pass of bf16 calls without
//   dropout: bf16 tile products with fp32 accumulation where the CPU has them, bf16_tiles.h); memory is O(L . D) per
//   head.
// pair_mask [B, 1 or H, L, L] (instead of token_mask): pair (i, j) of content keys is valid where it is nonzero.
// dropout_p > 0: probabilities are dropped (attention_dropout.h) with the int64 [1] seed, also in uniform rows.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace deberta_fast_cpu {

// Returns (out [B, H, L, Dv] in the dtype of query, stored as [B, L, H, Dv]; lse [B, H, L] fp32, the natural-log
// log-sum-exp of every score row, +inf for rows that average V uniformly).
std::tuple<at::Tensor, at::Tensor> disentangled_attention_forward(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const std::optional<at::Tensor>& pos_key,
    const std::optional<at::Tensor>& pos_query, const std::optional<at::Tensor>& token_mask,
    const std::optional<at::Tensor>& slot_table, double softmax_scale, int64_t num_prefix_keys,
    const std::optional<at::Tensor>& pair_mask, const std::optional<at::Tensor>& seed, double dropout_p);

// Gradients (d query, d key, d value, d pos_key, d pos_query) from the saved out and lse; the positional gradients
// are empty tensors when their table is absent. Deterministic: the result does not depend on the thread count.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> disentangled_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& pos_key, const std::optional<at::Tensor>& pos_query,
    const std::optional<at::Tensor>& token_mask, const std::optional<at::Tensor>& slot_table, const at::Tensor& out,
    const at::Tensor& lse, double softmax_scale, int64_t num_prefix_keys, const std::optional<at::Tensor>& pair_mask,
    const std::optional<at::Tensor>& seed, double dropout_p);

// bool [BH, L, NK]: where the attention dropout of `seed` keeps probability (bh, query, key) (tests, debugging).
at::Tensor dropout_keep_mask(const at::Tensor& seed, int64_t batch_heads, int64_t length, int64_t num_keys,
                             double dropout_p);

// Whether bf16 forward calls run their tile products in bf16 on this machine (bf16_tiles_available()).
bool bf16_tile_products();

}  // namespace deberta_fast_cpu
