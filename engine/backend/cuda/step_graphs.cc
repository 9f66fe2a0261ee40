#include "engine/backend/cuda/step_graphs.h"

#include "kernels/kernels.h"

namespace moeserve::engine::cuda {

using kernels::CudaStatus;

void StepGraphs::Clear() {
  for (Entry& entry : graphs_) cudaGraphExecDestroy(entry.exec);
  graphs_.clear();
}

absl::StatusOr<bool> StepGraphs::Launch(const Key& key, uint64_t fingerprint, cudaStream_t stream,
                                        absl::FunctionRef<absl::Status()> enqueue) {
  if (fingerprint != fingerprint_) {
    Clear();
    fingerprint_ = fingerprint;
  }
  for (auto it = graphs_.begin(); it != graphs_.end(); ++it) {
    if (!(it->key == key)) continue;
    graphs_.splice(graphs_.begin(), graphs_, it);  // most recently used first
    if (auto s = CudaStatus(cudaGraphLaunch(graphs_.front().exec, stream), "step graph launch");
        !s.ok()) {
      return s;
    }
    return false;
  }

  // Thread-local mode: only this thread's calls are checked while it captures, so other ranks'
  // threads (ranks sharing a process) go on with their own streams.
  if (auto s = CudaStatus(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal),
                          "step graph capture");
      !s.ok()) {
    return s;
  }
  absl::Status enqueued = enqueue();
  cudaGraph_t graph = nullptr;
  // Always ends the capture, so that the stream is usable whatever happened inside.
  const absl::Status ended = CudaStatus(cudaStreamEndCapture(stream, &graph), "step graph capture");
  if (!enqueued.ok() || !ended.ok()) {
    if (graph != nullptr) cudaGraphDestroy(graph);
    cudaGetLastError();  // not a sticky error: clear it for the launches that follow
    return !enqueued.ok() ? enqueued : ended;
  }
  cudaGraphExec_t exec = nullptr;
  const absl::Status instantiated =
      CudaStatus(cudaGraphInstantiate(&exec, graph, 0), "step graph instantiate");
  cudaGraphDestroy(graph);
  if (!instantiated.ok()) return instantiated;
  if (static_cast<int>(graphs_.size()) >= capacity_) {
    cudaGraphExecDestroy(graphs_.back().exec);
    graphs_.pop_back();
  }
  graphs_.push_front({key, exec});
  if (auto s = CudaStatus(cudaGraphLaunch(exec, stream), "step graph launch"); !s.ok()) return s;
  return true;
}

}  // namespace moeserve::engine::cuda
