#include <cfloat>

#include "absl/strings/str_cat.h"
#include "kernels/kernels.h"
#include "kernels/reductions.cuh"

namespace moeserve::kernels {
namespace {

constexpr int kWarp = kWarpSize;

__global__ void RmsNormKernel(const __nv_bfloat16* x, const __nv_bfloat16* weight,
                              __nv_bfloat16* out, int dim, float eps) {
  const __nv_bfloat16* row = x + static_cast<size_t>(blockIdx.x) * dim;
  float sum = 0;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    const float v = __bfloat162float(row[i]);
    sum += v * v;
  }
  const float inv = BlockInverseRms(sum, dim, eps);
  __nv_bfloat16* dst = out + static_cast<size_t>(blockIdx.x) * dim;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    dst[i] = __float2bfloat16(__bfloat162float(row[i]) * inv * __bfloat162float(weight[i]));
  }
}

// The same for rows whose width is a multiple of 8 and at most 8 x kRmsThreads x kRmsChunks
// (every model's hidden width and q-LoRA rank): a thread loads its chunks of 8 values (16
// bytes) and the weight's together, all in flight at once, and scales them from registers, so a
// row costs about two memory round trips instead of a chain of loads per 256 values (what
// bounds a decode step's few rows). Each thread writes only what it read: in place is fine.
constexpr int kRmsThreads = 256;
constexpr int kRmsChunks = 4;
constexpr int kRmsValuesPerChunk = 8;

__global__ void __launch_bounds__(kRmsThreads)
    RmsNormChunkKernel(const __nv_bfloat16* x, const __nv_bfloat16* weight, __nv_bfloat16* out,
                       int dim, float eps) {
  const int chunks = dim / kRmsValuesPerChunk;
  const auto* row = reinterpret_cast<const uint4*>(x + static_cast<size_t>(blockIdx.x) * dim);
  const auto* scale = reinterpret_cast<const uint4*>(weight);
  uint4 values[kRmsChunks], scales[kRmsChunks];
#pragma unroll
  for (int i = 0; i < kRmsChunks; ++i) {
    const int c = threadIdx.x + i * kRmsThreads;
    if (c < chunks) {
      values[i] = row[c];
      scales[i] = scale[c];
    }
  }
  float sum = 0;
#pragma unroll
  for (int i = 0; i < kRmsChunks; ++i) {
    if (threadIdx.x + i * kRmsThreads >= chunks) continue;
    const auto* v = reinterpret_cast<const __nv_bfloat16*>(&values[i]);
#pragma unroll
    for (int j = 0; j < kRmsValuesPerChunk; ++j) {
      const float f = __bfloat162float(v[j]);
      sum += f * f;
    }
  }
  const float inv = BlockInverseRms(sum, dim, eps);
  auto* dst = reinterpret_cast<uint4*>(out + static_cast<size_t>(blockIdx.x) * dim);
#pragma unroll
  for (int i = 0; i < kRmsChunks; ++i) {
    const int c = threadIdx.x + i * kRmsThreads;
    if (c >= chunks) continue;
    const auto* v = reinterpret_cast<const __nv_bfloat16*>(&values[i]);
    const auto* w = reinterpret_cast<const __nv_bfloat16*>(&scales[i]);
    uint4 result;
    auto* r = reinterpret_cast<__nv_bfloat16*>(&result);
#pragma unroll
    for (int j = 0; j < kRmsValuesPerChunk; ++j) {
      r[j] = __float2bfloat16(__bfloat162float(v[j]) * inv * __bfloat162float(w[j]));
    }
    dst[c] = result;
  }
}

__global__ void SiluMulKernel(const __nv_bfloat16* gate_up, __nv_bfloat16* out, int64_t rows,
                              int inter) {
  const int64_t total = rows * inter;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / inter, c = i % inter;
    const float g = __bfloat162float(gate_up[r * 2 * inter + c]);
    const float u = __bfloat162float(gate_up[r * 2 * inter + inter + c]);
    out[i] = __float2bfloat16(g / (1.0f + __expf(-g)) * u);
  }
}

