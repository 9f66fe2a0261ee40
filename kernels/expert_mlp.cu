#include <algorithm>

#include "absl/strings/str_cat.h"
#include "kernels/expert_mlp.h"
#include "kernels/kernels.h"

namespace moeserve::kernels {
absl::Status CublasStatus(cublasStatus_t status, const char* what) {
  if (status == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": cuBLAS status ", static_cast<int>(status)));
}

absl::Status GiveCublasWorkspace(cublasHandle_t handle, DeviceArray<uint8_t>& workspace) {
  if (auto s = workspace.Reserve(kCublasWorkspaceBytes); !s.ok()) return s;
  return CublasStatus(cublasSetWorkspace(handle, workspace.data(), kCublasWorkspaceBytes),
                      "cublasSetWorkspace");
}

absl::StatusOr<ExpertMlp> ExpertMlp::Create(int hidden, int intermediate, int max_rows,
                                            int max_experts, cudaStream_t stream) {
  ExpertMlp mlp;
  mlp.hidden_ = hidden;
  mlp.intermediate_ = intermediate;
  mlp.max_rows_ = max_rows;
  mlp.max_experts_ = max_experts;
  mlp.stream_ = stream;
  if (auto s = CublasStatus(cublasCreate(&mlp.cublas_), "cublasCreate"); !s.ok()) return s;
  if (auto s = CublasStatus(cublasSetStream(mlp.cublas_, stream), "cublasSetStream"); !s.ok())
    return s;
  // After cublasSetStream, which resets a handle to the default pool.
  if (auto s = GiveCublasWorkspace(mlp.cublas_, mlp.workspace_); !s.ok()) return s;
  const size_t rows = static_cast<size_t>(std::max(max_rows, 1));
  if (auto s = mlp.gate_up_.Reserve(rows * 2 * intermediate); !s.ok()) return s;
  if (auto s = mlp.activation_.Reserve(rows * intermediate); !s.ok()) return s;
  if (auto s = mlp.device_pointers_.Reserve(3 * static_cast<size_t>(max_experts)); !s.ok()) {
    return s;
  }
  if (auto s = CudaStatus(cudaEventCreateWithFlags(&mlp.fork_, cudaEventDisableTiming), "event");
      !s.ok()) {
    return s;
  }
  for (int i = 0; i < 2; ++i) {
    if (auto s = CudaStatus(cudaMallocHost(&mlp.pinned_pointers_[i],
                                           3 * static_cast<size_t>(max_experts) * sizeof(void*)),
                            "cudaMallocHost");
        !s.ok()) {
      return s;
    }
    if (auto s = CudaStatus(
            cudaEventCreateWithFlags(&mlp.pointers_copied_[i], cudaEventDisableTiming), "event");
        !s.ok()) {
      return s;
    }
  }
  for (int i = 0; i < kSideStreams; ++i) {
    if (auto s = CudaStatus(cudaStreamCreateWithFlags(&mlp.side_streams_[i], cudaStreamNonBlocking),
                            "cudaStreamCreate");
        !s.ok()) {
      return s;
    }
    if (auto s =
            CudaStatus(cudaEventCreateWithFlags(&mlp.joins_[i], cudaEventDisableTiming), "event");
        !s.ok()) {
      return s;
    }
    if (auto s = CublasStatus(cublasCreate(&mlp.side_cublas_[i]), "cublasCreate"); !s.ok())
      return s;
    if (auto s = CublasStatus(cublasSetStream(mlp.side_cublas_[i], mlp.side_streams_[i]), "stream");
        !s.ok()) {
      return s;
    }
  }
  return mlp;
}

ExpertMlp::ExpertMlp(ExpertMlp&& other) noexcept { *this = std::move(other); }

ExpertMlp& ExpertMlp::operator=(ExpertMlp&& other) noexcept {
  std::swap(hidden_, other.hidden_);
  std::swap(intermediate_, other.intermediate_);
  std::swap(max_rows_, other.max_rows_);
  std::swap(max_experts_, other.max_experts_);
  std::swap(stream_, other.stream_);
  std::swap(cublas_, other.cublas_);
  std::swap(workspace_, other.workspace_);
  std::swap(gate_up_, other.gate_up_);
  std::swap(activation_, other.activation_);
  std::swap(device_pointers_, other.device_pointers_);
  std::swap(pinned_pointers_, other.pinned_pointers_);
  std::swap(pointers_copied_, other.pointers_copied_);
  std::swap(pointer_slot_, other.pointer_slot_);
  std::swap(side_streams_, other.side_streams_);
  std::swap(side_cublas_, other.side_cublas_);
  std::swap(fork_, other.fork_);
  std::swap(joins_, other.joins_);
  return *this;
}

ExpertMlp::~ExpertMlp() {
  if (cublas_ != nullptr) cublasDestroy(cublas_);
  for (int i = 0; i < 2; ++i) {
    if (pinned_pointers_[i] != nullptr) cudaFreeHost(pinned_pointers_[i]);
    if (pointers_copied_[i] != nullptr) cudaEventDestroy(pointers_copied_[i]);
  }
  for (int i = 0; i < kSideStreams; ++i) {
    if (side_cublas_[i] != nullptr) cublasDestroy(side_cublas_[i]);
    if (side_streams_[i] != nullptr) cudaStreamDestroy(side_streams_[i]);
    if (joins_[i] != nullptr) cudaEventDestroy(joins_[i]);
  }
  if (fork_ != nullptr) cudaEventDestroy(fork_);
}

