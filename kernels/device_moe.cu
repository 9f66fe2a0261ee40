#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "kernels/device_moe.h"
#include "kernels/fp8.h"
#include "kernels/kernels.h"
#include "kernels/reductions.cuh"

namespace moeserve::kernels {
namespace {

// --- PlanSlots: one block; a pair's slot and its rank among its slot's rows come from a shared
// counter, the slots' first rows from a scan by one warp. ---

constexpr int kPlanThreads = 1024;
constexpr int kSlotBits = 11;  // slots < 2^11 = kMaxPlannedSlots; the rank sits above
constexpr int kSlotMask = (1 << kSlotBits) - 1;
static_assert(kMaxPlannedSlots <= (1 << kSlotBits), "a slot id fits its bits");
static_assert(kMaxPlannedPairs <= (1 << (31 - kSlotBits)), "a rank fits above the slot id");

__global__ void __launch_bounds__(kPlanThreads)
    PlanSlotsKernel(const int32_t* __restrict__ experts, int pairs, int top_k,
                    DeviceReplicaTable table, int slots, int32_t* __restrict__ offsets,
                    int32_t* __restrict__ source_rows, int32_t* __restrict__ positions,
                    int32_t* __restrict__ load) {
  extern __shared__ int32_t shared[];
  int32_t* counts = shared;          // [slots]: rows, then each slot's first row
  int32_t* packed = shared + slots;  // [pairs]: slot | (rank among the slot's rows << kSlotBits)
  for (int s = threadIdx.x; s < slots; s += blockDim.x) counts[s] = 0;
  __syncthreads();
  for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
    const int expert = experts[p];
    const int begin = table.replica_begin[expert];
    const int replicas = table.replica_begin[expert + 1] - begin;
    const int slot = table.replica_slots[begin + (p / top_k) % replicas];
    const int rank = atomicAdd(&counts[slot], 1);
    packed[p] = slot | (rank << kSlotBits);
  }
  __syncthreads();
  if (threadIdx.x < kWarpSize) {
    // Lane l scans slots [l * chunk, (l + 1) * chunk); the lanes' sums are scanned by shuffles.
    const int lane = threadIdx.x;
    const int chunk = (slots + kWarpSize - 1) / kWarpSize;
    const int first = min(lane * chunk, slots), last = min(first + chunk, slots);
    int sum = 0;
    for (int s = first; s < last; ++s) sum += counts[s];
    int inclusive = sum;
    for (int offset = 1; offset < kWarpSize; offset *= 2) {
      const int before = __shfl_up_sync(0xffffffffu, inclusive, offset);
      if (lane >= offset) inclusive += before;
    }
    int start = inclusive - sum;
    for (int s = first; s < last; ++s) {
      const int rows = counts[s];
      if (load != nullptr) load[s] += rows;
      offsets[s] = start;
      counts[s] = start;
      start += rows;
    }
    if (lane == kWarpSize - 1) offsets[slots] = inclusive;
  }
  __syncthreads();
  for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
    const int row = counts[packed[p] & kSlotMask] + (packed[p] >> kSlotBits);
    positions[p] = row;
    source_rows[row] = p / top_k;
  }
}

// --- DeviceGroupedGemm ---
//
// A block of 4 warps covers 128 output columns of one slot; a warp owns 4 tiles of 8 columns
// and runs mma.sync m16n8k16 over 16 rows (one pass; a slot with more rows takes more passes).
// k advances 128 at a time (one FP8 scale block): per step a lane loads 4 chunks of 8 k values
// of each weight row it feeds (its tile column g = lane / 4) and of its two activation rows
// (g and g + 8), all 16-byte loads, so a weight row is read in contiguous runs. Which k values
// a lane's chunk holds is a permutation of the step's k, the same for the activations and the
// weights; the fragment layout of mma then pairs them as a dot product needs (A: row g, k
// 2t, 2t+1 in register 0 and 2t+8, 2t+9 in register 2; B: column g, k 2t, 2t+1 and 2t+8,
// 2t+9; t = lane % 4): chunk word 0 and 1 feed one mma, words 2 and 3 the next.
constexpr int kGemmWarps = 4;
constexpr int kTiles = 4;
constexpr int kWarpColumns = 8 * kTiles;
constexpr int kBlockColumns = kGemmWarps * kWarpColumns;
constexpr int kPassRows = 16;
constexpr int kStepK = 128;
constexpr int kChunks = 4;  // per lane and step: 4 x 8 values x 4 lanes of a group = 128

