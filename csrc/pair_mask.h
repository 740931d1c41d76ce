// A [B, 1 or H, L, L] pair mask (nonzero = query i may attend to content key j), as bytes per (batch, mask head):
// rows [i][j] for the query-row passes, optionally the transpose [j][i] for the key-row pass, and one flag per
// 128 x 128 tile saying whether any pair of the tile is valid (tiles without one are skipped: they add nothing).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "attention_geometry.h"

namespace deberta_fast_cpu {

struct PairMask {
  bool present = false;
  int64_t mask_heads = 1, length = 0, tiles = 0;
  std::vector<uint8_t> rows;        // [B, Hm, L, L]
  std::vector<uint8_t> columns;     // [B, Hm, L, L] transposed (only when asked for)
  std::vector<uint8_t> tile_valid;  // [B, Hm, T, T], T = ceil(L / kBlockRows): [query tile][key tile]

  PairMask(const Geometry& g, const std::optional<at::Tensor>& pair_mask, bool transposed) : length(g.length) {
    if (!pair_mask.has_value()) return;
    const at::Tensor& m = *pair_mask;
    TORCH_CHECK(m.dim() == 4 && m.size(0) == g.batch && (m.size(1) == 1 || m.size(1) == g.heads) &&
                    m.size(2) == g.length && m.size(3) == g.length,
                "deberta_fast_cpu: pair_mask must be [B, 1 or H, L, L]");
    present = true;
    mask_heads = m.size(1);
    const int64_t L = g.length, planes = g.batch * mask_heads;
    tiles = (L + kBlockRows - 1) / kBlockRows;
    rows.assign(planes * L * L, 0);
    if (transposed) columns.assign(planes * L * L, 0);
    tile_valid.assign(planes * tiles * tiles, 0);
    AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, m.scalar_type(), "deberta_fast_cpu_pair_mask", [&] {
      const scalar_t* p = m.data_ptr<scalar_t>();
      at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
        for (int64_t plane = begin; plane < end; ++plane) {
          const scalar_t* src = p + (plane / mask_heads) * m.stride(0) + (plane % mask_heads) * m.stride(1);
          uint8_t* dst = rows.data() + plane * L * L;
          uint8_t* any = tile_valid.data() + plane * tiles * tiles;
          for (int64_t i = 0; i < L; ++i) {
            for (int64_t j = 0; j < L; ++j) {
              const uint8_t ok = src[i * m.stride(2) + j * m.stride(3)] != scalar_t(0) ? 1 : 0;
              dst[i * L + j] = ok;
              any[(i / kBlockRows) * tiles + j / kBlockRows] |= ok;
            }
          }
          if (transposed) {
            uint8_t* t = columns.data() + plane * L * L;
            for (int64_t i = 0; i < L; ++i) {
              for (int64_t j = 0; j < L; ++j) t[j * L + i] = dst[i * L + j];
            }
          }
        }
      });
    });
  }

  int64_t plane(int64_t b, int64_t h) const { return b * mask_heads + (mask_heads == 1 ? 0 : h); }
  // Whether the tile of queries [i0, i0 + 128) x keys [j0, j0 + 128) has a valid pair (i0, j0 multiples of 128).
  bool tile_ok(int64_t b, int64_t h, int64_t i0, int64_t j0) const {
    return !present || tile_valid[(plane(b, h) * tiles + i0 / kBlockRows) * tiles + j0 / kBlockRows] != 0;
  }
  // ok[c] = valid(query i, key j0 + c) for c < n, 0 up to n_padded.
  void fill_row(int64_t b, int64_t h, int64_t i, int64_t j0, int64_t n, int64_t n_padded, float* ok) const {
    const uint8_t* src = rows.data() + (plane(b, h) * length + i) * length + j0;
    int64_t c = 0;
    for (; c < n; ++c) ok[c] = src[c] ? 1.f : 0.f;
    for (; c < n_padded; ++c) ok[c] = 0.f;
  }
  // ok[c] = valid(query i0 + c, key j) for c < n, 0 up to n_padded (needs the transposed copy).
  void fill_column(int64_t b, int64_t h, int64_t j, int64_t i0, int64_t n, int64_t n_padded, float* ok) const {
    const uint8_t* src = columns.data() + (plane(b, h) * length + j) * length + i0;
    int64_t c = 0;
    for (; c < n; ++c) ok[c] = src[c] ? 1.f : 0.f;
    for (; c < n_padded; ++c) ok[c] = 0.f;
  }
};

}  // namespace deberta_fast_cpu
