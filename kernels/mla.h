// MLA (multi-head latent attention) kernels of the GPU backend, in DeepSeek's absorbed form over
// a paged cache of latent rows. A cache row holds one token's normalized latent (`latent` values)
// followed by its rotated rope key (`rope` values), in bf16; a sequence's rows live in blocks of
// `block_size` rows named by its block table. Same conventions as kernels.h: raw device
// pointers, a stream, a status; fp32 math. Each kernel has a CPU twin (cpu_twins.h) and a GPU
// test comparing the two.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"

namespace moeserve::kernels {

// The widest latent (kv_lora_rank) MlaPagedAttention takes; DeepSeek-V2 and V3 use 512.
inline constexpr int kMaxMlaLatent = 512;

// Writes new tokens into the cache: row = [rmsnorm(kv[:latent]) * norm_weight,
// rope(kv[latent:], position)] for kv = kv_a[t] (fp32 [tokens, latent + rope]); the row goes to
// cache row index cache_rows[t]. cos/sin tables are [positions, rope / 2] (interleaved pairs).
absl::Status MlaWriteCache(const float* kv_a, const __nv_bfloat16* norm_weight, float eps,
                           const int32_t* positions, const int64_t* cache_rows,
                           const float* cos_table, const float* sin_table, __nv_bfloat16* cache,
                           int tokens, int latent, int rope, cudaStream_t stream);

// Rotates the rope part of each query head (q: [tokens, heads, nope + rope] bf16) by its token's
// position and stores it behind the latent part of the absorbed query
// (q_absorbed: [tokens, heads, latent + rope]).
absl::Status MlaQueryRope(const __nv_bfloat16* q, const int32_t* positions, const float* cos_table,
                          const float* sin_table, __nv_bfloat16* q_absorbed, int tokens, int heads,
                          int nope, int rope, int latent, cudaStream_t stream);

// Causal attention of each token's absorbed queries over its sequence's cached rows
// 0..positions[t]: out[t, h] = softmax(scale * q_absorbed[t, h] · rows) · rows[:, :latent].
// token_sequence[t] picks the block table (block_tables: [sequences, max_blocks]).
// latent <= kMaxMlaLatent; bf16 tensor cores (compute capability 8.0). With a workspace of
// MlaPagedAttentionWorkspaceBytes(latent) (for the current device), a batch too small to fill
// the GPU has its contexts split across blocks and merged; with none, each (token, 16 heads)
// is one block. The workspace belongs to the stream until the work is done.
absl::Status MlaPagedAttention(const __nv_bfloat16* q_absorbed, const __nv_bfloat16* cache,
                               const int32_t* block_tables, int max_blocks,
                               const int32_t* token_sequence, const int32_t* positions,
                               __nv_bfloat16* out, int tokens, int heads, int latent, int rope,
                               int block_size, float scale, float* workspace, cudaStream_t stream);
size_t MlaPagedAttentionWorkspaceBytes(int latent);

// y += x, elementwise over bf16 values (fp32 add, one rounding).
absl::Status AddInPlace(__nv_bfloat16* y, const __nv_bfloat16* x, int64_t count,
                        cudaStream_t stream);

}  // namespace moeserve::kernels
