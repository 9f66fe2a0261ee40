// Logit heads for sampling on the GPU: for each row of a step's logits, the few largest logits in
// the sampler's order (descending, ties to the lower token id) and the summed weight of the set
// top-k keeps. The host sampler (engine/sampling/sampler.h) finishes each row from these — greedy
// needs the first entry only, top-k/top-p and the draw almost always stop inside the head — so a
// step copies a few kilobytes to the host instead of every row's whole vocabulary (33 MB a step
// at DeepSeek-V3's 129K vocabulary and 64 rows). Same conventions as kernels.h: raw device
// pointers, a stream, a status. CPU twin: LogitHeadsTwin in cpu_twins.h.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/logit_head.h"

namespace moeserve::kernels {

// For each row r of `logits` (fp32 [rows, vocab]) with rows_params[r].head_size > 0: the
// head_size largest logits, in the order above, go to ids/values[params.output_offset ...]; and
// where params.kept_weight_needed, kept_weight[r] = Σ exp((x − max) / temperature) in double
// over the keep_limit largest logits x (max: the row's largest). head_size <= kMaxLogitHead,
// head_size <= keep_limit <= vocab.
absl::Status LogitHeads(const float* logits, int rows, int vocab, const LogitHeadParams* params,
                        int32_t* ids, float* values, double* kept_weight, cudaStream_t stream);

}  // namespace moeserve::kernels
