#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/fp8_gemm.h"

namespace moeserve::kernels {

absl::Status CublasLtStatus(cublasStatus_t status, const char* what) {
  if (status == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": cuBLASLt status ", static_cast<int>(status),
                                          " (", cublasLtGetStatusName(status), ")"));
}

struct Fp8BlockGemm::Plan {
  cublasLtMatrixLayout_t weight = nullptr;       // A: e4m3 [k, n] column-major, used transposed
  cublasLtMatrixLayout_t activations = nullptr;  // B: e4m3 [k, padded rows] column-major
  cublasLtMatrixLayout_t output = nullptr;       // C and D: bf16 [n, padded rows] column-major
  cublasLtMatmulAlgo_t algorithm{};

  ~Plan() {
    if (weight != nullptr) cublasLtMatrixLayoutDestroy(weight);
    if (activations != nullptr) cublasLtMatrixLayoutDestroy(activations);
    if (output != nullptr) cublasLtMatrixLayoutDestroy(output);
  }
};

namespace {

template <typename T>
absl::Status SetAttribute(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attribute,
                          const T& value, const char* what) {
  return CublasLtStatus(cublasLtMatmulDescSetAttribute(desc, attribute, &value, sizeof(value)),
                        what);
}

}  // namespace

absl::StatusOr<Fp8BlockGemm> Fp8BlockGemm::Create(cudaStream_t stream, size_t workspace_bytes) {
  Fp8BlockGemm gemm;
  gemm.stream_ = stream;
  if (auto s = CublasLtStatus(cublasLtCreate(&gemm.handle_), "cublasLtCreate"); !s.ok()) return s;
  if (auto s = gemm.workspace_.Reserve(workspace_bytes); !s.ok()) return s;
  if (auto s =
          CublasLtStatus(cublasLtMatmulDescCreate(&gemm.matmul_, CUBLAS_COMPUTE_32F, CUDA_R_32F),
                         "cublasLtMatmulDescCreate");
      !s.ok()) {
    return s;
  }
  const cublasOperation_t transpose = CUBLAS_OP_T, keep = CUBLAS_OP_N;
  const int32_t weight_scales = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F;
  const int32_t activation_scales = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
  for (auto s : {SetAttribute(gemm.matmul_, CUBLASLT_MATMUL_DESC_TRANSA, transpose, "TRANSA"),
                 SetAttribute(gemm.matmul_, CUBLASLT_MATMUL_DESC_TRANSB, keep, "TRANSB"),
                 SetAttribute(gemm.matmul_, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, weight_scales,
                              "A_SCALE_MODE"),
                 SetAttribute(gemm.matmul_, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, activation_scales,
                              "B_SCALE_MODE")}) {
    if (!s.ok()) return s;
  }
  return gemm;
}

Fp8BlockGemm::Fp8BlockGemm(Fp8BlockGemm&& other) noexcept { *this = std::move(other); }

Fp8BlockGemm& Fp8BlockGemm::operator=(Fp8BlockGemm&& other) noexcept {
  std::swap(stream_, other.stream_);
  std::swap(handle_, other.handle_);
  std::swap(matmul_, other.matmul_);
  std::swap(workspace_, other.workspace_);
  std::swap(plans_, other.plans_);
  return *this;
}

Fp8BlockGemm::~Fp8BlockGemm() {
  plans_.clear();
  if (matmul_ != nullptr) cublasLtMatmulDescDestroy(matmul_);
  if (handle_ != nullptr) cublasLtDestroy(handle_);
}

absl::StatusOr<const Fp8BlockGemm::Plan*> Fp8BlockGemm::FindPlan(int64_t rows, int n, int k) {
  const int64_t padded_rows = Fp8PaddedRows(rows);
  const auto key = std::make_tuple(padded_rows, n, k);
  if (auto it = plans_.find(key); it != plans_.end()) return it->second.get();
  if (rows <= 0 || n <= 0 || k <= 0 || n % kFp8BlockSize != 0 || k % kFp8BlockSize != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("Fp8BlockGemm: rows ", rows, ", n ", n, ", k ", k,
                     ": rows must be positive and n, k positive multiples of 128"));
  }
  auto plan = std::make_unique<Plan>();
  if (auto s = CublasLtStatus(cublasLtMatrixLayoutCreate(&plan->weight, CUDA_R_8F_E4M3, k, n, k),
                              "weight layout");
      !s.ok()) {
    return s;
  }
  if (auto s = CublasLtStatus(
          cublasLtMatrixLayoutCreate(&plan->activations, CUDA_R_8F_E4M3, k, padded_rows, k),
          "activation layout");
      !s.ok()) {
    return s;
  }
  if (auto s =
          CublasLtStatus(cublasLtMatrixLayoutCreate(&plan->output, CUDA_R_16BF, n, padded_rows, n),
                         "output layout");
      !s.ok()) {
    return s;
  }
  // The heuristic sees scale pointers of the alignment real ones have (the workspace's).
  const void* aligned = workspace_.data();
  if (auto s = SetAttribute(matmul_, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, aligned, "A scales");
      !s.ok()) {
    return s;
  }
  if (auto s = SetAttribute(matmul_, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, aligned, "B scales");
      !s.ok()) {
    return s;
  }
  cublasLtMatmulPreference_t preference = nullptr;
  if (auto s = CublasLtStatus(cublasLtMatmulPreferenceCreate(&preference), "preference"); !s.ok()) {
    return s;
  }
  const size_t workspace_bytes = workspace_.bytes();
  cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                       &workspace_bytes, sizeof(workspace_bytes));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const cublasStatus_t status =
      cublasLtMatmulAlgoGetHeuristic(handle_, matmul_, plan->weight, plan->activations,
                                     plan->output, plan->output, preference, 1, &result, &found);
  cublasLtMatmulPreferenceDestroy(preference);
  if (status != CUBLAS_STATUS_SUCCESS || found == 0) {
    return absl::UnimplementedError(absl::StrCat(
        "cuBLASLt has no block-scaled FP8 algorithm (1x128 activations, 128x128 weights) for ",
        padded_rows, " rows, n ", n, ", k ", k, ": cublasLtMatmulAlgoGetHeuristic returned ",
        cublasLtGetStatusName(status), " with ", found, " results"));
  }
  plan->algorithm = result.algo;
  return plans_.emplace(key, std::move(plan)).first->second.get();
}

absl::Status Fp8BlockGemm::Prepare(int64_t rows, int n, int k) {
  return FindPlan(rows, n, k).status();
}

absl::Status Fp8BlockGemm::Run(const __nv_fp8_e4m3* x_values, const float* x_scales, int64_t rows,
                               const Fp8Weight& w, int n, int k, __nv_bfloat16* y) {
  auto plan = FindPlan(rows, n, k);
  if (!plan.ok()) return plan.status();
  // The scale pointers live in the shared descriptor: cublasLtMatmul reads them when it enqueues,
  // so changing them for the next call is safe.
  if (auto s = SetAttribute(matmul_, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, w.scales, "A scales");
      !s.ok()) {
    return s;
  }
  if (auto s = SetAttribute(matmul_, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, x_scales, "B scales");
      !s.ok()) {
    return s;
  }
  const float alpha = 1.0f, beta = 0.0f;
  const Plan& p = **plan;
  return CublasLtStatus(cublasLtMatmul(handle_, matmul_, &alpha, w.values, p.weight, x_values,
                                       p.activations, &beta, y, p.output, y, p.output, &p.algorithm,
                                       workspace_.data(), workspace_.bytes(), stream_),
                        "cublasLtMatmul (block-scaled FP8)");
}

}  // namespace moeserve::kernels
