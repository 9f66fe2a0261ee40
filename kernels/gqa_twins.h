// Grouped-query attention (GQA) on a paged bf16 KV cache, as Qwen3-MoE and Mixtral use it: the
// shape of a layer's heads and the CPU twins of the kernels in gqa_attention.h (same data
// types: bf16 stored as uint16_t, fp32 math). The twins are the reference the kernels are tested
// against; they build and run without CUDA.
//
// A cache row holds one token's rotated keys for every key/value head, then its values for every
// key/value head: 2 * kv_heads * head_dim values, the CPU engine's row layout
// (engine/model/gqa_attention.h). Query head h reads key/value head h / (heads / kv_heads). A
// sequence's rows live in blocks of `block_size` rows named by its block table.
//
// GqaShape's helpers are constexpr so that device code (relaxed constexpr) can call them.
// Stateless functions; thread-safe.
#pragma once

#include <cstdint>

namespace moeserve::kernels {

struct GqaShape {
  int heads = 0;     // query heads
  int kv_heads = 0;  // key/value heads; divides `heads`
  int head_dim = 0;  // even

  constexpr int heads_per_kv() const { return heads / kv_heads; }
  // Values per token of the fused q/k/v projection: queries, then keys, then values.
  constexpr int projection_dim() const { return (heads + 2 * kv_heads) * head_dim; }
  // Values per KV cache row: keys, then values.
  constexpr int row_dim() const { return 2 * kv_heads * head_dim; }
};

// For each new token t: takes its projection qkv[t] (fp32 [tokens, projection_dim]), normalizes
// every query and key head on its own (RMSNorm with weights q_norm / k_norm [head_dim]; skipped
// where they are null), rotates them by positions[t] (rotate-half pairs (i, i + head_dim / 2);
// cos/sin tables [positions, head_dim / 2]), and writes the queries to `queries` (bf16
// [tokens, heads, head_dim]) and the keys and values to cache row cache_rows[t]. One rounding to
// bf16 per value.
void GqaWriteCacheTwin(const float* qkv, const uint16_t* q_norm, const uint16_t* k_norm, float eps,
                       const int32_t* positions, const int64_t* cache_rows, const float* cos_table,
                       const float* sin_table, uint16_t* queries, uint16_t* cache, int tokens,
                       const GqaShape& shape);

// Causal attention of each token's queries over its sequence's cached rows 0..positions[t]:
// out[t, h] = softmax(scale * queries[t, h] · keys) · values, with the keys and values of head
// h's key/value head. token_sequence[t] picks the token's block table (block_tables:
// [sequences, max_blocks]). out: bf16 [tokens, heads, head_dim].
void GqaPagedAttentionTwin(const uint16_t* queries, const uint16_t* cache,
                           const int32_t* block_tables, int max_blocks,
                           const int32_t* token_sequence, const int32_t* positions, uint16_t* out,
                           int tokens, const GqaShape& shape, int block_size, float scale);

}  // namespace moeserve::kernels
