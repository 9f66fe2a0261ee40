// Model loading: turns a --model argument into a Model and its Tokenizer. Called once at start-up.
//
// `builtin:NAME` generates the built-in weights from a fixed seed. Anything else is a Hugging
// Face checkpoint folder: `config.json` (deepseek_v3, deepseek_v2, qwen3_moe or mixtral),
// safetensors weights (engine/model/checkpoint.h) and, when present, `tokenizer.json` (byte-level
// BPE, engine/model/bpe_tokenizer.h) with `tokenizer_config.json`. Stateless; safe to call from
// any thread.
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

struct LoadOptions {
  // Read a checkpoint's weights into host memory as fp32 (the CPU engine computes from them).
  // Off: the checkpoint is opened and checked against the config, and its tensors stay in the
  // mapped files for a GPU backend to read each rank's share of (Model::tensor_source()), so
  // host memory does not grow with the model. Built-in models are generated either way.
  bool host_weights = true;
};

// The fixed seed of the built-in models' weights.
inline constexpr uint64_t kBuiltinWeightSeed = 20250227;

// NOT_FOUND: no such folder, or a file the model needs is missing. INVALID_ARGUMENT: anything
// malformed (config, weights, index, tokenizer), with a message naming the file and the field or
// tensor.
absl::StatusOr<LoadedModel> LoadModel(const std::string& model_spec,
                                      const LoadOptions& options = {});

}  // namespace moeserve::engine
