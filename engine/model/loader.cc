#include "engine/model/loader.h"

#include <filesystem>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "base/bounded_json.h"
#include "base/regular_file.h"
#include "engine/model/architecture.h"
#include "engine/model/bpe_tokenizer.h"
#include "engine/model/builtin_models.h"
#include "engine/model/checkpoint.h"
#include "engine/model/hf_config.h"
#include "nlohmann/json.hpp"

namespace moeserve::engine {
namespace {

namespace fs = std::filesystem;

// The largest config.json, tokenizer_config.json and tokenizer.json accepted: far above any
// published model's (DeepSeek-V3's tokenizer.json is 8 MB), far below what would exhaust memory.
constexpr uint64_t kMaxConfigBytes = 16ull << 20;
constexpr uint64_t kMaxTokenizerBytes = 512ull << 20;

absl::StatusOr<nlohmann::json> ReadJsonFile(const fs::path& path, uint64_t max_bytes) {
  absl::StatusOr<std::string> text = base::ReadRegularFile(path.string(), max_bytes);
  if (!text.ok()) return text.status();
  absl::StatusOr<nlohmann::json> json = base::ParseBoundedJson(*text);
  if (!json.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("`", path.string(), "` is not valid JSON: ", json.status().message()));
  }
  return json;
}

absl::Status InFile(const absl::Status& status, const fs::path& path) {
  return absl::Status(status.code(), absl::StrCat(path.string(), ": ", status.message()));
}

absl::StatusOr<LoadedModel> LoadFolder(const fs::path& folder, const LoadOptions& options) {
  const fs::path config_path = folder / "config.json";
  std::error_code error;
  if (!fs::exists(config_path, error)) {
    return absl::NotFoundError(absl::StrCat("no config.json in `", folder.string(), "`"));
  }
  absl::StatusOr<nlohmann::json> config_json = ReadJsonFile(config_path, kMaxConfigBytes);
  if (!config_json.ok()) return config_json.status();
  const std::string name = folder.filename().empty() ? folder.parent_path().filename().string()
                                                     : folder.filename().string();
  absl::StatusOr<ModelConfig> config = ParseModelConfig(*config_json, name);
  if (!config.ok()) return InFile(config.status(), config_path);

  auto with_hint = [&](const absl::Status& status) {
    std::string hint;
    if (ArchitectureOf(*config).mixtral_tensor_names) {
      hint =
          " (Mixtral's `block_sparse_moe.experts.{i}.w1/w3/w2` are read as "
          "`mlp.experts.{i}.gate_proj/up_proj/down_proj`)";
    }
    return absl::InvalidArgumentError(absl::StrCat(folder.string(), ": ", status.message(), hint));
  };
  LoadedModel loaded;
  if (options.host_weights) {
    absl::StatusOr<std::map<std::string, Tensor>> tensors =
        ReadCheckpointTensors(folder.string(), *config, *config_json);
    if (!tensors.ok()) return tensors.status();
    absl::StatusOr<ModelWeights> weights = ModelWeights::FromTensors(*config, *std::move(tensors));
    if (!weights.ok()) return with_hint(weights.status());
    loaded.model = std::make_shared<Model>(*std::move(weights));
  } else {
    absl::StatusOr<std::shared_ptr<const Checkpoint>> checkpoint =
        Checkpoint::Open(folder.string(), *config, *config_json);
    if (!checkpoint.ok()) return checkpoint.status();
    if (absl::Status names = CheckExpectedTensors(*config, (*checkpoint)->shapes()); !names.ok()) {
      return with_hint(names);
    }
    loaded.model =
        std::make_shared<Model>(ModelWeights::ConfigOnly(*config), *std::move(checkpoint));
  }
  const fs::path tokenizer_path = folder / "tokenizer.json";
  if (fs::exists(tokenizer_path, error)) {
    absl::StatusOr<nlohmann::json> tokenizer_json =
        ReadJsonFile(tokenizer_path, kMaxTokenizerBytes);
    if (!tokenizer_json.ok()) return tokenizer_json.status();
    nlohmann::json tokenizer_config = nlohmann::json::object();
    const fs::path tokenizer_config_path = folder / "tokenizer_config.json";
    if (fs::exists(tokenizer_config_path, error)) {
      absl::StatusOr<nlohmann::json> json = ReadJsonFile(tokenizer_config_path, kMaxConfigBytes);
      if (!json.ok()) return json.status();
      tokenizer_config = *std::move(json);
    }
    absl::StatusOr<std::unique_ptr<BpeTokenizer>> tokenizer =
        BpeTokenizer::Create(*tokenizer_json, tokenizer_config, loaded.model->config());
    if (!tokenizer.ok()) return InFile(tokenizer.status(), tokenizer_path);
    loaded.tokenizer = std::shared_ptr<const Tokenizer>(*std::move(tokenizer));
  }
  return loaded;
}

}  // namespace

absl::StatusOr<LoadedModel> LoadModel(const std::string& model_spec, const LoadOptions& options) {
  if (model_spec.starts_with("builtin:")) {
    absl::StatusOr<ModelConfig> config = BuiltinModelConfig(model_spec);
    if (!config.ok()) return config.status();
    LoadedModel loaded;
    loaded.model = std::make_shared<Model>(ModelWeights::Generate(*config, kBuiltinWeightSeed));
    // The byte tokenizer fits the tiny vocabularies (256 bytes + <bos> + <eos>); larger built-ins
    // take token ids.
    if (config->vocab_size == 258) {
      loaded.tokenizer =
          std::make_shared<ByteTokenizer>(config->bos_token_id, config->eos_token_id);
    }
    return loaded;
  }
  std::error_code error;
  if (model_spec.empty() || !fs::is_directory(model_spec, error)) {
    return absl::NotFoundError(
        absl::StrCat("model `", model_spec,
                     "` is neither a checkpoint folder nor a built-in model (builtin:tiny, ...)"));
  }
  return LoadFolder(fs::path(model_spec), options);
}

}  // namespace moeserve::engine
