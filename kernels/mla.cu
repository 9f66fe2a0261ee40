#include <algorithm>

#include "kernels/kernels.h"
#include "kernels/mla.h"
#include "kernels/reductions.cuh"
#include "kernels/tensor_core.cuh"

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
  // Blocks tile a token's (head, pair) list as well as the tokens, so that a decode step's few
  // tokens spread over the GPU rather than each walking its 128 heads' pairs in one block.
  const int token = blockIdx.x;
  const int half = rope / 2;
  const float* cos_row = cos_table + static_cast<size_t>(positions[token]) * half;
  const float* sin_row = sin_table + static_cast<size_t>(positions[token]) * half;
  for (int i = blockIdx.y * blockDim.x + threadIdx.x; i < heads * half;
       i += gridDim.y * blockDim.x) {
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

// Attention layout: a block of 4 warps serves one token and 16 of its heads (one m16 tile of
// the tensor cores), so each cached row is read once per 16 heads, and the two products run as
// bf16 mma with fp32 accumulation: scores = queries · rowsᵀ and outputs += p · rows[:, :latent].
// Rows stream through shared memory in tiles of 32, double-buffered by cp.async so the next
// tile's loads overlap this tile's math. Per tile: warp w scores the 16 heads against rows
// [8w, 8w + 8) over the whole row; the block's threads then do the online softmax of the
// 16 × 32 scores (a running max and sum per head); warp w accumulates its quarter of the latent
// outputs. The probabilities feed the mma as a bf16 pair (high + low part, two mma), which keeps
// about 16 bits of each one: the output then matches the fp32 twin to bf16 rounding, where one
// bf16 probability alone would add its own 2^-9 error.
//
// Few blocks (a few decoding sequences) would leave most SMs idle while each block walks a long
// context alone, so the context can be split: grid.z blocks take contiguous runs of its tiles
// and write their unnormalized outputs with their running max and sum (fp32) to a workspace,
// and MlaCombineSplitsKernel merges them (flash-decoding).
constexpr int kHeadsPerBlock = 16;
constexpr int kAttentionWarps = 4;
constexpr int kAttentionThreads = kAttentionWarps * kWarp;
constexpr int kTileRows = 32;               // 8 per warp in the scores
constexpr int kMaxOutputTilesPerWarp = 16;  // n8 tiles of outputs: latent <= 4 * 16 * 8
static_assert(kMaxMlaLatent == kAttentionWarps * kMaxOutputTilesPerWarp * 8);
constexpr int kScoreStride = kTileRows + 4;
constexpr int kProbabilityStride = kTileRows + 8;  // 80-byte rows: ldmatrix without conflicts
constexpr int kMaxContextSplits = 16;
constexpr int kMinTilesPerSplit = 2;

// A row padded to whole k16 steps of the mma, and its shared-memory stride (bf16 values): 8
// more, so that consecutive rows start an odd number of 16-byte units apart and the 8 rows of
// an ldmatrix hit different banks.
__host__ __device__ constexpr int PaddedRowDim(int row_dim) { return (row_dim + 15) / 16 * 16; }
__host__ __device__ constexpr int SharedRowStride(int row_dim) { return PaddedRowDim(row_dim) + 8; }

size_t AttentionSharedBytes(int row_dim) {
  const size_t stride = SharedRowStride(row_dim);
  return sizeof(__nv_bfloat16) * (kHeadsPerBlock * stride + 2 * kTileRows * stride +
                                  2 * kHeadsPerBlock * kProbabilityStride) +
         sizeof(float) * (kHeadsPerBlock * kScoreStride + 3 * kHeadsPerBlock);
}

__global__ void __launch_bounds__(kAttentionThreads)
    MlaPagedAttentionKernel(const __nv_bfloat16* q_absorbed, const __nv_bfloat16* cache,
                            const int32_t* block_tables, int max_blocks,
                            const int32_t* token_sequence, const int32_t* positions,
                            __nv_bfloat16* out, int heads, int latent, int rope, int block_size,
                            float scale, float* split_outputs, float* split_stats) {
  extern __shared__ __align__(16) unsigned char shared[];
  const int row_dim = latent + rope;
  const int padded_dim = PaddedRowDim(row_dim);
  const int stride = SharedRowStride(row_dim);
  auto* queries = reinterpret_cast<__nv_bfloat16*>(shared);  // [kHeadsPerBlock, stride]
  __nv_bfloat16* tiles = queries + kHeadsPerBlock * stride;  // [2, kTileRows, stride]
  __nv_bfloat16* p_high = tiles + 2 * kTileRows * stride;    // [kHeadsPerBlock, kProb..Stride]
  __nv_bfloat16* p_low = p_high + kHeadsPerBlock * kProbabilityStride;
  auto* scores = reinterpret_cast<float*>(p_low + kHeadsPerBlock * kProbabilityStride);
  float* running_max = scores + kHeadsPerBlock * kScoreStride;  // [kHeadsPerBlock] each
  float* running_sum = running_max + kHeadsPerBlock;
  float* rescale = running_sum + kHeadsPerBlock;

  const int token = blockIdx.x;
  const int first_head = blockIdx.y * kHeadsPerBlock;
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int context = positions[token] + 1;
  const int32_t* table = block_tables + static_cast<size_t>(token_sequence[token]) * max_blocks;

  // Queries, zero beyond the heads and the row (so padding never meets a stray value).
  for (int i = threadIdx.x; i < kHeadsPerBlock * padded_dim; i += kAttentionThreads) {
    const int h = i / padded_dim;
    const int d = i % padded_dim;
    const int head = first_head + h;
    queries[h * stride + d] =
        head < heads && d < row_dim
            ? q_absorbed[(static_cast<size_t>(token) * heads + head) * row_dim + d]
            : __float2bfloat16(0.0f);
  }
  // The tiles' padding columns (row loads never write them).
  const int padding = padded_dim - row_dim;
  for (int i = threadIdx.x; i < 2 * kTileRows * padding; i += kAttentionThreads) {
    tiles[(i / padding) * stride + row_dim + i % padding] = __float2bfloat16(0.0f);
  }
  if (threadIdx.x < kHeadsPerBlock) {
    running_max[threadIdx.x] = -INFINITY;
    running_sum[threadIdx.x] = 0.0f;
  }

  // Rows [start, start + kTileRows) into `tile`; rows past the context are zeros (their
  // probabilities are zero, and zero times a stray NaN would not be).
  const bool unit_rows = row_dim % 8 == 0;  // rows are whole 16-byte units
  auto cache_row = [&](int position) {
    return static_cast<int64_t>(table[position / block_size]) * block_size + position % block_size;
  };
  auto load_tile = [&](int start, __nv_bfloat16* tile) {
    if (unit_rows) {
      const int units = row_dim / 8;
      for (int i = threadIdx.x; i < kTileRows * units; i += kAttentionThreads) {
        const int j = i / units;
        const int position = start + j;
        const __nv_bfloat16* from =
            position < context ? cache + cache_row(position) * row_dim + (i % units) * 8 : cache;
        CpAsync16(tile + j * stride + (i % units) * 8, from, position < context ? 16 : 0);
      }
    } else {
      for (int i = threadIdx.x; i < kTileRows * row_dim; i += kAttentionThreads) {
        const int j = i / row_dim;
        const int position = start + j;
        tile[j * stride + i % row_dim] = position < context
                                             ? cache[cache_row(position) * row_dim + i % row_dim]
                                             : __float2bfloat16(0.0f);
      }
    }
  };

  // This warp's output tiles: n8 tiles [first_tile, first_tile + my_tiles) of the latent.
  const int output_tiles = (latent + 7) / 8;
  const int tiles_per_warp = (output_tiles + kAttentionWarps - 1) / kAttentionWarps;
  const int first_tile = warp * tiles_per_warp;
  const int my_tiles = max(0, min(tiles_per_warp, output_tiles - first_tile));
  const int group = lane / 4;       // fragment rows group and group + 8
  const int pair = 2 * (lane % 4);  // fragment columns pair and pair + 1
  float outputs[kMaxOutputTilesPerWarp][4];
#pragma unroll
  for (int j = 0; j < kMaxOutputTilesPerWarp; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) outputs[j][e] = 0.0f;
  }

  // This block's run of tiles: all of them, or its split's share (maybe none, for a token whose
  // context is shorter than the batch's longest).
  const int tile_count = (context + kTileRows - 1) / kTileRows;
  const int tiles_per_split = (tile_count + gridDim.z - 1) / gridDim.z;
  const int first_tile_index = blockIdx.z * tiles_per_split;
  const int end_tile_index = min(tile_count, first_tile_index + tiles_per_split);
  if (first_tile_index < end_tile_index) load_tile(first_tile_index * kTileRows, tiles);
  CpAsyncCommit();
  for (int i = first_tile_index; i < end_tile_index; ++i) {
    const int start = i * kTileRows;
    const int rows = min(kTileRows, context - start);
    const int buffer = (i - first_tile_index) & 1;
    const __nv_bfloat16* tile = tiles + buffer * kTileRows * stride;
    CpAsyncWait<0>();
    __syncthreads();  // tile i has landed for every thread, and tile i - 1 is fully consumed
    if (i + 1 < end_tile_index) {
      load_tile(start + kTileRows, tiles + (buffer ^ 1) * kTileRows * stride);
    }
    CpAsyncCommit();

    // Scores of the 16 heads against this warp's 8 rows.
    // Two accumulators (even and odd k steps) halve the chain of dependent mma.
    float dot[4] = {0.0f, 0.0f, 0.0f, 0.0f}, odd_dot[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const __nv_bfloat16* query_row = queries + (lane % 16) * stride + (lane / 16) * 8;
    const __nv_bfloat16* key_row = tile + (8 * warp + lane % 8) * stride + ((lane / 8) % 2) * 8;
    for (int k0 = 0; k0 < padded_dim; k0 += 32) {
      uint32_t a[4], b[2];
      LoadMatrix4(a, query_row + k0);
      LoadMatrix2(b, key_row + k0);
      Mma(dot, a[0], a[1], a[2], a[3], b[0], b[1]);
      if (k0 + 16 < padded_dim) {
        LoadMatrix4(a, query_row + k0 + 16);
        LoadMatrix2(b, key_row + k0 + 16);
        Mma(odd_dot, a[0], a[1], a[2], a[3], b[0], b[1]);
      }
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) dot[e] += odd_dot[e];
    const int column = 8 * warp + pair;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      *reinterpret_cast<float2*>(scores + (group + 8 * half) * kScoreStride + column) =
          make_float2(column < rows ? dot[2 * half] * scale : -INFINITY,
                      column + 1 < rows ? dot[2 * half + 1] * scale : -INFINITY);
    }
    __syncthreads();

    // Online softmax: 8 threads per head, 4 scores each.
    {
      const int h = threadIdx.x / 8;
      const int c0 = (threadIdx.x % 8) * 4;
      const float4 s = *reinterpret_cast<const float4*>(scores + h * kScoreStride + c0);
      float tile_max = fmaxf(fmaxf(s.x, s.y), fmaxf(s.z, s.w));
#pragma unroll
      for (int offset = 1; offset < 8; offset *= 2) {
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, offset));
      }
      const float previous_max = running_max[h];
      const float new_max = fmaxf(previous_max, tile_max);  // finite: a tile has a valid row
      const float p[4] = {__expf(s.x - new_max), __expf(s.y - new_max), __expf(s.z - new_max),
                          __expf(s.w - new_max)};
      float tile_sum = 0.0f;
#pragma unroll
      for (int e = 0; e < 4; e += 2) {
        const __nv_bfloat162 high = __floats2bfloat162_rn(p[e], p[e + 1]);
        const float2 high_value = __bfloat1622float2(high);
        *reinterpret_cast<__nv_bfloat162*>(p_high + h * kProbabilityStride + c0 + e) = high;
        *reinterpret_cast<__nv_bfloat162*>(p_low + h * kProbabilityStride + c0 + e) =
            __floats2bfloat162_rn(p[e] - high_value.x, p[e + 1] - high_value.y);
        tile_sum += p[e] + p[e + 1];
      }
#pragma unroll
      for (int offset = 1; offset < 8; offset *= 2) {
        tile_sum += __shfl_xor_sync(0xffffffff, tile_sum, offset);
      }
      if (threadIdx.x % 8 == 0) {
        const float factor = __expf(previous_max - new_max);  // 0 on the first tile
        running_sum[h] = running_sum[h] * factor + tile_sum;
        running_max[h] = new_max;
        rescale[h] = factor;
      }
    }
    __syncthreads();

    // outputs = outputs * rescale + p · rows[:, this warp's latent columns].
    const float factor_low = rescale[group];
    const float factor_high = rescale[group + 8];
