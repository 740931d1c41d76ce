// The sizes of one disentangled-attention call and strided views of its per-(batch, head) operands.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace deberta_fast_cpu {

// Rows of a score tile (queries, or keys in the key-stationary backward pass) and columns of a tile.
constexpr int64_t kBlockRows = 128;
constexpr int64_t kBlockCols = 128;
// Fixed ownership chunks of the backward pass: partial positional-table gradients are kept per chunk and
// summed in chunk order, so the result does not depend on the number of threads.
constexpr int64_t kChunkRows = 256;
// Row blocks start on panel boundaries (attention_call.h), so a block of rows is also one panel of columns.
static_assert(kBlockRows == kBlockCols && kChunkRows % kBlockRows == 0, "tile sizes must nest");

struct Geometry {
  int64_t batch = 0, heads = 0, length = 0, prefix = 0, keys = 0, head_dim = 0, value_dim = 0;
  bool c2p = false, p2c = false;
  int64_t slot_lo = 0;   // first slot that distances |d| <= L - 1 reach
  int64_t window = 0;    // W: number of slots reached (0 without positional terms)
  int64_t pos_key_batch = 1, pos_query_batch = 1;
  float scale = 1.f;
  bool has_mask = false;

  bool positions() const { return c2p || p2c; }
};

// A 4-D tensor [N, H, rows, cols] with arbitrary strides, addressed per (n, h).
template <typename T>
struct Strided4 {
  const T* data = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;

  Strided4() = default;
  explicit Strided4(const at::Tensor& t)
      : data(t.data_ptr<T>()), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)), s3(t.stride(3)) {}
  const T* at(int64_t n, int64_t h) const { return data + n * s0 + h * s1; }
};

}  // namespace deberta_fast_cpu
