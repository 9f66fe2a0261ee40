#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/fp8_linear.h"
#include "kernels/fp8_quantize.h"
#include "kernels/kernels.h"
#include "kernels/mla.h"

namespace moeserve::kernels {

absl::StatusOr<Fp8Linear> Fp8Linear::Create(int max_rows, int max_k, int max_n, cudaStream_t stream,
                                            int weight_only_max_rows) {
  if (max_rows < 0 || max_k <= 0 || max_n <= 0 || max_k % kFp8BlockSize != 0 ||
      max_n % kFp8BlockSize != 0) {
    return absl::InvalidArgumentError(absl::StrCat("Fp8Linear: ", max_rows, " rows, k ", max_k,
                                                   " and n ", max_n,
                                                   " (positive multiples of 128)"));
  }
  Fp8Linear linear;
  linear.max_rows_ = max_rows;
  linear.max_k_ = max_k;
  linear.max_n_ = max_n;
  linear.weight_only_max_rows_ = weight_only_max_rows;
  linear.stream_ = stream;
  const size_t padded = static_cast<size_t>(Fp8PaddedRows(max_rows));
  for (auto s : {linear.x_values_.Reserve(padded * max_k),
                 linear.x_scales_.Reserve(ActivationScaleCount(max_rows, max_k)),
                 linear.y_scratch_.Reserve(padded * max_n)}) {
    if (!s.ok()) return s;
  }
  absl::StatusOr<Fp8BlockGemm> gemm = Fp8BlockGemm::Create(stream);
  if (!gemm.ok()) return gemm.status();
  linear.gemm_ = std::make_unique<Fp8BlockGemm>(std::move(*gemm));
  linear.weight_only_groups_ = std::make_unique<Fp8WeightOnlyGroups>();
  return linear;
}

Fp8Linear::Fp8Linear(Fp8Linear&&) noexcept = default;
Fp8Linear& Fp8Linear::operator=(Fp8Linear&&) noexcept = default;
Fp8Linear::~Fp8Linear() = default;

absl::Status Fp8Linear::Run(const __nv_bfloat16* x, int rows, const Fp8Weight& w, int n, int k,
                            __nv_bfloat16* y, bool accumulate) {
  if (rows < 0 || rows > max_rows_ || n <= 0 || n > max_n_ || k <= 0 || k > max_k_ ||
      n % kFp8BlockSize != 0 || k % kFp8BlockSize != 0) {
    return absl::InvalidArgumentError(absl::StrCat("Fp8Linear: ", rows, " x ", n, " x ", k,
                                                   " outside its ", max_rows_, " rows, n ", max_n_,
                                                   " and k ", max_k_, " (multiples of 128)"));
  }
  if (rows == 0) return absl::OkStatus();
  const int64_t count = static_cast<int64_t>(rows) * n;
  if (rows <= weight_only_max_rows_) {
    Fp8WeightOnlyGroups& groups = *weight_only_groups_;
    groups.count = 1;
    groups.group[0] = {w.values, w.scales, 0, rows};
    __nv_bfloat16* out = accumulate ? y_scratch_.data() : y;
    if (auto s = Fp8WeightOnlyGroupedGemm(x, groups, n, k, out, stream_); !s.ok()) return s;
    return accumulate ? AddInPlace(y, y_scratch_.data(), count, stream_) : absl::OkStatus();
  }
  if (auto s = QuantizeActivationsFp8(x, rows, k, x_values_.data(), x_scales_.data(), stream_);
      !s.ok()) {
    return s;
  }
  // The GEMM writes whole groups of 4 rows; rows past `rows` (and a sum to add) go through the
  // scratch, a whole multiple of 4 straight into y.
  const bool direct = !accumulate && Fp8PaddedRows(rows) == rows;
  __nv_bfloat16* out = direct ? y : y_scratch_.data();
  if (auto s = gemm_->Run(x_values_.data(), x_scales_.data(), rows, w, n, k, out); !s.ok()) {
    return s;
  }
  if (direct) return absl::OkStatus();
  if (accumulate) return AddInPlace(y, y_scratch_.data(), count, stream_);
  return CudaStatus(cudaMemcpyAsync(y, y_scratch_.data(), count * sizeof(__nv_bfloat16),
                                    cudaMemcpyDeviceToDevice, stream_),
                    "Fp8Linear output");
}

}  // namespace moeserve::kernels
