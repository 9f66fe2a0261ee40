#include "engine/backend/cuda/side_lane.h"

#include "engine/base/status_macros.h"
#include "kernels/expert_mlp.h"
#include "kernels/kernels.h"

namespace moeserve::engine::cuda {

using kernels::CublasStatus;
using kernels::CudaStatus;

absl::StatusOr<std::unique_ptr<SideLane>> SideLane::Create(cudaStream_t compute) {
  std::unique_ptr<SideLane> lane(new SideLane(compute));
  RETURN_IF_ERROR(CudaStatus(cudaStreamCreateWithFlags(&lane->stream_, cudaStreamNonBlocking),
                             "side lane stream"));
  RETURN_IF_ERROR(CublasStatus(cublasCreate(&lane->cublas_), "side lane cuBLAS handle"));
  RETURN_IF_ERROR(CublasStatus(cublasSetStream(lane->cublas_, lane->stream_), "side lane stream"));
  // After cublasSetStream, which resets a handle to the default pool.
  RETURN_IF_ERROR(kernels::GiveCublasWorkspace(lane->cublas_, lane->cublas_workspace_));
  for (cudaEvent_t* event : {&lane->forked_, &lane->joined_}) {
    RETURN_IF_ERROR(
        CudaStatus(cudaEventCreateWithFlags(event, cudaEventDisableTiming), "side lane event"));
  }
  return lane;
}

SideLane::~SideLane() {
  if (cublas_ != nullptr) cublasDestroy(cublas_);
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
  if (forked_ != nullptr) cudaEventDestroy(forked_);
  if (joined_ != nullptr) cudaEventDestroy(joined_);
}

absl::Status SideLane::Fork() {
  RETURN_IF_ERROR(CudaStatus(cudaEventRecord(forked_, compute_), "side lane fork"));
  forked_since_join_ = true;
  return CudaStatus(cudaStreamWaitEvent(stream_, forked_, 0), "side lane fork");
}

absl::Status SideLane::Join() {
  if (!forked_since_join_) return absl::OkStatus();
  forked_since_join_ = false;
  RETURN_IF_ERROR(CudaStatus(cudaEventRecord(joined_, stream_), "side lane join"));
  return CudaStatus(cudaStreamWaitEvent(compute_, joined_, 0), "side lane join");
}

}  // namespace moeserve::engine::cuda
