#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/fp8.h"
#include "kernels/fp8_grouped_gemm.h"
#include "kernels/reductions.cuh"
#include "kernels/slot_groups.cuh"
#include "kernels/tensor_core.cuh"

// The wgmma instructions exist on sm_90a only; elsewhere the kernel body is a trap and
// Fp8GroupedGemmSupported keeps callers away.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MOESERVE_WGMMA 1
#endif

namespace moeserve::kernels {
namespace {

// ---- Narrow tiles (Fp8GemmTiles::kNarrow) ---------------------------------------------------
//
// A block of two warpgroups computes 128 output columns (two 64-column halves, one per
// warpgroup: the weight is wgmma's 64-row A operand) for 64 rows of one group (the N
// operand). Per 128-wide k slice a stage holds the weight's 128 x 128 codes, the 64 rows' codes
// (both K-major, 128 bytes a row, in wgmma's 128-byte swizzle), their 64 scales and the
// weight block's scale. Four stages let three slices be in flight while one is multiplied, and
// two blocks fit on an SM (128 registers a thread), so one block's promotion and stage wait
// hide behind the other's multiplies.
constexpr int kThreads = 256;
constexpr int kBlockColumns = 128;
constexpr int kBlockRows = 64;
constexpr int kStages = 4;
constexpr int kSliceBytes = kFp8BlockSize;  // one e4m3 row of a 128-wide k slice
constexpr int kWeightStageBytes = kBlockColumns * kSliceBytes;
constexpr int kRowStageBytes = kBlockRows * kSliceBytes;
constexpr int kScaleStageBytes = kBlockRows * 4 + 16;  // row scales, then the weight's
constexpr int kStageBytes =
    (kWeightStageBytes + kRowStageBytes + kScaleStageBytes + 1023) / 1024 * 1024;
constexpr int kSharedBytes = kStages * kStageBytes + 1024;  // + alignment to the 1 KiB swizzle
constexpr int kAccumulators = kBlockRows / 2;  // per thread: 64 columns x 64 rows / 128 threads
static_assert(kBlockColumns * kSliceBytes / 16 == 4 * kThreads, "four weight units per thread");
static_assert(kBlockRows * kSliceBytes / 16 == 2 * kThreads, "two row units per thread");

// wgmma's shared-memory matrix descriptor for a K-major operand whose rows are 128 bytes in the
// 128-byte swizzle: 8-row core groups 1024 bytes apart. Moving `address` by 32 bytes steps k by
// 32 inside the swizzle atom.
__device__ __forceinline__ uint64_t SwizzledOperand(const void* address) {
  const uint32_t shared = SharedAddress(address);
  uint64_t descriptor = (shared & 0x3FFFF) >> 4;
  descriptor |= uint64_t{1} << 16;          // leading-dimension offset: unused for this layout
  descriptor |= uint64_t{1024 >> 4} << 32;  // stride between 8-row groups
  descriptor |= uint64_t{1} << 62;          // 128-byte swizzle
  return descriptor;
}

// Where a 16-byte unit u (0-7) of row r lands in a 128-byte-swizzled tile.
__device__ __forceinline__ int SwizzledUnit(int r, int u) {
  return r * kSliceBytes + ((u ^ (r & 7)) * 16);
}

// d (+)= A · B^T for a 64 x 64 tile and k 32: A the weight's 64 rows, B 64 activation rows.
// Lane l of warp w of the warpgroup holds d[4j + i] at weight row 16w + l / 4 + 8 (i / 2) and
// activation row 8j + 2 (l % 4) + i % 2.
__device__ __forceinline__ void WgmmaE4m3(float (&d)[kAccumulators], uint64_t a, uint64_t b,
                                          int accumulate) {
#ifdef MOESERVE_WGMMA
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "
      "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(a), "l"(b), "r"(accumulate));
#else
  __trap();
#endif
}

__device__ __forceinline__ void WgmmaFence() {
#ifdef MOESERVE_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void WgmmaCommitAndWait() {
#ifdef MOESERVE_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#endif
}
// cp.async writes through the generic proxy, wgmma reads through the async one.
__device__ __forceinline__ void FenceSharedForWgmma() {
#ifdef MOESERVE_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// Keeps the compiler from moving reads of the accumulators above the wait.
template <int kCount>
__device__ __forceinline__ void PinAccumulators(float (&d)[kCount]) {
#pragma unroll
  for (int i = 0; i < kCount; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// One group's rows [begin, end) against one block of 128 weight rows, 64 rows at a time.
__device__ void GroupTile(const __nv_fp8_e4m3* __restrict__ x, const float* __restrict__ x_scales,
                          int scale_rows, int begin, int end, const Fp8Weight& weight, int n, int k,
                          __nv_bfloat16* __restrict__ y, char* stages) {
  const int warpgroup = threadIdx.x / 128, warp = (threadIdx.x % 128) / kWarpSize,
            lane = threadIdx.x % kWarpSize;
  const int column0 = blockIdx.x * kBlockColumns;
  const int slices = k / kFp8BlockSize;
  const __nv_fp8_e4m3* w = weight.values + static_cast<int64_t>(column0) * k;
  const float* w_scales =
      weight.scales + static_cast<int64_t>(column0 / kFp8BlockSize) * WeightScaleStride(k);

  for (int row0 = begin; row0 < end; row0 += kBlockRows) {
    const int rows = min(kBlockRows, end - row0);
    const __nv_fp8_e4m3* x_block = x + static_cast<int64_t>(row0) * k;
    auto load_stage = [&](int slice) {
      char* weights = stages + (slice % kStages) * kStageBytes;
      char* activations = weights + kWeightStageBytes;
      float* scales = reinterpret_cast<float*>(activations + kRowStageBytes);
      const int64_t k0 = static_cast<int64_t>(slice) * kFp8BlockSize;
#pragma unroll
      for (int m = 0; m < 4; ++m) {
        const int unit = threadIdx.x + kThreads * m, r = unit / 8, u = unit % 8;
        CpAsync16(weights + SwizzledUnit(r, u), w + r * static_cast<int64_t>(k) + k0 + u * 16, 16);
      }
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        const int unit = threadIdx.x + kThreads * m, r = unit / 8, u = unit % 8;
        const bool real = r < rows;  // rows past the group's end are zeros
        CpAsync16(activations + SwizzledUnit(r, u),
                  real ? x_block + r * static_cast<int64_t>(k) + k0 + u * 16 : x_block,
                  real ? 16 : 0);
      }
      if (threadIdx.x < kBlockRows) {
        const int r = threadIdx.x;
        if (r < rows) {
          CpAsync4(scales + r, x_scales + static_cast<int64_t>(slice) * scale_rows + row0 + r);
        } else {
          scales[r] = 0.0f;
        }
      } else if (threadIdx.x == kBlockRows) {
        CpAsync4(scales + kBlockRows, w_scales + slice);
      }
    };

    float total[kAccumulators] = {}, slice_sum[kAccumulators];
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < slices) load_stage(s);
      CpAsyncCommit();  // empty groups keep the count of groups per slice fixed
    }
    for (int slice = 0; slice < slices; ++slice) {
      CpAsyncWait<kStages - 2>();  // this slice's stage has landed (for this thread)
      FenceSharedForWgmma();
      __syncthreads();  // ... for every thread; and every warpgroup is done with the oldest stage
      if (slice + kStages - 1 < slices) load_stage(slice + kStages - 1);
      CpAsyncCommit();
      const char* weights = stages + (slice % kStages) * kStageBytes;
      const char* activations = weights + kWeightStageBytes;
      const float* scales = reinterpret_cast<const float*>(activations + kRowStageBytes);
      WgmmaFence();
#pragma unroll
      for (int step = 0; step < kFp8BlockSize / 32; ++step) {
        WgmmaE4m3(slice_sum, SwizzledOperand(weights + warpgroup * 64 * kSliceBytes + step * 32),
                  SwizzledOperand(activations + step * 32), step > 0);
      }
      WgmmaCommitAndWait();
      PinAccumulators(slice_sum);
      const float weight_scale = scales[kBlockRows];
#pragma unroll
      for (int j = 0; j < kBlockRows / 8; ++j) {
        const float2 row_scales = *reinterpret_cast<const float2*>(scales + 8 * j + 2 * (lane % 4));
        const float first = weight_scale * row_scales.x, second = weight_scale * row_scales.y;
        total[4 * j + 0] = fmaf(slice_sum[4 * j + 0], first, total[4 * j + 0]);
        total[4 * j + 1] = fmaf(slice_sum[4 * j + 1], second, total[4 * j + 1]);
        total[4 * j + 2] = fmaf(slice_sum[4 * j + 2], first, total[4 * j + 2]);
        total[4 * j + 3] = fmaf(slice_sum[4 * j + 3], second, total[4 * j + 3]);
      }
    }
    __syncthreads();  // the next rows' first stages overwrite this pass's last

    const int column = column0 + warpgroup * 64 + warp * 16 + lane / 4;
#pragma unroll
    for (int j = 0; j < kBlockRows / 8; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = 8 * j + 2 * (lane % 4) + i % 2;
        if (r < rows) {
          y[static_cast<int64_t>(row0 + r) * n + column + 8 * (i / 2)] =
              __float2bfloat16(total[4 * j + i]);
        }
      }
    }
  }
}

__device__ __forceinline__ char* AlignedStages() {
  extern __shared__ char shared[];
  return reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(shared) + 1023) & ~uintptr_t{1023});
}

