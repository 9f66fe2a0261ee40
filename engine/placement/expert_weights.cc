#include "engine/placement/expert_weights.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "engine/base/status_macros.h"

namespace moeserve::engine {

ModelExpertWeightSource::ModelExpertWeightSource(const Model& model) : model_(model) {
  for (int layer = 0; layer < model.config().num_hidden_layers; ++layer) {
    if (model.moe_index(layer) >= 0) layer_of_moe_index_.push_back(layer);
  }
}

int ModelExpertWeightSource::hidden_size() const { return model_.config().hidden_size; }
int ModelExpertWeightSource::intermediate_size() const {
  return model_.config().moe_intermediate_size;
}

absl::Status ModelExpertWeightSource::CopyExpert(int moe_layer, int expert, float* gate_proj,
                                                 float* up_proj, float* down_proj) const {
  if (moe_layer < 0 || moe_layer >= static_cast<int>(layer_of_moe_index_.size()) || expert < 0 ||
      expert >= model_.config().n_routed_experts) {
    return absl::InvalidArgumentError(
        absl::StrCat("no expert ", expert, " in MoE layer ", moe_layer));
  }
  const MlpWeights& mlp =
      model_.weights().layer(layer_of_moe_index_[moe_layer]).moe.experts[expert];
  const size_t size = static_cast<size_t>(hidden_size()) * intermediate_size();
  std::copy_n(mlp.gate_proj, size, gate_proj);
  std::copy_n(mlp.up_proj, size, up_proj);
  std::copy_n(mlp.down_proj, size, down_proj);
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<const RankExpertWeights>> RankExpertWeights::Stage(
    const ExpertWeightSource& source, const ExpertPlacement& placement, int first_slot,
    int num_slots, const RankExpertWeights* previous) {
  auto staged = std::shared_ptr<RankExpertWeights>(new RankExpertWeights());
  const size_t size = static_cast<size_t>(source.hidden_size()) * source.intermediate_size();
  staged->slots_.resize(placement.num_layers());
  for (int layer = 0; layer < placement.num_layers(); ++layer) {
    for (int local = 0; local < num_slots; ++local) {
      const int expert = placement.phy2log(layer)[first_slot + local];
      if (previous != nullptr && previous->expert(layer, local) == expert) {
        staged->slots_[layer].push_back(previous->slots_[layer][local]);
        continue;
      }
      auto buffer = std::make_shared<SlotBuffer>();
      buffer->expert = expert;
      buffer->gate_proj.resize(size);
      buffer->up_proj.resize(size);
      buffer->down_proj.resize(size);
      RETURN_IF_ERROR(source.CopyExpert(layer, expert, buffer->gate_proj.data(),
                                        buffer->up_proj.data(), buffer->down_proj.data()));
      buffer->view = MlpWeights{buffer->gate_proj.data(), buffer->up_proj.data(),
                                buffer->down_proj.data(), source.intermediate_size()};
      staged->slots_[layer].push_back(std::move(buffer));
      ++staged->copied_slots_;
    }
  }
  return std::shared_ptr<const RankExpertWeights>(std::move(staged));
}

}  // namespace moeserve::engine
