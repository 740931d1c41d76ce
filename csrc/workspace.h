// Memory reused across calls: the per-call workspace (packed operands, positional tables) and each thread's tile
// scratch. Fresh multi-megabyte allocations would be mapped anew by the kernel on every call, and their page faults
// cost more than a tenth of the op (more when other processes compete for the CPU).
#pragma once

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <vector>

#include "aligned_buffer.h"

namespace deberta_fast_cpu {

// A lease on `count` floats (not zeroed): the process's cached block when no other call holds it (grown as needed,
// kept while it is at most kMaxCachedBytes), otherwise a block of its own.
class Workspace {
 public:
  static constexpr int64_t kMaxCachedBytes = int64_t(256) << 20;

  explicit Workspace(int64_t count) {
    if (count * int64_t(sizeof(float)) <= kMaxCachedBytes) {
      std::lock_guard<std::mutex> lock(mutex());
      if (!cached_in_use()) {
        cached_in_use() = true;
        leased_ = true;
        AlignedBuffer<float>& block = cached();
        if (block.size() < count) block.reset(count, /*zero=*/false);
        data_ = block.data();
        return;
      }
    }
    own_.reset(count, /*zero=*/false);
    data_ = own_.data();
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  ~Workspace() {
    if (leased_) {
      std::lock_guard<std::mutex> lock(mutex());
      cached_in_use() = false;
    }
  }

  float* data() { return data_; }

 private:
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  static AlignedBuffer<float>& cached() {
    static AlignedBuffer<float> block;
    return block;
  }
  static bool& cached_in_use() {
    static bool in_use = false;
    return in_use;
  }

  AlignedBuffer<float> own_;
  float* data_ = nullptr;
  bool leased_ = false;
};

// Lays out named sub-buffers in one block: plan every size first (add), then take them in the same order.
class Carver {
 public:
  // Reserves n floats (64-byte aligned) and returns its offset.
  int64_t add(int64_t n) {
    const int64_t offset = total_;
    total_ += round_up(std::max<int64_t>(n, 0), 16);
    return offset;
  }
  int64_t total() const { return total_; }

 private:
  int64_t total_ = 0;
};

// A sub-buffer of a workspace or of thread scratch (not owning).
struct Block {
  float* ptr = nullptr;
  float* data() const { return ptr; }
};

// Tile scratch of the calling thread, grown on demand and kept for the thread's lifetime (zero when first
// allocated; later calls see the finite values that earlier tiles left).
inline float* thread_scratch(int64_t count) {
  static thread_local AlignedBuffer<float> buffer;
  if (buffer.size() < count) buffer.reset(count, /*zero=*/true);
  return buffer.data();
}

}  // namespace deberta_fast_cpu
