#include "engine/backend/cuda/gpu_stage_timer.h"

#include <chrono>
#include <utility>

#include "kernels/kernels.h"

namespace moeserve::engine::cuda {

GpuStageTimer::~GpuStageTimer() {
  for (cudaEvent_t event : events_) cudaEventDestroy(event);
}

absl::Status GpuStageTimer::Record() {
  if (used_ == events_.size()) {
    cudaEvent_t event = nullptr;
    if (auto s = kernels::CudaStatus(cudaEventCreate(&event), "stage timer"); !s.ok()) return s;
    events_.push_back(event);
  }
  return kernels::CudaStatus(cudaEventRecord(events_[used_++], stream_), "stage timer");
}

absl::Status GpuStageTimer::Begin(TraceRecorder* trace, cudaStream_t stream) {
  trace_ = trace;
  stream_ = stream;
  used_ = 0;
  names_.clear();
  return trace_ == nullptr ? absl::OkStatus() : Record();
}

absl::Status GpuStageTimer::Mark(std::string name) {
  if (trace_ == nullptr || used_ == 0) return absl::OkStatus();
  names_.push_back(std::move(name));
  return Record();
}

void GpuStageTimer::Publish(int pid, int tid) {
  if (trace_ == nullptr || used_ < 2) return;
  trace_->NameThread(pid, tid, "GPU (compute stream)");
  // Walk back from the last event, which completed by now.
  auto end = TraceRecorder::Clock::now();
  for (size_t i = used_ - 1; i > 0; --i) {
    float milliseconds = 0;
    if (cudaEventElapsedTime(&milliseconds, events_[i - 1], events_[i]) != cudaSuccess) break;
    const auto start = end - std::chrono::duration_cast<TraceRecorder::Clock::duration>(
                                 std::chrono::duration<double, std::milli>(milliseconds));
    trace_->Complete(pid, tid, names_[i - 1], "gpu", start, end);
    end = start;
  }
  trace_ = nullptr;
}

}  // namespace moeserve::engine::cuda
