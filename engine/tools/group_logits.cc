#include "engine/tools/group_logits.h"

#include <cmath>
#include <numeric>
#include <thread>

#include "engine/ops/cpu_ops.h"

namespace moeserve::engine::tools {

absl::StatusOr<GroupLogits> ComputeGroupLogits(const Model& model, std::span<const int32_t> tokens,
                                               const parallel::GroupOptions& options,
                                               ExpertPlacement placement, TraceRecorder* trace,
                                               const RankBackendFactory& backend_factory) {
  // A GPU backend holds its slots' weights on its device; host copies would be waste (and do
  // not exist for experts generated on the GPU).
  parallel::GroupOptions group_options = options;
  if (backend_factory) group_options.stage_host_expert_weights = false;
  auto group = parallel::ExpertParallelGroup::Create(model, group_options, std::move(placement),
                                                     nullptr, trace);
  if (!group.ok()) return group.status();
  const int size = options.size;
  const int block_size = 16;
  const int blocks = (static_cast<int>(tokens.size()) + block_size - 1) / block_size;
  std::vector<std::unique_ptr<RankBackend>> backends;
  for (int rank = 0; rank < size; ++rank) {
    RankBackendRequest request;
    request.model = &model;
    request.group = group->get();
    request.rank = rank;
    request.kv_blocks = blocks;
    request.kv_block_size = block_size;
    request.max_batch_tokens = static_cast<int>(tokens.size());
    auto made = MakeRankBackend(backend_factory, request);
    if (!made.ok()) return made.status();
    backends.push_back(std::move(*made));
  }
  std::vector<std::vector<float>> logits(size);
  std::vector<absl::Status> statuses(size);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < size; ++rank) {
    threads.emplace_back([&, rank] {
      cpu::ConfigureBlasThreads(1);
      std::vector<int32_t> table(blocks);
      std::iota(table.begin(), table.end(), 0);
      BatchSequence sequence{tokens, 0, &table, /*all_logits=*/true};
      parallel::ExpertParallelGroup& g = **group;
      absl::StatusOr<parallel::StepAgreement> agreement =
          g.Agree(rank, static_cast<int64_t>(tokens.size()), false);
      if (!agreement.ok()) {
        statuses[rank] = agreement.status();
        (void)g.Fail(rank, agreement.status());
        return;
      }
      absl::Status forward =
          backends[rank]->Forward({&sequence, 1}, g.placement(rank), g.resources(rank), *agreement);
      absl::StatusOr<std::span<const float>> result =
          forward.ok() ? backends[rank]->Logits() : forward;
      if (!result.ok()) {
        statuses[rank] = result.status();
        (void)g.Fail(rank, result.status());
        return;
      }
      logits[rank].assign(result->begin(), result->end());
    });
  }
  for (auto& thread : threads) thread.join();
  for (const auto& status : statuses) {
    if (!status.ok()) return status;
  }
  GroupLogits result;
  for (int rank = 1; rank < size; ++rank) {
    for (size_t i = 0; i < logits[0].size(); ++i) {
      result.max_rank_difference =
          std::max(result.max_rank_difference,
                   static_cast<double>(std::abs(logits[rank][i] - logits[0][i])));
    }
  }
  result.logits = std::move(logits[0]);
  result.communication = (*group)->metrics().totals();
  return result;
}

RankBackendFactory WithGpuWeightFormats(RankBackendFactory factory, bool fp8_experts,
                                        bool fp8_dense) {
  return [inner = std::move(factory), fp8_experts, fp8_dense](const RankBackendRequest& request) {
    RankBackendRequest formats = request;
    formats.keep_fp8_experts = fp8_experts;
    formats.keep_fp8_dense = fp8_dense;
    return inner(formats);
  };
}

}  // namespace moeserve::engine::tools
