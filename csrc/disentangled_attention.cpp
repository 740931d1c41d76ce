// Operator schemas of the native CPU disentangled attention and their CPU kernels (torch.library).
// Autograd and fake-tensor rules are registered from Python (deberta_fast/ops/attention_cpu.py).
#include <torch/library.h>

#include "disentangled_attention.h"

TORCH_LIBRARY(deberta_fast_cpu, m) {
  m.def(
      "disentangled_attention_forward(Tensor query, Tensor key, Tensor value, Tensor? pos_key, Tensor? pos_query, "
      "Tensor? token_mask, Tensor? slot_table, float softmax_scale, int num_prefix_keys, Tensor? pair_mask=None, "
      "Tensor? seed=None, float dropout_p=0.0) -> (Tensor, Tensor)");
  m.def(
      "disentangled_attention_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor? pos_key, "
      "Tensor? pos_query, Tensor? token_mask, Tensor? slot_table, Tensor out, Tensor lse, float softmax_scale, "
      "int num_prefix_keys, Tensor? pair_mask=None, Tensor? seed=None, float dropout_p=0.0) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("dropout_keep_mask(Tensor seed, int batch_heads, int length, int num_keys, float dropout_p) -> Tensor");
  m.def("bf16_tile_products() -> bool", &deberta_fast_cpu::bf16_tile_products);
}

TORCH_LIBRARY_IMPL(deberta_fast_cpu, CPU, m) {
  m.impl("disentangled_attention_forward", &deberta_fast_cpu::disentangled_attention_forward);
  m.impl("disentangled_attention_backward", &deberta_fast_cpu::disentangled_attention_backward);
  m.impl("dropout_keep_mask", &deberta_fast_cpu::dropout_keep_mask);
}