#pragma unroll
    for (int j = 0; j < kMaxOutputTilesPerWarp; ++j) {
      outputs[j][0] *= factor_low;
      outputs[j][1] *= factor_low;
      outputs[j][2] *= factor_high;
      outputs[j][3] *= factor_high;
    }
#pragma unroll
    for (int k0 = 0; k0 < kTileRows; k0 += 16) {
      uint32_t high[4], low[4];
      const int p_offset = (lane % 16) * kProbabilityStride + k0 + (lane / 16) * 8;
      LoadMatrix4(high, p_high + p_offset);
      LoadMatrix4(low, p_low + p_offset);
      const __nv_bfloat16* value_row = tile + (k0 + lane % 16) * stride;
#pragma unroll
      for (int j = 0; j < kMaxOutputTilesPerWarp; j += 2) {
        if (j >= my_tiles) continue;
        const int n0 = (first_tile + j) * 8;
        uint32_t b[4];
        if (j + 1 < my_tiles) {
          LoadMatrix4Transposed(b, value_row + n0 + (lane / 16) * 8);
        } else {
          uint32_t last[2];
          LoadMatrix2Transposed(last, value_row + n0);
          b[0] = last[0];
          b[1] = last[1];
        }
        Mma(outputs[j], high[0], high[1], high[2], high[3], b[0], b[1]);
        Mma(outputs[j], low[0], low[1], low[2], low[3], b[0], b[1]);
        if (j + 1 < my_tiles) {
          Mma(outputs[j + 1], high[0], high[1], high[2], high[3], b[2], b[3]);
          Mma(outputs[j + 1], low[0], low[1], low[2], low[3], b[2], b[3]);
        }
      }
    }
  }

  // running_max and running_sum were last written before the final tile's second barrier (or,
  // for a split without tiles, by the threads that read them here).
  if (gridDim.z > 1) {
    // Split rows: ((token * head groups + group) * splits + split) * kHeadsPerBlock + head.
    const int64_t first_row =
        ((static_cast<int64_t>(token) * gridDim.y + blockIdx.y) * gridDim.z + blockIdx.z) *
        kHeadsPerBlock;
    if (threadIdx.x < kHeadsPerBlock) {
      split_stats[2 * (first_row + threadIdx.x)] = running_max[threadIdx.x];
      split_stats[2 * (first_row + threadIdx.x) + 1] = running_sum[threadIdx.x];
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float* row = split_outputs + (first_row + group + 8 * half) * latent;
#pragma unroll
      for (int j = 0; j < kMaxOutputTilesPerWarp; ++j) {
        if (j >= my_tiles) continue;
        const int column = (first_tile + j) * 8 + pair;
        if (column < latent) row[column] = outputs[j][2 * half];
        if (column + 1 < latent) row[column + 1] = outputs[j][2 * half + 1];
      }
    }
    return;
  }
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int head = first_head + group + 8 * half;
    if (head >= heads) continue;
    const float inverse_sum = 1.0f / running_sum[group + 8 * half];
    __nv_bfloat16* out_row = out + (static_cast<size_t>(token) * heads + head) * latent;
