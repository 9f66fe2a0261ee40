#include <algorithm>
#include <cfloat>

#include "absl/strings/str_cat.h"
#include "kernels/gqa_attention.h"
#include "kernels/kernels.h"
#include "kernels/reductions.cuh"

namespace moeserve::kernels {
namespace {

constexpr int kWarp = kWarpSize;

// One block per token; warp w normalizes and rotates heads w, w + warps, ... (queries, then
// keys), each lane a few rotate-half pairs; then the block copies the values.
constexpr int kWriteThreads = 128;

__global__ void __launch_bounds__(kWriteThreads)
    GqaWriteCacheKernel(const float* qkv, const __nv_bfloat16* q_norm, const __nv_bfloat16* k_norm,
                        float eps, const int32_t* positions, const int64_t* cache_rows,
                        const float* cos_table, const float* sin_table, __nv_bfloat16* queries,
                        __nv_bfloat16* cache, GqaShape shape) {
  const int token = blockIdx.x;
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int dim = shape.head_dim;
  const int half = dim / 2;
  const int kv_dim = shape.kv_heads * dim;
  const float* projection = qkv + static_cast<size_t>(token) * shape.projection_dim();
  __nv_bfloat16* row = cache + cache_rows[token] * shape.row_dim();
  const float* cos_row = cos_table + static_cast<size_t>(positions[token]) * half;
  const float* sin_row = sin_table + static_cast<size_t>(positions[token]) * half;

  for (int head = warp; head < shape.heads + shape.kv_heads; head += blockDim.x / kWarp) {
    const bool is_query = head < shape.heads;
    const float* in = projection + static_cast<size_t>(head) * dim;
    const __nv_bfloat16* norm = is_query ? q_norm : k_norm;
    float inverse_rms = 1.0f;
    if (norm != nullptr) {
      float sum = 0.0f;
      for (int i = lane; i < dim; i += kWarp) sum += in[i] * in[i];
      inverse_rms = rsqrtf(WarpReduceSum(sum) / dim + eps);
    }
    __nv_bfloat16* out = is_query
                             ? queries + (static_cast<size_t>(token) * shape.heads + head) * dim
                             : row + static_cast<size_t>(head - shape.heads) * dim;
    for (int i = lane; i < half; i += kWarp) {
      float x = in[i] * inverse_rms;
      float y = in[i + half] * inverse_rms;
      if (norm != nullptr) {
        x *= __bfloat162float(norm[i]);
        y *= __bfloat162float(norm[i + half]);
      }
      out[i] = __float2bfloat16(x * cos_row[i] - y * sin_row[i]);
      out[i + half] = __float2bfloat16(y * cos_row[i] + x * sin_row[i]);
    }
  }
  const float* values = projection + static_cast<size_t>(shape.heads + shape.kv_heads) * dim;
  for (int i = threadIdx.x; i < kv_dim; i += blockDim.x) {
    row[kv_dim + i] = __float2bfloat16(values[i]);
  }
}

// Attention layout: a block serves one token and up to kHeadsPerBlock query heads of one
// key/value head (warp w scores head w), so each cached row is read once for the group. Rows
// stream through shared memory in tiles of 32 (one per lane when scoring), converted to fp32:
// keys with an odd stride so that lanes reading different rows hit different banks, values
// densely (threads read one column each). Online softmax: each warp keeps its head's running
// max and sum, and every thread accumulates its share of the group's outputs, rescaled when the
// max moves.
constexpr int kHeadsPerBlock = 8;
constexpr int kTileRows = kWarp;
constexpr int kMaxOutputsPerThread = kMaxGqaHeadDim / kWarp;  // outputs = warps * head_dim
constexpr int kBf16PerLoad = 8;                               // one 16-byte load

size_t AttentionSharedBytes(int warps, int dim) {
  return sizeof(float) * (static_cast<size_t>(warps) * dim +            // queries
                          static_cast<size_t>(kTileRows) * (dim + 1) +  // keys
                          static_cast<size_t>(kTileRows) * dim +        // values
                          static_cast<size_t>(warps) * kTileRows +      // probabilities
                          2 * static_cast<size_t>(warps));              // rescale, sums
}

__global__ void __launch_bounds__(kHeadsPerBlock* kWarp)
    GqaPagedAttentionKernel(const __nv_bfloat16* queries, const __nv_bfloat16* cache,
                            const int32_t* block_tables, int max_blocks,
                            const int32_t* token_sequence, const int32_t* positions,
                            __nv_bfloat16* out, GqaShape shape, int block_size, float scale) {
  extern __shared__ float shared[];
  const int dim = shape.head_dim;
  const int warps = blockDim.x / kWarp;
  const int key_stride = dim + 1;
  float* query_tile = shared;                          // [warps, dim]
  float* keys = query_tile + warps * dim;              // [kTileRows, key_stride]
  float* values = keys + kTileRows * key_stride;       // [kTileRows, dim]
  float* probabilities = values + kTileRows * dim;     // [warps, kTileRows]
  float* rescale = probabilities + warps * kTileRows;  // [warps]
  float* sums = rescale + warps;                       // [warps]

  const int token = blockIdx.x;
  const int chunks_per_kv_head = (shape.heads_per_kv() + warps - 1) / warps;
  const int kv_head = blockIdx.y / chunks_per_kv_head;
  const int first_in_group = (blockIdx.y % chunks_per_kv_head) * warps;
  const int heads_here = min(warps, shape.heads_per_kv() - first_in_group);
  const int first_head = kv_head * shape.heads_per_kv() + first_in_group;
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int context = positions[token] + 1;
  const int32_t* table = block_tables + static_cast<size_t>(token_sequence[token]) * max_blocks;
  const int row_dim = shape.row_dim();
  const int kv_dim = shape.kv_heads * dim;

  for (int i = threadIdx.x; i < warps * dim; i += blockDim.x) {
    const int head = i / dim;
    query_tile[i] =
        head < heads_here
            ? __bfloat162float(
                  queries[(static_cast<size_t>(token) * shape.heads + first_head + head) * dim +
                          i % dim])
            : 0.0f;
  }
  const bool warp_head_valid = warp < heads_here;
  float running_max = -FLT_MAX;
  float running_sum = 0.0f;
  float accumulator[kMaxOutputsPerThread];
#pragma unroll
  for (int i = 0; i < kMaxOutputsPerThread; ++i) accumulator[i] = 0.0f;
  const int outputs = warps * dim;
  const int loads_per_half = dim / kBf16PerLoad;  // 16-byte loads of a key (or a value)

  for (int start = 0; start < context; start += kTileRows) {
    __syncthreads();  // the previous tile is fully consumed
    const int rows = min(kTileRows, context - start);
    for (int i = threadIdx.x; i < rows * 2 * loads_per_half; i += blockDim.x) {
      const int j = i / (2 * loads_per_half);
      const int load = i % (2 * loads_per_half);
      const bool is_value = load >= loads_per_half;
      const int offset = (load % loads_per_half) * kBf16PerLoad;
      const int position = start + j;
      const int64_t row =
          static_cast<int64_t>(table[position / block_size]) * block_size + position % block_size;
      const uint4 packed =
          *reinterpret_cast<const uint4*>(cache + row * row_dim + (is_value ? kv_dim : 0) +
                                          static_cast<size_t>(kv_head) * dim + offset);
      const auto* pairs = reinterpret_cast<const __nv_bfloat162*>(&packed);
      float* destination = is_value ? values + j * dim + offset : keys + j * key_stride + offset;
#pragma unroll
      for (int p = 0; p < kBf16PerLoad / 2; ++p) {
        const float2 pair = __bfloat1622float2(pairs[p]);
        destination[2 * p] = pair.x;
        destination[2 * p + 1] = pair.y;
      }
    }
    __syncthreads();
    float score = -FLT_MAX;
    if (warp_head_valid && lane < rows) {
      const float* query = query_tile + warp * dim;
      const float* key = keys + lane * key_stride;
      float dot = 0.0f;
      for (int d = 0; d < dim; ++d) dot += query[d] * key[d];
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
      const int k = threadIdx.x + i * blockDim.x;
      if (k < outputs) {
        const int head = k / dim;
        const int d = k % dim;
        float value = accumulator[i] * rescale[head];
        for (int j = 0; j < rows; ++j) {
          value += probabilities[head * kTileRows + j] * values[j * dim + d];
        }
        accumulator[i] = value;
      }
    }
  }
  if (lane == 0) sums[warp] = running_sum;
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kMaxOutputsPerThread; ++i) {
    const int k = threadIdx.x + i * blockDim.x;
    if (k < outputs && k / dim < heads_here) {
      out[(static_cast<size_t>(token) * shape.heads + first_head + k / dim) * dim + k % dim] =
          __float2bfloat16(accumulator[i] / sums[k / dim]);
    }
  }
}

absl::Status Launched(const char* what) { return CudaStatus(cudaGetLastError(), what); }

}  // namespace

