// Expert weights per rank: the SwiGLU matrices of the expert slots one rank hosts, as the rank's
// own copies, staged from an ExpertWeightSource. Staging a new placement copies only the slots
// whose expert changed (unchanged slots share their buffers with the previous placement), so a
// rebalance moves the least data; a GPU implementation of the source can copy peer-to-peer.
//
// RankExpertWeights is immutable once staged; safe to share between threads.
#pragma once

#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model/model.h"
#include "engine/placement/expert_placement.h"

namespace moeserve::engine {

// Where expert weights come from when a rank stages a slot.
class ExpertWeightSource {
 public:
  virtual ~ExpertWeightSource() = default;
  virtual int hidden_size() const = 0;
  virtual int intermediate_size() const = 0;
  // Copies logical expert `expert` of MoE layer `moe_layer` into the three buffers
  // ([intermediate, hidden], [intermediate, hidden], [hidden, intermediate]).
  virtual absl::Status CopyExpert(int moe_layer, int expert, float* gate_proj, float* up_proj,
                                  float* down_proj) const = 0;
};

// Reads experts from a loaded model (the checkpoint or the built-in weights) in host memory.
class ModelExpertWeightSource : public ExpertWeightSource {
 public:
  explicit ModelExpertWeightSource(const Model& model);
  int hidden_size() const override;
  int intermediate_size() const override;
  absl::Status CopyExpert(int moe_layer, int expert, float* gate_proj, float* up_proj,
                          float* down_proj) const override;

 private:
  const Model& model_;
  std::vector<int> layer_of_moe_index_;
};

class RankExpertWeights {
 public:
  // Stages slots [first_slot, first_slot + num_slots) of every MoE layer of `placement`.
  // Slots holding the same expert as in `previous` (may be null) reuse its buffers.
  static absl::StatusOr<std::shared_ptr<const RankExpertWeights>> Stage(
      const ExpertWeightSource& source, const ExpertPlacement& placement, int first_slot,
      int num_slots, const RankExpertWeights* previous);

  const MlpWeights& slot(int moe_layer, int local_slot) const {
    return slots_[moe_layer][local_slot]->view;
  }
  int expert(int moe_layer, int local_slot) const { return slots_[moe_layer][local_slot]->expert; }
  // Slots copied by the Stage() call that built this object (the rest were shared).
  int copied_slots() const { return copied_slots_; }

 private:
  struct SlotBuffer {
    int expert = -1;
    std::vector<float> gate_proj, up_proj, down_proj;
    MlpWeights view;
  };
  std::vector<std::vector<std::shared_ptr<const SlotBuffer>>> slots_;  // [moe layer][local slot]
  int copied_slots_ = 0;
};

}  // namespace moeserve::engine
