// Fuzzes config.json parsing: bounded JSON, then ParseModelConfig with its field types, the
// architecture registry and ValidateModelConfig's limits. An accepted config must also describe
// its expected tensors without trouble (a walk that stops after the first few thousand).
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "base/bounded_json.h"
#include "engine/model/hf_config.h"
#include "engine/model/weights.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  absl::StatusOr<nlohmann::json> json =
      moeserve::base::ParseBoundedJson(std::string_view(reinterpret_cast<const char*>(data), size));
  if (!json.ok()) return 0;
  absl::StatusOr<moeserve::engine::ModelConfig> config =
      moeserve::engine::ParseModelConfig(*json, "fuzz");
  if (!config.ok()) return 0;
  int visited = 0;
  moeserve::engine::ForEachExpectedTensor(
      *config, [&](const std::string&, const std::vector<int64_t>&) { return ++visited < 4096; });
  (void)config->num_moe_layers();
  (void)config->attention_softmax_scale();
  return 0;
}
