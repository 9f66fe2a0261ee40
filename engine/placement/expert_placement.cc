#include "engine/placement/expert_placement.h"

#include <limits>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "base/bounded_json.h"
#include "base/regular_file.h"
#include "engine/base/status_macros.h"
#include "nlohmann/json.hpp"

namespace moeserve::engine {

ExpertPlacement ExpertPlacement::Default(int num_layers, int num_logical, int num_physical) {
  ExpertPlacement placement;
  placement.num_logical_ = num_logical;
  placement.num_physical_ = num_physical;
  placement.phy2log_.assign(num_layers, std::vector<int32_t>(num_physical));
  for (auto& layer : placement.phy2log_) {
    for (int slot = 0; slot < num_physical; ++slot) layer[slot] = slot % num_logical;
  }
  placement.BuildInverse();
  return placement;
}

absl::StatusOr<ExpertPlacement> ExpertPlacement::FromPhy2Log(
    std::vector<std::vector<int32_t>> phy2log, int num_logical, int64_t version) {
  if (phy2log.empty()) return absl::InvalidArgumentError("placement: phy2log has no layers");
  const size_t num_physical = phy2log[0].size();
  for (size_t layer = 0; layer < phy2log.size(); ++layer) {
    if (phy2log[layer].size() != num_physical) {
      return absl::InvalidArgumentError(absl::StrCat("placement: layer ", layer, " has ",
                                                     phy2log[layer].size(), " slots, layer 0 has ",
                                                     num_physical));
    }
    std::vector<bool> seen(num_logical, false);
    for (size_t slot = 0; slot < num_physical; ++slot) {
      const int32_t expert = phy2log[layer][slot];
      if (expert < 0 || expert >= num_logical) {
        return absl::InvalidArgumentError(absl::StrCat("placement: layer ", layer, " slot ", slot,
                                                       " holds expert ", expert, ", outside [0, ",
                                                       num_logical, ")"));
      }
      seen[expert] = true;
    }
    for (int expert = 0; expert < num_logical; ++expert) {
      if (!seen[expert]) {
        return absl::InvalidArgumentError(
            absl::StrCat("placement: layer ", layer, " has no replica of expert ", expert));
      }
    }
  }
  ExpertPlacement placement;
  placement.num_logical_ = num_logical;
  placement.num_physical_ = static_cast<int>(num_physical);
  placement.version_ = version;
  placement.phy2log_ = std::move(phy2log);
  placement.BuildInverse();
  return placement;
}

absl::StatusOr<ExpertPlacement> ExpertPlacement::Create(std::vector<std::vector<int32_t>> phy2log,
                                                        int64_t version,
                                                        const PlacementShape& shape) {
  if (version < 0 || version == std::numeric_limits<int64_t>::max()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "placement: version ", version, " is out of range: use 0 to ",
        std::numeric_limits<int64_t>::max() - 1, " (each update needs a higher version)"));
  }
  if (static_cast<int>(phy2log.size()) != shape.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("placement: ", phy2log.size(),
                                                   " layers given, the model has ",
                                                   shape.num_layers, " MoE layers"));
  }
  for (size_t layer = 0; layer < phy2log.size(); ++layer) {
    if (static_cast<int>(phy2log[layer].size()) != shape.num_physical) {
      return absl::InvalidArgumentError(
          absl::StrCat("placement: layer ", layer, " has ", phy2log[layer].size(),
                       " slots, expected ", shape.num_physical, " (routed + redundant experts)"));
    }
  }
  absl::StatusOr<ExpertPlacement> placement =
      FromPhy2Log(std::move(phy2log), shape.num_logical, version);
  if (!placement.ok()) return placement.status();
  RETURN_IF_ERROR(placement->CheckRanks(shape.num_ranks));
  return placement;
}

