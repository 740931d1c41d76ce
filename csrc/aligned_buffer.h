// Zero-initialised, 64-byte aligned scratch memory owned by one worker or one group of heads.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace deberta_fast_cpu {

template <typename T>
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(int64_t count, bool zero = true) { reset(count, zero); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  AlignedBuffer(AlignedBuffer&& other) noexcept : data_(other.data_), size_(other.size_) {
    other.data_ = nullptr;
    other.size_ = 0;
  }
  AlignedBuffer& operator=(AlignedBuffer&& other) noexcept {
    if (this != &other) {
      std::free(data_);
      data_ = other.data_;
      size_ = other.size_;
      other.data_ = nullptr;
      other.size_ = 0;
    }
    return *this;
  }
  ~AlignedBuffer() { std::free(data_); }

  // Makes room for `count` elements, zero unless `zero` is false (buffers that are written before every read skip
  // it; zero padding keeps unused tile columns finite elsewhere).
  void reset(int64_t count, bool zero = true) {
    std::free(data_);
    data_ = nullptr;
    size_ = count;
    if (count <= 0) {
      return;
    }
    const size_t bytes = ((static_cast<size_t>(count) * sizeof(T) + 63) / 64) * 64;
    data_ = static_cast<T*>(std::aligned_alloc(64, bytes));
    TORCH_CHECK(data_ != nullptr, "deberta_fast_cpu: out of memory allocating ", bytes, " bytes of scratch");
    if (zero) std::memset(data_, 0, bytes);
  }

  T* data() { return data_; }
  const T* data() const { return data_; }
  int64_t size() const { return size_; }

 private:
  T* data_ = nullptr;
  int64_t size_ = 0;
};

// Rounds n up to a multiple of m.
inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// A row pitch of at least n floats that is not a multiple of 256 floats: rows of power-of-two pitch map to the same
// few L1 sets and evict each other when a kernel walks down a column.
inline int64_t padded_pitch(int64_t n) { return round_up(n, 16) + 16; }

}  // namespace deberta_fast_cpu
