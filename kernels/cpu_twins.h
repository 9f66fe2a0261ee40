// CPU twins of the CUDA kernels in kernels.h: the same operations, on host memory, in the same
// data types (bf16 stored as uint16_t, fp32 accumulation). They are the reference each kernel is
// tested against, and they build and run without CUDA.
// Stateless functions; thread-safe.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/bf16.h"
#include "kernels/exchange_shape.h"
#include "kernels/logit_head.h"

namespace moeserve::kernels {

// out[r] = x[r] / rms(x[r]) * weight, bf16 in and out, fp32 accumulation.
void RmsNormTwin(const uint16_t* x, const uint16_t* weight, uint16_t* out, int rows, int dim,
                 float eps);
// gate_up [rows, 2 * inter] (gate then up) -> out [rows, inter] = silu(gate) * up.
void SiluMulTwin(const uint16_t* gate_up, uint16_t* out, int rows, int inter);
// Rotates interleaved pairs of `vectors` [rows, heads, dim] by positions[row] with
// cos/sin tables [max_positions, dim / 2] (fp32 data, in place).
void RopeInterleavedTwin(float* vectors, const int32_t* positions, const float* cos_table,
                         const float* sin_table, int rows, int heads, int dim);
// out[i] = table[ids[i]] (rows of `hidden` bf16 values).
void EmbeddingTwin(const uint16_t* table, const int32_t* ids, uint16_t* out, int rows, int hidden);

struct GateOptions {
  int num_experts = 256;
  int top_k = 8;
  int num_groups = 8;
  int topk_groups = 4;
  bool sigmoid = true;               // else softmax
  bool group_score_top2_sum = true;  // DeepSeek-V3; else the group's best score (V2)
  bool normalize = true;
  float scaling = 2.5f;
};
// Group-limited top-k routing from fp32 logits [tokens, experts] (+ optional correction bias,
// used for the choice only): experts [tokens, top_k] best first, weights [tokens, top_k].
void GateTopKTwin(const float* logits, const float* bias, int tokens, const GateOptions& options,
                  int32_t* experts, float* weights);
// out[i] = x[source_rows[i]] (bf16 rows).
void PermuteRowsTwin(const uint16_t* x, const int32_t* source_rows, uint16_t* out, int rows,
                     int hidden);
// out[t] = sum over k (in order) of weights[t,k] * expert_rows[position[t * top_k + k]], plus
// shared[t] when given; fp32 accumulation, bf16 out.
void WeightedUnpermuteTwin(const uint16_t* expert_rows, const int32_t* position,
                           const float* weights, const uint16_t* shared, uint16_t* out, int tokens,
                           int top_k, int hidden);
// Y[M, N] = X[M, K] · W[N, K]^T for each expert's row range (bf16 in, fp32 accumulate, bf16 out):
// rows [offsets[e], offsets[e+1]) use weight matrix `weights[e]`.
void GroupedLinearTwin(const uint16_t* x, const std::vector<const uint16_t*>& weights,
                       const std::vector<int64_t>& offsets, uint16_t* y, int n, int k);

// Twin of PlanSlots (device_moe.h), with the rows of a slot in pair order (the kernel's order
// inside a slot may differ; nothing it computes depends on it): pair p = t * top_k + j of expert
// e is served by slot replica_slots[replica_begin[e] + t % count(e)]; offsets [slots + 1],
// source_rows (the token of each grouped row), positions (the grouped row of each pair), and
// load[s] += rows of slot s.
void PlanSlotsTwin(const int32_t* experts, int tokens, int top_k, const int32_t* replica_begin,
                   const int32_t* replica_slots, int slots, int32_t* offsets, int32_t* source_rows,
                   int32_t* positions, int32_t* load);

// Twins of PlanDestinations and PlanReceived (device_exchange.h), on the same buffers in host
// memory (bf16 rows as uint16_t, headers inside them); PlanReceivedTwin groups a slot's rows in
// entry order (the kernel's order inside a slot may differ; nothing depends on it).
void PlanDestinationsTwin(const int32_t* experts, int tokens, int top_k,
                          const int32_t* replica_begin, const int32_t* replica_slots,
                          int slots_per_rank, int rank, const ExchangeShape& shape,
                          uint16_t* dispatch, int32_t* dispatch_index, int32_t* positions);
void PlanReceivedTwin(const uint16_t* received, const ExchangeShape& shape, int slots,
                      int32_t* offsets, int32_t* source_rows, int32_t* grouped_rows, int32_t* load,
                      int32_t* overflow);

// Twin of FillRandomBf16.
void FillRandomBf16Twin(uint16_t* out, int64_t count, uint64_t seed, float scale);
// The value FillRandomBf16 puts at index i, before bf16 rounding (host and device share it).
#ifdef __CUDACC__
#define MOESERVE_HOST_DEVICE __host__ __device__
#else
#define MOESERVE_HOST_DEVICE
#endif
MOESERVE_HOST_DEVICE inline float RandomUniformValue(uint64_t seed, int64_t index, float scale) {
  // splitmix64 of (seed, index): a well-mixed 64-bit hash, then 24 bits to [-1, 1).
  uint64_t z = seed + static_cast<uint64_t>(index) * 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  const float unit = static_cast<float>(z >> 40) * (2.0f / 16777216.0f) - 1.0f;
  return unit * scale * 1.7320508f;  // uniform on [-sqrt(3), sqrt(3)] has unit variance
}

// --- MLA (twins of mla.h) ---
// Cache rows: [rmsnorm(kv_a[t, :latent]) * norm_weight, rope(kv_a[t, latent:], positions[t])]
// written to row cache_rows[t] of `cache` (bf16, rows of latent + rope values).
void MlaWriteCacheTwin(const float* kv_a, const uint16_t* norm_weight, float eps,
                       const int32_t* positions, const int64_t* cache_rows, const float* cos_table,
                       const float* sin_table, uint16_t* cache, int tokens, int latent, int rope);
// q_absorbed[t, h, latent:] = rope(q[t, h, nope:], positions[t]).
void MlaQueryRopeTwin(const uint16_t* q, const int32_t* positions, const float* cos_table,
                      const float* sin_table, uint16_t* q_absorbed, int tokens, int heads, int nope,
                      int rope, int latent);
// out[t, h] = softmax(scale * q_absorbed[t, h] · rows) · rows[:, :latent] over the rows of
// positions 0..positions[t] of sequence token_sequence[t] (paged through block_tables).
void MlaPagedAttentionTwin(const uint16_t* q_absorbed, const uint16_t* cache,
                           const int32_t* block_tables, int max_blocks,
                           const int32_t* token_sequence, const int32_t* positions, uint16_t* out,
                           int tokens, int heads, int latent, int rope, int block_size,
                           float scale);

// --- Sampling (twin of sampling.h) ---
// Each row's head (largest logits first, ties to the lower id) and kept weight, as LogitHeads.
void LogitHeadsTwin(const float* logits, int rows, int vocab, const LogitHeadParams* params,
                    int32_t* ids, float* values, double* kept_weight);

}  // namespace moeserve::kernels
