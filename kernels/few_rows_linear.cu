#include <algorithm>

#include "absl/strings/str_cat.h"
#include "kernels/device_moe.h"
#include "kernels/few_rows_linear.h"
#include "kernels/kernels.h"

namespace moeserve::kernels {
namespace {

constexpr int kColumnsPerBlock = 128;  // DeviceGroupedGemm's output columns per block
constexpr int kStepK = 128;            // ... and its k per pipeline step
// Blocks of the GEMM kernel that fit an SM at once (about 100 KiB of shared memory each).
constexpr int kBlocksPerMultiprocessor = 2;
// Waves of blocks a projection is split into: with one wave or less, each block's start (the
// first stages' latency) and end (its stores) leave the memory idle, about 15-25% of a
// projection's time on an H100 (`moeserve-linear-bench`); with several, other blocks stream
// meanwhile.
constexpr int kTargetWaves = 3;
// A share keeps at least this many steps, so its pipeline of shared-memory stages fills.
constexpr int kMinStepsPerShare = 4;

int ColumnBlocks(int n) { return (n + kColumnsPerBlock - 1) / kColumnsPerBlock; }

}  // namespace

bool FewRowsLinear::Supports(int n, int k) { return DeviceGroupedGemmSupports(n, k); }

absl::StatusOr<FewRowsLinear> FewRowsLinear::Create(int max_n, cudaStream_t stream) {
  if (max_n <= 0) return absl::InvalidArgumentError(absl::StrCat("FewRowsLinear: max_n ", max_n));
  FewRowsLinear linear;
  int device = 0;
  if (auto s = CudaStatus(cudaGetDevice(&device), "FewRowsLinear device"); !s.ok()) return s;
  if (auto s = CudaStatus(
          cudaDeviceGetAttribute(&linear.multiprocessors_, cudaDevAttrMultiProcessorCount, device),
          "FewRowsLinear multiprocessors");
      !s.ok()) {
    return s;
  }
  linear.max_n_ = max_n;
  linear.stream_ = stream;
  // KShares keeps shares * column blocks under kTargetWaves waves plus one share of every
  // column block, so the partial sums of kMaxRows rows fit this.
  const int64_t wave = static_cast<int64_t>(kBlocksPerMultiprocessor) * linear.multiprocessors_;
  const int64_t share_columns = (kTargetWaves * wave + ColumnBlocks(max_n)) * kColumnsPerBlock;
  if (auto s = linear.partials_.Reserve(static_cast<size_t>(kMaxRows) * share_columns); !s.ok()) {
    return s;
  }
  if (auto s = linear.counters_.Reserve(ColumnBlocks(max_n)); !s.ok()) return s;
  if (auto s = CudaStatus(cudaMemset(linear.counters_.data(), 0, sizeof(int) * ColumnBlocks(max_n)),
                          "FewRowsLinear counters");
      !s.ok()) {
    return s;
  }
  return linear;
}

int FewRowsLinear::KShares(int n, int k) const {
  const int column_blocks = ColumnBlocks(n);
  const int wave = kBlocksPerMultiprocessor * multiprocessors_;
  const int wanted = (kTargetWaves * wave + column_blocks - 1) / std::max(column_blocks, 1);
  return std::max(1, std::min(wanted, k / kStepK / kMinStepsPerShare));
}

absl::Status FewRowsLinear::Run(const __nv_bfloat16* x, int rows, const Weight& w, int n, int k,
                                void* y, cudaDataType y_type, bool accumulate) {
  if (rows < 0 || rows > kMaxRows || n > max_n_ || !Supports(n, k) ||
      (y_type != CUDA_R_16BF && y_type != CUDA_R_32F)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "FewRowsLinear: ", rows, " rows (at most ", kMaxRows, "), n ", n, " (at most ", max_n_,
        ", a multiple of 8), k ", k, " (a multiple of 128), output bf16 or fp32"));
  }
  if (rows == 0) return absl::OkStatus();
  return DeviceOneWeightGemm(x, rows, w, n, k, KShares(n, k), {partials_.data(), counters_.data()},
                             y, y_type, accumulate, stream_);
}

}  // namespace moeserve::kernels