__global__ void RopeKernel(float* vectors, const int32_t* positions, const float* cos_table,
                           const float* sin_table, int heads, int dim) {
  const int half = dim / 2;
  const int row = blockIdx.x;
  const float* c = cos_table + static_cast<size_t>(positions[row]) * half;
  const float* s = sin_table + static_cast<size_t>(positions[row]) * half;
  for (int i = threadIdx.x; i < heads * half; i += blockDim.x) {
    const int h = i / half, p = i % half;
    float* v = vectors + (static_cast<size_t>(row) * heads + h) * dim;
    const float even = v[2 * p], odd = v[2 * p + 1];
    v[2 * p] = even * c[p] - odd * s[p];
    v[2 * p + 1] = odd * c[p] + even * s[p];
  }
}

__global__ void CopyRowsKernel(const __nv_bfloat16* source, const int32_t* source_rows,
                               __nv_bfloat16* out, int hidden) {
  const int64_t row = blockIdx.x;
  const int32_t from = source_rows[row];
  if (from < 0) return;  // GatherRows: a row with no source keeps what it holds
  // 16-byte vectors when the row allows it.
  const __nv_bfloat16* src = source + static_cast<size_t>(from) * hidden;
  __nv_bfloat16* dst = out + static_cast<size_t>(row) * hidden;
  if (hidden % 8 == 0) {
    const int4* s = reinterpret_cast<const int4*>(src);
    int4* d = reinterpret_cast<int4*>(dst);
    for (int i = threadIdx.x; i < hidden / 8; i += blockDim.x) d[i] = s[i];
  } else {
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = src[i];
  }
}

// A thread sums kUnpermuteValues adjacent values of one token's row (one 16-byte load per
// expert row where the width allows), and blocks tile the row as well as the tokens: a decode
// step's few tokens still spread over the GPU, and each thread's top-k loads are all in flight
// at once. Every value's sum runs in the token's own top-k order, then the shared experts'.
constexpr int kUnpermuteValues = 8;

__global__ void UnpermuteKernel(const __nv_bfloat16* expert_rows, const int32_t* position,
                                const float* weights, const __nv_bfloat16* shared,
                                __nv_bfloat16* out, int top_k, int hidden) {
  const int token = blockIdx.x;  // x: up to 2^31 - 1 tokens; y: the row's tiles
  const int first = (blockIdx.y * blockDim.x + threadIdx.x) * kUnpermuteValues;
  if (first >= hidden) return;
  const int count = min(kUnpermuteValues, hidden - first);
  const bool whole = hidden % kUnpermuteValues == 0;  // then every thread has 8 values
  float sum[kUnpermuteValues] = {};
  auto add = [&](const __nv_bfloat16* row, float weight) {
    __nv_bfloat16 values[kUnpermuteValues];
    if (whole) {
      *reinterpret_cast<uint4*>(values) = *reinterpret_cast<const uint4*>(row + first);
    } else {
      for (int v = 0; v < count; ++v) values[v] = row[first + v];
    }
#pragma unroll
    for (int v = 0; v < kUnpermuteValues; ++v) {
      if (v < count) sum[v] += weight * __bfloat162float(values[v]);
    }
  };
  for (int k = 0; k < top_k; ++k) {  // each token's own top-k order
    const size_t row = static_cast<size_t>(position[token * top_k + k]);
    add(expert_rows + row * hidden, weights[token * top_k + k]);
  }
  if (shared != nullptr) add(shared + static_cast<size_t>(token) * hidden, 1.0f);
  __nv_bfloat16* to = out + static_cast<size_t>(token) * hidden + first;
  for (int v = 0; v < count; ++v) to[v] = __float2bfloat16(sum[v]);
}

// Largest value among lanes' candidates; ties to the lowest index.
__device__ void WarpArgMax(float& value, int& index) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const float other_value = __shfl_xor_sync(0xffffffff, value, offset);
    const int other_index = __shfl_xor_sync(0xffffffff, index, offset);
    if (other_value > value || (other_value == value && other_index < index)) {
      value = other_value;
      index = other_index;
    }
  }
}

