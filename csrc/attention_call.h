// What the forward and backward kernels share about one call: geometry checks, the token mask, packed windows of
// the positional tables, grouping of heads and the dynamic task queue.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <optional>
#include <vector>

#include "aligned_buffer.h"
#include "attention_geometry.h"
#include "packing.h"
#include "slot_index.h"
#include "workspace.h"

namespace deberta_fast_cpu {

// Validates the operands (the Python wrapper checks them too; this guards direct calls of the op).
inline Geometry make_geometry(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                              const std::optional<at::Tensor>& pos_key, const std::optional<at::Tensor>& pos_query,
                              const std::optional<at::Tensor>& token_mask, const std::optional<at::Tensor>& slot_table,
                              double softmax_scale, int64_t num_prefix_keys) {
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.dim() == 4,
              "deberta_fast_cpu: query, key and value must be [B, H, L, D]");
  TORCH_CHECK(query.device().is_cpu(), "deberta_fast_cpu: tensors must be on the CPU");
  TORCH_CHECK(key.scalar_type() == query.scalar_type() && value.scalar_type() == query.scalar_type(),
              "deberta_fast_cpu: query, key and value must share one dtype");
  Geometry g;
  g.batch = query.size(0);
  g.heads = query.size(1);
  g.length = query.size(2);
  g.head_dim = query.size(3);
  g.prefix = num_prefix_keys;
  g.keys = g.prefix + g.length;
  g.value_dim = value.size(3);
  g.scale = static_cast<float>(softmax_scale);
  TORCH_CHECK(num_prefix_keys >= 0, "deberta_fast_cpu: num_prefix_keys must be >= 0");
  TORCH_CHECK(key.size(0) == g.batch && key.size(1) == g.heads && key.size(2) == g.keys && key.size(3) == g.head_dim,
              "deberta_fast_cpu: key must be [B, H, P + L, D]");
  TORCH_CHECK(value.size(0) == g.batch && value.size(1) == g.heads && value.size(2) == g.keys,
              "deberta_fast_cpu: value must be [B, H, P + L, Dv]");
  g.c2p = pos_key.has_value();
  g.p2c = pos_query.has_value();
  if (g.positions()) {
    TORCH_CHECK(slot_table.has_value() && slot_table->dim() == 1 && slot_table->size(0) == 2 * g.length - 1,
                "deberta_fast_cpu: slot_table must be [2L - 1] when a positional table is given");
  }
  for (const auto* table : {&pos_key, &pos_query}) {
    if (!table->has_value()) continue;
    const at::Tensor& t = **table;
    TORCH_CHECK(t.dim() == 4 && (t.size(0) == 1 || t.size(0) == g.batch) && t.size(1) == g.heads &&
                    t.size(3) == g.head_dim && t.scalar_type() == query.scalar_type(),
                "deberta_fast_cpu: positional tables must be [1 or B, H, 2S, D] in the dtype of query");
  }
  if (g.c2p) g.pos_key_batch = pos_key->size(0);
  if (g.p2c) g.pos_query_batch = pos_query->size(0);
  if (token_mask.has_value()) {
    TORCH_CHECK(token_mask->dim() == 2 && token_mask->size(0) == g.batch && token_mask->size(1) == g.length,
                "deberta_fast_cpu: token_mask must be [B, L]");
    g.has_mask = true;
  }
  return g;
}

// The positional window [lo, lo + W) and both orientations of the slot index.
struct Slots {
  SlotIndex query_rows, key_rows;

  // table_rows: 2S, the number of rows of the positional tables; every slot must index one of them.
  Slots(Geometry& g, const std::optional<at::Tensor>& slot_table, int64_t table_rows) {
    if (!g.positions()) return;
    const at::Tensor slots = slot_table->scalar_type() == at::kInt && slot_table->is_contiguous()
                                 ? *slot_table
                                 : slot_table->to(at::kInt).contiguous();
    const int32_t* s = slots.data_ptr<int32_t>();
    const int64_t n = 2 * g.length - 1;
    TORCH_CHECK(s[0] >= 0 && s[n - 1] >= s[0] && s[n - 1] < table_rows,
                "deberta_fast_cpu: slot_table must hold non-decreasing slots in [0, ", table_rows, ")");
    g.slot_lo = s[0];
    g.window = static_cast<int64_t>(s[n - 1]) - s[0] + 1;
    query_rows = SlotIndex(s, g.length, g.slot_lo, g.window, /*rows_are_queries=*/true);
    key_rows = SlotIndex(s, g.length, g.slot_lo, g.window, /*rows_are_queries=*/false);
  }
};