absl::Status CheckGqaShape(const GqaShape& shape) {
  if (shape.heads <= 0 || shape.kv_heads <= 0 || shape.heads % shape.kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("GQA: ", shape.heads,
                                                   " query heads are not a multiple of ",
                                                   shape.kv_heads, " key/value heads"));
  }
  if (shape.head_dim <= 0 || shape.head_dim % kBf16PerLoad != 0 ||
      shape.head_dim > kMaxGqaHeadDim) {
    return absl::InvalidArgumentError(absl::StrCat("GQA: head_dim ", shape.head_dim,
                                                   " is not a multiple of ", kBf16PerLoad,
                                                   " up to ", kMaxGqaHeadDim));
  }
  return absl::OkStatus();
}

absl::Status GqaWriteCache(const float* qkv, const __nv_bfloat16* q_norm,
                           const __nv_bfloat16* k_norm, float eps, const int32_t* positions,
                           const int64_t* cache_rows, const float* cos_table,
                           const float* sin_table, __nv_bfloat16* queries, __nv_bfloat16* cache,
                           int tokens, const GqaShape& shape, cudaStream_t stream) {
  if (auto status = CheckGqaShape(shape); !status.ok()) return status;
  if (tokens == 0) return absl::OkStatus();
  GqaWriteCacheKernel<<<tokens, kWriteThreads, 0, stream>>>(
      qkv, q_norm, k_norm, eps, positions, cache_rows, cos_table, sin_table, queries, cache, shape);
  return Launched("GqaWriteCache");
}