// ---- Wide tiles (Fp8GemmTiles::kWide) -------------------------------------------------------
//
// A block of three warpgroups computes one tile of 128 rows of a group by 128 weight columns.
// The first warpgroup only loads: per 128-wide k slice a stage holds the rows' codes, the
// weight's 128 x 128 codes (both K-major, 128-byte swizzle), the rows' scales and the weight
// block's scale, and the loader's cp.async copies arrive on the stage's `full` barrier as they
// land. The two others multiply 64 rows each (wgmma m64n128, the rows as the 64-row operand),
// release the stage on its `empty` barrier once they have read it, and promote the slice while
// the loader refills it and the other warpgroup's multiplies run. One block per SM.
namespace wide {
constexpr int kThreads = 384;
constexpr int kLoaders = 128;  // the first warpgroup
constexpr int kConsumers = 256;
constexpr int kTileRows = 128;
constexpr int kTileColumns = 128;
constexpr int kStages = 6;
constexpr int kOperandBytes = 128 * kSliceBytes;            // 128 rows (or weight rows) of a slice
constexpr int kStageBytes = 2 * kOperandBytes + 1024;       // + 128 row scales and the weight's
constexpr int kSharedBytes = kStages * kStageBytes + 1024;  // + alignment to the 1 KiB swizzle
constexpr int kAccumulators = 64;                           // 64 rows x 128 columns / 128 threads
static_assert(2 * kOperandBytes / 16 == 16 * kLoaders, "sixteen 16-byte units per loader");
static_assert(kLoaders + kConsumers == kThreads && kTileRows == kLoaders, "a scale per loader");
}  // namespace wide

