#include "absl/strings/str_cat.h"
#include "kernels/reductions.cuh"
#include "kernels/sampling.h"

namespace moeserve::kernels {
namespace {

constexpr int kThreads = kMaxLogitHead;  // one thread per head entry for the in-block sort
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kDigitBits = 8;
constexpr int kDigits = 1 << kDigitBits;

// An unsigned key that orders like the float: flip every bit of negatives, the sign of the rest.
// −0 and +0 compare equal as floats (the host's order breaks their tie by id), so they share
// +0's key.
__device__ inline uint32_t OrderedKey(float x) {
  uint32_t bits = __float_as_uint(x);
  if (bits == 0x80000000u) bits = 0;
  return (bits & 0x80000000u) != 0 ? ~bits : (bits | 0x80000000u);
}

__device__ inline double WarpSumDouble(double value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    value += __shfl_xor_sync(0xffffffff, value, offset);
  return value;
}

// Every thread of the block calls it and gets the block's sum.
__device__ double BlockSumDouble(double value) {
  __shared__ double partial[kWarps];
  value = WarpSumDouble(value);
  __syncthreads();  // `partial` may still be read by an earlier call
  if (threadIdx.x % kWarpSize == 0) partial[threadIdx.x / kWarpSize] = value;
  __syncthreads();
  double total = 0.0;
  for (int w = 0; w < kWarps; ++w) total += partial[w];
  return total;
}

struct Selection {
  uint32_t key;  // the k-th largest key of the row
  int above;     // how many keys are strictly larger (< k)
};

// The k-th largest key of a row (1 <= k <= vocab) by radix selection: one pass over the row per
// 8-bit digit, most significant first, each counting the digits of the keys that share the
// prefix found so far. Warps add their equal digits once (match_any), so a row whose logits
// share their top bits does not serialize on one shared counter.
__device__ Selection SelectKth(const float* row, int vocab, int k) {
  __shared__ int histogram[kDigits];
  __shared__ uint32_t found_prefix;
  __shared__ int remaining;  // of the k, how many are still to be found under the prefix
  __syncthreads();           // an earlier call's result may still be being read
  if (threadIdx.x == 0) {
    found_prefix = 0;
    remaining = k;
  }
  uint32_t mask = 0;
  const int lane = threadIdx.x % kWarpSize;
  for (int shift = 32 - kDigitBits; shift >= 0; shift -= kDigitBits) {
    for (int d = threadIdx.x; d < kDigits; d += blockDim.x) histogram[d] = 0;
    __syncthreads();
    const uint32_t prefix = found_prefix;
    for (int base = 0; base < vocab; base += blockDim.x) {
      const int i = base + threadIdx.x;
      int digit = kDigits;  // no digit: out of the row or outside the prefix
      if (i < vocab) {
        const uint32_t key = OrderedKey(row[i]);
        if ((key & mask) == prefix) digit = static_cast<int>((key >> shift) & (kDigits - 1));
      }
      const unsigned same = __match_any_sync(0xffffffff, digit);
      if (digit < kDigits && lane == __ffs(same) - 1) atomicAdd(&histogram[digit], __popc(same));
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int larger = 0;
      int digit = kDigits - 1;
      for (; digit > 0; --digit) {
        if (larger + histogram[digit] >= remaining) break;
        larger += histogram[digit];
      }
      remaining -= larger;
      found_prefix = prefix | (static_cast<uint32_t>(digit) << shift);
    }
    mask |= static_cast<uint32_t>(kDigits - 1) << shift;
    __syncthreads();
  }
  return {found_prefix, k - remaining};
}

// Before: larger logit first, then the lower id (the sampler's strict order).
__device__ inline bool Before(uint32_t key_a, int32_t id_a, uint32_t key_b, int32_t id_b) {
  return key_a > key_b || (key_a == key_b && id_a < id_b);
}

__global__ void __launch_bounds__(kThreads)
    LogitHeadsKernel(const float* logits, int vocab, const LogitHeadParams* params, int32_t* ids,
                     float* values, double* kept_weight) {
  const LogitHeadParams p = params[blockIdx.x];
  if (p.head_size <= 0) return;
  const float* row = logits + static_cast<int64_t>(blockIdx.x) * vocab;
  __shared__ uint32_t head_keys[kThreads];
  __shared__ int32_t head_ids[kThreads];
  __shared__ int gathered;
  __shared__ int warp_ties[kWarps];

  // 1. The head: every key above the head_size-th largest, then the lowest-id ties of it.
  const Selection cut = SelectKth(row, vocab, p.head_size);
  if (threadIdx.x == 0) gathered = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const uint32_t key = OrderedKey(row[i]);
    if (key > cut.key) {
      const int slot = atomicAdd(&gathered, 1);
      head_keys[slot] = key;
      head_ids[slot] = i;
    }
  }
  __syncthreads();
  // Ties in id order: a block-wide prefix count per chunk of the row, until enough are taken.
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  int taken = cut.above;
  for (int base = 0; base < vocab && taken < p.head_size; base += blockDim.x) {
    const int i = base + threadIdx.x;
    const bool tie = i < vocab && OrderedKey(row[i]) == cut.key;
    const unsigned ballot = __ballot_sync(0xffffffff, tie);
    if (lane == 0) warp_ties[warp] = __popc(ballot);
    __syncthreads();
    int before = 0;
    int chunk = 0;
    for (int w = 0; w < kWarps; ++w) {
      if (w < warp) before += warp_ties[w];
      chunk += warp_ties[w];
    }
    before += __popc(ballot & ((1u << lane) - 1));
    if (tie && taken + before < p.head_size) {
      head_keys[taken + before] = cut.key;
      head_ids[taken + before] = i;
    }
    taken += chunk;
    __syncthreads();  // warp_ties is rewritten by the next chunk
  }