absl::StatusOr<ExpertPlacement> ExpertPlacement::FromJson(const nlohmann::json& json,
                                                          const PlacementShape& shape) {
  std::vector<std::vector<int32_t>> phy2log;
  int64_t version = 1;
  const auto malformed = [] {
    return absl::InvalidArgumentError(
        "placement: expected {\"version\": N, \"phy2log\": [[slot experts...] per MoE layer]} "
        "with integer expert ids");
  };
  if (!json.is_object() || !json.contains("phy2log") || !json["phy2log"].is_array()) {
    return malformed();
  }
  if (json.contains("version")) {
    if (!json["version"].is_number_integer()) return malformed();
    version = json["version"].get<int64_t>();
  }
  for (const auto& layer : json["phy2log"]) {
    if (!layer.is_array()) return malformed();
    std::vector<int32_t>& slots = phy2log.emplace_back();
    for (const auto& expert : layer) {
      // get<int32_t>() would truncate 2.7 or wrap 2^32 + 1; refuse anything but a small integer.
      if (!expert.is_number_integer() || expert.get<int64_t>() < 0 ||
          expert.get<int64_t>() >= shape.num_logical) {
        return absl::InvalidArgumentError(absl::StrCat(
            "placement: phy2log layer ", phy2log.size() - 1, " slot ", slots.size(), " holds ",
            expert.dump(), ", not an expert id in [0, ", shape.num_logical, ")"));
      }
      slots.push_back(static_cast<int32_t>(expert.get<int64_t>()));
    }
  }
  return Create(std::move(phy2log), version, shape);
}

absl::StatusOr<ExpertPlacement> ExpertPlacement::LoadJsonFile(const std::string& path,
                                                              const PlacementShape& shape) {
  // A placement is a few integers per expert slot; DeepSeek-V3's is well under a megabyte.
  constexpr uint64_t kMaxPlacementFileBytes = 64ull << 20;
  absl::StatusOr<std::string> text = base::ReadRegularFile(path, kMaxPlacementFileBytes);
  if (!text.ok()) {
    return absl::Status(text.status().code(), absl::StrCat("placement: ", text.status().message()));
  }
  absl::StatusOr<nlohmann::json> json = base::ParseBoundedJson(*text);
  if (!json.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("placement: ", path, " is not valid JSON: ", json.status().message()));
  }
  return FromJson(*json, shape);
}

ExpertPlacement ExpertPlacement::WithVersion(int64_t version) const {
  ExpertPlacement copy = *this;
  copy.version_ = version;
  return copy;
}

void ExpertPlacement::BuildInverse() {
  replica_slots_.assign(phy2log_.size(), {});
  replica_begin_.assign(phy2log_.size(), {});
  for (size_t layer = 0; layer < phy2log_.size(); ++layer) {
    std::vector<int32_t> counts(num_logical_ + 1, 0);
    for (int32_t expert : phy2log_[layer]) ++counts[expert + 1];
    for (int e = 0; e < num_logical_; ++e) counts[e + 1] += counts[e];
    replica_begin_[layer] = counts;
    replica_slots_[layer].resize(phy2log_[layer].size());
    std::vector<int32_t> next(counts.begin(), counts.end() - 1);
    for (size_t slot = 0; slot < phy2log_[layer].size(); ++slot) {
      replica_slots_[layer][next[phy2log_[layer][slot]]++] = static_cast<int32_t>(slot);
    }
  }
}

std::span<const int32_t> ExpertPlacement::replicas(int layer, int expert) const {
  const auto& begin = replica_begin_[layer];
  return std::span<const int32_t>(replica_slots_[layer])
      .subspan(begin[expert], begin[expert + 1] - begin[expert]);
}

int32_t ExpertPlacement::ChooseSlot(int layer, int expert, uint64_t key) const {
  std::span<const int32_t> slots = replicas(layer, expert);
  return slots[key % slots.size()];
}

absl::Status ExpertPlacement::CheckShape(const PlacementShape& shape) const {
  if (num_layers() != shape.num_layers || num_logical_ != shape.num_logical ||
      num_physical_ != shape.num_physical) {
    return absl::InvalidArgumentError(
        absl::StrCat("placement shape ", num_layers(), " layers x ", num_physical_, " slots of ",
                     num_logical_, " experts does not match the group's ", shape.num_layers, " x ",
                     shape.num_physical, " of ", shape.num_logical));
  }
  return CheckRanks(shape.num_ranks);
}

absl::Status ExpertPlacement::CheckRanks(int num_ranks) const {
  if (num_ranks < 1 || num_physical_ % num_ranks != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the ", num_physical_, " expert slots (routed + redundant) do not divide over ", num_ranks,
        " ranks; choose --num-redundant-experts so that the total is a multiple of the EP size"));
  }
  return absl::OkStatus();
}

}  // namespace moeserve::engine