// d (+)= A · B^T for 64 rows and 128 columns, k 32: A 64 activation rows, B 128 weight rows
// (both K-major, 128-byte swizzle). Lane l of warp w of the warpgroup holds d[4j + i] at row
// 16w + l / 4 + 8 (i / 2) and column 8j + 2 (l % 4) + i % 2.
__device__ __forceinline__ void WgmmaE4m3Wide(float (&d)[64], uint64_t a, uint64_t b,
                                              int accumulate) {
#ifdef MOESERVE_WGMMA
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "
      "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "
      "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "
      "%56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
        "+f"(d[63])
      : "l"(a), "l"(b), "r"(accumulate));
#else
  __trap();
#endif
}

// Shared-memory barriers (mbarrier) that hand a stage from the loader to the consumers and back.
__device__ __forceinline__ void BarrierInit(uint64_t* barrier, int arrivals) {
#ifdef MOESERVE_WGMMA
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(SharedAddress(barrier)),
               "r"(arrivals)
               : "memory");
#endif
}
__device__ __forceinline__ void BarrierArrive(uint64_t* barrier) {
#ifdef MOESERVE_WGMMA
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(SharedAddress(barrier))
               : "memory");
#endif
}
// Arrives once every cp.async this thread issued before has landed (the arrival was counted in
// the barrier's init).
__device__ __forceinline__ void BarrierArriveOnCopies(uint64_t* barrier) {
#ifdef MOESERVE_WGMMA
  asm volatile(
      "cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(SharedAddress(barrier))
      : "memory");
#endif
}
// Waits for the completion of the barrier's phase of this parity.
__device__ __forceinline__ void BarrierWait(uint64_t* barrier, int parity) {
#ifdef MOESERVE_WGMMA
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(SharedAddress(barrier)), "r"(parity)
        : "memory");
  } while (done == 0);