  // 2. Sort the head (padded to a power of two with entries that sort last) by bitonic merges.
  int padded = 1;
  while (padded < p.head_size) padded *= 2;
  for (int i = p.head_size + threadIdx.x; i < padded; i += blockDim.x) {
    head_keys[i] = 0;
    head_ids[i] = INT32_MAX;
  }
  __syncthreads();
  for (int size = 2; size <= padded; size *= 2) {
    for (int stride = size / 2; stride > 0; stride /= 2) {
      const int i = threadIdx.x;
      const int partner = i ^ stride;
      if (i < padded && partner > i) {
        const bool ascending_block = (i & size) == 0;  // this block puts the first-in-order first
        const bool partner_first =
            Before(head_keys[partner], head_ids[partner], head_keys[i], head_ids[i]);
        if (partner_first == ascending_block) {
          const uint32_t key = head_keys[i];
          head_keys[i] = head_keys[partner];
          head_keys[partner] = key;
          const int32_t id = head_ids[i];
          head_ids[i] = head_ids[partner];
          head_ids[partner] = id;
        }
      }
      __syncthreads();
    }
  }
  for (int j = threadIdx.x; j < p.head_size; j += blockDim.x) {
    ids[p.output_offset + j] = head_ids[j];
    values[p.output_offset + j] = row[head_ids[j]];
  }

  // 3. The kept set's weight: all of the row, or the keep_limit largest (ties share a value, so
  // the ones at the cut count by number).
  if (!p.kept_weight_needed) return;
  const double max_logit = row[head_ids[0]];
  const double temperature = p.temperature;
  auto weight = [&](float x) { return exp((static_cast<double>(x) - max_logit) / temperature); };
  double partial = 0.0;
  if (p.keep_limit >= vocab) {
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) partial += weight(row[i]);
    const double total = BlockSumDouble(partial);
    if (threadIdx.x == 0) kept_weight[blockIdx.x] = total;
    return;
  }
  const Selection keep = SelectKth(row, vocab, p.keep_limit);
  float cut_value = 0.0f;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float x = row[i];
    const uint32_t key = OrderedKey(x);
    if (key > keep.key) partial += weight(x);
    if (key == keep.key) cut_value = x;  // every thread that sees one writes the same value
  }
  __shared__ float shared_cut_value;
  if (OrderedKey(cut_value) == keep.key) shared_cut_value = cut_value;
  const double total = BlockSumDouble(partial);  // synchronizes, so shared_cut_value is set
  if (threadIdx.x == 0) {
    kept_weight[blockIdx.x] = total + (p.keep_limit - keep.above) * weight(shared_cut_value);
  }
}

}  // namespace

absl::Status LogitHeads(const float* logits, int rows, int vocab, const LogitHeadParams* params,
                        int32_t* ids, float* values, double* kept_weight, cudaStream_t stream) {
  if (rows <= 0) return absl::OkStatus();
  if (vocab <= 0) return absl::InvalidArgumentError("LogitHeads: empty vocabulary");
  LogitHeadsKernel<<<rows, kThreads, 0, stream>>>(logits, vocab, params, ids, values, kept_weight);
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) {
    return absl::InternalError(absl::StrCat("LogitHeads: ", cudaGetErrorString(error)));
  }
  return absl::OkStatus();
}

}  // namespace moeserve::kernels
