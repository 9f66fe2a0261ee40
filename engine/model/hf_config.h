// Hugging Face config.json ↔ ModelConfig: parsing (with each family's field names, defaults
// and spellings from architecture.h) and serializing for export. Stateless; thread-safe.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "engine/model/model_config.h"
#include "nlohmann/json_fwd.hpp"

namespace moeserve::engine {

// Parses a Hugging Face config.json object and validates it. Accepts rope settings under
// `rope_scaling` or `rope_parameters`.
absl::StatusOr<ModelConfig> ParseModelConfig(const nlohmann::json& json, std::string name);

// Serializes to Hugging Face config.json keys (used when exporting the built-in weights).
nlohmann::json ModelConfigToJson(const ModelConfig& config);

}  // namespace moeserve::engine
