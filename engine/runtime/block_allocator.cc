#include "engine/runtime/block_allocator.h"

namespace moeserve::engine {

BlockAllocator::BlockAllocator(int num_blocks) : num_blocks_(num_blocks), in_use_(num_blocks) {
  free_blocks_.reserve(num_blocks);
  for (int block = num_blocks - 1; block >= 0; --block) free_blocks_.push_back(block);
}

std::optional<std::vector<int32_t>> BlockAllocator::Allocate(int count) {
  if (count < 0 || count > num_free()) return std::nullopt;
  std::vector<int32_t> blocks(free_blocks_.end() - count, free_blocks_.end());
  free_blocks_.resize(free_blocks_.size() - count);
  for (int32_t block : blocks) in_use_[block] = true;
  return blocks;
}

void BlockAllocator::Free(const std::vector<int32_t>& blocks) {
  for (int32_t block : blocks) {
    // Ignore double frees and foreign ids instead of corrupting the free list.
    if (block < 0 || block >= num_blocks_ || !in_use_[block]) continue;
    in_use_[block] = false;
    free_blocks_.push_back(block);
  }
}

}  // namespace moeserve::engine