#endif
}
// Four bytes, or zeros where `real` is false.
__device__ __forceinline__ void CpAsync4OrZero(void* shared, const void* global, bool real) {
#ifdef MOESERVE_WGMMA
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(SharedAddress(shared)),
               "l"(global), "r"(real ? 4 : 0));
#endif
}

// The loader's part: every slice of the tile's rows [row0, row0 + rows) and weight columns.
__device__ void LoadWideTile(const __nv_fp8_e4m3* __restrict__ x,
                             const float* __restrict__ x_scales, int scale_rows, int row0, int rows,
                             const Fp8Weight& weight, int k, char* stages, uint64_t* full,
                             uint64_t* empty) {
  const int t = threadIdx.x;  // 0 .. kLoaders - 1
  const int column0 = blockIdx.x * wide::kTileColumns;
  const int slices = k / kFp8BlockSize;
  const __nv_fp8_e4m3* w = weight.values + static_cast<int64_t>(column0) * k;
  const float* w_scales =
      weight.scales + static_cast<int64_t>(column0 / kFp8BlockSize) * WeightScaleStride(k);
  const __nv_fp8_e4m3* x_tile = x + static_cast<int64_t>(row0) * k;
  for (int slice = 0; slice < slices; ++slice) {
    const int stage = slice % wide::kStages;
    // The consumers' release of this stage's previous use.
    if (slice >= wide::kStages) BarrierWait(&empty[stage], (slice / wide::kStages - 1) & 1);
    char* activations = stages + stage * wide::kStageBytes;
    char* weights = activations + wide::kOperandBytes;
    float* scales = reinterpret_cast<float*>(weights + wide::kOperandBytes);
    const int64_t k0 = static_cast<int64_t>(slice) * kFp8BlockSize;
#pragma unroll
    for (int m = 0; m < 8; ++m) {
      const int unit = t + wide::kLoaders * m, r = unit / 8, u = unit % 8;
      CpAsync16(weights + SwizzledUnit(r, u), w + r * static_cast<int64_t>(k) + k0 + u * 16, 16);
      const bool real = r < rows;  // rows past the tile's end are zeros
      CpAsync16(activations + SwizzledUnit(r, u),
                real ? x_tile + r * static_cast<int64_t>(k) + k0 + u * 16 : x_tile, real ? 16 : 0);
    }
    const bool real = t < rows;
    CpAsync4OrZero(scales + t,
                   x_scales + static_cast<int64_t>(slice) * scale_rows + row0 + (real ? t : 0),
                   real);
    if (t == 0) CpAsync4(scales + wide::kTileRows, w_scales + slice);
    BarrierArriveOnCopies(&full[stage]);
  }
  CpAsyncCommit();  // nothing of this thread's left in flight when it exits
  CpAsyncWait<0>();
}