// Token mask as bytes plus per-batch prefix counts (a block has a valid token iff its count difference > 0).
struct TokenMask {
  std::vector<uint8_t> valid;   // [B, L]
  std::vector<int32_t> counts;  // [B, L + 1]
  int64_t length = 0;
  bool present = false;

  TokenMask(const Geometry& g, const std::optional<at::Tensor>& token_mask) : length(g.length) {
    if (!token_mask.has_value()) return;
    present = true;
    const at::Tensor& m = *token_mask;
    valid.assign(g.batch * g.length, 0);
    AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, m.scalar_type(), "deberta_fast_cpu_mask", [&] {
      const scalar_t* p = m.data_ptr<scalar_t>();
      for (int64_t b = 0; b < g.batch; ++b) {
        for (int64_t i = 0; i < g.length; ++i) {
          valid[b * g.length + i] = p[b * m.stride(0) + i * m.stride(1)] != scalar_t(0) ? 1 : 0;
        }
      }
    });
    counts.assign(g.batch * (g.length + 1), 0);
    for (int64_t b = 0; b < g.batch; ++b) {
      for (int64_t i = 0; i < g.length; ++i) {
        counts[b * (g.length + 1) + i + 1] = counts[b * (g.length + 1) + i] + valid[b * g.length + i];
      }
    }
  }

  bool ok(int64_t b, int64_t i) const { return !present || valid[b * length + i] != 0; }
  int64_t count(int64_t b, int64_t i0, int64_t i1) const {
    if (!present) return i1 - i0;
    return counts[b * (length + 1) + i1] - counts[b * (length + 1) + i0];
  }
  // col_ok[c] = 1 for valid tokens i0 + c (c < n), 0 for masked ones and for padding up to n_padded.
  void fill(int64_t b, int64_t i0, int64_t n, int64_t n_padded, float* col_ok) const {
    for (int64_t c = 0; c < n_padded; ++c) col_ok[c] = (c < n && ok(b, i0 + c)) ? 1.f : 0.f;
  }
};

// The slots [lo, lo + W) of one positional table [PB, H, 2S, D], packed per (pb, h) in fp32:
// rows [W, D] or transposed [D, W]; `reversed` stores slot lo + W - 1 - sigma at sigma.
template <typename State, typename Fn>
void parallel_tasks(int64_t n, const Fn& fn);

// The slots [lo, lo + W) of one positional table [PB, H, 2S, D], packed per (pb, h) in fp32:
// rows [W, D] or transposed [D, W]; `reversed` stores slot lo + W - 1 - sigma at sigma.
template <typename T>
void pack_window(const at::Tensor& table, const Geometry& g, bool reversed, bool transposed, float scale,
                 float* out) {
  const Strided4<T> t(table);
  const int64_t pb_count = table.size(0), W = g.window, D = g.head_dim;
  auto pack = [&](int64_t task, int&) {
    const T* src = t.at(task / g.heads, task % g.heads);
    float* dst = out + task * W * D;
    auto slot_of = [&](int64_t sigma) { return reversed ? g.slot_lo + W - 1 - sigma : g.slot_lo + sigma; };
    if (transposed) {  // dst[d, sigma], written contiguously
      for (int64_t d = 0; d < D; ++d) {
        for (int64_t sigma = 0; sigma < W; ++sigma) {
          dst[d * W + sigma] = scale * static_cast<float>(src[slot_of(sigma) * t.s2 + d * t.s3]);
        }
      }
    } else {
      for (int64_t sigma = 0; sigma < W; ++sigma) {
        const T* row = src + slot_of(sigma) * t.s2;
        for (int64_t d = 0; d < D; ++d) dst[sigma * D + d] = scale * static_cast<float>(row[d * t.s3]);
      }
    }
  };
  // A parallel region costs more than packing a few windows (and waits for every thread at its end).
  constexpr int64_t kSerialElements = int64_t(1) << 20;
  if (pb_count * g.heads * W * D <= kSerialElements) {
    int unused = 0;
    for (int64_t task = 0; task < pb_count * g.heads; ++task) pack(task, unused);
  } else {
    parallel_tasks<int>(pb_count * g.heads, pack);
  }
}

inline int64_t window_size(const std::optional<at::Tensor>& table, const Geometry& g) {
  return table.has_value() ? table->size(0) * g.heads * g.window * g.head_dim : 0;
}

// Operands read as the right-hand side of tile products are stored transposed in panels of kBlockCols tokens:
// panel p holds tokens [p * kBlockCols, (p + 1) * kBlockCols) as [dim][kBlockCols], so the tile of tokens starting at
// a multiple of kBlockCols is one dense [dim, kBlockCols] block (leading dimension kBlockCols).
inline int64_t panels_size(int64_t tokens, int64_t dim) { return round_up(tokens, kBlockCols) * dim; }
inline const float* panel_at(const float* panels, int64_t dim, int64_t token0) {
  return panels + (token0 / kBlockCols) * dim * kBlockCols;
}

