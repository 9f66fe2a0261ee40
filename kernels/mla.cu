#include <cfloat>

#include "kernels/kernels.h"
#include "kernels/mla.h"
#include "kernels/reductions.cuh"

namespace moeserve::kernels {
namespace {

constexpr int kWarp = kWarpSize;

// One block per token: the latent's RMSNorm needs a reduction over the row.
__global__ void MlaWriteCacheKernel(const float* kv_a, const __nv_bfloat16* norm_weight, float eps,
                                    const int32_t* positions, const int64_t* cache_rows,
                                    const float* cos_table, const float* sin_table,
                                    __nv_bfloat16* cache, int latent, int rope) {
  const int token = blockIdx.x;
  const int row_dim = latent + rope;
  const float* in = kv_a + static_cast<size_t>(token) * row_dim;
  __nv_bfloat16* out = cache + cache_rows[token] * row_dim;
  float sum = 0;
  for (int i = threadIdx.x; i < latent; i += blockDim.x) sum += in[i] * in[i];
  const float inv = BlockInverseRms(sum, latent, eps);
  for (int i = threadIdx.x; i < latent; i += blockDim.x) {
    out[i] = __float2bfloat16(in[i] * inv * __bfloat162float(norm_weight[i]));
  }
  const int half = rope / 2;
  const float* cos_row = cos_table + static_cast<size_t>(positions[token]) * half;
  const float* sin_row = sin_table + static_cast<size_t>(positions[token]) * half;
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float x = in[latent + 2 * i];
    const float y = in[latent + 2 * i + 1];
    out[latent + 2 * i] = __float2bfloat16(x * cos_row[i] - y * sin_row[i]);
    out[latent + 2 * i + 1] = __float2bfloat16(y * cos_row[i] + x * sin_row[i]);
  }
}

__global__ void MlaQueryRopeKernel(const __nv_bfloat16* q, const int32_t* positions,
                                   const float* cos_table, const float* sin_table,
                                   __nv_bfloat16* q_absorbed, int heads, int nope, int rope,
                                   int latent) {
  const int token = blockIdx.x;
  const int half = rope / 2;
  const float* cos_row = cos_table + static_cast<size_t>(positions[token]) * half;
  const float* sin_row = sin_table + static_cast<size_t>(positions[token]) * half;
  for (int i = threadIdx.x; i < heads * half; i += blockDim.x) {
    const int head = i / half;
    const int pair = i % half;
    const __nv_bfloat16* in =
        q + (static_cast<size_t>(token) * heads + head) * (nope + rope) + nope + 2 * pair;
    __nv_bfloat16* out = q_absorbed +
                         (static_cast<size_t>(token) * heads + head) * (latent + rope) + latent +
                         2 * pair;
    const float x = __bfloat162float(in[0]);
    const float y = __bfloat162float(in[1]);
    out[0] = __float2bfloat16(x * cos_row[pair] - y * sin_row[pair]);
    out[1] = __float2bfloat16(y * cos_row[pair] + x * sin_row[pair]);
  }
}

// Attention layout: a block serves one token and kHeadsPerBlock of its heads, so each cached
// row is read once per block rather than once per head. Rows stream through shared memory in
// tiles of 32 (one per lane); warp w scores head w against the tile, keeps a running max and
// sum (online softmax), and every thread accumulates its share of the heads' latent outputs.
constexpr int kHeadsPerBlock = 8;
constexpr int kTileRows = kWarp;
constexpr int kAttentionThreads = kHeadsPerBlock * kWarp;
constexpr int kMaxOutputsPerThread = 32;  // kHeadsPerBlock * latent <= 32 * 256

size_t AttentionSharedBytes(int row_dim) {
  return sizeof(float) * (static_cast<size_t>(kHeadsPerBlock) * row_dim +
                          static_cast<size_t>(kTileRows) * (row_dim + 1) +
                          kHeadsPerBlock * kTileRows + 2 * kHeadsPerBlock);
}

__global__ void __launch_bounds__(kAttentionThreads)
    MlaPagedAttentionKernel(const __nv_bfloat16* q_absorbed, const __nv_bfloat16* cache,
                            const int32_t* block_tables, int max_blocks,
                            const int32_t* token_sequence, const int32_t* positions,
                            __nv_bfloat16* out, int heads, int latent, int rope, int block_size,
                            float scale) {
  extern __shared__ float shared[];
  const int row_dim = latent + rope;
  const int tile_stride =
      row_dim + 1;          // odd stride: lanes reading different rows hit different banks
  float* queries = shared;  // [kHeadsPerBlock, row_dim]
  float* tile = queries + kHeadsPerBlock * row_dim;             // [kTileRows, tile_stride]
  float* probabilities = tile + kTileRows * tile_stride;        // [kHeadsPerBlock, kTileRows]
  float* rescale = probabilities + kHeadsPerBlock * kTileRows;  // [kHeadsPerBlock]
  float* sums = rescale + kHeadsPerBlock;                       // [kHeadsPerBlock]

  const int token = blockIdx.x;
  const int first_head = blockIdx.y * kHeadsPerBlock;
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int context = positions[token] + 1;
  const int32_t* table = block_tables + static_cast<size_t>(token_sequence[token]) * max_blocks;

  for (int i = threadIdx.x; i < kHeadsPerBlock * row_dim; i += blockDim.x) {
    const int head = first_head + i / row_dim;
    queries[i] =
        head < heads
            ? __bfloat162float(
                  q_absorbed[(static_cast<size_t>(token) * heads + head) * row_dim + i % row_dim])
            : 0.0f;
  }
  const bool warp_head_valid = first_head + warp < heads;
  float running_max = -FLT_MAX;
  float running_sum = 0.0f;
  float accumulator[kMaxOutputsPerThread];
#pragma unroll
  for (int i = 0; i < kMaxOutputsPerThread; ++i) accumulator[i] = 0.0f;
  const int outputs = kHeadsPerBlock * latent;

  for (int start = 0; start < context; start += kTileRows) {
    __syncthreads();  // the previous tile is fully consumed
    const int rows = min(kTileRows, context - start);
    for (int i = threadIdx.x; i < rows * row_dim; i += blockDim.x) {
      const int j = i / row_dim;
      const int position = start + j;
      const int64_t row =
          static_cast<int64_t>(table[position / block_size]) * block_size + position % block_size;
      tile[j * tile_stride + i % row_dim] = __bfloat162float(cache[row * row_dim + i % row_dim]);
    }
    __syncthreads();
    float score = -FLT_MAX;
    if (warp_head_valid && lane < rows) {
      const float* query = queries + warp * row_dim;
      const float* key = tile + lane * tile_stride;
      float dot = 0.0f;
      for (int d = 0; d < row_dim; ++d) dot += query[d] * key[d];
      score = dot * scale;
    }
    const float new_max = fmaxf(running_max, WarpReduceMax(score));
    const float p = lane < rows && warp_head_valid ? __expf(score - new_max) : 0.0f;
    const float factor = __expf(running_max - new_max);
    running_sum = running_sum * factor + WarpReduceSum(p);
    running_max = new_max;
    probabilities[warp * kTileRows + lane] = p;
    if (lane == 0) rescale[warp] = factor;
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kMaxOutputsPerThread; ++i) {
      const int k = threadIdx.x + i * kAttentionThreads;
      if (k < outputs) {
        const int head = k / latent;
        const int d = k % latent;
        float value = accumulator[i] * rescale[head];
        for (int j = 0; j < rows; ++j) {
          value += probabilities[head * kTileRows + j] * tile[j * tile_stride + d];
        }
        accumulator[i] = value;
      }
    }
  }
  if (lane == 0) sums[warp] = running_sum;
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kMaxOutputsPerThread; ++i) {
    const int k = threadIdx.x + i * kAttentionThreads;
    if (k < outputs) {
      const int head = first_head + k / latent;
      if (head < heads) {
        out[(static_cast<size_t>(token) * heads + head) * latent + k % latent] =
            __float2bfloat16(accumulator[i] / sums[k / latent]);
      }
    }
  }
}

