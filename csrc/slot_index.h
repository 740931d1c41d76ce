// Relative-position slots of a score tile, as one O(L) index array.
//
// A tile row `row` and column `col` (queries x keys in the forward and query-stationary passes, keys x queries in
// the key-stationary pass) read the positional tables at a slot that depends on u = col - row + L - 1 only. The
// array holds, for every u, the slot index sigma used by the kernels (0 <= sigma < W), oriented so that sigma is
// non-decreasing in u, i.e. along a tile row:
//   query rows: sigma(u) = W - 1 - (slot(i - j) - lo) with i - j = L - 1 - u   (tables stored in reversed slot order)
//   key rows:   sigma(u) = slot(i - j) - lo          with i - j = u - L + 1
// Consecutive slots differ by 0 or 1 (identity, then log buckets, then clamping), so a tile is one of:
//   constant (every pair reads one slot), linear (sigma = sigma(u_row) + column), or general.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

namespace deberta_fast_cpu {

enum class TileKind { kConstant, kLinear, kGeneral };

class SlotIndex {
 public:
  // Padding on both ends (edge values), so that vector loads over padded tile columns stay inside the array.
  static constexpr int64_t kPad = 64;

  SlotIndex() = default;

  // slots: [2L - 1] absolute slots of the distances -(L-1) .. L-1, non-decreasing. rows_are_queries selects
  // the orientation described above.
  SlotIndex(const int32_t* slots, int64_t length, int64_t lo, int64_t window, bool rows_are_queries)
      : length_(length) {
    const int64_t n = 2 * length - 1;
    values_.assign(n + 2 * kPad, 0);
    for (int64_t u = 0; u < n; ++u) {
      const int64_t slot = rows_are_queries ? slots[n - 1 - u] : slots[u];
      const int64_t sigma = rows_are_queries ? window - 1 - (slot - lo) : slot - lo;
      TORCH_CHECK(sigma >= 0 && sigma < window, "deberta_fast_cpu: slot table is not monotone in the distance");
      values_[kPad + u] = static_cast<int32_t>(sigma);
    }
    for (int64_t p = 0; p < kPad; ++p) {
      values_[p] = values_[kPad];
      values_[kPad + n + p] = values_[kPad + n - 1];
    }
    for (int64_t u = 1; u < n; ++u) {
      const int32_t step = values_[kPad + u] - values_[kPad + u - 1];
      TORCH_CHECK(step == 0 || step == 1, "deberta_fast_cpu: slot table must grow by 0 or 1 per unit of distance");
    }
  }

  // sigma of (row, col) and onwards along the row: pointer to sigma(col - row + L - 1).
  const int32_t* row_ptr(int64_t row, int64_t col) const { return values_.data() + kPad + col - row + length_ - 1; }

  // Kind of the tile rows [row0, row0 + rows) x columns [col0, col0 + cols_padded).
  TileKind classify(int64_t row0, int64_t rows, int64_t col0, int64_t cols_padded) const {
    const int64_t u_lo = col0 - (row0 + rows - 1) + length_ - 1;
    const int64_t u_hi = col0 + cols_padded - 1 - row0 + length_ - 1;
    const int32_t a = values_[kPad + u_lo], b = values_[kPad + u_hi];
    if (a == b) return TileKind::kConstant;
    if (b - a == u_hi - u_lo) return TileKind::kLinear;
    return TileKind::kGeneral;
  }

 private:
  std::vector<int32_t> values_;
  int64_t length_ = 0;
};

}  // namespace deberta_fast_cpu