absl::Status ExpertMlp::Gemm(const __nv_bfloat16* a,
                             const std::vector<const __nv_bfloat16*>& weights,
                             const std::vector<int64_t>& offsets, __nv_bfloat16* c, int n, int k,
                             Strategy strategy) {
  // Row-major C[m, n] = A[m, k] · W[n, k]^T is column-major C^T = W^T(op T) · A^T.
  const float alpha = 1.0f, beta = 0.0f;
  const int experts = static_cast<int>(weights.size());
  if (strategy == Strategy::kPerExpertGemm || strategy == Strategy::kConcurrentGemm) {
    const bool concurrent = strategy == Strategy::kConcurrentGemm;
    if (concurrent) {
      if (auto s = CudaStatus(cudaEventRecord(fork_, stream_), "cudaEventRecord"); !s.ok())
        return s;
      for (int i = 0; i < kSideStreams; ++i) cudaStreamWaitEvent(side_streams_[i], fork_, 0);
    }
    int launched = 0;
    for (int e = 0; e < experts; ++e) {
      const int m = static_cast<int>(offsets[e + 1] - offsets[e]);
      if (m == 0) continue;
      cublasHandle_t handle = concurrent ? side_cublas_[launched++ % kSideStreams] : cublas_;
      auto status =
          cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &alpha, weights[e], CUDA_R_16BF,
                       k, a + offsets[e] * k, CUDA_R_16BF, k, &beta, c + offsets[e] * n,
                       CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
      if (auto s = CublasStatus(status, "cublasGemmEx"); !s.ok()) return s;
    }
    if (concurrent) {
      for (int i = 0; i < kSideStreams; ++i) {
        cudaEventRecord(joins_[i], side_streams_[i]);
        cudaStreamWaitEvent(stream_, joins_[i], 0);
      }
    }
    return absl::OkStatus();
  }
  // Grouped: one call, one group per non-empty expert.
  std::vector<cublasOperation_t> transa, transb;
  std::vector<int> m_array, n_array, k_array, lda, ldb, ldc, group_size;
  std::vector<float> alphas, betas;
  std::vector<const void*> a_pointers, b_pointers;
  std::vector<void*> c_pointers;
  for (int e = 0; e < experts; ++e) {
    const int m = static_cast<int>(offsets[e + 1] - offsets[e]);
    if (m == 0) continue;
    transa.push_back(CUBLAS_OP_T);
    transb.push_back(CUBLAS_OP_N);
    m_array.push_back(n);
    n_array.push_back(m);
    k_array.push_back(k);
    lda.push_back(k);
    ldb.push_back(k);
    ldc.push_back(n);
    group_size.push_back(1);
    alphas.push_back(alpha);
    betas.push_back(beta);
    a_pointers.push_back(weights[e]);
    b_pointers.push_back(a + offsets[e] * k);
    c_pointers.push_back(c + offsets[e] * n);
  }
  const int groups = static_cast<int>(group_size.size());
  if (groups == 0) return absl::OkStatus();
  std::vector<void*> host_pointers;
  for (auto* p : a_pointers) host_pointers.push_back(const_cast<void*>(p));
  for (auto* p : b_pointers) host_pointers.push_back(const_cast<void*>(p));
  for (auto* p : c_pointers) host_pointers.push_back(p);
  const int slot = pointer_slot_;
  pointer_slot_ ^= 1;
  // The copy two calls ago read this slot; it is long done, but must be before we rewrite it.
  if (auto s = CudaStatus(cudaEventSynchronize(pointers_copied_[slot]), "cudaEventSynchronize");
      !s.ok()) {
    return s;
  }
  std::copy(host_pointers.begin(), host_pointers.end(), pinned_pointers_[slot]);
  if (auto s = CudaStatus(
          cudaMemcpyAsync(device_pointers_.data(), pinned_pointers_[slot],
                          host_pointers.size() * sizeof(void*), cudaMemcpyHostToDevice, stream_),
          "cudaMemcpyAsync");
      !s.ok()) {
    return s;
  }
  if (auto s = CudaStatus(cudaEventRecord(pointers_copied_[slot], stream_), "cudaEventRecord");
      !s.ok()) {
    return s;
  }
  auto status = cublasGemmGroupedBatchedEx(
      cublas_, transa.data(), transb.data(), m_array.data(), n_array.data(), k_array.data(),
      alphas.data(), reinterpret_cast<const void* const*>(device_pointers_.data()), CUDA_R_16BF,
      lda.data(), reinterpret_cast<const void* const*>(device_pointers_.data() + groups),
      CUDA_R_16BF, ldb.data(), betas.data(), device_pointers_.data() + 2 * groups, CUDA_R_16BF,
      ldc.data(), groups, group_size.data(), CUBLAS_COMPUTE_32F);
  return CublasStatus(status, "cublasGemmGroupedBatchedEx");
}

absl::Status ExpertMlp::Run(const __nv_bfloat16* x, const std::vector<int64_t>& offsets,
                            const std::vector<const __nv_bfloat16*>& gate_up_weights,
                            const std::vector<const __nv_bfloat16*>& down_weights, __nv_bfloat16* y,
                            Strategy strategy) {
  const int64_t rows = offsets.back();
  if (rows > max_rows_ || static_cast<int>(gate_up_weights.size()) > max_experts_ ||
      gate_up_weights.size() + 1 != offsets.size() ||
      down_weights.size() != gate_up_weights.size()) {
    return absl::InvalidArgumentError(
        "ExpertMlp::Run: rows or experts beyond the sizes it was made for");
  }
  if (auto s =
          Gemm(x, gate_up_weights, offsets, gate_up_.data(), 2 * intermediate_, hidden_, strategy);
      !s.ok())
    return s;
  if (auto s = SiluMul(gate_up_.data(), activation_.data(), static_cast<int>(rows), intermediate_,
                       stream_);
      !s.ok())
    return s;
  return Gemm(activation_.data(), down_weights, offsets, y, hidden_, intermediate_, strategy);
}

}  // namespace moeserve::kernels