__global__ void AddInPlaceKernel(__nv_bfloat16* y, const __nv_bfloat16* x, int64_t count) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    y[i] = __float2bfloat16(__bfloat162float(y[i]) + __bfloat162float(x[i]));
  }
}

absl::Status Launched(const char* what) { return CudaStatus(cudaGetLastError(), what); }

}  // namespace

absl::Status MlaWriteCache(const float* kv_a, const __nv_bfloat16* norm_weight, float eps,
                           const int32_t* positions, const int64_t* cache_rows,
                           const float* cos_table, const float* sin_table, __nv_bfloat16* cache,
                           int tokens, int latent, int rope, cudaStream_t stream) {
  if (tokens == 0) return absl::OkStatus();
  MlaWriteCacheKernel<<<tokens, 128, 0, stream>>>(kv_a, norm_weight, eps, positions, cache_rows,
                                                  cos_table, sin_table, cache, latent, rope);
  return Launched("MlaWriteCache");
}

absl::Status MlaQueryRope(const __nv_bfloat16* q, const int32_t* positions, const float* cos_table,
                          const float* sin_table, __nv_bfloat16* q_absorbed, int tokens, int heads,
                          int nope, int rope, int latent, cudaStream_t stream) {
  if (tokens == 0) return absl::OkStatus();
  MlaQueryRopeKernel<<<tokens, 256, 0, stream>>>(q, positions, cos_table, sin_table, q_absorbed,
                                                 heads, nope, rope, latent);
  return Launched("MlaQueryRope");
}

