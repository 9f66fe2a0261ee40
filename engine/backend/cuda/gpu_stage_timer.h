// GpuStageTimer: where a traced step's GPU time goes. The backend marks the end of each stage it
// enqueues (attention, experts, LM head, ...) with a CUDA event on its compute stream; once the
// step has synchronized, the intervals between consecutive events become trace events on the
// rank's GPU lane, beside the host's own events. An interval is the GPU time of that stage's
// work plus any time the stream sat idle waiting for the host to enqueue it, so a stage that
// is long here but short on the host lane is the GPU's; idle gaps show as stages longer than
// their kernels (compare with the host lane). Disabled (no events, no cost) unless a step is
// traced.
//
// Not thread-safe: the rank's thread drives it, like the rest of the backend's State.
#pragma once

#include <cuda_runtime_api.h>

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "engine/trace/trace_recorder.h"

namespace moeserve::engine::cuda {

class GpuStageTimer {
 public:
  GpuStageTimer() = default;
  GpuStageTimer(const GpuStageTimer&) = delete;
  GpuStageTimer& operator=(const GpuStageTimer&) = delete;
  ~GpuStageTimer();

  // Starts a step on `stream`; enabled only when `trace` is set (else every call is a no-op).
  absl::Status Begin(TraceRecorder* trace, cudaStream_t stream);
  // Whether this step is timed (Begin had a trace).
  bool enabled() const { return trace_ != nullptr; }
  // The work enqueued on the stream since the last mark is the stage `name`.
  absl::Status Mark(std::string name);
  // After the stream has synchronized: the stages as trace events on lane `tid` of `pid`,
  // ending at now (the host's clock when the step's last work was seen done).
  void Publish(int pid, int tid);

 private:
  absl::Status Record();
  TraceRecorder* trace_ = nullptr;
  cudaStream_t stream_ = nullptr;
  std::vector<cudaEvent_t> events_;  // pooled; the first `used_` belong to this step
  std::vector<std::string> names_;   // names_[i]: the stage ending at events_[i + 1]
  size_t used_ = 0;
};

}  // namespace moeserve::engine::cuda
