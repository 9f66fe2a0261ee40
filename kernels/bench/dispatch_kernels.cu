#include <cuda_bf16.h>

#include <algorithm>
#include <cub/block/block_scan.cuh>

#include "kernels/bench/dispatch_kernels.h"

namespace moeserve::kernels::dispatch_bench {
namespace {

constexpr int kRouteThreads = 1024;
constexpr int kRowThreads = 256;
constexpr int kMaxTopK = 16;

// One block: pairs are split into contiguous per-thread ranges, and for each (chunk, rank) key
// in order a block-wide exclusive scan of the per-thread counts gives every pair its row. The
// number of keys is small (chunks x ranks), so the loop costs microseconds.
__global__ void RouteKernel(const int32_t* expert_ids, int num_tokens, int top_k, int num_experts,
                            int num_ranks, int num_chunks, int32_t* pair_rows,
                            int64_t* send_counts) {
  using Scan = cub::BlockScan<int, kRouteThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  const int num_pairs = num_tokens * top_k;
  const int per_thread = (num_pairs + kRouteThreads - 1) / kRouteThreads;
  const int begin = min(static_cast<int>(threadIdx.x) * per_thread, num_pairs);
  const int end = min(begin + per_thread, num_pairs);
  const int tokens_per_chunk = TokensPerChunk(num_tokens, num_chunks);
  auto key_of = [&](int pair) {
    const int chunk = (pair / top_k) / tokens_per_chunk;
    return chunk * num_ranks + RankOfExpert(expert_ids[pair], num_experts, num_ranks);
  };
  int rows_before = 0;
  for (int chunk = 0; chunk < num_chunks; ++chunk) {
    for (int rank = 0; rank < num_ranks; ++rank) {
      const int key = chunk * num_ranks + rank;
      int mine = 0;
      for (int pair = begin; pair < end; ++pair) mine += key_of(pair) == key;
      int offset = 0, total = 0;
      Scan(scan_storage).ExclusiveSum(mine, offset, total);
      __syncthreads();  // scan_storage is reused by the next key
      if (mine > 0) {
        int row = rows_before + offset;
        for (int pair = begin; pair < end; ++pair) {
          if (key_of(pair) == key) pair_rows[pair] = row++;
        }
      }
      if (threadIdx.x == 0) send_counts[rank * num_chunks + chunk] = total;
      rows_before += total;
    }
  }
}

__global__ void PermuteRowsKernel(const uint4* tokens, int vectors_per_row, int top_k,
                                  int token_begin, const int32_t* pair_rows, uint4* send_rows) {
  __shared__ int32_t rows[kMaxTopK];
  const int64_t token = token_begin + blockIdx.x;
  if (threadIdx.x < top_k) rows[threadIdx.x] = pair_rows[token * top_k + threadIdx.x];
  __syncthreads();
  // Each token row is read once and written to its top_k destinations.
  const uint4* source = tokens + token * vectors_per_row;
  for (int v = threadIdx.x; v < vectors_per_row; v += blockDim.x) {
    const uint4 value = source[v];
    for (int k = 0; k < top_k; ++k) send_rows[int64_t{rows[k]} * vectors_per_row + v] = value;
  }
}

__global__ void WeightedCombineKernel(const uint4* rows, int vectors_per_row, int top_k,
                                      int token_begin, const int32_t* pair_rows,
                                      const float* weights, uint4* out) {
  __shared__ int32_t row_of[kMaxTopK];
  __shared__ float weight_of[kMaxTopK];
  const int64_t token = token_begin + blockIdx.x;
  if (threadIdx.x < top_k) {
    row_of[threadIdx.x] = pair_rows[token * top_k + threadIdx.x];
    weight_of[threadIdx.x] = weights[token * top_k + threadIdx.x];
  }
  __syncthreads();
  for (int v = threadIdx.x; v < vectors_per_row; v += blockDim.x) {
    float sum[8] = {};
    // In the token's own top-k order, so the result never depends on arrival order.
    for (int k = 0; k < top_k; ++k) {
      const uint4 packed = rows[int64_t{row_of[k]} * vectors_per_row + v];
      const __nv_bfloat16* values = reinterpret_cast<const __nv_bfloat16*>(&packed);
      for (int j = 0; j < 8; ++j) {
        sum[j] = __fadd_rn(sum[j], __fmul_rn(weight_of[k], __bfloat162float(values[j])));
      }
    }
    uint4 result;
    __nv_bfloat16* result_values = reinterpret_cast<__nv_bfloat16*>(&result);
    for (int j = 0; j < 8; ++j) result_values[j] = __float2bfloat16_rn(sum[j]);
    out[token * vectors_per_row + v] = result;
  }
}

__global__ void FillRandomKernel(__nv_bfloat16* data, int64_t count, uint32_t seed, float scale) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x) {
    uint64_t x = (uint64_t{seed} << 40) ^ static_cast<uint64_t>(i);
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    const float unit = static_cast<float>(x >> 40) * (1.0f / 16777216.0f);  // [0, 1)
    data[i] = __float2bfloat16_rn((2.0f * unit - 1.0f) * scale);
  }
}

}  // namespace

cudaError_t LaunchRoute(const int32_t* expert_ids, int num_tokens, int top_k, int num_experts,
                        int num_ranks, int num_chunks, int32_t* pair_rows, int64_t* send_counts,
                        cudaStream_t stream) {
  if (num_tokens < 0 || top_k < 1 || top_k > kMaxTopK || num_ranks < 1 || num_chunks < 1 ||
      num_chunks * num_ranks > kMaxRouteKeys || num_experts < num_ranks) {
    return cudaErrorInvalidValue;
  }
  RouteKernel<<<1, kRouteThreads, 0, stream>>>(expert_ids, num_tokens, top_k, num_experts,
                                               num_ranks, num_chunks, pair_rows, send_counts);
  return cudaGetLastError();
}

cudaError_t LaunchPermuteRows(const uint16_t* tokens, int hidden, int top_k, int token_begin,
                              int token_end, const int32_t* pair_rows, uint16_t* send_rows,
                              cudaStream_t stream) {
  if (hidden % 8 != 0 || top_k < 1 || top_k > kMaxTopK) return cudaErrorInvalidValue;
  if (token_end <= token_begin) return cudaSuccess;
  PermuteRowsKernel<<<token_end - token_begin, kRowThreads, 0, stream>>>(
      reinterpret_cast<const uint4*>(tokens), hidden / 8, top_k, token_begin, pair_rows,
      reinterpret_cast<uint4*>(send_rows));
  return cudaGetLastError();
}

cudaError_t LaunchWeightedCombine(const uint16_t* rows, int hidden, int top_k, int token_begin,
                                  int token_end, const int32_t* pair_rows, const float* weights,
                                  uint16_t* out, cudaStream_t stream) {
  if (hidden % 8 != 0 || top_k < 1 || top_k > kMaxTopK) return cudaErrorInvalidValue;
  if (token_end <= token_begin) return cudaSuccess;
  WeightedCombineKernel<<<token_end - token_begin, kRowThreads, 0, stream>>>(
      reinterpret_cast<const uint4*>(rows), hidden / 8, top_k, token_begin, pair_rows, weights,
      reinterpret_cast<uint4*>(out));
  return cudaGetLastError();
}

cudaError_t LaunchFillRandom(uint16_t* data, int64_t count, uint32_t seed, float scale,
                             cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((count + 255) / 256, 65536);
  FillRandomKernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
      reinterpret_cast<__nv_bfloat16*>(data), count, seed, scale);
  return cudaGetLastError();
}

}  // namespace moeserve::kernels::dispatch_bench
