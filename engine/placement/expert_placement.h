// ExpertPlacement: which logical expert each physical expert slot of each MoE layer holds
// (phy2log), the inverse (log2phy, logcnt), and a version. Slot p lives on rank
// p / (num_physical / ranks). With redundant experts (num_physical > num_logical) hot experts
// can have several replicas; which replica serves a token is chosen deterministically so that
// load spreads across them. Placement never changes the math, only where it runs.
//
// Immutable after construction; safe to share between threads.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json_fwd.hpp"

namespace moeserve::engine {

// What a placement must fit: a group's MoE layers, logical experts, physical slots and ranks.
struct PlacementShape {
  int num_layers = 0;
  int num_logical = 0;
  int num_physical = 0;
  int num_ranks = 1;
};

class ExpertPlacement {
 public:
  // The one validation of a placement from outside (a file, the Admin API): phy2log has
  // shape.num_layers layers of shape.num_physical slots, every slot holds an expert id in
  // [0, num_logical), every expert has a replica, the slots divide over the ranks, and the
  // version is in [0, INT64_MAX). INVALID_ARGUMENT naming the first problem otherwise.
  static absl::StatusOr<ExpertPlacement> Create(std::vector<std::vector<int32_t>> phy2log,
                                                int64_t version, const PlacementShape& shape);
  // Slot p holds expert p % num_logical: every expert once, then the first
  // (num_physical - num_logical) experts a second time. Used when no load is known.
  static ExpertPlacement Default(int num_layers, int num_logical, int num_physical);
  // Validates and indexes phy2log[layer][slot] (every expert must have a replica).
  static absl::StatusOr<ExpertPlacement> FromPhy2Log(std::vector<std::vector<int32_t>> phy2log,
                                                     int num_logical, int64_t version);
  // Reads {"version": V, "phy2log": [[...], ...]} (also the output lines of
  // `moeserve-eplb rebalance`) and checks it against the expected shape.
  static absl::StatusOr<ExpertPlacement> LoadJsonFile(const std::string& path,
                                                      const PlacementShape& shape);
  static absl::StatusOr<ExpertPlacement> FromJson(const nlohmann::json& json,
                                                  const PlacementShape& shape);

  int num_layers() const { return static_cast<int>(phy2log_.size()); }
  int num_logical() const { return num_logical_; }
  int num_physical() const { return num_physical_; }
  int64_t version() const { return version_; }
  ExpertPlacement WithVersion(int64_t version) const;

  const std::vector<int32_t>& phy2log(int layer) const { return phy2log_[layer]; }
  std::span<const int32_t> replicas(int layer, int expert) const;  // slots, replica rank order
  int logcnt(int layer, int expert) const {
    return static_cast<int>(replicas(layer, expert).size());
  }
  // The slot serving one (token, expert) pair: replica `key % count`.
  int32_t ChooseSlot(int layer, int expert, uint64_t key) const;

  // Checks that the slots divide evenly over `num_ranks`.
  absl::Status CheckRanks(int num_ranks) const;
  // Whether this placement fits `shape` (layers, logical experts, slots, ranks).
  absl::Status CheckShape(const PlacementShape& shape) const;

 private:
  ExpertPlacement() = default;
  void BuildInverse();

  int num_logical_ = 0;
  int num_physical_ = 0;
  int64_t version_ = 0;
  std::vector<std::vector<int32_t>> phy2log_;        // [layer][slot]
  std::vector<std::vector<int32_t>> replica_slots_;  // [layer][expert offsets...] flattened
  std::vector<std::vector<int32_t>> replica_begin_;  // [layer][expert + 1] offsets
};

}  // namespace moeserve::engine
