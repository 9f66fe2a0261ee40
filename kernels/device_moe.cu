#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "kernels/device_moe.h"
#include "kernels/fp8.h"
#include "kernels/fp8_expert_mlp.h"
#include "kernels/fp8_grouped_gemm.h"
#include "kernels/kernels.h"
#include "kernels/reductions.cuh"
#include "kernels/slot_groups.cuh"
#include "kernels/tensor_core.cuh"

namespace moeserve::kernels {
namespace {

// --- PlanSlots: one block; a pair's slot and its rank among its slot's rows come from a shared
// counter, the slots' first rows from a scan by one warp. ---

constexpr int kPlanThreads = 1024;

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
  ScanSlotCounts(counts, slots, offsets, load);
  __syncthreads();
  for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
    const int row = counts[packed[p] & kSlotMask] + (packed[p] >> kSlotBits);
    positions[p] = row;
    source_rows[row] = p / top_k;
  }
}

// --- DeviceGroupedGemm ---
//
// A block of 4 warps computes 128 output columns of one slot (one FP8 scale row) for up to 16
// of the slot's rows at a time (a pass). The weights are the mma's A operand: a warp owns 32
// weight rows (two m16 tiles) and the pass's grouped rows are the n8 tiles of B, so a decode
// slot of 1 to 8 rows runs one n tile and wastes at most 7/8 of the tensor work, not 15/16.
// k advances 128 per step (one scale block). Weights and activations reach shared memory
// through a ring of kStages cp.async stages, so every warp keeps several steps' bytes in flight
// without holding them in registers: the kernel streams the weights at the memory's pace.
//
// Which k values a lane feeds the mma is a permutation of the step's k, the same for weights and
// activations, so each k value still meets its partner once: for bf16 a lane's chunk c (16
// bytes) holds k [32c + 8t, 32c + 8t + 8) (t = lane % 4); for FP8 a lane reads 16 codes
// [64h + 16t, +16), its chunks 2h and 2h + 1. Words 0 and 1 of a chunk feed one mma, words 2
// and 3 the next (A: rows g and g + 8, g = lane / 4; B: column g). Shared rows are stored with
// their 16-byte units swizzled by row parity so the 8 lanes of a quarter warp, which read rows
// g and g + 1, hit 32 different banks.
constexpr int kGemmWarps = 4;
constexpr int kGemmThreads = kGemmWarps * kWarpSize;
constexpr int kWarpRows = 32;  // weight rows (output columns) per warp: two m16 tiles
constexpr int kMTiles = kWarpRows / 16;
constexpr int kBlockColumns = kGemmWarps * kWarpRows;
constexpr int kPassRows = 16;  // grouped rows per pass: two n8 tiles
constexpr int kNTiles = kPassRows / 8;
constexpr int kStepK = 128;
constexpr int kUnitBytes = 16;
constexpr int kXRowBytes = kStepK * 2;  // a step of one bf16 activation row
constexpr int kXStageBytes = kPassRows * kXRowBytes;
constexpr int kScaleSlotBytes = 16;  // a stage's FP8 scale (4 bytes, kept 16-byte aligned)
static_assert(kBlockColumns == kFp8BlockSize, "a block's columns share one FP8 scale row");
static_assert(kBlockColumns == kGemmThreads, "a thread copies one weight row's units per stage");

__device__ __forceinline__ uint4 LoadShared(const char* base, int row, int row_bytes, int unit,
                                            int swizzle) {
  return *reinterpret_cast<const uint4*>(base + row * row_bytes +
                                         (unit ^ ((row & 1) * swizzle)) * kUnitBytes);
}

// Two e4m3 codes at bits [8, 16) and [24, 32) of `spread` as a bf16 pair. Sign, exponent and
// mantissa are moved into bf16's fields, which reads as the value times 2^-120 (exponent bias 7
// against 127; e4m3's subnormals land on bf16's subnormals exactly); one multiply by 2^120 makes
// the exact value. Integer operations and one bf16 multiply instead of four conversions: the
// conversions' lower throughput would bound the kernel. (e4m3's NaN codes, absent from
// checkpoints, become 480.)
__device__ __forceinline__ uint32_t WidenSpreadPair(uint32_t spread) {
  const uint32_t bits = (spread & 0x80008000u) | ((spread >> 4) & 0x07f007f0u);
  const __nv_bfloat162 scaled = *reinterpret_cast<const __nv_bfloat162*>(&bits);
  const __nv_bfloat162 value =
      __hmul2(scaled, __nv_bfloat162(__ushort_as_bfloat16(0x7b80), __ushort_as_bfloat16(0x7b80)));
  return *reinterpret_cast<const uint32_t*>(&value);
}

