// ExpertMlp: the routed experts' SwiGLU MLP on the GPU as grouped GEMMs through cuBLAS —
// rows already permuted so that each local expert's tokens are contiguous:
//   gate_up[rows of e] = X[rows of e] · W_gate_up(e)^T      ([2I, H] per expert, gate then up)
//   act = silu(gate) * up                                     (one kernel over all rows)
//   Y[rows of e]       = act[rows of e] · W_down(e)^T         ([H, I] per expert)
// bf16 in and out, fp32 accumulation. One instance per stream; not thread-safe.
#pragma once

#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/device_array.h"

namespace moeserve::kernels {

// A cuBLAS result as a status (INTERNAL naming `what` and the cuBLAS code on failure).
absl::Status CublasStatus(cublasStatus_t status, const char* what);

// Gives `handle` a workspace of its own, allocated into `workspace` (kCublasWorkspaceBytes), in
// place of the default pool. A handle whose GEMMs are captured into CUDA graphs needs one:
// without it, each capture would take workspace memory of its own.
inline constexpr size_t kCublasWorkspaceBytes = size_t{32} << 20;
absl::Status GiveCublasWorkspace(cublasHandle_t handle, DeviceArray<uint8_t>& workspace);

class ExpertMlp {
 public:
  enum class Strategy {
    kPerExpertGemm,  // one cublasGemmEx per expert and matrix
    kGroupedGemm,    // one cublasGemmGroupedBatchedEx per matrix for all experts
    // Per-expert GEMMs spread over side streams, so that small experts (few row tiles each)
    // run side by side and fill the GPU; joined back into the main stream.
    kConcurrentGemm,
  };
  static absl::StatusOr<ExpertMlp> Create(int hidden, int intermediate, int max_rows,
                                          int max_experts, cudaStream_t stream);
  ExpertMlp(ExpertMlp&&) noexcept;
  ExpertMlp& operator=(ExpertMlp&&) noexcept;
  ~ExpertMlp();

  // `offsets` (host, experts + 1 entries) splits X [offsets.back(), hidden] by expert;
  // gate_up_weights[e] and down_weights[e] are device pointers.
  absl::Status Run(const __nv_bfloat16* x, const std::vector<int64_t>& offsets,
                   const std::vector<const __nv_bfloat16*>& gate_up_weights,
                   const std::vector<const __nv_bfloat16*>& down_weights, __nv_bfloat16* y,
                   Strategy strategy = Strategy::kPerExpertGemm);

 private:
  ExpertMlp() = default;
  absl::Status Gemm(const __nv_bfloat16* a, const std::vector<const __nv_bfloat16*>& weights,
                    const std::vector<int64_t>& offsets, __nv_bfloat16* c, int n, int k,
                    Strategy strategy);

  int hidden_ = 0, intermediate_ = 0, max_rows_ = 0, max_experts_ = 0;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  DeviceArray<uint8_t> workspace_;         // cublas_'s (GiveCublasWorkspace)
  DeviceArray<__nv_bfloat16> gate_up_;     // [max_rows, 2I]
  DeviceArray<__nv_bfloat16> activation_;  // [max_rows, I]
  DeviceArray<void*> device_pointers_;     // 3 * max_experts pointer arrays for grouped GEMM
  // The grouped GEMM's pointer arrays travel from pinned host memory without synchronizing the
  // stream; two host copies alternate, and an event says when a copy's source may be rewritten.
  void** pinned_pointers_[2] = {};
  cudaEvent_t pointers_copied_[2] = {};
  int pointer_slot_ = 0;
  static constexpr int kSideStreams = 4;
  cudaStream_t side_streams_[kSideStreams] = {};
  cublasHandle_t side_cublas_[kSideStreams] = {};
  cudaEvent_t fork_ = nullptr;
  cudaEvent_t joins_[kSideStreams] = {};
};

}  // namespace moeserve::kernels
