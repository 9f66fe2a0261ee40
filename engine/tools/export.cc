// ExportModel (engine/engine.h): the engine side of `moeserve export`.
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "engine/base/status_macros.h"
#include "engine/engine.h"
#include "engine/model/hf_config.h"
#include "engine/model/loader.h"
#include "engine/model/safetensors.h"
#include "nlohmann/json.hpp"

namespace moeserve::engine {

absl::StatusOr<int> ExportModel(const std::string& model_spec, const std::string& out_dir) {
  if (auto status = CheckModelRunsOn(model_spec, "cpu"); !status.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(status.message(), " (it has no checkpoint to export)"));
  }
  absl::StatusOr<LoadedModel> loaded = LoadModel(model_spec);
  if (!loaded.ok()) return loaded.status();
  std::error_code error;
  std::filesystem::create_directories(out_dir, error);
  if (error) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot create ", out_dir, ": ", error.message()));
  }
  const ModelWeights& weights = loaded->model->weights();
  {
    std::ofstream config(out_dir + "/config.json");
    config << ModelConfigToJson(weights.config()).dump(2) << "\n";
    if (!config)
      return absl::FailedPreconditionError(absl::StrCat("cannot write ", out_dir, "/config.json"));
  }
  RETURN_IF_ERROR(WriteSafetensors(out_dir + "/model.safetensors", weights.tensors()));
  return static_cast<int>(weights.tensors().size());
}

}  // namespace moeserve::engine
