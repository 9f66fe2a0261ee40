// ComputeLogits (engine/engine.h): the engine side of `moeserve logits`.
#include <numeric>

#include "absl/strings/str_cat.h"
#include "engine/backend/backend_loader.h"
#include "engine/base/status_macros.h"
#include "engine/engine.h"
#include "engine/model/kv_rows.h"
#include "engine/model/loader.h"
#include "engine/tools/group_logits.h"

namespace moeserve::engine {

absl::StatusOr<LogitsResult> ComputeLogits(const LogitsRequest& request) {
  RETURN_IF_ERROR(CheckModelRunsOn(request.model, request.device));
  if (request.tokens.empty()) return absl::InvalidArgumentError("--tokens is empty");
  if (request.ep < 1) return absl::InvalidArgumentError("--ep must be at least 1");
  ASSIGN_OR_RETURN(const RankBackendChoice backend, ChooseRankBackend(request.device));
  LoadOptions load_options;
  load_options.host_weights = !backend.factory;  // a GPU backend reads its share itself
  ASSIGN_OR_RETURN(const LoadedModel loaded, LoadModel(request.model, load_options));
  const Model& model = *loaded.model;
  const ModelConfig& config = model.config();
  for (int32_t id : request.tokens) {
    if (id < 0 || id >= config.vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("token ", id, " is out of range (vocabulary of ", config.vocab_size, ")"));
    }
  }
  const int num_tokens = static_cast<int>(request.tokens.size());
  if (num_tokens > config.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat(num_tokens, " tokens exceed the context length ",
                                                   config.max_position_embeddings));
  }
  LogitsResult result;
  result.num_tokens = num_tokens;
  result.vocab_size = config.vocab_size;
  result.ep = request.ep;
  const ParallelOptions& parallel = request.parallel;
  const int block_size = 16;
  const int blocks = (num_tokens + block_size - 1) / block_size;
  std::vector<int32_t> block_table(blocks);
  std::iota(block_table.begin(), block_table.end(), 0);
  if (request.ep == 1 && parallel.num_redundant_experts == 0 && parallel.placement_file.empty() &&
      !parallel.two_batch_overlap && !backend.factory) {
    // One rank on the CPU: the model's own forward pass, no group.
    KvRows rows(config.num_hidden_layers, blocks, block_size, model.kv_row_dim());
    BatchSequence sequence{request.tokens, 0, &block_table, /*all_logits=*/true};
    result.logits = model.Forward({&sequence, 1}, rows);
    return result;
  }
  const int num_logical = config.n_routed_experts;
  const PlacementShape shape{config.num_moe_layers(), num_logical,
                             num_logical + parallel.num_redundant_experts, request.ep};
  absl::StatusOr<ExpertPlacement> placement =
      parallel.placement_file.empty()
          ? absl::StatusOr<ExpertPlacement>(
                ExpertPlacement::Default(shape.num_layers, shape.num_logical, shape.num_physical))
          : ExpertPlacement::LoadJsonFile(parallel.placement_file, shape);
  if (!placement.ok()) return placement.status();
  parallel::GroupOptions options;
  options.name = "logits";
  options.size = request.ep;
  options.two_batch_overlap = parallel.two_batch_overlap;
  options.overlap_min_tokens = parallel.overlap_min_tokens;
  RankBackendFactory factory = backend.factory;
  if (factory) {
    factory = tools::WithGpuWeightFormats(std::move(factory), request.gpu_fp8_experts,
                                          request.gpu_fp8_dense);
  }
  absl::StatusOr<tools::GroupLogits> group_logits = tools::ComputeGroupLogits(
      model, request.tokens, options, std::move(*placement), nullptr, factory);
  if (!group_logits.ok()) return group_logits.status();
  result.logits = std::move(group_logits->logits);
  result.max_rank_difference = group_logits->max_rank_difference;
  return result;
}

}  // namespace moeserve::engine