// One warp per token; scores live in shared memory.
__global__ void GateTopKKernel(const float* logits, const float* bias, GateOptions o,
                               int32_t* experts, float* weights) {
  extern __shared__ float shared[];
  const int warp_in_block = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int token = blockIdx.x * (blockDim.x / kWarp) + warp_in_block;
  float* scores = shared + warp_in_block * 2 * o.num_experts;
  float* choice = scores + o.num_experts;
  const float* row = logits + static_cast<size_t>(token) * o.num_experts;
  if (o.sigmoid) {
    for (int e = lane; e < o.num_experts; e += kWarp) scores[e] = 1.0f / (1.0f + __expf(-row[e]));
  } else {
    float max = -FLT_MAX;
    for (int e = lane; e < o.num_experts; e += kWarp) max = fmaxf(max, row[e]);
    for (int offset = kWarp / 2; offset > 0; offset /= 2)
      max = fmaxf(max, __shfl_xor_sync(0xffffffff, max, offset));
    float sum = 0;
    for (int e = lane; e < o.num_experts; e += kWarp) sum += scores[e] = __expf(row[e] - max);
    sum = WarpReduceSum(sum);
    for (int e = lane; e < o.num_experts; e += kWarp) scores[e] /= sum;
  }
  __syncwarp();
  for (int e = lane; e < o.num_experts; e += kWarp) choice[e] = scores[e] + (bias ? bias[e] : 0.0f);
  __syncwarp();
  if (o.num_groups > 1) {
    const int per_group = o.num_experts / o.num_groups;
    // Lane g scores group g (groups <= 32).
    float group_score = -FLT_MAX;
    if (lane < o.num_groups) {
      float first = -FLT_MAX, second = -FLT_MAX;
      for (int i = 0; i < per_group; ++i) {
        const float v = choice[lane * per_group + i];
        if (v > first) {
          second = first;
          first = v;
        } else if (v > second) {
          second = v;
        }
      }
      group_score = o.group_score_top2_sum ? first + second : first;
    }
    unsigned chosen_groups = 0;
    for (int i = 0; i < o.topk_groups; ++i) {
      float value = (chosen_groups >> lane) & 1u ? -FLT_MAX : group_score;
      int index = lane < o.num_groups ? lane : 1 << 20;
      if (lane >= o.num_groups) value = -FLT_MAX;
      WarpArgMax(value, index);
      chosen_groups |= 1u << index;
    }
    for (int e = lane; e < o.num_experts; e += kWarp) {
      if (!((chosen_groups >> (e / per_group)) & 1u)) choice[e] = -FLT_MAX;
    }
    __syncwarp();
  }
  float sum = 0;
  for (int k = 0; k < o.top_k; ++k) {
    float value = -FLT_MAX;
    int index = 1 << 20;
    for (int e = lane; e < o.num_experts; e += kWarp) {
      if (choice[e] > value) {
        value = choice[e];
        index = e;
      }
    }
    WarpArgMax(value, index);
    if (lane == 0) {
      experts[token * o.top_k + k] = index;
      weights[token * o.top_k + k] = scores[index];
      choice[index] = -INFINITY;  // below the masked value: never chosen again
    }
    sum += scores[index];
    __syncwarp();
  }
  if (lane < o.top_k) {
    float w = weights[token * o.top_k + lane];
    if (o.normalize) w /= (sum + 1e-20f);
    weights[token * o.top_k + lane] = w * o.scaling;
  }
}

__global__ void FillRandomBf16Kernel(__nv_bfloat16* out, int64_t count, uint64_t seed,
                                     float scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = __float2bfloat16(RandomUniformValue(seed, i, scale));
  }
}

int Blocks(int64_t work, int threads) {
  return static_cast<int>(std::min<int64_t>((work + threads - 1) / threads, 65535 * 8));
}

absl::Status LastError(const char* what) { return CudaStatus(cudaGetLastError(), what); }

}  // namespace

absl::Status CudaStatus(cudaError_t error, const char* what) {
  if (error == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorString(error)));
}

absl::Status RmsNorm(const __nv_bfloat16* x, const __nv_bfloat16* weight, __nv_bfloat16* out,
                     int rows, int dim, float eps, cudaStream_t stream) {
  if (rows == 0) return absl::OkStatus();
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (dim % kRmsValuesPerChunk == 0 && dim <= kRmsValuesPerChunk * kRmsThreads * kRmsChunks &&
      aligned(x) && aligned(weight) && aligned(out)) {
    RmsNormChunkKernel<<<rows, kRmsThreads, 0, stream>>>(x, weight, out, dim, eps);
  } else {
    RmsNormKernel<<<rows, 256, 0, stream>>>(x, weight, out, dim, eps);
  }
  return LastError("RmsNorm");
}