#pragma unroll
    for (int j = 0; j < kMaxOutputTilesPerWarp; ++j) {
      if (j >= my_tiles) continue;
      const int column = (first_tile + j) * 8 + pair;
      if (column < latent) out_row[column] = __float2bfloat16(outputs[j][2 * half] * inverse_sum);
      if (column + 1 < latent) {
        out_row[column + 1] = __float2bfloat16(outputs[j][2 * half + 1] * inverse_sum);
      }
    }
  }
}

// Merges a token's context splits per head: out = Σ w_s o_s / Σ w_s l_s with w_s =
// exp(m_s - max_s m_s); a split without rows (m_s = -inf, l_s = 0) weighs nothing. One block
// per (token, head).
__global__ void MlaCombineSplitsKernel(const float* split_outputs, const float* split_stats,
                                       int splits, int heads, int latent, __nv_bfloat16* out) {
  const int token = blockIdx.x;
  const int head = blockIdx.y;
  const int groups = (heads + kHeadsPerBlock - 1) / kHeadsPerBlock;
  auto row_of = [&](int split) {
    return ((static_cast<int64_t>(token) * groups + head / kHeadsPerBlock) * splits + split) *
               kHeadsPerBlock +
           head % kHeadsPerBlock;
  };
  float global_max = -INFINITY;
  for (int split = 0; split < splits; ++split) {
    global_max = fmaxf(global_max, split_stats[2 * row_of(split)]);
  }
  float weights[kMaxContextSplits];
  float total = 0.0f;
#pragma unroll
  for (int split = 0; split < kMaxContextSplits; ++split) {
    weights[split] = 0.0f;
    if (split >= splits) continue;
    const float split_max = split_stats[2 * row_of(split)];
    weights[split] = split_max == -INFINITY ? 0.0f : __expf(split_max - global_max);
    total += weights[split] * split_stats[2 * row_of(split) + 1];
  }
  const float inverse_total = 1.0f / total;
  for (int d = threadIdx.x; d < latent; d += blockDim.x) {
    float value = 0.0f;
#pragma unroll
    for (int split = 0; split < kMaxContextSplits; ++split) {
      if (split < splits) value += weights[split] * split_outputs[row_of(split) * latent + d];
    }
    out[(static_cast<size_t>(token) * heads + head) * latent + d] =
        __float2bfloat16(value * inverse_total);
  }
}

