// Kernels of the dispatch/combine benchmark (moeserve-dispatch-bench): routing (row of each
// (token, expert) pair in the send buffer), the permutation of token rows into that buffer, the
// weighted un-permutation of combine, and random fills. Only the benchmark calls these; the
// engine's own dispatch kernels live in kernels/. Stateless; each call enqueues on `stream`
// and returns the launch error.
//
// Send-buffer layout: chunk-major, then destination rank, then (token, k) order. A chunk is a
// range of ceil(num_tokens / num_chunks) tokens, so each chunk's rows for all ranks are packed
// in rank order and can be sent as one all-to-all-v while the next chunk is being permuted.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#ifdef __CUDACC__
#define MOESERVE_HOST_DEVICE __host__ __device__
#else
#define MOESERVE_HOST_DEVICE
#endif

namespace moeserve::kernels::dispatch_bench {

// (num_chunks * num_ranks) must not exceed this.
inline constexpr int kMaxRouteKeys = 64;

MOESERVE_HOST_DEVICE inline int TokensPerChunk(int num_tokens, int num_chunks) {
  return (num_tokens + num_chunks - 1) / num_chunks;
}
// The rank hosting `expert` when num_experts are spread evenly over num_ranks.
MOESERVE_HOST_DEVICE inline int RankOfExpert(int expert, int num_experts, int num_ranks) {
  return static_cast<int>(int64_t{expert} * num_ranks / num_experts);
}

// expert_ids: [num_tokens * top_k]. Writes pair_rows[num_tokens * top_k] (row of each pair in
// the send buffer) and send_counts[rank * num_chunks + chunk] (rows for that rank and chunk).
// Deterministic (no atomics decide the order).
cudaError_t LaunchRoute(const int32_t* expert_ids, int num_tokens, int top_k, int num_experts,
                        int num_ranks, int num_chunks, int32_t* pair_rows, int64_t* send_counts,
                        cudaStream_t stream);

// Copies token rows [token_begin, token_end) of `tokens` ([num_tokens, hidden] bf16) to their
// top_k rows of `send_rows`. hidden must be a multiple of 8.
cudaError_t LaunchPermuteRows(const uint16_t* tokens, int hidden, int top_k, int token_begin,
                              int token_end, const int32_t* pair_rows, uint16_t* send_rows,
                              cudaStream_t stream);

// out[t] = sum over k, in k order, of weights[t, k] * rows[pair_rows[t, k]] (fp32 sum, bf16
// result) for tokens [token_begin, token_end).
cudaError_t LaunchWeightedCombine(const uint16_t* rows, int hidden, int top_k, int token_begin,
                                  int token_end, const int32_t* pair_rows, const float* weights,
                                  uint16_t* out, cudaStream_t stream);

// Uniform values in [-scale, scale) as bf16, from a hash of (seed, index).
cudaError_t LaunchFillRandom(uint16_t* data, int64_t count, uint32_t seed, float scale,
                             cudaStream_t stream);

}  // namespace moeserve::kernels::dispatch_bench
