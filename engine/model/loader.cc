#include "engine/model/loader.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace moeserve::engine {

absl::StatusOr<LoadedModel> LoadModel(const std::string& model_spec) {
  if (model_spec.starts_with("builtin:")) {
    absl::StatusOr<ModelConfig> config = BuiltinModelConfig(model_spec);
    if (!config.ok()) return config.status();
    LoadedModel loaded;
    loaded.model = std::make_shared<Model>(ModelWeights::Generate(*config, kBuiltinWeightSeed));
    loaded.tokenizer = std::make_shared<ByteTokenizer>(config->bos_token_id, config->eos_token_id);
    return loaded;
  }
  return absl::UnimplementedError(absl::StrCat(
      "cannot load `", model_spec,
      "`: checkpoint folders are not supported yet; use a built-in model (builtin:tiny)"));
}

}  // namespace moeserve::engine