// Blocks that fill the GPU: two attention blocks fit an SM (their shared memory).
int AttentionTargetBlocks() {
  int device = 0, multiprocessors = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device) !=
          cudaSuccess) {
    return 0;
  }
  return 2 * multiprocessors;
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
  constexpr int kThreads = 256;
  const int pairs = heads * (rope / 2);
  const dim3 grid(tokens, std::max(1, std::min((pairs + kThreads - 1) / kThreads, 65535)));
  MlaQueryRopeKernel<<<grid, kThreads, 0, stream>>>(q, positions, cos_table, sin_table, q_absorbed,
                                                    heads, nope, rope, latent);
  return Launched("MlaQueryRope");
}

size_t MlaPagedAttentionWorkspaceBytes(int latent) {
  return sizeof(float) * static_cast<size_t>(AttentionTargetBlocks()) * kHeadsPerBlock *
         (static_cast<size_t>(latent) + 2);
}

absl::Status MlaPagedAttention(const __nv_bfloat16* q_absorbed, const __nv_bfloat16* cache,
                               const int32_t* block_tables, int max_blocks,
                               const int32_t* token_sequence, const int32_t* positions,
                               __nv_bfloat16* out, int tokens, int heads, int latent, int rope,
                               int block_size, float scale, float* workspace, cudaStream_t stream) {
  if (tokens == 0) return absl::OkStatus();
  if (latent > kMaxMlaLatent) {
    return absl::InvalidArgumentError("MlaPagedAttention: kv_lora_rank above 512");
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
  // Split the contexts where the blocks would not fill the GPU, into runs of at least
  // kMinTilesPerSplit tiles of the longest context the block tables allow; tokens * groups *
  // splits stays within the target, which is what the workspace holds.
  const int groups = (heads + kHeadsPerBlock - 1) / kHeadsPerBlock;
  const int blocks = tokens * groups;
  const int target = AttentionTargetBlocks();
  const int longest_tiles = (max_blocks * block_size + kTileRows - 1) / kTileRows;
  int splits = 1;
  if (workspace != nullptr && blocks < target) {
    splits = std::max(
        1, std::min({kMaxContextSplits, target / blocks, longest_tiles / kMinTilesPerSplit}));
  }
  const size_t split_rows = static_cast<size_t>(blocks) * splits * kHeadsPerBlock;
  float* split_outputs = workspace;
  float* split_stats = splits > 1 ? workspace + split_rows * latent : nullptr;
  const dim3 grid(tokens, groups, splits);
  MlaPagedAttentionKernel<<<grid, kAttentionThreads, shared_bytes, stream>>>(
      q_absorbed, cache, block_tables, max_blocks, token_sequence, positions, out, heads, latent,
      rope, block_size, scale, split_outputs, split_stats);
  if (splits > 1) {
    MlaCombineSplitsKernel<<<dim3(tokens, heads), 128, 0, stream>>>(split_outputs, split_stats,
                                                                    splits, heads, latent, out);
  }
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
