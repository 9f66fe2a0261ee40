// The built-in models: DeepSeek-V3's and V2's architectures scaled down for tests and demos
// (`builtin:tiny` and variants), and for GPU benchmarks DeepSeek-V3's dimensions at reduced
// depth (`builtin:v3-bench`; in FP8 `-fp8`, and 8 layers deep `-fp8-deep`) and Qwen3-30B-A3B's
// at full depth (`builtin:qwen3-30b-bench`).
// Their weights are generated from a fixed seed (loader.h; the benchmark models' routed experts
// on the GPUs). Stateless.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model/model_config.h"

namespace moeserve::engine {

std::vector<std::string> BuiltinModelNames();
absl::StatusOr<ModelConfig> BuiltinModelConfig(const std::string& name);

}  // namespace moeserve::engine
