// Device helpers shared by the kernels that group (token, expert) rows by slot (device_moe.cu's
// PlanSlots, device_exchange.cu's PlanReceived): a row's rank inside its slot comes from a
// shared-memory counter, and a slot's rows and rank pack into one int; and by the grouped
// GEMMs that launch blocks for the busy slots only or for their row tiles (device_moe.cu,
// fp8_grouped_gemm.cu).
#pragma once

#include <cstdint>

#include "kernels/device_moe.h"
#include "kernels/reductions.cuh"

namespace moeserve::kernels {

inline constexpr int kSlotBits = 11;  // slots < 2^11 = kMaxPlannedSlots; the rank sits above
inline constexpr int kSlotMask = (1 << kSlotBits) - 1;
static_assert(kMaxPlannedSlots <= (1 << kSlotBits), "a slot id fits its bits");
static_assert(kMaxPlannedPairs <= (1 << (31 - kSlotBits)), "a rank fits above the slot id");

// counts [slots] (shared memory, the rows of each slot) -> offsets [slots + 1] (each slot's
// first row, then the total), counts[s] = offsets[s], and load[s] += rows (load may be null).
// Run by the first warp of the block, between two __syncthreads().
__device__ inline void ScanSlotCounts(int32_t* counts, int slots, int32_t* offsets, int32_t* load) {
  if (threadIdx.x >= kWarpSize) return;
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

// Block-wide search: slot s owns units(s) consecutive units (a busy slot's one block, or its
// row tiles), in slot order; returns {slot, index inside the slot} of unit `wanted`, or
// {-1, 0} past the last unit. Every thread of the block of kThreads threads must call it (it
// contains __syncthreads()).
template <int kThreads, typename Units>
__device__ int2 FindSlotUnit(int wanted, int slots, Units units) {
  static_assert(kThreads % kWarpSize == 0, "whole warps");
  __shared__ int warp_totals[kThreads / kWarpSize];
  __shared__ int2 found;
  const int per_thread = (slots + kThreads - 1) / kThreads;
  const int first = min(static_cast<int>(threadIdx.x) * per_thread, slots);
  const int last = min(first + per_thread, slots);
  int mine = 0;
  for (int s = first; s < last; ++s) mine += units(s);
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  int inclusive = mine;
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const int before = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += before;
  }
  if (lane == kWarpSize - 1) warp_totals[warp] = inclusive;
  if (threadIdx.x == 0) found = make_int2(-1, 0);
  __syncthreads();
  int seen = inclusive - mine;
  for (int w = 0; w < warp; ++w) seen += warp_totals[w];
  if (wanted >= seen && wanted < seen + mine) {
    for (int s = first; s < last; ++s) {
      const int count = units(s);
      if (wanted < seen + count) {
        found = make_int2(s, wanted - seen);
        break;
      }
      seen += count;
    }
  }
  __syncthreads();
  return found;
}

// The slot this block (blockIdx.y) computes, or -1, found by the whole block of kThreads
// threads. A grid of one block row per slot maps rows to slots; a smaller one (GEMM blocks are
// launched for at most as many slots as the step has rows, not for every slot of the layer)
// gives block row b the b-th slot with rows, in slot order. Contains __syncthreads() in that
// case: every thread must call it.
template <int kThreads>
__device__ int SlotOfBlock(const int32_t* __restrict__ offsets, int slots) {
  if (static_cast<int>(gridDim.y) == slots) return static_cast<int>(blockIdx.y);
  return FindSlotUnit<kThreads>(static_cast<int>(blockIdx.y), slots,
                                [&](int s) { return offsets[s + 1] > offsets[s] ? 1 : 0; })
      .x;
}

// A block's tile when every slot's rows are cut into tiles of tile_rows: block row b
// (blockIdx.y) takes the b-th tile in slot order. Returns {slot, first row} or {-1, 0} past the
// last tile. Every thread of the block must call it (it contains __syncthreads()).
template <int kThreads>
__device__ int2 TileOfBlock(const int32_t* __restrict__ offsets, int slots, int tile_rows) {
  const int2 unit = FindSlotUnit<kThreads>(static_cast<int>(blockIdx.y), slots, [&](int s) {
    return (offsets[s + 1] - offsets[s] + tile_rows - 1) / tile_rows;
  });
  if (unit.x < 0) return unit;
  return make_int2(unit.x, offsets[unit.x] + unit.y * tile_rows);
}

}  // namespace moeserve::kernels