absl::Status MlaPagedAttention(const __nv_bfloat16* q_absorbed, const __nv_bfloat16* cache,
                               const int32_t* block_tables, int max_blocks,
                               const int32_t* token_sequence, const int32_t* positions,
                               __nv_bfloat16* out, int tokens, int heads, int latent, int rope,
                               int block_size, float scale, cudaStream_t stream) {
  if (tokens == 0) return absl::OkStatus();
  if (latent > kMaxOutputsPerThread * kAttentionThreads / kHeadsPerBlock) {
    return absl::InvalidArgumentError("MlaPagedAttention: kv_lora_rank above 1024");
  }
  const size_t shared_bytes = AttentionSharedBytes(latent + rope);
  // Above 48 KiB of dynamic shared memory a kernel must opt in; the attribute is per kernel and
  // device, and setting it again is cheap.
  if (auto s = CudaStatus(
          cudaFuncSetAttribute(MlaPagedAttentionKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(shared_bytes)),
          "MlaPagedAttention shared memory");
      !s.ok()) {
    return s;
  }
  const dim3 grid(tokens, (heads + kHeadsPerBlock - 1) / kHeadsPerBlock);
  MlaPagedAttentionKernel<<<grid, kAttentionThreads, shared_bytes, stream>>>(
      q_absorbed, cache, block_tables, max_blocks, token_sequence, positions, out, heads, latent,
      rope, block_size, scale);
  return Launched("MlaPagedAttention");
}

absl::Status AddInPlace(__nv_bfloat16* y, const __nv_bfloat16* x, int64_t count,
                        cudaStream_t stream) {
  if (count == 0) return absl::OkStatus();
  const int blocks = static_cast<int>(std::min<int64_t>((count + 255) / 256, 65535 * 8));
  AddInPlaceKernel<<<blocks, 256, 0, stream>>>(y, x, count);
  return Launched("AddInPlace");
}

}  // namespace moeserve::kernels
