// BlockAllocator: hands out the KV cache block ids of one rank. A sequence reserves the blocks
// for its prompt and max_tokens on admission and returns them when it ends, so it never runs
// out mid-stream; recently freed blocks are reused first.
//
// Not thread-safe: owned and used by one rank's step loop.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

namespace moeserve::engine {

class BlockAllocator {
 public:
  explicit BlockAllocator(int num_blocks);
  // Takes `count` free blocks, or nothing when fewer are free (all or nothing).
  std::optional<std::vector<int32_t>> Allocate(int count);
  // Returns blocks; double frees and foreign ids are ignored.
  void Free(const std::vector<int32_t>& blocks);
  int num_free() const { return static_cast<int>(free_blocks_.size()); }
  int num_total() const { return num_blocks_; }
  double usage_ratio() const {
    return num_blocks_ > 0 ? 1.0 - static_cast<double>(num_free()) / num_blocks_ : 0.0;
  }

 private:
  int num_blocks_;
  std::vector<int32_t> free_blocks_;  // a stack: recently freed blocks are reused first
  std::vector<bool> in_use_;
};

// Blocks of `block_size` tokens needed to hold `num_tokens` tokens.
inline int BlocksFor(int num_tokens, int block_size) {
  return (num_tokens + block_size - 1) / block_size;
}

}  // namespace moeserve::engine
