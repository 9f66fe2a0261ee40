// SideLane: a rank's second compute stream, for work of a step that does not depend on what the
// compute stream enqueues beside it — MLA's latent rows (kv_a and the cache write) beside its
// queries, and the shared experts beside the routing and the routed experts. Decode steps of a
// few tokens leave most SMs idle in such small kernels; two lanes fill them. The work and its
// numbers are the same as on one stream: only the order between independent kernels changes.
//
// Fork() makes the side stream wait for everything the compute stream enqueued so far; Join()
// makes the compute stream wait for everything the side stream enqueued so far. Both are event
// record/wait pairs, so a step graph captures them as its edges (the side stream joins the
// capture at Fork and must Join before the capture ends). The lane owns its stream, a cuBLAS
// handle bound to it (with a workspace of its own, as captured GEMMs need) and the two events.
//
// Not thread-safe: the rank's thread drives it, like the rest of the backend's State.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "kernels/device_array.h"

namespace moeserve::engine::cuda {

class SideLane {
 public:
  // A lane beside `compute`, on the current device.
  static absl::StatusOr<std::unique_ptr<SideLane>> Create(cudaStream_t compute);
  SideLane(const SideLane&) = delete;
  SideLane& operator=(const SideLane&) = delete;
  ~SideLane();

  absl::Status Fork();  // the side stream waits for the compute stream's work so far
  // The compute stream waits for the side stream's work so far; nothing where nothing was forked
  // since the last join (a captured compute stream may not wait for an uncaptured stream).
  absl::Status Join();

  cudaStream_t stream() const { return stream_; }
  cublasHandle_t cublas() const { return cublas_; }

 private:
  explicit SideLane(cudaStream_t compute) : compute_(compute) {}

  cudaStream_t compute_ = nullptr;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  kernels::DeviceArray<uint8_t> cublas_workspace_;
  cudaEvent_t forked_ = nullptr;
  cudaEvent_t joined_ = nullptr;
  bool forked_since_join_ = false;
};

}  // namespace moeserve::engine::cuda