absl::Status SiluMul(const __nv_bfloat16* gate_up, __nv_bfloat16* out, int rows, int inter,
                     cudaStream_t stream) {
  if (rows == 0) return absl::OkStatus();
  SiluMulKernel<<<Blocks(static_cast<int64_t>(rows) * inter, 256), 256, 0, stream>>>(gate_up, out,
                                                                                     rows, inter);
  return LastError("SiluMul");
}

absl::Status RopeInterleaved(float* vectors, const int32_t* positions, const float* cos_table,
                             const float* sin_table, int rows, int heads, int dim,
                             cudaStream_t stream) {
  if (rows == 0) return absl::OkStatus();
  RopeKernel<<<rows, 128, 0, stream>>>(vectors, positions, cos_table, sin_table, heads, dim);
  return LastError("RopeInterleaved");
}

absl::Status Embedding(const __nv_bfloat16* table, const int32_t* ids, __nv_bfloat16* out, int rows,
                       int hidden, cudaStream_t stream) {
  if (rows == 0) return absl::OkStatus();
  CopyRowsKernel<<<rows, 128, 0, stream>>>(table, ids, out, hidden);
  return LastError("Embedding");
}

absl::Status GateTopK(const float* logits, const float* bias, int tokens,
                      const GateOptions& options, int32_t* experts, float* weights,
                      cudaStream_t stream) {
  if (options.num_experts > 1024 || options.top_k > 32 || options.num_groups > 32 ||
      options.num_experts % options.num_groups != 0) {
    return absl::InvalidArgumentError("GateTopK: experts <= 1024, top_k <= 32, groups <= 32");
  }
  if (tokens == 0) return absl::OkStatus();
  // One warp per token; 4 tokens per block unless that overruns the token count.
  const int warps = tokens % 4 == 0 ? 4 : 1;
  const size_t shared = static_cast<size_t>(warps) * 2 * options.num_experts * sizeof(float);
  GateTopKKernel<<<tokens / warps, warps * kWarp, shared, stream>>>(logits, bias, options, experts,
                                                                    weights);
  return LastError("GateTopK");
}

absl::Status PermuteRows(const __nv_bfloat16* x, const int32_t* source_rows, __nv_bfloat16* out,
                         int rows, int hidden, cudaStream_t stream) {
  if (rows == 0) return absl::OkStatus();
  CopyRowsKernel<<<rows, 128, 0, stream>>>(x, source_rows, out, hidden);
  return LastError("PermuteRows");
}

absl::Status GatherRows(const __nv_bfloat16* x, const int32_t* source_rows, __nv_bfloat16* out,
                        int64_t rows, int hidden, cudaStream_t stream) {
  if (rows == 0) return absl::OkStatus();
  if (rows > INT32_MAX) return absl::InvalidArgumentError("GatherRows: too many rows");
  CopyRowsKernel<<<static_cast<unsigned>(rows), 128, 0, stream>>>(x, source_rows, out, hidden);
  return LastError("GatherRows");
}

absl::Status FillRandomBf16(__nv_bfloat16* out, int64_t count, uint64_t seed, float scale,
                            cudaStream_t stream) {
  if (count == 0) return absl::OkStatus();
  FillRandomBf16Kernel<<<Blocks(count, 256), 256, 0, stream>>>(out, count, seed, scale);
  return LastError("FillRandomBf16");
}

absl::Status WeightedUnpermute(const __nv_bfloat16* expert_rows, const int32_t* position,
                               const float* weights, const __nv_bfloat16* shared,
                               __nv_bfloat16* out, int tokens, int top_k, int hidden,
                               cudaStream_t stream) {
  if (tokens == 0) return absl::OkStatus();
  constexpr int kThreads = 128;
  const int threads_per_row = (hidden + kUnpermuteValues - 1) / kUnpermuteValues;
  const dim3 grid(tokens, (threads_per_row + kThreads - 1) / kThreads);
  UnpermuteKernel<<<grid, kThreads, 0, stream>>>(expert_rows, position, weights, shared, out, top_k,
                                                 hidden);
  return LastError("WeightedUnpermute");
}

}  // namespace moeserve::kernels