// Eight e4m3 codes (two words, code i in byte i) as eight bf16 in order.
__device__ __forceinline__ uint4 Widen(uint32_t low, uint32_t high) {
  return make_uint4(
      WidenSpreadPair(__byte_perm(low, 0, 0x1404)), WidenSpreadPair(__byte_perm(low, 0, 0x3424)),
      WidenSpreadPair(__byte_perm(high, 0, 0x1404)), WidenSpreadPair(__byte_perm(high, 0, 0x3424)));
}

// The sums of one pass: [m tile][n tile][mma register].
using PassSums = float[kMTiles][kNTiles][4];

// Where a warp reads its fragments of one stage.
struct StageView {
  const char* weights;      // [kBlockColumns][kRowBytes], units swizzled
  const char* activations;  // [kPassRows][kXRowBytes], units swizzled
  int warp_row;             // the warp's first weight row in the block
  int g, t;
  int rows;    // valid grouped rows of the pass (activation rows beyond it read as zeros)
  int ntiles;  // n tiles holding valid rows
};

template <int kChunkCount>
__device__ __forceinline__ void MmaTiles(const uint4 (&a_low)[kChunkCount],
                                         const uint4 (&a_high)[kChunkCount],
                                         const uint4 (&b)[kNTiles][kChunkCount], int ntiles,
                                         float (&sums)[kNTiles][4]) {
#pragma unroll
  for (int c = 0; c < kChunkCount; ++c) {
#pragma unroll
    for (int j = 0; j < kNTiles; ++j) {
      if (j >= ntiles) continue;
      Mma(sums[j], a_low[c].x, a_high[c].x, a_low[c].y, a_high[c].y, b[j][c].x, b[j][c].y);
      Mma(sums[j], a_low[c].z, a_high[c].z, a_low[c].w, a_high[c].w, b[j][c].z, b[j][c].w);
    }
  }
}

// bf16 weights: chunk c of a lane is unit 4c + t of a 256-byte row.
struct Bf16Operand {
  const __nv_bfloat16* const* slots;
  static constexpr int kRowBytes = kStepK * 2;
  static constexpr int kStages = 3;  // 2 blocks of 108 KiB per SM, 128 KiB in flight
  static constexpr bool kScaled = false;
  static constexpr int kXSwizzle = 4;
  struct Slot {
    const char* weight;
    int64_t row_bytes;
    __device__ const char* Row(int row, int k0) const { return weight + row * row_bytes + 2 * k0; }
  };
  __device__ Slot Get(int slot, int k) const {
    return {reinterpret_cast<const char*>(slots[slot]), 2 * static_cast<int64_t>(k)};
  }
  __device__ static void Step(const StageView& v, PassSums& sums) {
    uint4 b[kNTiles][4];
#pragma unroll
    for (int j = 0; j < kNTiles; ++j) {
      const int row = 8 * j + v.g;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        b[j][c] = row < v.rows ? LoadShared(v.activations, row, kXRowBytes, 4 * c + v.t, kXSwizzle)
                               : make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int i = 0; i < kMTiles; ++i) {
      const int row = v.warp_row + 16 * i + v.g;
      uint4 low[4], high[4];
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        low[c] = LoadShared(v.weights, row, kRowBytes, 4 * c + v.t, 4);
        high[c] = LoadShared(v.weights, row + 8, kRowBytes, 4 * c + v.t, 4);
      }
      MmaTiles(low, high, b, v.ntiles, sums[i]);
    }
  }
};