__device__ __forceinline__ void Mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                    uint32_t a3, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 mma needs compute capability 8.0; the backend never launches this there
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

__device__ __forceinline__ uint4 LoadStreaming(const void* address) {
  return __ldg(reinterpret_cast<const uint4*>(address));
}

// bf16 weights: chunk c of lane t is k values [32c + 8t, 32c + 8t + 8) of the step.
struct Bf16Operand {
  const __nv_bfloat16* const* slots;
  static constexpr bool kScaled = false;
  __device__ static int ChunkOffset(int c, int t) { return 32 * c + 8 * t; }
  struct Slot {
    const __nv_bfloat16* weight;
    __device__ void Load(int row, int k, int k0, int t, uint4 (&out)[kChunks]) const {
      const __nv_bfloat16* at = weight + static_cast<int64_t>(row) * k + k0;
#pragma unroll
      for (int c = 0; c < kChunks; ++c) out[c] = LoadStreaming(at + ChunkOffset(c, t));
    }
  };
  __device__ Slot Get(int slot) const { return {slots[slot]}; }
};

// Two e4m3 values (bits [shift, shift + 16) of `word`) as a bf16 pair; exact (e4m3 has 3
// mantissa bits and exponents bf16 covers).
__device__ __forceinline__ uint32_t WidenPair(uint32_t word, int shift) {
  const auto two = static_cast<__nv_fp8x2_storage_t>((word >> shift) & 0xffffu);
  const __half2_raw raw = __nv_cvt_fp8x2_to_halfraw2(two, __NV_E4M3);
  const float2 values = __half22float2(*reinterpret_cast<const __half2*>(&raw));
  const __nv_bfloat162 pair = __floats2bfloat162_rn(values.x, values.y);
  return *reinterpret_cast<const uint32_t*>(&pair);
}

// Eight e4m3 values (two words) as a chunk of eight bf16.
__device__ __forceinline__ uint4 Widen(uint32_t low, uint32_t high) {
  return make_uint4(WidenPair(low, 0), WidenPair(low, 16), WidenPair(high, 0), WidenPair(high, 16));
}

// e4m3 weights: a lane loads 16 codes per 64 k values, [64h + 16t, 64h + 16t + 16), which are
// its chunks 2h and 2h + 1; the step's sums are scaled by the block's scale once.
struct Fp8Operand {
  const Fp8Weight* slots;
  int scale_stride;
  static constexpr bool kScaled = true;
  __device__ static int ChunkOffset(int c, int t) { return 64 * (c / 2) + 16 * t + 8 * (c % 2); }
  struct Slot {
    const uint8_t* values;
    const float* scales;
    int scale_stride;
    __device__ void Load(int row, int k, int k0, int t, uint4 (&out)[kChunks]) const {
      const uint8_t* at = values + static_cast<int64_t>(row) * k + k0 + 16 * t;
#pragma unroll
      for (int h = 0; h < kChunks / 2; ++h) {
        const uint4 codes = LoadStreaming(at + 64 * h);
        out[2 * h] = Widen(codes.x, codes.y);
        out[2 * h + 1] = Widen(codes.z, codes.w);
      }
    }
    __device__ float Scale(int row, int k0) const {
      return __ldg(scales + (row / kFp8BlockSize) * scale_stride + k0 / kFp8BlockSize);
    }
  };
  __device__ Slot Get(int slot) const {
    const Fp8Weight w = slots[slot];
    return {reinterpret_cast<const uint8_t*>(w.values), w.scales, scale_stride};
  }
};

