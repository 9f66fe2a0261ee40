// Grouped-query attention (GQA) kernels of the GPU backend, as Qwen3-MoE and Mixtral use it,
// over a paged bf16 KV cache (the row layout and the twins are in gqa_twins.h). A step's new
// tokens first go through GqaWriteCache (their q/k norms and rotations; keys and values into the
// cache), then GqaPagedAttention attends each token over its sequence's cached rows: one query
// token per decoding sequence, or the causal rows of a prefill chunk over the tokens cached
// before it and the chunk's own.
//
// Same conventions as kernels.h: raw device pointers, a stream, a status; bf16 storage, fp32
// math and softmax accumulation. head_dim must be a multiple of 8 and at most 256. Each kernel
// has a CPU twin (gqa_twins.h) and a GPU test comparing the two. Thread-safe as far as CUDA
// streams are: callers own their streams.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/gqa_twins.h"

namespace moeserve::kernels {

// Largest head_dim the kernels take (Qwen3-MoE and Mixtral use 128).
inline constexpr int kMaxGqaHeadDim = 256;

// INVALID_ARGUMENT naming what the kernels cannot take (head sizes, grouping).
absl::Status CheckGqaShape(const GqaShape& shape);

// The queries and cache rows of new tokens from their fused projection (fp32
// [tokens, projection_dim]): per-head RMSNorm of queries and keys where q_norm / k_norm are
// given (Qwen3; null for Mixtral), rotate-half RoPE at positions[t] (cos/sin tables
// [positions, head_dim / 2]), queries to `queries` (bf16 [tokens, heads, head_dim]), keys and
// values to row cache_rows[t] of `cache`. Twin: GqaWriteCacheTwin.
absl::Status GqaWriteCache(const float* qkv, const __nv_bfloat16* q_norm,
                           const __nv_bfloat16* k_norm, float eps, const int32_t* positions,
                           const int64_t* cache_rows, const float* cos_table,
                           const float* sin_table, __nv_bfloat16* queries, __nv_bfloat16* cache,
                           int tokens, const GqaShape& shape, cudaStream_t stream);

// Causal attention of each token's query heads over the cached rows 0..positions[t] of sequence
// token_sequence[t] (block_tables: [sequences, max_blocks]); out: bf16 [tokens, heads,
// head_dim]. A thread block serves one token and up to 8 query heads of one key/value head, so
// each cached row is read once for the whole group. Twin: GqaPagedAttentionTwin.
absl::Status GqaPagedAttention(const __nv_bfloat16* queries, const __nv_bfloat16* cache,
                               const int32_t* block_tables, int max_blocks,
                               const int32_t* token_sequence, const int32_t* positions,
                               __nv_bfloat16* out, int tokens, const GqaShape& shape,
                               int block_size, float scale, cudaStream_t stream);

}  // namespace moeserve::kernels