absl::Status GqaPagedAttention(const __nv_bfloat16* queries, const __nv_bfloat16* cache,
                               const int32_t* block_tables, int max_blocks,
                               const int32_t* token_sequence, const int32_t* positions,
                               __nv_bfloat16* out, int tokens, const GqaShape& shape,
                               int block_size, float scale, cudaStream_t stream) {
  if (auto status = CheckGqaShape(shape); !status.ok()) return status;
  if (tokens == 0) return absl::OkStatus();
  // As many warps as the group has query heads, up to kHeadsPerBlock; larger groups take
  // several blocks per key/value head.
  const int warps = std::min(shape.heads_per_kv(), kHeadsPerBlock);
  const int chunks_per_kv_head = (shape.heads_per_kv() + warps - 1) / warps;
  const size_t shared_bytes = AttentionSharedBytes(warps, shape.head_dim);
  // Above 48 KiB of dynamic shared memory (head_dim above 128) a kernel must opt in; the
  // attribute is per kernel and device, and setting it again is cheap.
  if (auto status = CudaStatus(
          cudaFuncSetAttribute(GqaPagedAttentionKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(shared_bytes)),
          "GqaPagedAttention shared memory");
      !status.ok()) {
    return status;
  }
  const dim3 grid(tokens, shape.kv_heads * chunks_per_kv_head);
  GqaPagedAttentionKernel<<<grid, warps * kWarp, shared_bytes, stream>>>(
      queries, cache, block_tables, max_blocks, token_sequence, positions, out, shape, block_size,
      scale);
  return Launched("GqaPagedAttention");
}

}  // namespace moeserve::kernels
