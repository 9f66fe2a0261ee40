// The GPU backend's output: final norm and LM head over the rows that need logits, the logits
// on the host when asked, and next tokens ranked on the device (kernels/sampling.h) and
// finished by each request's sampler.
#include "kernels/sampling.h"

#include <tuple>

#include "engine/backend/cuda/rank_state.h"
#include "engine/base/status_macros.h"
#include "kernels/kernels.h"

namespace moeserve::engine::cuda {

std::vector<int32_t> CudaRankBackend::State::LogitRows(const MicroBatchState& mb) {
  const std::vector<int> rows =
      parallel::MicroBatchLogitRows(mb.sequences, mb.spans, mb.emits_logits);
  return std::vector<int32_t>(rows.begin(), rows.end());
}

absl::Status CudaRankBackend::State::Head(MicroBatchState& mb, const std::vector<int32_t>& rows,
                                          float* out) {
  const ModelConfig& c = config();
  const int hidden = c.hidden_size;
  if (rows.empty()) return absl::OkStatus();
  const int count = static_cast<int>(rows.size());
  // Every row in order (a decode step): the norm reads the residual where it is. Otherwise the
  // rows are gathered first; that upload is why a step graph (which reads buffers, not host
  // memory) takes decode steps only.
  bool every_row_in_order = count == mb.tokens;
  for (int i = 0; i < count && every_row_in_order; ++i) every_row_in_order = rows[i] == i;
  const Bf16* head_rows = mb.residual.data();
  if (!every_row_in_order) {
    RETURN_IF_ERROR(mb.head_rows.Upload(rows, stream));
    RETURN_IF_ERROR(kernels::PermuteRows(mb.residual.data(), mb.head_rows.device.data(),
                                         mb.head_in.data(), count, hidden, stream));
    head_rows = mb.head_in.data();
  }
  RETURN_IF_ERROR(kernels::RmsNorm(head_rows, final_norm.data(), mb.head_in.data(), count, hidden,
                                   static_cast<float>(c.rms_norm_eps), stream));
  return Linear(mb.head_in.data(), lm_head.data(), out, CUDA_R_32F, count, hidden, c.vocab_size);
}

absl::StatusOr<std::span<const float>> CudaRankBackend::Logits() {
  State& s = *state_;
  RETURN_IF_ERROR(CudaStatus(cudaSetDevice(s.options.device), "select GPU"));
  const size_t count = s.step_rows * static_cast<size_t>(s.config().vocab_size);
  RETURN_IF_ERROR(s.host_logits.Reserve(std::max<size_t>(count, 1) * sizeof(float)));
  float* host = static_cast<float*>(s.host_logits.data());
  RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(host, s.step_logits.data(), count * sizeof(float),
                                             cudaMemcpyDeviceToHost, s.stream),
                             "logits to host"));
  RETURN_IF_ERROR(s.SynchronizeCompute("logits to host"));
  return std::span<const float>(host, count);
}

absl::StatusOr<std::vector<int32_t>> CudaRankBackend::NextTokens(
    std::span<Sampler* const> samplers) {
  State& s = *state_;
  if (samplers.size() != s.step_rows) {
    return absl::InternalError(absl::StrCat("NextTokens: ", samplers.size(), " samplers for ",
                                            s.step_rows, " rows of logits"));
  }
  RETURN_IF_ERROR(CudaStatus(cudaSetDevice(s.options.device), "select GPU"));
  const int vocab = s.config().vocab_size;
  const int rows = static_cast<int>(samplers.size());
  std::vector<int32_t> tokens(samplers.size(), -1);
  if (rows == 0) return tokens;
  // Each row's request, packed: the heads follow one another in ids/values.
  std::vector<kernels::LogitHeadParams> params(rows);
  int32_t head_total = 0;
  for (int r = 0; r < rows; ++r) {
    if (samplers[r] == nullptr) continue;
    params[r] = samplers[r]->HeadParams(vocab);
    params[r].output_offset = head_total;
    head_total += params[r].head_size;
  }
  if (head_total == 0) return tokens;
  RETURN_IF_ERROR(s.head_params.Reserve(rows));
  RETURN_IF_ERROR(s.head_ids.Reserve(head_total));
  RETURN_IF_ERROR(s.head_values.Reserve(head_total));
  RETURN_IF_ERROR(s.kept_weight.Reserve(rows));
  RETURN_IF_ERROR(s.head_params_staging.CopyToDevice(s.head_params.data(), params.data(),
                                                     params.size() * sizeof(params[0]), s.stream));
  RETURN_IF_ERROR(kernels::LogitHeads(s.step_logits.data(), rows, vocab, s.head_params.data(),
                                      s.head_ids.data(), s.head_values.data(), s.kept_weight.data(),
                                      s.stream));
  // One pinned block comes back: kept weights, then ids, then values.
  const size_t weight_bytes = rows * sizeof(double);
  const size_t id_bytes = head_total * sizeof(int32_t);
  RETURN_IF_ERROR(s.head_results.Reserve(weight_bytes + 2 * id_bytes));
  auto* results = static_cast<char*>(s.head_results.data());
  auto* kept_weight = reinterpret_cast<double*>(results);
  auto* ids = reinterpret_cast<int32_t*>(results + weight_bytes);
  auto* values = reinterpret_cast<float*>(results + weight_bytes + id_bytes);
  for (auto [host, device, bytes] :
       {std::tuple<void*, const void*, size_t>{kept_weight, s.kept_weight.data(), weight_bytes},
        {ids, s.head_ids.data(), id_bytes},
        {values, s.head_values.data(), id_bytes}}) {
    RETURN_IF_ERROR(CudaStatus(
        cudaMemcpyAsync(host, device, bytes, cudaMemcpyDeviceToHost, s.stream), "heads to host"));
  }
  RETURN_IF_ERROR(s.SynchronizeCompute("logit heads"));
  std::vector<float> row;  // a whole row, for the rare walk past its head
  for (int r = 0; r < rows; ++r) {
    if (samplers[r] == nullptr) continue;
    const kernels::LogitHeadParams& p = params[r];
    auto whole_row = [&]() -> absl::StatusOr<std::span<const float>> {
      row.resize(vocab);
      RETURN_IF_ERROR(CudaStatus(
          cudaMemcpyAsync(row.data(), s.step_logits.data() + static_cast<size_t>(r) * vocab,
                          row.size() * sizeof(float), cudaMemcpyDeviceToHost, s.stream),
          "logit row to host"));
      RETURN_IF_ERROR(s.SynchronizeCompute("logit row to host"));
      return std::span<const float>(row);
    };
    absl::StatusOr<int32_t> token =
        samplers[r]->SampleFromHead({ids + p.output_offset, static_cast<size_t>(p.head_size)},
                                    {values + p.output_offset, static_cast<size_t>(p.head_size)},
                                    kept_weight[r], vocab, whole_row);
    if (!token.ok()) return token.status();
    tokens[r] = *token;
  }
  return tokens;
}

}  // namespace moeserve::engine::cuda
