// What the logit-head kernel (sampling.h) and its CPU twin compute for one row: shared by the
// host sampler, the GPU backend, the kernel and the twin, so it builds without CUDA.
#pragma once

#include <cstdint>

namespace moeserve::kernels {

// The largest head a row can ask for (one thread block ranks it in shared memory).
inline constexpr int kMaxLogitHead = 1024;

struct LogitHeadParams {
  int32_t head_size = 0;      // 0: the row is skipped
  int32_t keep_limit = 0;     // how many logits top-k keeps (the vocabulary when top-k is off)
  float temperature = 1.0f;   // divides (x − max) in the kept weight
  int32_t output_offset = 0;  // where the row's head starts in the packed ids/values
  bool kept_weight_needed = false;
};

}  // namespace moeserve::kernels