// e4m3 weights: a lane's 16 codes [64h + 16t, +16) are unit 4h + t of a 128-byte row; the
// matching activations are units 8h + 2t and 8h + 2t + 1.
struct Fp8Operand {
  const Fp8Weight* slots;
  int scale_stride;
  static constexpr int kRowBytes = kStepK;
  static constexpr int kStages = 5;  // 2 blocks of 100 KiB per SM, 128 KiB in flight
  static constexpr bool kScaled = true;
  static constexpr int kXSwizzle = 1;
  struct Slot {
    const char* values;
    const float* scales;
    int64_t row_bytes;
    int scale_stride;
    __device__ const char* Row(int row, int k0) const { return values + row * row_bytes + k0; }
    __device__ const float* Scale(int row, int k0) const {
      return scales + (row / kFp8BlockSize) * scale_stride + k0 / kFp8BlockSize;
    }
  };
  __device__ Slot Get(int slot, int k) const {
    const Fp8Weight w = slots[slot];
    return {reinterpret_cast<const char*>(w.values), w.scales, k, scale_stride};
  }
  __device__ static void Step(const StageView& v, PassSums& sums) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint4 b[kNTiles][2];
#pragma unroll
      for (int j = 0; j < kNTiles; ++j) {
        const int row = 8 * j + v.g;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          b[j][half] = row < v.rows ? LoadShared(v.activations, row, kXRowBytes,
                                                 8 * h + 2 * v.t + half, kXSwizzle)
                                    : make_uint4(0, 0, 0, 0);
        }
      }
#pragma unroll
      for (int i = 0; i < kMTiles; ++i) {
        const int row = v.warp_row + 16 * i + v.g;
        const uint4 codes_low = LoadShared(v.weights, row, kRowBytes, 4 * h + v.t, 4);
        const uint4 codes_high = LoadShared(v.weights, row + 8, kRowBytes, 4 * h + v.t, 4);
        const uint4 low[2] = {Widen(codes_low.x, codes_low.y), Widen(codes_low.z, codes_low.w)};
        const uint4 high[2] = {Widen(codes_high.x, codes_high.y),
                               Widen(codes_high.z, codes_high.w)};
        MmaTiles(low, high, b, v.ntiles, sums[i]);
      }
    }
  }
};

template <class Operand>
constexpr int StageBytes() {
  return kBlockColumns * Operand::kRowBytes + kXStageBytes + kScaleSlotBytes;
}
template <class Operand>
constexpr int GemmSharedBytes() {
  return Operand::kStages * StageBytes<Operand>();
}

