#include <algorithm>

#include "absl/strings/str_cat.h"
#include "kernels/device_exchange.h"
#include "kernels/kernels.h"
#include "kernels/reductions.cuh"
#include "kernels/slot_groups.cuh"

namespace moeserve::kernels {
namespace {

constexpr int kDestinationThreads = 256;
constexpr int kReceiveThreads = 1024;

__device__ inline int32_t* BlockHeader(__nv_bfloat16* buffer, const ExchangeShape& shape, int p) {
  return reinterpret_cast<int32_t*>(buffer + shape.BlockOffset(p));
}
__device__ inline const int32_t* BlockHeader(const __nv_bfloat16* buffer,
                                             const ExchangeShape& shape, int p) {
  return reinterpret_cast<const int32_t*>(buffer + shape.BlockOffset(p));
}

// The global slot of pair j of `token` (parallel::PlanDispatch's replica rule).
__device__ inline int PairSlot(const int32_t* experts, int token, int j, int top_k,
                               const DeviceReplicaTable& table, int rank) {
  const int expert = experts[token * top_k + j];
  const int begin = table.replica_begin[expert];
  const int replicas = table.replica_begin[expert + 1] - begin;
  return table.replica_slots[begin + (token + rank) % replicas];
}

// Exclusive prefix sum over the block of two counts at once (blockDim.x ==
// kDestinationThreads); `totals` receives the block's sums.
__device__ inline int2 BlockExclusiveScan2(int2 value, int2& totals) {
  __shared__ int2 warp_sums[kDestinationThreads / kWarpSize];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  int2 inclusive = value;
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const int x = __shfl_up_sync(0xffffffffu, inclusive.x, offset);
    const int y = __shfl_up_sync(0xffffffffu, inclusive.y, offset);
    if (lane >= offset) {
      inclusive.x += x;
      inclusive.y += y;
    }
  }
  if (lane == kWarpSize - 1) warp_sums[warp] = inclusive;
  __syncthreads();
  int2 before{0, 0};
  totals = {0, 0};
  for (int w = 0; w < kDestinationThreads / kWarpSize; ++w) {
    if (w < warp) {
      before.x += warp_sums[w].x;
      before.y += warp_sums[w].y;
    }
    totals.x += warp_sums[w].x;
    totals.y += warp_sums[w].y;
  }
  __syncthreads();  // warp_sums is reused by the next call
  return {before.x + inclusive.x - value.x, before.y + inclusive.y - value.y};
}

// Block p plans destination p: its rows in token order, a token's entries in top-k order.
__global__ void __launch_bounds__(kDestinationThreads)
    PlanDestinationsKernel(const int32_t* __restrict__ experts, int tokens, int top_k,
                           DeviceReplicaTable table, int slots_per_rank, int rank,
                           ExchangeShape shape, __nv_bfloat16* dispatch,
                           int32_t* __restrict__ dispatch_index, int32_t* __restrict__ positions,
                           int32_t* __restrict__ peer_overflow) {
  const int p = blockIdx.x;
  int32_t* header = BlockHeader(dispatch, shape, p);
  int32_t* index = dispatch_index + static_cast<int64_t>(p) * shape.block_rows();
  for (int r = threadIdx.x; r < shape.block_rows(); r += blockDim.x) index[r] = -1;
  __syncthreads();
  int2 sent{0, 0};  // rows, entries so far (the same in every thread)
  for (int first = 0; first < tokens; first += blockDim.x) {
    const int token = first + threadIdx.x;
    int here = 0;
    if (token < tokens) {
      for (int j = 0; j < top_k; ++j) {
        here += PairSlot(experts, token, j, top_k, table, rank) / slots_per_rank == p;
      }
    }
    int2 totals;
    const int2 before = BlockExclusiveScan2({here > 0 ? 1 : 0, here}, totals);
    if (here > 0) {
      const int row = sent.x + before.x;
      if (row < shape.rows) index[shape.header_rows() + row] = token;
      int entry = sent.y + before.y;
      for (int j = 0; j < top_k; ++j) {
        const int slot = PairSlot(experts, token, j, top_k, table, rank);
        if (slot / slots_per_rank != p) continue;
        if (row < shape.rows && entry < shape.entries) {
          header[ExchangeShape::kHeaderInts + 2 * entry] = slot % slots_per_rank;
          header[ExchangeShape::kHeaderInts + 2 * entry + 1] = row;
          positions[token * top_k + j] = p * shape.entries + entry;
        } else {
          positions[token * top_k + j] = 0;  // not sent: the group redoes the step
        }
        ++entry;
      }
    }
    sent.x += totals.x;
    sent.y += totals.y;
  }
  if (threadIdx.x == 0) {
    header[0] = sent.x;
    header[1] = sent.y;
    header[3] = 0;
    peer_overflow[p] = sent.x > shape.rows || sent.y > shape.entries;
  }
}

// Marks every header with whether any destination overflowed.
__global__ void StampOverflowKernel(ExchangeShape shape, __nv_bfloat16* dispatch,
                                    const int32_t* __restrict__ peer_overflow) {
  int any = 0;
  for (int p = threadIdx.x; p < shape.ranks; p += blockDim.x) any |= peer_overflow[p];
  any = __syncthreads_or(any);
  for (int p = threadIdx.x; p < shape.ranks; p += blockDim.x) {
    BlockHeader(dispatch, shape, p)[2] = any;
  }
}

__global__ void __launch_bounds__(kReceiveThreads)
    PlanReceivedKernel(const __nv_bfloat16* __restrict__ received, ExchangeShape shape, int slots,
                       int32_t* __restrict__ offsets, int32_t* __restrict__ source_rows,
                       int32_t* __restrict__ grouped_rows, int32_t* __restrict__ load,
                       int32_t* __restrict__ overflow) {
  extern __shared__ int32_t shared[];
  int32_t* counts = shared;          // [slots]: rows, then each slot's first row
  int32_t* packed = shared + slots;  // [pairs]: slot | (rank among the slot's rows << kSlotBits)
  const int pairs = shape.ranks * shape.entries;
  for (int s = threadIdx.x; s < slots; s += blockDim.x) counts[s] = 0;
  __syncthreads();
  int bad = 0;
  for (int q = threadIdx.x; q < pairs; q += blockDim.x) {
    const int p = q / shape.entries, e = q % shape.entries;
    const int32_t* header = BlockHeader(received, shape, p);
    const int rows = header[0], entries = header[1];
    if (e == 0 && (header[2] != 0 || rows < 0 || rows > shape.rows || entries < 0 ||
                   entries > shape.entries)) {
      bad = 1;
    }
    packed[q] = -1;
    if (e < min(entries, shape.entries)) {
      const int slot = header[ExchangeShape::kHeaderInts + 2 * e];
      const int row = header[ExchangeShape::kHeaderInts + 2 * e + 1];
      if (slot < 0 || slot >= slots || row < 0 || row >= min(rows, shape.rows)) {
        bad = 1;  // not a plan's entry: dropped, and the step redone
      } else {
        packed[q] = slot | (atomicAdd(&counts[slot], 1) << kSlotBits);
      }
    }
  }
  bad = __syncthreads_or(bad);
  ScanSlotCounts(counts, slots, offsets, load);
  __syncthreads();
  for (int q = threadIdx.x; q < pairs; q += blockDim.x) {
    if (packed[q] < 0) {
      grouped_rows[q] = -1;
      continue;
    }
    const int p = q / shape.entries, e = q % shape.entries;
    const int row = BlockHeader(received, shape, p)[ExchangeShape::kHeaderInts + 2 * e + 1];
    const int grouped = counts[packed[q] & kSlotMask] + (packed[q] >> kSlotBits);
    grouped_rows[q] = grouped;
    source_rows[grouped] = static_cast<int32_t>(shape.DispatchRow(p, row));
  }
  if (threadIdx.x == 0 && bad) *overflow = 1;
}

absl::Status CheckShape(const char* what, const ExchangeShape& shape) {
  if (shape.ranks < 1 || shape.ranks > kMaxPlannedSlots || shape.rows < 0 || shape.entries < 0 ||
      shape.hidden < 2 || shape.hidden % 8 != 0 || shape.combine_rows() > kMaxPlannedPairs ||
      shape.dispatch_rows() > INT32_MAX) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": exchange of ", shape.ranks, " GPUs x (", shape.rows, " rows, ",
                     shape.entries, " entries) of width ", shape.hidden, " (at most ",
                     kMaxPlannedPairs, " entries in all, a width that is a multiple of 8)"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status PlanDestinations(const int32_t* experts, int tokens, int top_k,
                              const DeviceReplicaTable& table, int slots_per_rank, int rank,
                              const ExchangeShape& shape, __nv_bfloat16* dispatch,
                              int32_t* dispatch_index, int32_t* positions, int32_t* peer_overflow,
                              cudaStream_t stream) {
  if (auto s = CheckShape("PlanDestinations", shape); !s.ok()) return s;
  if (tokens < 0 || top_k < 1 || slots_per_rank < 1 || rank < 0 || rank >= shape.ranks ||
      table.experts < 1) {
    return absl::InvalidArgumentError(absl::StrCat("PlanDestinations: ", tokens, " tokens x top-",
                                                   top_k, ", ", slots_per_rank,
                                                   " slots a GPU, rank ", rank));
  }
  PlanDestinationsKernel<<<shape.ranks, kDestinationThreads, 0, stream>>>(
      experts, tokens, top_k, table, slots_per_rank, rank, shape, dispatch, dispatch_index,
      positions, peer_overflow);
  if (auto s = CudaStatus(cudaGetLastError(), "PlanDestinations"); !s.ok()) return s;
  StampOverflowKernel<<<1, 256, 0, stream>>>(shape, dispatch, peer_overflow);
  return CudaStatus(cudaGetLastError(), "PlanDestinations");
}

absl::Status PlanReceived(const __nv_bfloat16* received, const ExchangeShape& shape, int slots,
                          int32_t* offsets, int32_t* source_rows, int32_t* grouped_rows,
                          int32_t* load, int32_t* overflow, cudaStream_t stream) {
  if (auto s = CheckShape("PlanReceived", shape); !s.ok()) return s;
  if (slots < 1 || slots > kMaxPlannedSlots) {
    return absl::InvalidArgumentError(
        absl::StrCat("PlanReceived: ", slots, " slots (1 to ", kMaxPlannedSlots, ")"));
  }
  // At most (2048 + 8192) ints: within the 48 KiB a block gets without opting in.
  const size_t shared = sizeof(int32_t) * (static_cast<size_t>(slots) + shape.combine_rows());
  PlanReceivedKernel<<<1, kReceiveThreads, shared, stream>>>(
      received, shape, slots, offsets, source_rows, grouped_rows, load, overflow);
  return CudaStatus(cudaGetLastError(), "PlanReceived");
}

}  // namespace moeserve::kernels
