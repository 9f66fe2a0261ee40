#include "eplb/rebalance_jsonl.h"

#include <cfloat>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <limits>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace moeserve::eplb {
namespace {

using nlohmann::json;

constexpr std::string_view kKnownFields[] = {"id",         "weight",    "num_replicas",
                                             "num_groups", "num_nodes", "num_gpus"};

absl::Status ReadCount(const json& object, const char* field, int* value) {
  const auto it = object.find(field);
  if (it == object.end()) {
    return absl::InvalidArgumentError(absl::StrCat("missing field \"", field, "\""));
  }
  if (it->is_number_unsigned()) {
    const uint64_t number = it->get<uint64_t>();
    if (number > static_cast<uint64_t>(std::numeric_limits<int>::max())) {
      return absl::InvalidArgumentError(absl::StrCat(field, " is too large: ", number));
    }
    *value = static_cast<int>(number);
    return absl::OkStatus();
  }
  if (it->is_number_integer()) {
    const int64_t number = it->get<int64_t>();
    if (number < std::numeric_limits<int>::min()) {
      return absl::InvalidArgumentError(absl::StrCat(field, " is too small: ", number));
    }
    // Non-positive values pass through; RebalanceExperts explains what they must be.
    *value = static_cast<int>(number);
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(
      absl::StrCat(field, " must be a JSON integer, got ", it->dump()));
}

absl::Status ReadWeight(const json& object, std::vector<std::vector<float>>* weight) {
  const auto it = object.find("weight");
  if (it == object.end()) return absl::InvalidArgumentError("missing field \"weight\"");
  if (!it->is_array()) {
    return absl::InvalidArgumentError("weight must be an array of layers, each an array of loads");
  }
  weight->clear();
  weight->reserve(it->size());
  for (size_t layer = 0; layer < it->size(); ++layer) {
    const json& row = (*it)[layer];
    if (!row.is_array()) {
      return absl::InvalidArgumentError(
          absl::StrCat("weight[", layer, "] must be an array of loads, got ", row.dump()));
    }
    std::vector<float>& loads = weight->emplace_back();
    loads.reserve(row.size());
    for (size_t expert = 0; expert < row.size(); ++expert) {
      const json& cell = row[expert];
      if (!cell.is_number()) {
        return absl::InvalidArgumentError(
            absl::StrCat("weight[", layer, "][", expert, "] must be a number, got ", cell.dump()));
      }
      const double load = cell.get<double>();
      // Converting an out-of-range double to float is undefined behaviour, so check first.
      if (!std::isfinite(load) || std::fabs(load) > FLT_MAX) {
        return absl::InvalidArgumentError(absl::StrCat("weight[", layer, "][", expert, "] is ",
                                                       load, ", outside the float32 range"));
      }
      loads.push_back(static_cast<float>(load));
    }
  }
  return absl::OkStatus();
}

void AppendInt(int value, std::string* out) {
  char buffer[16];
  const auto result = std::to_chars(buffer, buffer + sizeof(buffer), value);
  out->append(buffer, result.ptr);
}

void AppendMatrix(const std::vector<std::vector<int>>& rows, std::string* out) {
  out->push_back('[');
  for (size_t i = 0; i < rows.size(); ++i) {
    if (i > 0) out->push_back(',');
    out->push_back('[');
    for (size_t j = 0; j < rows[i].size(); ++j) {
      if (j > 0) out->push_back(',');
      AppendInt(rows[i][j], out);
    }
    out->push_back(']');
  }
  out->push_back(']');
}

}  // namespace

absl::Status ParseRebalanceCase(std::string_view line, RebalanceCase* rebalance_case) {
  rebalance_case->id_json = "null";
  json object;
  try {
    object = json::parse(line.begin(), line.end());
  } catch (const json::exception& error) {
    // what() reads "[json.exception.parse_error.101] parse error at ..."; keep the readable part.
    std::string_view message = error.what();
    if (const size_t bracket = message.find("] "); bracket != std::string_view::npos) {
      message.remove_prefix(bracket + 2);
    }
    return absl::InvalidArgumentError(absl::StrCat("invalid JSON: ", std::string(message)));
  }
  if (!object.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "each line must be a JSON object with weight and the counts, got ", object.type_name()));
  }
  if (const auto id = object.find("id"); id != object.end()) {
    rebalance_case->id_json = id->dump();
  }
  for (const auto& [key, value] : object.items()) {
    bool known = false;
    for (const std::string_view field : kKnownFields) known = known || key == field;
    if (!known) {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown field \"", key,
                       "\"; expected id, weight, num_replicas, num_groups, num_nodes, num_gpus"));
    }
  }
  if (absl::Status status = ReadWeight(object, &rebalance_case->weight); !status.ok()) {
    return status;
  }
  ClusterShape& shape = rebalance_case->shape;
  for (const auto& [field, value] :
       {std::pair{"num_replicas", &shape.num_replicas}, std::pair{"num_groups", &shape.num_groups},
        std::pair{"num_nodes", &shape.num_nodes}, std::pair{"num_gpus", &shape.num_gpus}}) {
    if (absl::Status status = ReadCount(object, field, value); !status.ok()) return status;
  }
  return absl::OkStatus();
}

void AppendPlanLine(std::string_view id_json, const ExpertPlacementPlan& plan, std::string* out) {
  out->append("{\"id\":");
  out->append(id_json);
  out->append(",\"phy2log\":");
  AppendMatrix(plan.phy2log, out);
  out->append(",\"log2phy\":[");
  for (int layer = 0; layer < plan.num_layers; ++layer) {
    if (layer > 0) out->push_back(',');
    out->push_back('[');
    for (int expert = 0; expert < plan.num_logical_experts; ++expert) {
      if (expert > 0) out->push_back(',');
      out->push_back('[');
      for (int rank = 0; rank < plan.max_replica_count; ++rank) {
        if (rank > 0) out->push_back(',');
        AppendInt(plan.Log2Phy(layer, expert, rank), out);
      }
      out->push_back(']');
    }
    out->push_back(']');
  }
  out->append("],\"logcnt\":");
  AppendMatrix(plan.logcnt, out);
  out->append("}\n");
}

void AppendErrorLine(std::string_view id_json, std::string_view message, std::string* out) {
  out->append("{\"id\":");
  out->append(id_json);
  out->append(",\"error\":");
  // Let the JSON library do the escaping (quotes, control characters, invalid UTF-8).
  out->append(json(std::string(message)).dump(-1, ' ', false, json::error_handler_t::replace));
  out->append("}\n");
}

}  // namespace moeserve::eplb