template <int kTileCount>
__device__ __forceinline__ void MmaStep(const uint4 (&low)[kChunks], const uint4 (&high)[kChunks],
                                        const uint4 (&w)[kTileCount][kChunks],
                                        float (&sums)[kTileCount][4]) {
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
#pragma unroll
    for (int j = 0; j < kTileCount; ++j) {
      Mma(sums[j], low[c].x, high[c].x, low[c].y, high[c].y, w[j][c].x, w[j][c].y);
      Mma(sums[j], low[c].z, high[c].z, low[c].w, high[c].w, w[j][c].z, w[j][c].w);
    }
  }
}

template <class Operand>
__global__ void __launch_bounds__(kGemmWarps* kWarpSize)
    DeviceGroupedGemmKernel(const __nv_bfloat16* __restrict__ x, DeviceSlotPlan plan,
                            Operand operand, int n, int k, __nv_bfloat16* __restrict__ y) {
  const int slot = blockIdx.y;
  const int begin = plan.offsets[slot], end = plan.offsets[slot + 1];
  if (begin >= end) return;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, t = lane % 4;
  const int first_column = blockIdx.x * kBlockColumns + warp * kWarpColumns;
  if (first_column >= n) return;
  const typename Operand::Slot weights = operand.Get(slot);
  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (int pass = begin; pass < end; pass += kPassRows) {
    const int rows = min(kPassRows, end - pass);
    auto row_of = [&](int r) -> const __nv_bfloat16* {
      if (r >= rows) return nullptr;
      const int source = plan.source_rows != nullptr ? plan.source_rows[pass + r] : pass + r;
      return x + static_cast<int64_t>(source) * k;
    };
    const __nv_bfloat16* x_low = row_of(g);
    const __nv_bfloat16* x_high = row_of(g + 8);
    float sums[kTiles][4] = {};
    for (int k0 = 0; k0 < k; k0 += kStepK) {
      uint4 w[kTiles][kChunks];
#pragma unroll
      for (int j = 0; j < kTiles; ++j) {
        if (first_column + 8 * j < n) {
          weights.Load(first_column + 8 * j + g, k, k0, t, w[j]);
        } else {
#pragma unroll
          for (int c = 0; c < kChunks; ++c) w[j][c] = zero;
        }
      }
      uint4 low[kChunks], high[kChunks];
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const int at = k0 + Operand::ChunkOffset(c, t);
        low[c] = x_low != nullptr ? *reinterpret_cast<const uint4*>(x_low + at) : zero;
        high[c] = x_high != nullptr ? *reinterpret_cast<const uint4*>(x_high + at) : zero;
      }
      if constexpr (Operand::kScaled) {
        float block[kTiles][4] = {};
        MmaStep(low, high, w, block);
#pragma unroll
        for (int j = 0; j < kTiles; ++j) {
          const float scale =
              first_column + 8 * j < n ? weights.Scale(first_column + 8 * j, k0) : 0.0f;
#pragma unroll
          for (int i = 0; i < 4; ++i) sums[j][i] = fmaf(block[j][i], scale, sums[j][i]);
        }
      } else {
        MmaStep(low, high, w, sums);
      }
    }
    // Lane (g, t) holds columns 2t, 2t + 1 of each tile for rows g and g + 8.
#pragma unroll
    for (int j = 0; j < kTiles; ++j) {
      const int column = first_column + 8 * j + 2 * t;
      if (column >= n) continue;
      if (g < rows) {
        *reinterpret_cast<__nv_bfloat162*>(y + static_cast<int64_t>(pass + g) * n + column) =
            __floats2bfloat162_rn(sums[j][0], sums[j][1]);
      }
      if (g + 8 < rows) {
        *reinterpret_cast<__nv_bfloat162*>(y + static_cast<int64_t>(pass + g + 8) * n + column) =
            __floats2bfloat162_rn(sums[j][2], sums[j][3]);
      }
    }
  }
}

}  // namespace

