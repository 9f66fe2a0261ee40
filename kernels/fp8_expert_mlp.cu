#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/fp8_expert_mlp.h"
#include "kernels/fp8_quantize.h"
#include "kernels/kernels.h"

namespace moeserve::kernels {

absl::StatusOr<Fp8ExpertMlp> Fp8ExpertMlp::Create(int hidden, int intermediate, int max_rows,
                                                  int max_experts, cudaStream_t stream) {
  if (hidden <= 0 || intermediate <= 0 || hidden % kFp8BlockSize != 0 ||
      intermediate % kFp8BlockSize != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("Fp8ExpertMlp: hidden (", hidden, ") and intermediate (", intermediate,
                     ") must be positive multiples of 128, the FP8 scale blocks"));
  }
  if (max_experts <= 0 || max_experts > kMaxFp8RowGroups || max_rows < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("Fp8ExpertMlp: ", max_experts, " experts; at most ", kMaxFp8RowGroups));
  }
  Fp8ExpertMlp mlp;
  mlp.hidden_ = hidden;
  mlp.intermediate_ = intermediate;
  mlp.max_rows_ = max_rows;
  mlp.max_experts_ = max_experts;
  mlp.stream_ = stream;
  // Each expert pads its rows by at most 3.
  const size_t padded = static_cast<size_t>(max_rows) + 3 * static_cast<size_t>(max_experts);
  for (auto s : {mlp.x_values_.Reserve(padded * hidden),
                 mlp.x_scales_.Reserve(padded * (hidden / kFp8BlockSize)),
                 mlp.gate_up_.Reserve(padded * 2 * intermediate),
                 mlp.act_values_.Reserve(padded * intermediate),
                 mlp.act_scales_.Reserve(padded * (intermediate / kFp8BlockSize)),
                 mlp.y_padded_.Reserve(padded * hidden),
                 mlp.act_.Reserve(static_cast<size_t>(max_rows) * intermediate)}) {
    if (!s.ok()) return s;
  }
  auto grouped = PrepareFp8GroupedGemmIfSupported();
  if (!grouped.ok()) return grouped.status();
  mlp.grouped_gemm_supported_ = *grouped;
  auto main_gemm = Fp8BlockGemm::Create(stream);
  if (!main_gemm.ok()) return main_gemm.status();
  mlp.gemms_.push_back(std::move(*main_gemm));
  if (auto s = CudaStatus(cudaEventCreateWithFlags(&mlp.fork_, cudaEventDisableTiming), "event");
      !s.ok()) {
    return s;
  }
  for (int i = 0; i < kSideStreams; ++i) {
    if (auto s = CudaStatus(cudaStreamCreateWithFlags(&mlp.side_streams_[i], cudaStreamNonBlocking),
                            "cudaStreamCreate");
        !s.ok()) {
      return s;
    }
    if (auto s =
            CudaStatus(cudaEventCreateWithFlags(&mlp.joins_[i], cudaEventDisableTiming), "event");
        !s.ok()) {
      return s;
    }
    auto side_gemm = Fp8BlockGemm::Create(mlp.side_streams_[i]);
    if (!side_gemm.ok()) return side_gemm.status();
    mlp.gemms_.push_back(std::move(*side_gemm));
  }
  return mlp;
}

Fp8ExpertMlp::Fp8ExpertMlp(Fp8ExpertMlp&& other) noexcept { *this = std::move(other); }

Fp8ExpertMlp& Fp8ExpertMlp::operator=(Fp8ExpertMlp&& other) noexcept {
  std::swap(hidden_, other.hidden_);
  std::swap(intermediate_, other.intermediate_);
  std::swap(max_rows_, other.max_rows_);
  std::swap(max_experts_, other.max_experts_);
  std::swap(grouped_gemm_supported_, other.grouped_gemm_supported_);
  std::swap(grouped_gate_up_, other.grouped_gate_up_);
  std::swap(grouped_down_, other.grouped_down_);
  std::swap(stream_, other.stream_);
  std::swap(gemms_, other.gemms_);
  std::swap(side_streams_, other.side_streams_);
  std::swap(fork_, other.fork_);
  std::swap(joins_, other.joins_);
  std::swap(x_values_, other.x_values_);
  std::swap(x_scales_, other.x_scales_);
  std::swap(gate_up_, other.gate_up_);
  std::swap(act_, other.act_);
  std::swap(weight_only_groups_, other.weight_only_groups_);
  std::swap(act_values_, other.act_values_);
  std::swap(act_scales_, other.act_scales_);
  std::swap(y_padded_, other.y_padded_);
  return *this;
}

Fp8ExpertMlp::~Fp8ExpertMlp() { Release(); }