// A consumer warpgroup's part: its 64 rows of the tile against the 128 weight columns.
__device__ void MultiplyWideTile(int row0, int rows, int n, int k, __nv_bfloat16* __restrict__ y,
                                 const char* stages, uint64_t* full, uint64_t* empty) {
  const int consumer = threadIdx.x / 128 - 1, warp = (threadIdx.x % 128) / kWarpSize,
            lane = threadIdx.x % kWarpSize;
  const int slices = k / kFp8BlockSize;
  const int first_row = consumer * 64;  // of the tile
  const bool busy = first_row < rows;   // a warpgroup wholly past the group's end only keeps pace
  const int scale_row = first_row + 16 * warp + lane / 4;  // and + 8
  float total[wide::kAccumulators] = {}, slice_sum[wide::kAccumulators];
  for (int slice = 0; slice < slices; ++slice) {
    const int stage = slice % wide::kStages;
    BarrierWait(&full[stage], (slice / wide::kStages) & 1);
    const char* activations = stages + stage * wide::kStageBytes;
    const char* weights = activations + wide::kOperandBytes;
    const float* scales = reinterpret_cast<const float*>(weights + wide::kOperandBytes);
    float first = 0.0f, second = 0.0f;
    if (busy) {
      FenceSharedForWgmma();
      WgmmaFence();
#pragma unroll
      for (int step = 0; step < kFp8BlockSize / 32; ++step) {
        WgmmaE4m3Wide(slice_sum, SwizzledOperand(activations + first_row * kSliceBytes + step * 32),
                      SwizzledOperand(weights + step * 32), step > 0);
      }
      WgmmaCommitAndWait();
      PinAccumulators(slice_sum);
      const float weight_scale = scales[wide::kTileRows];
      first = weight_scale * scales[scale_row];
      second = weight_scale * scales[scale_row + 8];
    }
    BarrierArrive(&empty[stage]);  // read: the loader may refill it
    if (busy) {
#pragma unroll
      for (int i = 0; i < wide::kAccumulators; ++i) {
        total[i] = fmaf(slice_sum[i], (i % 4) < 2 ? first : second, total[i]);
      }
    }
  }
  if (!busy) return;
  const int column = blockIdx.x * wide::kTileColumns + 2 * (lane % 4);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = scale_row + 8 * half;
    if (r >= rows) continue;
    __nv_bfloat16* out = y + static_cast<int64_t>(row0 + r) * n + column;
#pragma unroll
    for (int j = 0; j < wide::kTileColumns / 8; ++j) {
      *reinterpret_cast<__nv_bfloat162*>(out + 8 * j) =
          __floats2bfloat162_rn(total[4 * j + 2 * half], total[4 * j + 2 * half + 1]);
    }
  }
}

// One block's wide tile: rows [row0, row0 + rows) of a group, rows <= kTileRows.
__device__ void WideTile(const __nv_fp8_e4m3* __restrict__ x, const float* __restrict__ x_scales,
                         int scale_rows, int row0, int rows, const Fp8Weight& weight, int n, int k,
                         __nv_bfloat16* __restrict__ y, char* stages) {
  __shared__ __align__(8) uint64_t full[wide::kStages], empty[wide::kStages];
  if (threadIdx.x == 0) {
    for (int s = 0; s < wide::kStages; ++s) {
      BarrierInit(&full[s], wide::kLoaders);
      BarrierInit(&empty[s], wide::kConsumers);
    }
  }
  __syncthreads();
  if (threadIdx.x < wide::kLoaders) {
    LoadWideTile(x, x_scales, scale_rows, row0, rows, weight, k, stages, full, empty);
  } else {
    MultiplyWideTile(row0, rows, n, k, y, stages, full, empty);
  }
}

__global__ void __launch_bounds__(kThreads, 2)
    GroupListKernel(const __nv_fp8_e4m3* __restrict__ x, const float* __restrict__ x_scales,
                    int scale_rows, const __grid_constant__ Fp8GemmGroupList groups, int n, int k,
                    __nv_bfloat16* __restrict__ y) {
  const int g = blockIdx.y;
  const int begin = groups.offsets[g], end = groups.offsets[g + 1];
  if (begin >= end) return;
  GroupTile(x, x_scales, scale_rows, begin, end, groups.weights[g], n, k, y, AlignedStages());
}

