// ExpertStager: prepares one rank's expert slots for a new placement in the background and
// switches to them at the step boundary where the placement commits, so that a rebalance never
// stalls a step. The CPU's HostExpertStager copies the changed slots' weights into host buffers
// (RankExpertWeights); a GPU backend stages changed slots into spare device buffers on a copy
// stream and swaps pointers at the commit.
//
// Thread rules: Stage() and Discard() run on the group's staging thread (or the thread that
// cancels an update), never concurrently with each other; Commit() runs on the rank's own thread
// between steps, only after a Stage() of the same placement returned OK and before any later
// Stage(). The placement being computed with stays untouched until Commit().
#pragma once

#include <memory>

#include "absl/status/status.h"
#include "engine/placement/expert_placement.h"
#include "engine/placement/expert_weights.h"

namespace moeserve::engine {

class ExpertStager {
 public:
  virtual ~ExpertStager() = default;
  // Prepares the slots `placement` gives this rank; copies only the slots whose expert changed.
  virtual absl::Status Stage(const ExpertPlacement& placement) = 0;
  // Switches to the staged slots of `placement`.
  virtual void Commit(const ExpertPlacement& placement) = 0;
  // Drops a staged placement that will not commit.
  virtual void Discard() = 0;
};

// Host copies of a rank's slots, for the CPU backend.
class HostExpertStager : public ExpertStager {
 public:
  // Slots [first_slot, first_slot + num_slots) of every MoE layer, read from `source`.
  HostExpertStager(const ExpertWeightSource& source, int first_slot, int num_slots)
      : source_(source), first_slot_(first_slot), num_slots_(num_slots) {}

  absl::Status Stage(const ExpertPlacement& placement) override {
    auto staged =
        RankExpertWeights::Stage(source_, placement, first_slot_, num_slots_, current_.get());
    if (!staged.ok()) return staged.status();
    staged_ = std::move(*staged);
    return absl::OkStatus();
  }
  void Commit(const ExpertPlacement&) override { current_ = std::move(staged_); }
  void Discard() override { staged_.reset(); }

  // The committed slots' weights (null before the first commit). Rank thread only.
  const RankExpertWeights* current() const { return current_.get(); }

 private:
  const ExpertWeightSource& source_;
  int first_slot_;
  int num_slots_;
  std::shared_ptr<const RankExpertWeights> current_;
  std::shared_ptr<const RankExpertWeights> staged_;
};

}  // namespace moeserve::engine
