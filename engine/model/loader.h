// Model loading: turns a --model argument into a Model and its Tokenizer.
// `builtin:NAME` generates the built-in weights from a fixed seed. Called once at start-up.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "engine/model/model.h"
#include "engine/model/tokenizer.h"

namespace moeserve::engine {

struct LoadedModel {
  std::shared_ptr<const Model> model;
  std::shared_ptr<const Tokenizer> tokenizer;  // null when the model has none
};

// The fixed seed of the built-in models' weights.
inline constexpr uint64_t kBuiltinWeightSeed = 20250227;

absl::StatusOr<LoadedModel> LoadModel(const std::string& model_spec);

}  // namespace moeserve::engine