template <class Operand>
__global__ void __launch_bounds__(kGemmThreads)
    DeviceGroupedGemmKernel(const __nv_bfloat16* __restrict__ x, DeviceSlotPlan plan,
                            Operand operand, int n, int k, __nv_bfloat16* __restrict__ y) {
  extern __shared__ __align__(16) char stages[];
  const int slot = SlotOfBlock<kGemmThreads>(plan.offsets, plan.slots);
  if (slot < 0) return;
  const int begin = plan.offsets[slot], end = plan.offsets[slot + 1];
  if (begin >= end) return;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int block_column = blockIdx.x * kBlockColumns;
  const typename Operand::Slot weights = operand.Get(slot, k);
  const int steps = k / kStepK;
  constexpr int kRowUnits = Operand::kRowBytes / kUnitBytes;
  constexpr int kXRowUnits = kXRowBytes / kUnitBytes;
  const bool warp_computes = block_column + warp * kWarpRows < n;
  StageView view{nullptr, nullptr, warp * kWarpRows, lane / 4, lane % 4, 0, 0};

  for (int pass = begin; pass < end; pass += kPassRows) {
    const int rows = min(kPassRows, end - pass);
    view.rows = rows;
    view.ntiles = (rows + 7) / 8;
    // This thread's activation copies: units threadIdx.x + kGemmThreads * m of the stage.
    const __nv_bfloat16* x_rows[kXStageBytes / kUnitBytes / kGemmThreads];
#pragma unroll
    for (int m = 0; m < kXStageBytes / kUnitBytes / kGemmThreads; ++m) {
      const int r = (threadIdx.x + kGemmThreads * m) / kXRowUnits;
      const int source = r >= rows                     ? -1
                         : plan.source_rows != nullptr ? plan.source_rows[pass + r]
                                                       : pass + r;
      x_rows[m] = source < 0 ? nullptr : x + static_cast<int64_t>(source) * k;
    }
    auto load_stage = [&](int step) {
      char* stage = stages + (step % Operand::kStages) * StageBytes<Operand>();
      const int k0 = step * kStepK;
#pragma unroll
      for (int m = 0; m < kRowUnits; ++m) {
        const int unit = threadIdx.x + kGemmThreads * m;
        const int r = unit / kRowUnits, u = unit % kRowUnits;
        const bool inside = block_column + r < n;
        const char* from = weights.Row(inside ? block_column + r : 0, k0) + u * kUnitBytes;
        CpAsync16(stage + r * Operand::kRowBytes + (u ^ ((r & 1) * 4)) * kUnitBytes, from,
                  inside ? kUnitBytes : 0);
      }
      char* activations = stage + kBlockColumns * Operand::kRowBytes;
#pragma unroll
      for (int m = 0; m < kXStageBytes / kUnitBytes / kGemmThreads; ++m) {
        if (x_rows[m] == nullptr) continue;
        const int unit = threadIdx.x + kGemmThreads * m;
        const int r = unit / kXRowUnits, u = unit % kXRowUnits;
        CpAsync16(activations + r * kXRowBytes + (u ^ ((r & 1) * Operand::kXSwizzle)) * kUnitBytes,
                  x_rows[m] + k0 + u * (kUnitBytes / 2), kUnitBytes);
      }
      if constexpr (Operand::kScaled) {
        if (threadIdx.x == 0) CpAsync4(activations + kXStageBytes, weights.Scale(block_column, k0));
      }
    };

    PassSums sums = {};
#pragma unroll
    for (int s = 0; s < Operand::kStages - 1; ++s) {
      if (s < steps) load_stage(s);
      CpAsyncCommit();  // empty groups keep the count of groups per step fixed
    }
    for (int step = 0; step < steps; ++step) {
      CpAsyncWait<Operand::kStages - 2>();  // this step's stage has landed (for this thread)
      __syncthreads();  // ... for every thread; and every warp is done with the oldest stage
      if (step + Operand::kStages - 1 < steps) load_stage(step + Operand::kStages - 1);
      CpAsyncCommit();
      if (!warp_computes) continue;
      const char* stage = stages + (step % Operand::kStages) * StageBytes<Operand>();
      view.weights = stage;
      view.activations = stage + kBlockColumns * Operand::kRowBytes;
      if constexpr (Operand::kScaled) {
        PassSums block = {};
        Operand::Step(view, block);
        const float scale = *reinterpret_cast<const float*>(view.activations + kXStageBytes);
#pragma unroll
        for (int i = 0; i < kMTiles; ++i)
#pragma unroll
          for (int j = 0; j < kNTiles; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) sums[i][j][e] = fmaf(block[i][j][e], scale, sums[i][j][e]);
      } else {
        Operand::Step(view, sums);
      }
    }
    __syncthreads();  // the next pass's first stages overwrite this pass's last

    // Lane (g, t) holds, per m tile i and half h, output column 16i + 8h + g for grouped rows
    // 2t and 2t + 1 of each n tile. Neighbour lanes (g, g ^ 1) swap one value so each stores two
    // adjacent columns of one row.
    const int g = view.g, t = view.t;
#pragma unroll
    for (int i = 0; i < kMTiles; ++i) {
#pragma unroll
      for (int j = 0; j < kNTiles; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float first = sums[i][j][2 * h], second = sums[i][j][2 * h + 1];
          const bool odd = g & 1;
          const float received = __shfl_xor_sync(0xffffffffu, odd ? first : second, 4);
          const int row = 8 * j + 2 * t + (odd ? 1 : 0);
          const int column = block_column + view.warp_row + 16 * i + 8 * h + (g & ~1);
          if (warp_computes && row < rows && column < n) {
            *reinterpret_cast<__nv_bfloat162*>(y + static_cast<int64_t>(pass + row) * n + column) =
                odd ? __floats2bfloat162_rn(received, second)
                    : __floats2bfloat162_rn(first, received);
          }
        }
      }
    }
  }
}