absl::Status PlanSlots(const int32_t* experts, int tokens, int top_k,
                       const DeviceReplicaTable& table, int slots, int32_t* offsets,
                       int32_t* source_rows, int32_t* positions, int32_t* load,
                       cudaStream_t stream) {
  const int64_t pairs = static_cast<int64_t>(tokens) * top_k;
  if (tokens < 0 || top_k < 1 || pairs > kMaxPlannedPairs || slots < 1 ||
      slots > kMaxPlannedSlots || table.experts < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "PlanSlots: ", tokens, " tokens x top-", top_k, " (at most ", kMaxPlannedPairs, " pairs), ",
        slots, " slots (1 to ", kMaxPlannedSlots, "), ", table.experts, " experts"));
  }
  const size_t shared = sizeof(int32_t) * (static_cast<size_t>(slots) + pairs);
  PlanSlotsKernel<<<1, kPlanThreads, shared, stream>>>(
      experts, static_cast<int>(pairs), top_k, table, slots, offsets, source_rows, positions, load);
  return CudaStatus(cudaGetLastError(), "PlanSlots");
}

absl::Status DeviceGroupedGemm(const __nv_bfloat16* x, const DeviceSlotPlan& plan,
                               const DeviceSlotWeights& weights, int n, int k, __nv_bfloat16* y,
                               cudaStream_t stream) {
  if (!DeviceGroupedGemmSupports(n, k) || plan.slots < 0 || plan.slots > 65535 ||
      (weights.bf16 == nullptr) == (weights.fp8 == nullptr)) {
    return absl::InvalidArgumentError(
        absl::StrCat("DeviceGroupedGemm: n ", n, " (a multiple of 8), k ", k,
                     " (a multiple of 128), ", plan.slots, " slots, one kind of weights"));
  }
  if (plan.slots == 0) return absl::OkStatus();
  const dim3 grid((n + kBlockColumns - 1) / kBlockColumns, plan.slots);
  const int threads = kGemmWarps * kWarpSize;
  if (weights.bf16 != nullptr) {
    DeviceGroupedGemmKernel<<<grid, threads, 0, stream>>>(x, plan, Bf16Operand{weights.bf16}, n, k,
                                                          y);
  } else {
    DeviceGroupedGemmKernel<<<grid, threads, 0, stream>>>(
        x, plan, Fp8Operand{weights.fp8, WeightScaleStride(k)}, n, k, y);
  }
  return CudaStatus(cudaGetLastError(), "DeviceGroupedGemm");
}

absl::StatusOr<DeviceExpertMlp> DeviceExpertMlp::Create(int hidden, int intermediate, int max_rows,
                                                        cudaStream_t stream) {
  if (!DeviceGroupedGemmSupports(2 * intermediate, hidden) ||
      !DeviceGroupedGemmSupports(hidden, intermediate) || max_rows < 0) {
    return absl::InvalidArgumentError(absl::StrCat("DeviceExpertMlp: hidden ", hidden,
                                                   " and intermediate ", intermediate,
                                                   " must be multiples of 128"));
  }
  DeviceExpertMlp mlp;
  mlp.hidden_ = hidden;
  mlp.intermediate_ = intermediate;
  mlp.max_rows_ = max_rows;
  mlp.stream_ = stream;
  const size_t rows = static_cast<size_t>(std::max(max_rows, 1));
  if (auto s = mlp.gate_up_.Reserve(rows * 2 * intermediate); !s.ok()) return s;
  if (auto s = mlp.activation_.Reserve(rows * intermediate); !s.ok()) return s;
  return mlp;
}

absl::Status DeviceExpertMlp::Run(const __nv_bfloat16* x, const DeviceSlotPlan& plan, int rows,
                                  const DeviceSlotWeights& gate_up, const DeviceSlotWeights& down,
                                  __nv_bfloat16* y) {
  if (rows < 0 || rows > max_rows_) {
    return absl::InvalidArgumentError(
        absl::StrCat("DeviceExpertMlp::Run: ", rows, " rows, made for ", max_rows_));
  }
  if (rows == 0) return absl::OkStatus();
  if (auto s =
          DeviceGroupedGemm(x, plan, gate_up, 2 * intermediate_, hidden_, gate_up_.data(), stream_);
      !s.ok()) {
    return s;
  }
  if (auto s = SiluMul(gate_up_.data(), activation_.data(), rows, intermediate_, stream_); !s.ok())
    return s;
  const DeviceSlotPlan grouped{plan.offsets, nullptr, plan.slots};  // activation rows in order
  return DeviceGroupedGemm(activation_.data(), grouped, down, hidden_, intermediate_, y, stream_);
}

}  // namespace moeserve::kernels
