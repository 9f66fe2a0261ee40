// CUDA kernels of the GPU backend, behind a narrow API: raw device pointers, sizes and a stream;
// each returns a status. bf16 storage (as __nv_bfloat16), fp32 accumulation. Every kernel has a
// CPU twin in cpu_twins.h and a GPU test comparing the two on random inputs (tests/gpu/).
// Thread-safe as far as CUDA streams are: callers own their streams.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/cpu_twins.h"

namespace moeserve::kernels {

absl::Status CudaStatus(cudaError_t error, const char* what);

absl::Status RmsNorm(const __nv_bfloat16* x, const __nv_bfloat16* weight, __nv_bfloat16* out,
                     int rows, int dim, float eps, cudaStream_t stream);
absl::Status SiluMul(const __nv_bfloat16* gate_up, __nv_bfloat16* out, int rows, int inter,
                     cudaStream_t stream);
absl::Status RopeInterleaved(float* vectors, const int32_t* positions, const float* cos_table,
                             const float* sin_table, int rows, int heads, int dim,
                             cudaStream_t stream);
absl::Status Embedding(const __nv_bfloat16* table, const int32_t* ids, __nv_bfloat16* out, int rows,
                       int hidden, cudaStream_t stream);
// Scores, group selection and top-k in one kernel (one warp per token); experts <= 1024,
// top_k <= 32, groups <= 32.
absl::Status GateTopK(const float* logits, const float* bias, int tokens,
                      const GateOptions& options, int32_t* experts, float* weights,
                      cudaStream_t stream);
absl::Status PermuteRows(const __nv_bfloat16* x, const int32_t* source_rows, __nv_bfloat16* out,
                         int rows, int hidden, cudaStream_t stream);
// The same, except that a row whose source is negative is left as it is (the device-planned
// exchange's unused and header rows, device_exchange.h).
absl::Status GatherRows(const __nv_bfloat16* x, const int32_t* source_rows, __nv_bfloat16* out,
                        int64_t rows, int hidden, cudaStream_t stream);
// Deterministic random bf16 values, uniform with standard deviation `scale`: value i depends
// only on (seed, i). Generates weights on the GPU that never exist on the host.
absl::Status FillRandomBf16(__nv_bfloat16* out, int64_t count, uint64_t seed, float scale,
                            cudaStream_t stream);
absl::Status WeightedUnpermute(const __nv_bfloat16* expert_rows, const int32_t* position,
                               const float* weights, const __nv_bfloat16* shared,
                               __nv_bfloat16* out, int tokens, int top_k, int hidden,
                               cudaStream_t stream);

}  // namespace moeserve::kernels