// Packs tokens [t0, t1) of src (token stride rs, feature stride cs), times scale, into panels.
template <typename T>
void pack_panels(const T* src, int64_t rs, int64_t cs, int64_t t0, int64_t t1, int64_t dim, float scale,
                 float* panels) {
  for (int64_t t = t0; t < t1;) {
    const int64_t within = t % kBlockCols, n = std::min(t1 - t, kBlockCols - within);
    pack_transposed(src + t * rs, rs, cs, n, dim, scale, panels + (t / kBlockCols) * dim * kBlockCols + within,
                    kBlockCols);
    t += n;
  }
}

// Runs fn(task, worker_state) for task in [0, n) on at::parallel_for threads with a shared counter, so uneven
// tasks balance. Which thread runs a task never changes what the task computes.
template <typename State, typename Fn>
void parallel_tasks(int64_t n, const Fn& fn) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    State state;
    for (int64_t task = next.fetch_add(1); task < n; task = next.fetch_add(1)) fn(task, state);
  });
}

// Per-head preparation tasks and per-head work tasks in one parallel region. The queue holds every preparation
// task of head h before the first work task of h (order: prep 0, then prep h + 1 and work h for each h), so a work
// task only ever waits for preparation tasks that are already running; preparation never waits. Saves the barrier
// between the two phases. prep(head, index) and work(head, index, state) must not depend on which thread runs them.
template <typename State, typename Prep, typename Work>
void pipelined_tasks(int64_t heads, int64_t prep_per_head, int64_t work_per_head, const Prep& prep,
                     const Work& work) {
  std::vector<int64_t> queue;  // >= 0: prep task id; < 0: -(work task id) - 1
  queue.reserve(heads * (prep_per_head + work_per_head));
  auto push_prep = [&](int64_t h) {
    for (int64_t i = 0; i < prep_per_head; ++i) queue.push_back(h * prep_per_head + i);
  };
  if (heads > 0) push_prep(0);
  for (int64_t h = 0; h < heads; ++h) {
    if (h + 1 < heads) push_prep(h + 1);
    for (int64_t i = 0; i < work_per_head; ++i) queue.push_back(-(h * work_per_head + i) - 1);
  }
  std::unique_ptr<std::atomic<int64_t>[]> pending(new std::atomic<int64_t>[std::max<int64_t>(heads, 1)]);
  for (int64_t h = 0; h < heads; ++h) pending[h].store(prep_per_head, std::memory_order_relaxed);
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex error_mutex;
  parallel_tasks<State>(static_cast<int64_t>(queue.size()), [&](int64_t t, State& state) {
    const int64_t entry = queue[t];
    if (entry >= 0) {
      const int64_t h = entry / prep_per_head;
      try {
        if (!failed.load(std::memory_order_relaxed)) prep(h, entry % prep_per_head);
      } catch (...) {  // keep counting down, or the work tasks of this head would wait forever
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!failed.exchange(true)) error = std::current_exception();
      }
      pending[h].fetch_sub(1, std::memory_order_release);
      return;
    }
    const int64_t id = -entry - 1, h = id / work_per_head;
    while (pending[h].load(std::memory_order_acquire) > 0) std::this_thread::yield();
    if (!failed.load(std::memory_order_relaxed)) work(h, id % work_per_head, state);
  });
  if (error) std::rethrow_exception(error);
}

// Heads processed together: as many as fit a 64 MiB workspace (every group costs a parallel region, whose end waits
// for its slowest thread), at least two per thread. The grouping never changes what a task computes.
inline int64_t heads_per_group(int64_t total_heads, int64_t bytes_per_head) {
  constexpr int64_t kSmallGroupBytes = int64_t(64) << 20;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t by_budget = kSmallGroupBytes / std::max<int64_t>(1, bytes_per_head);
  return std::max<int64_t>(1, std::min(total_heads, std::max(2 * threads, by_budget)));
}

// An fp32 row view of a per-head operand: the input itself when it is fp32 with unit column stride, else packed.
template <typename T>
Rows rows_view(const Strided4<T>& t, int64_t n, int64_t h, const float* packed, int64_t packed_ld) {
  if constexpr (std::is_same_v<T, float>) {
    if (t.s3 == 1) return Rows{t.at(n, h), t.s2};
  }
  return Rows{packed, packed_ld};
}

template <typename T>
bool needs_row_pack(const Strided4<T>& t) {
  if constexpr (std::is_same_v<T, float>) return t.s3 != 1;
  return true;
}

}  // namespace deberta_fast_cpu