void Fp8ExpertMlp::Release() {
  gemms_.clear();  // before their streams go
  for (int i = 0; i < kSideStreams; ++i) {
    if (side_streams_[i] != nullptr) cudaStreamDestroy(side_streams_[i]);
    if (joins_[i] != nullptr) cudaEventDestroy(joins_[i]);
  }
  if (fork_ != nullptr) cudaEventDestroy(fork_);
}

absl::Status Fp8ExpertMlp::Run(const __nv_bfloat16* x, const std::vector<int64_t>& offsets,
                               const std::vector<Fp8Weight>& gate_up,
                               const std::vector<Fp8Weight>& down, __nv_bfloat16* y,
                               Strategy strategy, const int32_t* x_rows) {
  return Run(Fp8InputRows{.bf16 = x, .rows = x_rows}, offsets, gate_up, down, y, strategy);
}

absl::Status Fp8ExpertMlp::Run(const Fp8InputRows& x, const std::vector<int64_t>& offsets,
                               const std::vector<Fp8Weight>& gate_up,
                               const std::vector<Fp8Weight>& down, __nv_bfloat16* y,
                               Strategy strategy) {
  const int experts = static_cast<int>(gate_up.size());
  if (offsets.size() != gate_up.size() + 1 || down.size() != gate_up.size() ||
      experts > max_experts_ || offsets.back() > max_rows_) {
    return absl::InvalidArgumentError(
        "Fp8ExpertMlp::Run: rows or experts beyond the sizes it was made for");
  }
  if (strategy == Strategy::kWeightOnly) {
    if (x.rows != nullptr || x.bf16 == nullptr) {
      return absl::InvalidArgumentError(
          "Fp8ExpertMlp::Run: the weight-only strategy reads bf16 rows in expert order (no row "
          "list, no packed FP8 rows)");
    }
    return RunWeightOnly(x.bf16, offsets, gate_up, down, y);
  }
  if (strategy == Strategy::kGroupedGemm) {
    return RunGroupedGemm(x, offsets, gate_up, down, y);
  }
  auto made = MakeFp8RowGroups(offsets);
  if (!made.ok()) return made.status();
  const Fp8RowGroups& groups = *made;
  if (strategy == Strategy::kPipelinedGemm) {
    return RunPipelined(x, groups, gate_up, down, y);
  }
  if (auto s =
          QuantizeInputGroupsFp8(x, groups, hidden_, x_values_.data(), x_scales_.data(), stream_);
      !s.ok()) {
    return s;
  }
  const bool concurrent = strategy == Strategy::kConcurrentGemm;
  // The GEMM object (and so the stream) of the launched-th non-empty expert.
  auto gemm_for = [&](int launched) -> Fp8BlockGemm& {
    return concurrent ? gemms_[1 + launched % kSideStreams] : gemms_[0];
  };

  if (concurrent) {
    if (auto s = Fork(); !s.ok()) return s;
  }
  int launched = 0;
  for (int e = 0; e < experts; ++e) {
    const int64_t rows = groups.rows(e);
    if (rows == 0) continue;
    const Fp8GroupedMlpScratch scratch = ScratchAt(groups.padded_start[e]);
    if (auto s = gemm_for(launched++)
                     .Run(scratch.x_values, scratch.x_scales, rows, gate_up[e], 2 * intermediate_,
                          hidden_, scratch.gate_up);
        !s.ok()) {
      return s;
    }
  }
  if (concurrent) {
    if (auto s = Join(); !s.ok()) return s;
  }
  if (auto s = SiluMulQuantizeFp8(gate_up_.data(), groups, intermediate_, act_values_.data(),
                                  act_scales_.data(), stream_);
      !s.ok()) {
    return s;
  }
  if (concurrent) {
    if (auto s = Fork(); !s.ok()) return s;
  }
  launched = 0;
  bool any_unaligned = false;
  for (int e = 0; e < experts; ++e) {
    const int64_t rows = groups.rows(e);
    if (rows == 0) continue;
    const Fp8GroupedMlpScratch scratch = ScratchAt(groups.padded_start[e]);
    if (auto s = gemm_for(launched++)
                     .Run(scratch.act_values, scratch.act_scales, rows, down[e], hidden_,
                          intermediate_, DownOutput(groups, e, y, any_unaligned));
        !s.ok()) {
      return s;
    }
  }
  if (concurrent) {
    if (auto s = Join(); !s.ok()) return s;
  }
  if (!any_unaligned) return absl::OkStatus();
  return CopyUnalignedGroupRows(y_padded_.data(), groups, hidden_, y, stream_);
}

