// Paged KV cache for MLA: per layer, fixed-size blocks of token rows; each row holds the
// compressed latent (kv_lora_rank values, after its RMSNorm) followed by the rotated rope key
// (qk_rope_head_dim values) — MLA caches this instead of per-head keys and values.
//
// BlockAllocator hands out block ids; a sequence owns a block table (its blocks in order).
// Not thread-safe: owned and used by one engine step loop.
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
  void Free(const std::vector<int32_t>& blocks);
  int num_free() const { return static_cast<int>(free_blocks_.size()); }
  int num_total() const { return num_blocks_; }

 private:
  int num_blocks_;
  std::vector<int32_t> free_blocks_;  // a stack: recently freed blocks are reused first
  std::vector<bool> in_use_;
};

class KvCache {
 public:
  // Without `host_rows`, only blocks are allocated: the rows live elsewhere (a GPU backend keeps
  // them in device memory) and Row() must not be called.
  KvCache(int num_layers, int num_blocks, int block_size, int row_dim, bool host_rows = true);

  float* Row(int layer, int32_t block, int offset) {
    return &storage_[((static_cast<size_t>(layer) * num_blocks_ + block) * block_size_ + offset) *
                     row_dim_];
  }
  // The row of `position` in a sequence with `block_table`.
  float* RowAt(int layer, const std::vector<int32_t>& block_table, int position) {
    return Row(layer, block_table[position / block_size_], position % block_size_);
  }

  int block_size() const { return block_size_; }
  int row_dim() const { return row_dim_; }
  int num_blocks() const { return num_blocks_; }
  // Blocks needed to hold `num_tokens` tokens.
  int BlocksFor(int num_tokens) const { return (num_tokens + block_size_ - 1) / block_size_; }
  BlockAllocator& allocator() { return allocator_; }
  const BlockAllocator& allocator() const { return allocator_; }
  double usage_ratio() const {
    return 1.0 - static_cast<double>(allocator_.num_free()) / allocator_.num_total();
  }

 private:
  int num_layers_;
  int num_blocks_;
  int block_size_;
  int row_dim_;
  std::vector<float> storage_;
  BlockAllocator allocator_;
};

}  // namespace moeserve::engine