__global__ void __launch_bounds__(kThreads, 2)
    SlotGroupsKernel(const __nv_fp8_e4m3* __restrict__ x, const float* __restrict__ x_scales,
                     int scale_rows, Fp8GemmSlotGroups groups, int n, int k,
                     __nv_bfloat16* __restrict__ y) {
  const int slot = SlotOfBlock<kThreads>(groups.offsets, groups.slots);
  if (slot < 0) return;
  const int begin = groups.offsets[slot], end = groups.offsets[slot + 1];
  if (begin >= end) return;
  GroupTile(x, x_scales, scale_rows, begin, end, groups.weights[slot], n, k, y, AlignedStages());
}

__global__ void __launch_bounds__(wide::kThreads, 1)
    WideGroupListKernel(const __nv_fp8_e4m3* __restrict__ x, const float* __restrict__ x_scales,
                        int scale_rows, const __grid_constant__ Fp8GemmGroupList groups, int n,
                        int k, __nv_bfloat16* __restrict__ y) {
  const int2 tile = TileOfBlock<wide::kThreads>(groups.offsets, groups.count, wide::kTileRows);
  if (tile.x < 0) return;
  const int rows = min(wide::kTileRows, groups.offsets[tile.x + 1] - tile.y);
  WideTile(x, x_scales, scale_rows, tile.y, rows, groups.weights[tile.x], n, k, y, AlignedStages());
}

__global__ void __launch_bounds__(wide::kThreads, 1)
    WideSlotGroupsKernel(const __nv_fp8_e4m3* __restrict__ x, const float* __restrict__ x_scales,
                         int scale_rows, Fp8GemmSlotGroups groups, int n, int k,
                         __nv_bfloat16* __restrict__ y) {
  const int2 tile = TileOfBlock<wide::kThreads>(groups.offsets, groups.slots, wide::kTileRows);
  if (tile.x < 0) return;
  const int rows = min(wide::kTileRows, groups.offsets[tile.x + 1] - tile.y);
  WideTile(x, x_scales, scale_rows, tile.y, rows, groups.weights[tile.x], n, k, y, AlignedStages());
}

// (This library sits below moeserve_kernels, so it does not use kernels.h's CudaStatus.)
absl::Status Status(cudaError_t error, const char* what) {
  if (error == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorString(error)));
}

absl::Status CheckShape(int n, int k, int scale_rows) {
  if (n <= 0 || k <= 0 || n % kBlockColumns != 0 || k % kFp8BlockSize != 0 || scale_rows < 0) {
    return absl::InvalidArgumentError(absl::StrCat("Fp8GroupedGemm: n ", n, ", k ", k,
                                                   ": both must be positive multiples of 128"));
  }
  return absl::OkStatus();
}

// kBySize's rule: wide tiles where the busy groups average more than kWideTileMinMeanRows rows.
bool UseWideTiles(int rows, int busy_groups) {
  return busy_groups > 0 && rows > kWideTileMinMeanRows * busy_groups;
}

}  // namespace

bool Fp8GroupedGemmSupported(int device) {
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    return false;
  }
  return major == 9 && minor == 0;
}