template <class Operand>
absl::Status LaunchGroupedGemm(const __nv_bfloat16* x, const DeviceSlotPlan& plan, Operand operand,
                               int n, int k, __nv_bfloat16* y, cudaStream_t stream) {
  constexpr int kShared = GemmSharedBytes<Operand>();
  // Above 48 KiB of dynamic shared memory a kernel must opt in (per kernel and device; setting
  // it again is cheap), as the attention kernels do.
  if (auto s =
          CudaStatus(cudaFuncSetAttribute(DeviceGroupedGemmKernel<Operand>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize, kShared),
                     "DeviceGroupedGemm shared memory");
      !s.ok()) {
    return s;
  }
  const int busy_bound =
      plan.busy_slot_bound >= 0 ? std::min(plan.slots, plan.busy_slot_bound) : plan.slots;
  if (busy_bound == 0) return absl::OkStatus();
  const dim3 grid((n + kBlockColumns - 1) / kBlockColumns, busy_bound);
  DeviceGroupedGemmKernel<<<grid, kGemmThreads, kShared, stream>>>(x, plan, operand, n, k, y);
  return CudaStatus(cudaGetLastError(), "DeviceGroupedGemm");
}

}  // namespace

size_t DeviceGroupedGemmSharedBytes() {
  return std::max(GemmSharedBytes<Bf16Operand>(), GemmSharedBytes<Fp8Operand>());
}

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
  if (weights.bf16 != nullptr) {
    return LaunchGroupedGemm(x, plan, Bf16Operand{weights.bf16}, n, k, y, stream);
  }
  return LaunchGroupedGemm(x, plan, Fp8Operand{weights.fp8, WeightScaleStride(k)}, n, k, y, stream);
}

absl::StatusOr<DeviceExpertMlp> DeviceExpertMlp::Create(int hidden, int intermediate, int max_rows,
                                                        cudaStream_t stream, Fp8Products fp8) {
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
  mlp.fp8_ = fp8;
  const size_t rows = static_cast<size_t>(std::max(max_rows, 1));
  const size_t padded = static_cast<size_t>(Fp8PaddedRows(static_cast<int64_t>(rows)));
  if (auto s = mlp.gate_up_.Reserve(padded * 2 * intermediate); !s.ok()) return s;
  if (auto s = mlp.activation_.Reserve(rows * intermediate); !s.ok()) return s;
  if (fp8 == Fp8Products::kRecipe) {
    auto supported = PrepareFp8GroupedGemmIfSupported();
    if (!supported.ok()) return supported.status();
    if (!*supported) {
      return absl::FailedPreconditionError(
          "DeviceExpertMlp: the FP8 recipe's grouped GEMM needs a GPU of compute capability 9.0");
    }
    for (auto s : {mlp.x_values_.Reserve(padded * hidden),
                   mlp.x_scales_.Reserve(padded * (hidden / kFp8BlockSize)),
                   mlp.activation_values_.Reserve(padded * intermediate),
                   mlp.activation_scales_.Reserve(padded * (intermediate / kFp8BlockSize))}) {
      if (!s.ok()) return s;
    }
  }
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
  if (gate_up.fp8 != nullptr && fp8_ == Fp8Products::kRecipe) {
    return Fp8GroupedSwiGlu(Fp8InputRows{.bf16 = x, .rows = plan.source_rows}, rows,
                            Fp8GemmSlotGroups{plan.offsets, gate_up.fp8, plan.slots, rows, rows},
                            Fp8GemmSlotGroups{plan.offsets, down.fp8, plan.slots, rows, rows},
                            hidden_, intermediate_,
                            {x_values_.data(), x_scales_.data(), gate_up_.data(),
                             activation_values_.data(), activation_scales_.data()},
                            y, stream_);
  }
  DeviceSlotPlan bounded = plan;
  bounded.busy_slot_bound = rows;
  if (auto s = DeviceGroupedGemm(x, bounded, gate_up, 2 * intermediate_, hidden_, gate_up_.data(),
                                 stream_);
      !s.ok()) {
    return s;
  }
  if (auto s = SiluMul(gate_up_.data(), activation_.data(), rows, intermediate_, stream_); !s.ok())
    return s;
  const DeviceSlotPlan grouped{plan.offsets, nullptr, plan.slots, rows};  // rows in order
  return DeviceGroupedGemm(activation_.data(), grouped, down, hidden_, intermediate_, y, stream_);
}

}  // namespace moeserve::kernels
