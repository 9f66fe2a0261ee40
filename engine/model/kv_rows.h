// KvRows: the paged KV cache rows one rank's attention reads and writes. Per layer, fixed-size
// blocks of token rows; a sequence's block table lists its blocks in order, so position p of
// the sequence lives in block table[p / block_size] at offset p % block_size. For MLA models a
// row holds the compressed latent (kv_lora_rank values, after its RMSNorm) followed by the
// rotated rope key (qk_rope_head_dim values) — MLA caches this instead of per-head keys and
// values; for grouped-query models it holds every KV head's key and value.
//
// Which blocks a sequence owns is decided elsewhere (runtime/block_allocator.h); this only
// stores rows. Not thread-safe: owned and used by one rank's step loop.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace moeserve::engine {

class KvRows {
 public:
  KvRows(int num_layers, int num_blocks, int block_size, int row_dim)
      : num_layers_(num_layers),
        num_blocks_(num_blocks),
        block_size_(block_size),
        row_dim_(row_dim),
        storage_(static_cast<size_t>(num_layers) * num_blocks * block_size * row_dim) {}

  float* Row(int layer, int32_t block, int offset) {
    return &storage_[((static_cast<size_t>(layer) * num_blocks_ + block) * block_size_ + offset) *
                     row_dim_];
  }
  // The row of `position` in a sequence with `block_table`.
  float* RowAt(int layer, const std::vector<int32_t>& block_table, int position) {
    return Row(layer, block_table[position / block_size_], position % block_size_);
  }

  int num_layers() const { return num_layers_; }
  int block_size() const { return block_size_; }
  int row_dim() const { return row_dim_; }
  int num_blocks() const { return num_blocks_; }
  // Blocks needed to hold `num_tokens` tokens.
  int BlocksFor(int num_tokens) const { return (num_tokens + block_size_ - 1) / block_size_; }

 private:
  int num_layers_;
  int num_blocks_;
  int block_size_;
  int row_dim_;
  std::vector<float> storage_;
};

}  // namespace moeserve::engine
