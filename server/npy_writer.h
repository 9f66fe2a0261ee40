// Writes float32 arrays as NumPy .npy files (format version 1.0), for `moeserve logits`.
// Stateless; thread-safe.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace moeserve::server {

absl::Status WriteNpyFloat32(const std::string& path, const std::vector<int64_t>& shape,
                             const std::vector<float>& values);

}  // namespace moeserve::server