__nv_bfloat16* Fp8ExpertMlp::DownOutput(const Fp8RowGroups& groups, int e, __nv_bfloat16* y,
                                        bool& unaligned) {
  // A GEMM writes whole groups of 4 rows: an expert with a multiple of 4 rows writes straight
  // into Y; another would overwrite its neighbour's first rows, so it goes through y_padded_.
  if (groups.rows(e) % kFp8RowAlignment == 0) {
    return y + groups.source_start[e] * static_cast<int64_t>(hidden_);
  }
  unaligned = true;
  return y_padded_.data() + groups.padded_start[e] * static_cast<int64_t>(hidden_);
}

Fp8GroupedMlpScratch Fp8ExpertMlp::ScratchAt(int64_t padded_row) {
  return {x_values_.data() + padded_row * hidden_,
          x_scales_.data() + padded_row * (hidden_ / kFp8BlockSize),
          gate_up_.data() + padded_row * 2 * intermediate_,
          act_values_.data() + padded_row * intermediate_,
          act_scales_.data() + padded_row * (intermediate_ / kFp8BlockSize)};
}

absl::Status Fp8ExpertMlp::Fork() {
  if (auto s = CudaStatus(cudaEventRecord(fork_, stream_), "cudaEventRecord"); !s.ok()) return s;
  for (cudaStream_t side : side_streams_) {
    if (auto s = CudaStatus(cudaStreamWaitEvent(side, fork_, 0), "cudaStreamWaitEvent"); !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

absl::Status Fp8ExpertMlp::Join() {
  for (int i = 0; i < kSideStreams; ++i) {
    if (auto s = CudaStatus(cudaEventRecord(joins_[i], side_streams_[i]), "cudaEventRecord");
        !s.ok()) {
      return s;
    }
    if (auto s = CudaStatus(cudaStreamWaitEvent(stream_, joins_[i], 0), "cudaStreamWaitEvent");
        !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

absl::Status Fp8ExpertMlp::RunPipelined(const Fp8InputRows& x, const Fp8RowGroups& groups,
                                        const std::vector<Fp8Weight>& gate_up,
                                        const std::vector<Fp8Weight>& down, __nv_bfloat16* y) {
  if (auto s = Fork(); !s.ok()) return s;
  int launched = 0;
  bool any_unaligned = false;
  for (int e = 0; e < groups.count; ++e) {
    const int64_t rows = groups.rows(e);
    if (rows == 0) continue;
    // The expert's rows as a group of their own: each group's padded rows and scales form a
    // standalone block (fp8_quantize.h), so its kernels run on that block alone.
    auto made = MakeFp8RowGroups({0, rows});
    if (!made.ok()) return made.status();
    const Fp8RowGroups& own = *made;
    const int64_t source = groups.source_start[e];
    const int lane = launched++ % kSideStreams;
    cudaStream_t stream = side_streams_[lane];
    Fp8BlockGemm& gemm = gemms_[1 + lane];
    const Fp8GroupedMlpScratch scratch = ScratchAt(groups.padded_start[e]);
    if (auto s = QuantizeInputGroupsFp8(x.From(source, hidden_), own, hidden_, scratch.x_values,
                                        scratch.x_scales, stream);
        !s.ok()) {
      return s;
    }
    if (auto s = gemm.Run(scratch.x_values, scratch.x_scales, rows, gate_up[e], 2 * intermediate_,
                          hidden_, scratch.gate_up);
        !s.ok()) {
      return s;
    }
    if (auto s = SiluMulQuantizeFp8(scratch.gate_up, own, intermediate_, scratch.act_values,
                                    scratch.act_scales, stream);
        !s.ok()) {
      return s;
    }
    if (auto s = gemm.Run(scratch.act_values, scratch.act_scales, rows, down[e], hidden_,
                          intermediate_, DownOutput(groups, e, y, any_unaligned));
        !s.ok()) {
      return s;
    }
  }
  if (auto s = Join(); !s.ok()) return s;
  if (!any_unaligned) return absl::OkStatus();
  return CopyUnalignedGroupRows(y_padded_.data(), groups, hidden_, y, stream_);
}

absl::Status Fp8ExpertMlp::RunWeightOnly(const __nv_bfloat16* x,
                                         const std::vector<int64_t>& offsets,
                                         const std::vector<Fp8Weight>& gate_up,
                                         const std::vector<Fp8Weight>& down, __nv_bfloat16* y) {
  if (weight_only_groups_ == nullptr) weight_only_groups_ = std::make_unique<Fp8WeightOnlyGroups>();
  Fp8WeightOnlyGroups& groups = *weight_only_groups_;
  auto describe = [&](const std::vector<Fp8Weight>& weights) {
    groups.count = 0;
    for (size_t e = 0; e < weights.size(); ++e) {
      const int rows = static_cast<int>(offsets[e + 1] - offsets[e]);
      if (rows == 0) continue;
      groups.group[groups.count++] = {weights[e].values, weights[e].scales,
                                      static_cast<int>(offsets[e]), rows};
    }
  };
  // The rows are not padded here: gate_up_ and act_ hold them as x does.
  describe(gate_up);
  if (auto s =
          Fp8WeightOnlyGroupedGemm(x, groups, 2 * intermediate_, hidden_, gate_up_.data(), stream_);
      !s.ok()) {
    return s;
  }
  const int rows = static_cast<int>(offsets.back());
  if (auto s = SiluMul(gate_up_.data(), act_.data(), rows, intermediate_, stream_); !s.ok()) {
    return s;
  }
  describe(down);
  return Fp8WeightOnlyGroupedGemm(act_.data(), groups, hidden_, intermediate_, y, stream_);
}

absl::Status Fp8ExpertMlp::RunGroupedGemm(const Fp8InputRows& x,
                                          const std::vector<int64_t>& offsets,
                                          const std::vector<Fp8Weight>& gate_up,
                                          const std::vector<Fp8Weight>& down, __nv_bfloat16* y) {
  if (!grouped_gemm_supported_) {
    return absl::FailedPreconditionError(
        "Fp8ExpertMlp: the grouped FP8 GEMM needs a GPU of compute capability 9.0");
  }
  if (grouped_gate_up_ == nullptr) {
    grouped_gate_up_ = std::make_unique<Fp8GemmGroupList>();
    grouped_down_ = std::make_unique<Fp8GemmGroupList>();
  }
  const int experts = static_cast<int>(gate_up.size());
  grouped_gate_up_->count = grouped_down_->count = experts;
  for (int e = 0; e <= experts; ++e) {
    grouped_gate_up_->offsets[e] = grouped_down_->offsets[e] = static_cast<int>(offsets[e]);
  }
  std::copy(gate_up.begin(), gate_up.end(), grouped_gate_up_->weights);
  std::copy(down.begin(), down.end(), grouped_down_->weights);
  // No expert is padded here (all rows are one group), so the down projection writes y.
  return Fp8GroupedSwiGlu(x, static_cast<int>(offsets.back()), *grouped_gate_up_, *grouped_down_,
                          hidden_, intermediate_, ScratchAt(0), y, stream_);
}

namespace {

template <class Groups>
absl::Status GroupedSwiGlu(const Fp8InputRows& x, int rows, const Groups& gate_up,
                           const Groups& down, int hidden, int intermediate,
                           const Fp8GroupedMlpScratch& scratch, __nv_bfloat16* y,
                           cudaStream_t stream) {
  if (rows == 0) return absl::OkStatus();
  auto made = MakeFp8RowGroups({0, rows});
  if (!made.ok()) return made.status();
  const Fp8RowGroups& all_rows = *made;
  const int scale_rows = static_cast<int>(all_rows.padded_rows());
  if (auto s =
          QuantizeInputGroupsFp8(x, all_rows, hidden, scratch.x_values, scratch.x_scales, stream);
      !s.ok()) {
    return s;
  }
  if (auto s = Fp8GroupedGemm(scratch.x_values, scratch.x_scales, scale_rows, gate_up,
                              2 * intermediate, hidden, scratch.gate_up, stream);
      !s.ok()) {
    return s;
  }
  if (auto s = SiluMulQuantizeFp8(scratch.gate_up, all_rows, intermediate, scratch.act_values,
                                  scratch.act_scales, stream);
      !s.ok()) {
    return s;
  }
  return Fp8GroupedGemm(scratch.act_values, scratch.act_scales, scale_rows, down, hidden,
                        intermediate, y, stream);
}

}  // namespace

absl::Status Fp8GroupedSwiGlu(const Fp8InputRows& x, int rows, const Fp8GemmGroupList& gate_up,
                              const Fp8GemmGroupList& down, int hidden, int intermediate,
                              const Fp8GroupedMlpScratch& scratch, __nv_bfloat16* y,
                              cudaStream_t stream) {
  return GroupedSwiGlu(x, rows, gate_up, down, hidden, intermediate, scratch, y, stream);
}

absl::Status Fp8GroupedSwiGlu(const Fp8InputRows& x, int rows, const Fp8GemmSlotGroups& gate_up,
                              const Fp8GemmSlotGroups& down, int hidden, int intermediate,
                              const Fp8GroupedMlpScratch& scratch, __nv_bfloat16* y,
                              cudaStream_t stream) {
  return GroupedSwiGlu(x, rows, gate_up, down, hidden, intermediate, scratch, y, stream);
}

}  // namespace moeserve::kernels