absl::Status PrepareFp8GroupedGemm() {
  const std::pair<const void*, int> kernels[] = {
      {reinterpret_cast<const void*>(GroupListKernel), kSharedBytes},
      {reinterpret_cast<const void*>(SlotGroupsKernel), kSharedBytes},
      {reinterpret_cast<const void*>(WideGroupListKernel), wide::kSharedBytes},
      {reinterpret_cast<const void*>(WideSlotGroupsKernel), wide::kSharedBytes}};
  for (const auto& [kernel, bytes] : kernels) {
    if (auto s =
            Status(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
                   "Fp8GroupedGemm shared memory");
        !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<bool> PrepareFp8GroupedGemmIfSupported() {
  int device = 0;
  if (auto s = Status(cudaGetDevice(&device), "cudaGetDevice"); !s.ok()) return s;
  if (!Fp8GroupedGemmSupported(device)) return false;
  if (auto s = PrepareFp8GroupedGemm(); !s.ok()) return s;
  return true;
}

absl::Status Fp8GroupedGemm(const __nv_fp8_e4m3* x, const float* x_scales, int scale_rows,
                            const Fp8GemmGroupList& groups, int n, int k, __nv_bfloat16* y,
                            cudaStream_t stream, Fp8GemmTiles tiles) {
  if (auto s = CheckShape(n, k, scale_rows); !s.ok()) return s;
  if (groups.count < 0 || groups.count > kMaxFp8RowGroups) {
    return absl::InvalidArgumentError(
        absl::StrCat("Fp8GroupedGemm: ", groups.count, " groups, at most ", kMaxFp8RowGroups));
  }
  if (groups.count == 0) return absl::OkStatus();
  int busy = 0, wide_tiles = 0;
  for (int g = 0; g < groups.count; ++g) {
    const int rows = groups.offsets[g + 1] - groups.offsets[g];
    busy += rows > 0;
    wide_tiles += (rows + wide::kTileRows - 1) / wide::kTileRows;
  }
  if (tiles == Fp8GemmTiles::kBySize) {
    tiles = UseWideTiles(groups.offsets[groups.count] - groups.offsets[0], busy)
                ? Fp8GemmTiles::kWide
                : Fp8GemmTiles::kNarrow;
  }
  if (tiles == Fp8GemmTiles::kWide) {
    if (wide_tiles == 0) return absl::OkStatus();
    WideGroupListKernel<<<dim3(n / wide::kTileColumns, wide_tiles), wide::kThreads,
                          wide::kSharedBytes, stream>>>(x, x_scales, scale_rows, groups, n, k, y);
  } else {
    GroupListKernel<<<dim3(n / kBlockColumns, groups.count), kThreads, kSharedBytes, stream>>>(
        x, x_scales, scale_rows, groups, n, k, y);
  }
  return Status(cudaGetLastError(), "Fp8GroupedGemm launch");
}

absl::Status Fp8GroupedGemm(const __nv_fp8_e4m3* x, const float* x_scales, int scale_rows,
                            const Fp8GemmSlotGroups& groups, int n, int k, __nv_bfloat16* y,
                            cudaStream_t stream, Fp8GemmTiles tiles) {
  if (auto s = CheckShape(n, k, scale_rows); !s.ok()) return s;
  const int busy_bound =
      groups.busy_slot_bound >= 0 ? std::min(groups.slots, groups.busy_slot_bound) : groups.slots;
  if (busy_bound <= 0 || groups.row_bound == 0) return absl::OkStatus();
  if (tiles == Fp8GemmTiles::kBySize) {
    tiles = groups.row_bound > 0 && UseWideTiles(groups.row_bound, busy_bound)
                ? Fp8GemmTiles::kWide
                : Fp8GemmTiles::kNarrow;
  }
  if (tiles == Fp8GemmTiles::kWide) {
    if (groups.row_bound < 0) {
      return absl::InvalidArgumentError("Fp8GroupedGemm: wide tiles need the slots' row_bound");
    }
    // Each busy slot's last tile may be partial: at most row_bound / 128 whole tiles besides.
    const int wide_tiles = busy_bound + groups.row_bound / wide::kTileRows;
    WideSlotGroupsKernel<<<dim3(n / wide::kTileColumns, wide_tiles), wide::kThreads,
                           wide::kSharedBytes, stream>>>(x, x_scales, scale_rows, groups, n, k, y);
  } else {
    SlotGroupsKernel<<<dim3(n / kBlockColumns, busy_bound), kThreads, kSharedBytes, stream>>>(
        x, x_scales, scale_rows, groups, n, k, y);
  }
  return Status(cudaGetLastError(), "Fp8GroupedGemm launch");
}

}  // namespace moeserve::kernels
