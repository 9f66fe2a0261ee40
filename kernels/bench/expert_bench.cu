// moeserve-expert-bench: the routed experts' SwiGLU MLP at DeepSeek-V3 shapes (hidden 7168,
// expert intermediate 2048) on one GPU, in bf16 (ExpertMlp) and in DeepSeek-V3's block-scaled
// FP8 recipe (Fp8ExpertMlp), against the card's limits measured in the same run: floor =
// max(flops / dense GEMM rate, bytes / device copy bandwidth), with the bf16 rate for bf16 and
// the block-scaled FP8 rate for FP8. Layouts: EP32 prefill (9 local experts x ~14.5K tokens),
// EP128 decode (3 x ~340), and one GPU holding all 256 experts with 128 tokens routed top-8.
// The FP8 weights are the bf16 ones quantized per 128 x 128 block, so the two outputs are
// compared too. Prints what cuBLASLt offers for block-scaled FP8 (one matrix per call, and the
// batch modes that would take several experts at once), then two markdown tables, then
// a third for decode on one GPU holding all 256 experts (1 to 128 tokens routed top-8): the
// host-planned paths (ExpertMlp, Fp8ExpertMlp: rows grouped by the host) against the
// device-planned one (kernels/device_moe.h: the plan and tensor-core grouped GEMMs, no host
// round trip; its time includes the plan), FP8 both with the weights widened and in the recipe
// (the grouped FP8 GEMM, Hopper only). Between them, a table from the received rows: the
// permute into expert order counted (bf16 copies the rows; FP8 reads them in its quantization,
// or, as a group's FP8 dispatch delivers them, moves the codes its senders quantized);
// the grouped FP8 GEMMs alone in both tile shapes (fp8_grouped_gemm.h); and the rows per expert
// where the grouped GEMM stops beating cuBLASLt's per-expert GEMMs.
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels/bench/bench_timing.h"
#include "kernels/bf16.h"
#include "kernels/device_moe.h"
#include "kernels/expert_mlp.h"
#include "kernels/fp8_expert_mlp.h"
#include "kernels/fp8_gemm.h"
#include "kernels/fp8_grouped_gemm.h"
#include "kernels/fp8_quantize.h"
#include "kernels/kernels.h"

namespace {

using moeserve::kernels::ExpertMlp;
using moeserve::kernels::Fp8BlockGemm;
using moeserve::kernels::Fp8ExpertMlp;
using moeserve::kernels::Fp8Weight;
using moeserve::kernels::bench::CopyGBps;
using moeserve::kernels::bench::ExitOnError;
using moeserve::kernels::bench::MedianMs;

constexpr int kHidden = 7168;
constexpr int kIntermediate = 2048;

// Uniform values with standard deviation `scale`, generated on the device (a counter hash), so
// that tens of GB of weights do not pass through the host.
__global__ void FillRandomKernel(__nv_bfloat16* data, size_t count, unsigned seed, float scale) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    uint64_t h = (i + 1) * 0x9E3779B97F4A7C15ull ^ (static_cast<uint64_t>(seed) << 32);
    h ^= h >> 31;
    h *= 0xBF58476D1CE4E5B9ull;
    h ^= h >> 29;
    const float uniform = static_cast<float>(h >> 40) / static_cast<float>(1ull << 24);  // [0, 1)
    data[i] = __float2bfloat16((uniform - 0.5f) * 3.4641016f * scale);
  }
}

__nv_bfloat16* RandomBf16(size_t count, unsigned seed, float scale) {
  __nv_bfloat16* device = nullptr;
  CHECK_CUDA(cudaMalloc(&device, count * sizeof(__nv_bfloat16)));
  FillRandomKernel<<<4096, 256>>>(device, count, seed, scale);
  CHECK_CUDA(cudaDeviceSynchronize());
  return device;
}

double DenseTflops(cudaStream_t stream) {
  const int n = 8192;
  __nv_bfloat16* a = RandomBf16(static_cast<size_t>(n) * n, 1, 0.02f);
  __nv_bfloat16* b = RandomBf16(static_cast<size_t>(n) * n, 2, 0.02f);
  __nv_bfloat16* c = RandomBf16(static_cast<size_t>(n) * n, 3, 0.02f);
  cublasHandle_t handle;
  cublasCreate(&handle);
  cublasSetStream(handle, stream);
  const float alpha = 1, beta = 0;
  const double ms = MedianMs(
      [&] {
        cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, n, n, n, &alpha, a, CUDA_R_16BF, n, b,
                     CUDA_R_16BF, n, &beta, c, CUDA_R_16BF, n, CUBLAS_COMPUTE_32F,
                     CUBLAS_GEMM_DEFAULT);
      },
      10, stream);
  cublasDestroy(handle);
  cudaFree(a);
  cudaFree(b);
  cudaFree(c);
  return 2.0 * n * n * n / (ms * 1e-3) / 1e12;
}

// A bf16 [out, in] weight quantized on the device to e4m3 with 128 x 128 block scales.
Fp8Weight QuantizeWeight(const __nv_bfloat16* w, int out, int in, std::vector<void*>& owned) {
  __nv_fp8_e4m3* values = nullptr;
  float* scales = nullptr;
  CHECK_CUDA(cudaMalloc(&values, static_cast<size_t>(out) * in));
  CHECK_CUDA(cudaMalloc(&scales, moeserve::kernels::WeightScaleCount(out, in) * sizeof(float)));
  ExitOnError(moeserve::kernels::QuantizeWeightBlocksFp8(w, out, in, values, scales, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  owned.push_back(values);
  owned.push_back(scales);
  return {values, scales};
}

// What cuBLASLt's heuristic says about block-scaled FP8 GEMMs on this device, for our operand
// roles (A = weight with 128x128 scales, B = activations with 1x128 scales) and the swapped ones,
// at the gate/up shape (n 4096, k 7168) and several activation row counts.
void PrintBlockScaledSupport() {
  cublasLtHandle_t handle;
  cublasLtCreate(&handle);
  struct Modes {
    const char* name;
    int32_t a, b;
  };
  const Modes modes[] = {
      {"A 128x128 (weight), B 1x128 (activations)", CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F,
       CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F},
      {"A 1x128, B 128x128", CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F,
       CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F},
      {"A 1x128, B 1x128", CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F,
       CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F},
  };
  const int n = 4096, k = 7168;
  // The heuristic refuses (INVALID_VALUE) a block-scaled descriptor without scale pointers; any
  // 16-byte aligned device buffer will do for the question.
  void* scales = nullptr;
  CHECK_CUDA(cudaMalloc(&scales, 1 << 20));
  std::printf("cuBLASLt %zu block-scaled FP8 heuristic (TN, n %d, k %d):\n", cublasLtGetVersion(),
              n, k);
  for (const Modes& m : modes) {
    std::printf("  %s:", m.name);
    for (int rows : {1, 3, 4, 340, 14500}) {
      cublasLtMatmulDesc_t desc;
      cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F);
      const cublasOperation_t t = CUBLAS_OP_T, nt = CUBLAS_OP_N;
      cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof(t));
      cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &nt, sizeof(nt));
      cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &m.a, sizeof(m.a));
      cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &m.b, sizeof(m.b));
      cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &scales,
                                     sizeof(scales));
      cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &scales,
                                     sizeof(scales));
      cublasLtMatrixLayout_t a, b, d;
      cublasLtMatrixLayoutCreate(&a, CUDA_R_8F_E4M3, k, n, k);
      cublasLtMatrixLayoutCreate(&b, CUDA_R_8F_E4M3, k, rows, k);
      cublasLtMatrixLayoutCreate(&d, CUDA_R_16BF, n, rows, n);
      cublasLtMatmulPreference_t preference;
      cublasLtMatmulPreferenceCreate(&preference);
      const size_t workspace = Fp8BlockGemm::kDefaultWorkspaceBytes;
      cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                           &workspace, sizeof(workspace));
      cublasLtMatmulHeuristicResult_t results[8];
      int found = 0;
      const cublasStatus_t status =
          cublasLtMatmulAlgoGetHeuristic(handle, desc, a, b, d, d, preference, 8, results, &found);
      std::printf(" rows %d: %s (%d)%s", rows, cublasLtGetStatusName(status), found,
                  rows == 14500 ? "\n" : ";");
      cublasLtMatmulPreferenceDestroy(preference);
      cublasLtMatrixLayoutDestroy(a);
      cublasLtMatrixLayoutDestroy(b);
      cublasLtMatrixLayoutDestroy(d);
      cublasLtMatmulDescDestroy(desc);
    }
  }
  // One call for several experts: the batch modes, 3 experts of 340 rows (the weight's role).
  std::printf("  several experts in one call (3 x 340 rows):");
  for (const bool pointer_array : {false, true}) {
    cublasLtMatmulDesc_t desc;
    cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F);
    const cublasOperation_t t = CUBLAS_OP_T, nt = CUBLAS_OP_N;
    const int32_t a_mode = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F,
                  b_mode = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
    cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof(t));
    cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &nt, sizeof(nt));
    cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &a_mode,
                                   sizeof(a_mode));
    cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &b_mode,
                                   sizeof(b_mode));
    cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &scales,
                                   sizeof(scales));
    cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &scales,
                                   sizeof(scales));
    const int rows = 340, batch = 3;
    cublasLtMatrixLayout_t layouts[3];
    cublasLtMatrixLayoutCreate(&layouts[0], CUDA_R_8F_E4M3, k, n, k);
    cublasLtMatrixLayoutCreate(&layouts[1], CUDA_R_8F_E4M3, k, rows, k);
    cublasLtMatrixLayoutCreate(&layouts[2], CUDA_R_16BF, n, rows, n);
    const int64_t strides[3] = {int64_t{k} * n, int64_t{k} * rows, int64_t{n} * rows};
    for (int i = 0; i < 3; ++i) {
      cublasLtMatrixLayoutSetAttribute(layouts[i], CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch,
                                       sizeof(batch));
      if (pointer_array) {
        const uint32_t mode = CUBLASLT_BATCH_MODE_POINTER_ARRAY;
        cublasLtMatrixLayoutSetAttribute(layouts[i], CUBLASLT_MATRIX_LAYOUT_BATCH_MODE, &mode,
                                         sizeof(mode));
      } else {
        cublasLtMatrixLayoutSetAttribute(layouts[i], CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                                         &strides[i], sizeof(strides[i]));
      }
    }
    cublasLtMatmulPreference_t preference;
    cublasLtMatmulPreferenceCreate(&preference);
    cublasLtMatmulHeuristicResult_t result;
    int found = 0;
    const cublasStatus_t status =
        cublasLtMatmulAlgoGetHeuristic(handle, desc, layouts[0], layouts[1], layouts[2], layouts[2],
                                       preference, 1, &result, &found);
    std::printf(" %s batch: %s (%d)%s", pointer_array ? "pointer-array" : "strided",
                cublasLtGetStatusName(status), found, pointer_array ? "\n" : ";");
    cublasLtMatmulPreferenceDestroy(preference);
    for (auto& layout : layouts) cublasLtMatrixLayoutDestroy(layout);
    cublasLtMatmulDescDestroy(desc);
  }
  cudaFree(scales);
  cublasLtDestroy(handle);
}

// Block-scaled FP8 GEMM rate at 8192^3 (our Fp8BlockGemm, activation quantization excluded).
double BlockScaledFp8Tflops(cudaStream_t stream) {
  const int n = 8192;
  std::vector<void*> owned;
  __nv_bfloat16* w = RandomBf16(static_cast<size_t>(n) * n, 4, 0.02f);
  __nv_bfloat16* x = RandomBf16(static_cast<size_t>(n) * n, 5, 1.0f);
  const Fp8Weight weight = QuantizeWeight(w, n, n, owned);
  __nv_fp8_e4m3* x_values = nullptr;
  float* x_scales = nullptr;
  __nv_bfloat16* y = nullptr;
  CHECK_CUDA(cudaMalloc(&x_values, static_cast<size_t>(n) * n));
  CHECK_CUDA(cudaMalloc(&x_scales, moeserve::kernels::ActivationScaleCount(n, n) * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&y, static_cast<size_t>(n) * n * sizeof(__nv_bfloat16)));
  ExitOnError(moeserve::kernels::QuantizeActivationsFp8(x, n, n, x_values, x_scales, stream));
  auto gemm = Fp8BlockGemm::Create(stream);
  ExitOnError(gemm.status());
  const double ms =
      MedianMs([&] { ExitOnError(gemm->Run(x_values, x_scales, n, weight, n, n, y)); }, 10, stream);
  for (void* p : owned) cudaFree(p);
  cudaFree(w);
  cudaFree(x);
  cudaFree(x_values);
  cudaFree(x_scales);
  cudaFree(y);
  return 2.0 * n * n * n / (ms * 1e-3) / 1e12;
}

// sqrt(sum (a - b)^2 / sum b^2) over the first and last row of every expert.
double SampledRelativeRms(const __nv_bfloat16* a, const __nv_bfloat16* b,
                          const std::vector<int64_t>& offsets, int hidden) {
  double squared_diff = 0, squared = 0;
  std::vector<uint16_t> row_a(hidden), row_b(hidden);
  for (size_t e = 0; e + 1 < offsets.size(); ++e) {
    if (offsets[e + 1] == offsets[e]) continue;
    for (int64_t row : {offsets[e], offsets[e + 1] - 1}) {
      CHECK_CUDA(cudaMemcpy(row_a.data(), a + row * hidden, hidden * 2, cudaMemcpyDeviceToHost));
      CHECK_CUDA(cudaMemcpy(row_b.data(), b + row * hidden, hidden * 2, cudaMemcpyDeviceToHost));
      for (int i = 0; i < hidden; ++i) {
        const double va = moeserve::kernels::Bf16ToFloat(row_a[i]);
        const double vb = moeserve::kernels::Bf16ToFloat(row_b[i]);
        squared_diff += (va - vb) * (va - vb);
        squared += vb * vb;
      }
    }
  }
  return squared > 0 ? std::sqrt(squared_diff / squared) : 0;
}

struct Layout {
  std::string name;
  std::vector<int64_t> rows_per_expert;
};

// Bytes the bf16 MLP moves: the active experts' weights, bf16 x in and y out, gate_up written
// and read, the activation written and read.
double Bf16Bytes(int active, int64_t rows) {
  return active * 3.0 * kHidden * kIntermediate * 2 +
         rows * (kHidden * 2.0 * 2 + 2 * kIntermediate * 2.0 * 2 + kIntermediate * 2.0 * 2);
}

// Bytes of the FP8 recipe: e4m3 weights (+ their scales), bf16 x in and y out, e4m3 x written
// and read, bf16 gate_up written and read, e4m3 act written and read.
double Fp8Bytes(int active, int64_t rows) {
  return active * 3.0 * kHidden * kIntermediate * (1.0 + 4.0 / (128.0 * 128.0)) +
         rows * (kHidden * 2.0 * 2 + kHidden * 1.0 * 2 + 2 * kIntermediate * 2.0 * 2 +
                 kIntermediate * 1.0 * 2);
}

// A copy of `host` in device memory, kept in `owned`.
template <typename T>
T* DeviceCopy(const std::vector<T>& host, std::vector<void*>& owned) {
  void* device = nullptr;
  CHECK_CUDA(cudaMalloc(&device, std::max<size_t>(host.size(), 1) * sizeof(T)));
  CHECK_CUDA(cudaMemcpy(device, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  owned.push_back(device);
  return static_cast<T*>(device);
}

// The two grouped wgmma GEMMs of the MLP alone (gate/up, then down), in one tile shape, on
// activations quantized beforehand (values/scales, scale_rows rows).
double GroupedGemmsMs(const __nv_fp8_e4m3* values, const float* scales, int scale_rows,
                      const std::vector<int64_t>& offsets, const std::vector<Fp8Weight>& gate_up,
                      const std::vector<Fp8Weight>& down, __nv_bfloat16* gate_up_rows,
                      __nv_bfloat16* y, moeserve::kernels::Fp8GemmTiles tiles,
                      cudaStream_t stream) {
  namespace k = moeserve::kernels;
  k::Fp8GemmGroupList first, second;
  first.count = second.count = static_cast<int>(gate_up.size());
  for (int e = 0; e < first.count; ++e) {
    first.offsets[e + 1] = second.offsets[e + 1] = static_cast<int>(offsets[e + 1]);
    first.weights[e] = gate_up[e];
    second.weights[e] = down[e];
  }
  return MedianMs(
      [&] {
        ExitOnError(k::Fp8GroupedGemm(values, scales, scale_rows, first, 2 * kIntermediate, kHidden,
                                      gate_up_rows, stream, tiles));
        ExitOnError(k::Fp8GroupedGemm(values, scales, scale_rows, second, kHidden, kIntermediate, y,
                                      stream, tiles));
      },
      10, stream);
}

// Where the grouped wgmma GEMM (wide tiles above 64 rows per expert) stops beating cuBLASLt's
// one GEMM per expert: the FP8 MLP of 4 experts at growing rows per expert, the rows already in
// expert order. Serving's host-planned rule (moe_exchange.cc) follows this table.
void CrossoverTable(cudaStream_t stream) {
  constexpr int kExperts = 4;
  std::vector<void*> owned;
  std::vector<Fp8Weight> gate_up, down;
  for (int e = 0; e < kExperts; ++e) {
    __nv_bfloat16* w = RandomBf16(static_cast<size_t>(2) * kIntermediate * kHidden, 100 + e, 0.01f);
    gate_up.push_back(QuantizeWeight(w, 2 * kIntermediate, kHidden, owned));
    owned.push_back(w);
    w = RandomBf16(static_cast<size_t>(kHidden) * kIntermediate, 900 + e, 0.02f);
    down.push_back(QuantizeWeight(w, kHidden, kIntermediate, owned));
    owned.push_back(w);
  }
  constexpr int kMaxRowsPerExpert = 4096;
  __nv_bfloat16* x =
      RandomBf16(static_cast<size_t>(kExperts) * kMaxRowsPerExpert * kHidden, 7, 1.0f);
  __nv_bfloat16* y =
      RandomBf16(static_cast<size_t>(kExperts) * kMaxRowsPerExpert * kHidden, 8, 1.0f);
  owned.push_back(x);
  owned.push_back(y);
  const int max_rows = kExperts * kMaxRowsPerExpert;
  auto fp8 = Fp8ExpertMlp::Create(kHidden, kIntermediate, max_rows, kExperts, stream);
  ExitOnError(fp8.status());
  if (!fp8->grouped_gemm_supported()) return;
  // Operands for the GEMMs alone: every row quantized once (the codes do not affect the time).
  __nv_fp8_e4m3* values = nullptr;
  float* scales = nullptr;
  __nv_bfloat16* gate_up_rows = nullptr;
  CHECK_CUDA(cudaMalloc(&values, static_cast<size_t>(max_rows) * kHidden));
  CHECK_CUDA(cudaMalloc(&scales, static_cast<size_t>(max_rows) * (kHidden / 128) * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&gate_up_rows,
                        static_cast<size_t>(max_rows) * 2 * kIntermediate * sizeof(__nv_bfloat16)));
  owned.insert(owned.end(), {values, scales, gate_up_rows});
  {
    auto all_rows = moeserve::kernels::MakeFp8RowGroups({0, max_rows});
    ExitOnError(all_rows.status());
    ExitOnError(moeserve::kernels::QuantizeActivationGroupsFp8(x, *all_rows, kHidden, values,
                                                               scales, stream));
  }
  std::printf(
      "\nFP8 MLP of %d experts by rows per expert: cuBLASLt per expert (the fastest of one after "
      "another, side streams and pipelined) against the grouped wgmma GEMM (its tile shape by "
      "size); then the grouped GEMMs alone in each tile shape\n| rows per expert | cuBLASLt ms | "
      "grouped ms | "
      "grouped TFLOP/s | grouped speed-up | GEMMs alone, narrow tiles ms | GEMMs alone, wide "
      "tiles ms |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
      kExperts);
  for (const int rows : {8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096}) {
    std::vector<int64_t> offsets(kExperts + 1);
    for (int e = 0; e <= kExperts; ++e) offsets[e] = static_cast<int64_t>(e) * rows;
    auto time = [&](Fp8ExpertMlp::Strategy strategy) {
      return MedianMs([&] { ExitOnError(fp8->Run(x, offsets, gate_up, down, y, strategy)); }, 10,
                      stream);
    };
    const double cublas = std::min({time(Fp8ExpertMlp::Strategy::kPerExpertGemm),
                                    time(Fp8ExpertMlp::Strategy::kConcurrentGemm),
                                    time(Fp8ExpertMlp::Strategy::kPipelinedGemm)});
    const double grouped = time(Fp8ExpertMlp::Strategy::kGroupedGemm);
    const double flops = 2.0 * kExperts * rows * 3.0 * kHidden * kIntermediate;
    double alone[2];
    for (const auto tiles :
         {moeserve::kernels::Fp8GemmTiles::kNarrow, moeserve::kernels::Fp8GemmTiles::kWide}) {
      alone[tiles == moeserve::kernels::Fp8GemmTiles::kWide] = GroupedGemmsMs(
          values, scales, max_rows, offsets, gate_up, down, gate_up_rows, y, tiles, stream);
    }
    std::printf("| %d | %.3f | %.3f | %.0f | %.2fx | %.3f | %.3f |\n", rows, cublas, grouped,
                flops / grouped / 1e9, cublas / grouped, alone[0], alone[1]);
  }
  for (void* p : owned) cudaFree(p);
}

// Decode on one GPU holding all 256 experts (see the top of the file). The host-planned rows
// come grouped already (their plan and permutation are not timed); the device path starts from
// the tokens' rows and the routing.
void DecodeTable(cudaStream_t stream, double copy) {
  namespace k = moeserve::kernels;
  constexpr int kExperts = 256, kTopK = 8, kMaxTokens = 128;
  std::vector<void*> owned;
  std::vector<const __nv_bfloat16*> gate_up, down;
  std::vector<Fp8Weight> fp8_gate_up, fp8_down;
  for (int e = 0; e < kExperts; ++e) {
    __nv_bfloat16* w = RandomBf16(static_cast<size_t>(2) * kIntermediate * kHidden, 100 + e, 0.01f);
    gate_up.push_back(w);
    fp8_gate_up.push_back(QuantizeWeight(w, 2 * kIntermediate, kHidden, owned));
    owned.push_back(w);
    w = RandomBf16(static_cast<size_t>(kHidden) * kIntermediate, 900 + e, 0.02f);
    down.push_back(w);
    fp8_down.push_back(QuantizeWeight(w, kHidden, kIntermediate, owned));
    owned.push_back(w);
  }
  const k::DeviceSlotWeights device_gate_up{.bf16 = DeviceCopy(gate_up, owned)};
  const k::DeviceSlotWeights device_down{.bf16 = DeviceCopy(down, owned)};
  const k::DeviceSlotWeights device_gate_up_fp8{.fp8 = DeviceCopy(fp8_gate_up, owned)};
  const k::DeviceSlotWeights device_down_fp8{.fp8 = DeviceCopy(fp8_down, owned)};
  std::vector<int32_t> identity(kExperts + 1);
  for (int e = 0; e <= kExperts; ++e) identity[e] = e;
  const k::DeviceReplicaTable table{DeviceCopy(identity, owned), DeviceCopy(identity, owned),
                                    kExperts};
  const int max_pairs = kMaxTokens * kTopK;
  __nv_bfloat16* x = RandomBf16(static_cast<size_t>(max_pairs) * kHidden, 7, 1.0f);
  __nv_bfloat16* y = RandomBf16(static_cast<size_t>(max_pairs) * kHidden, 8, 1.0f);
  owned.push_back(x);
  owned.push_back(y);
  int32_t* plan_arrays = nullptr;  // offsets, source rows, positions
  CHECK_CUDA(cudaMalloc(&plan_arrays, sizeof(int32_t) * (kExperts + 1 + 2 * max_pairs)));
  owned.push_back(plan_arrays);
  int32_t* offsets = plan_arrays;
  int32_t* source_rows = offsets + kExperts + 1;
  int32_t* positions = source_rows + max_pairs;
  auto mlp = ExpertMlp::Create(kHidden, kIntermediate, max_pairs, kExperts, stream);
  auto fp8 = Fp8ExpertMlp::Create(kHidden, kIntermediate, max_pairs, kExperts, stream);
  auto device_mlp = k::DeviceExpertMlp::Create(kHidden, kIntermediate, max_pairs, stream);
  ExitOnError(mlp.status());
  ExitOnError(fp8.status());
  ExitOnError(device_mlp.status());
  // The device-planned recipe (activations quantized, the grouped wgmma GEMM), where it runs.
  auto device_recipe = k::DeviceExpertMlp::Create(kHidden, kIntermediate, max_pairs, stream,
                                                  k::DeviceExpertMlp::Fp8Products::kRecipe);
  if (!device_recipe.ok())
    std::printf("\nno device-planned FP8 recipe: %s\n", device_recipe.status().ToString().c_str());

  std::printf(
      "\n| tokens | experts read | bf16 floor ms | bf16 host-planned ms | bf16 device-planned ms "
      "| %% of floor | FP8 floor ms | FP8 host-planned ms | FP8 device-planned ms | %% of floor | "
      "FP8 device-planned recipe ms | %% of floor | best FP8 device vs bf16 device |\n");
  std::printf(
      "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
      "|\n");
  std::mt19937 rng(42);
  for (int tokens : {1, 8, 64, kMaxTokens}) {
    std::vector<int32_t> routed;
    std::vector<int64_t> host_offsets(kExperts + 1, 0);
    std::vector<int> order(kExperts);
    for (int t = 0; t < tokens; ++t) {
      for (int e = 0; e < kExperts; ++e) order[e] = e;
      std::shuffle(order.begin(), order.end(), rng);
      for (int j = 0; j < kTopK; ++j) {
        routed.push_back(order[j]);
        ++host_offsets[order[j] + 1];
      }
    }
    int active = 0;
    for (int e = 0; e < kExperts; ++e) {
      active += host_offsets[e + 1] > 0;
      host_offsets[e + 1] += host_offsets[e];
    }
    const int pairs = tokens * kTopK;
    const int32_t* device_routed = DeviceCopy(routed, owned);
    // The faster of the host-planned strategies that suit decode.
    auto best_ms = [&](auto& runner, auto& first, auto& second, auto... strategies) {
      double best = std::numeric_limits<double>::infinity();
      for (auto strategy : {strategies...}) {
        best = std::min(
            best,
            MedianMs([&] { ExitOnError(runner->Run(x, host_offsets, first, second, y, strategy)); },
                     10, stream));
      }
      return best;
    };
    const double host_bf16 = best_ms(mlp, gate_up, down, ExpertMlp::Strategy::kGroupedGemm,
                                     ExpertMlp::Strategy::kConcurrentGemm);
    const double host_fp8 =
        fp8->grouped_gemm_supported()
            ? best_ms(fp8, fp8_gate_up, fp8_down, Fp8ExpertMlp::Strategy::kConcurrentGemm,
                      Fp8ExpertMlp::Strategy::kPipelinedGemm, Fp8ExpertMlp::Strategy::kWeightOnly,
                      Fp8ExpertMlp::Strategy::kGroupedGemm)
            : best_ms(fp8, fp8_gate_up, fp8_down, Fp8ExpertMlp::Strategy::kConcurrentGemm,
                      Fp8ExpertMlp::Strategy::kPipelinedGemm, Fp8ExpertMlp::Strategy::kWeightOnly);
    auto device_ms = [&](k::DeviceExpertMlp& runner, const k::DeviceSlotWeights& first,
                         const k::DeviceSlotWeights& second) {
      return MedianMs(
          [&] {
            ExitOnError(k::PlanSlots(device_routed, tokens, kTopK, table, kExperts, offsets,
                                     source_rows, positions, nullptr, stream));
            ExitOnError(runner.Run(x, {offsets, source_rows, kExperts}, pairs, first, second, y));
          },
          10, stream);
    };
    const double device_bf16 = device_ms(*device_mlp, device_gate_up, device_down);
    const double device_fp8 = device_ms(*device_mlp, device_gate_up_fp8, device_down_fp8);
    const double recipe_fp8 = device_recipe.ok()
                                  ? device_ms(*device_recipe, device_gate_up_fp8, device_down_fp8)
                                  : std::nan("");
    const double floor_bf16 = Bf16Bytes(active, pairs) / (copy * 1e9) * 1e3;
    const double floor_fp8 = Fp8Bytes(active, pairs) / (copy * 1e9) * 1e3;
    const double best_device_fp8 =
        std::isnan(recipe_fp8) ? device_fp8 : std::min(device_fp8, recipe_fp8);
    std::printf(
        "| %d | %d | %.3f | %.3f | **%.3f** | %.0f%% | %.3f | %.3f | **%.3f** | %.0f%% | **%.3f** "
        "| "
        "%.0f%% | %.2fx |\n",
        tokens, active, floor_bf16, host_bf16, device_bf16, 100 * floor_bf16 / device_bf16,
        floor_fp8, host_fp8, device_fp8, 100 * floor_fp8 / device_fp8, recipe_fp8,
        100 * floor_fp8 / recipe_fp8, device_bf16 / best_device_fp8);
  }
  CHECK_CUDA(cudaDeviceSynchronize());
  for (void* p : owned) cudaFree(p);
}

}  // namespace

int main() {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  cudaDeviceProp properties{};
  CHECK_CUDA(cudaGetDeviceProperties(&properties, 0));
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  const double tflops = DenseTflops(stream);
  const double copy = CopyGBps(stream);
  PrintBlockScaledSupport();
  const double fp8_tflops = BlockScaledFp8Tflops(stream);

  std::vector<Layout> layouts = {
      {"EP32 prefill: 9 experts x 14.5K tokens", std::vector<int64_t>(9, 14500)},
      {"EP128 decode: 3 experts x 340 tokens", std::vector<int64_t>(3, 340)},
  };
  {
    // 128 tokens, top-8 of 256 experts, uniformly random distinct experts per token.
    std::mt19937 rng(42);
    std::vector<int64_t> rows(256, 0);
    for (int t = 0; t < 128; ++t) {
      std::vector<int> experts(256);
      for (int e = 0; e < 256; ++e) experts[e] = e;
      std::shuffle(experts.begin(), experts.end(), rng);
      for (int k = 0; k < 8; ++k) ++rows[experts[k]];
    }
    layouts.push_back({"1 GPU, 256 experts, 128 tokens top-8", rows});
  }

  std::printf(
      "GPU: %s; dense bf16 GEMM %.0f TFLOP/s; block-scaled FP8 GEMM %.0f TFLOP/s; device copy %.0f "
      "GB/s\n",
      properties.name, tflops, fp8_tflops, copy);
  std::vector<std::string> fp8_lines, received_lines, gemm_lines;
  std::printf(
      "| layout | rows | TFLOP | GB moved | floor ms | per-expert GEMM ms | %% of floor | grouped "
      "GEMM ms | %% of floor | concurrent GEMM ms | %% of floor |\n");
  std::printf("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
  for (const Layout& layout : layouts) {
    const int experts = static_cast<int>(layout.rows_per_expert.size());
    std::vector<int64_t> offsets(experts + 1, 0);
    for (int e = 0; e < experts; ++e) offsets[e + 1] = offsets[e] + layout.rows_per_expert[e];
    const int64_t rows = offsets.back();
    __nv_bfloat16* x = RandomBf16(static_cast<size_t>(rows) * kHidden, 7, 1.0f);
    __nv_bfloat16* y = nullptr;
    CHECK_CUDA(cudaMalloc(&y, static_cast<size_t>(rows) * kHidden * sizeof(__nv_bfloat16)));
    std::vector<const __nv_bfloat16*> gate_up, down;
    std::vector<__nv_bfloat16*> owned;
    for (int e = 0; e < experts; ++e) {
      owned.push_back(RandomBf16(static_cast<size_t>(2) * kIntermediate * kHidden, 100 + e, 0.01f));
      gate_up.push_back(owned.back());
      owned.push_back(RandomBf16(static_cast<size_t>(kHidden) * kIntermediate, 900 + e, 0.02f));
      down.push_back(owned.back());
    }
    auto mlp = ExpertMlp::Create(kHidden, kIntermediate, static_cast<int>(rows), experts, stream);
    if (!mlp.ok()) {
      std::fprintf(stderr, "%s\n", std::string(mlp.status().message()).c_str());
      return 1;
    }
    const double flops = 2.0 * rows * 3.0 * kHidden * kIntermediate;
    int active = 0;
    for (int64_t r : layout.rows_per_expert) active += r > 0;
    const double bytes = Bf16Bytes(active, rows);
    const double floor_ms = std::max(flops / (tflops * 1e12), bytes / (copy * 1e9)) * 1e3;
    double ms[3];
    const ExpertMlp::Strategy strategies[3] = {ExpertMlp::Strategy::kPerExpertGemm,
                                               ExpertMlp::Strategy::kGroupedGemm,
                                               ExpertMlp::Strategy::kConcurrentGemm};
    for (int s = 0; s < 3; ++s) {
      const auto strategy = strategies[s];
      ms[s] = MedianMs(
          [&] {
            auto status = mlp->Run(x, offsets, gate_up, down, y, strategy);
            if (!status.ok()) {
              std::fprintf(stderr, "%s\n", std::string(status.message()).c_str());
              std::exit(1);
            }
          },
          10, stream);
    }
    std::printf(
        "| %s | %lld | %.2f | %.2f | %.3f | %.3f | %.0f%% | %.3f | %.0f%% | %.3f | %.0f%% |\n",
        layout.name.c_str(), static_cast<long long>(rows), flops / 1e12, bytes / 1e9, floor_ms,
        ms[0], 100 * floor_ms / ms[0], ms[1], 100 * floor_ms / ms[1], ms[2],
        100 * floor_ms / ms[2]);

    // FP8: the same weights quantized per 128 x 128 block, the same input.
    std::vector<void*> fp8_owned;
    std::vector<Fp8Weight> fp8_gate_up, fp8_down;
    for (int e = 0; e < experts; ++e) {
      fp8_gate_up.push_back(QuantizeWeight(gate_up[e], 2 * kIntermediate, kHidden, fp8_owned));
      fp8_down.push_back(QuantizeWeight(down[e], kHidden, kIntermediate, fp8_owned));
    }
    __nv_bfloat16* y_fp8 = nullptr;
    CHECK_CUDA(cudaMalloc(&y_fp8, static_cast<size_t>(rows) * kHidden * sizeof(__nv_bfloat16)));
    auto fp8 =
        Fp8ExpertMlp::Create(kHidden, kIntermediate, static_cast<int>(rows), experts, stream);
    ExitOnError(fp8.status());
    // The weight-only decode strategy re-reads an expert's weights per 8 rows: measured where
    // experts have few rows (decode), not for prefill's thousands.
    double fp8_ms[5] = {0, 0, std::nan(""), std::nan(""), 0};
    const Fp8ExpertMlp::Strategy fp8_strategies[5] = {
        Fp8ExpertMlp::Strategy::kPerExpertGemm, Fp8ExpertMlp::Strategy::kConcurrentGemm,
        Fp8ExpertMlp::Strategy::kWeightOnly, Fp8ExpertMlp::Strategy::kGroupedGemm,
        Fp8ExpertMlp::Strategy::kPipelinedGemm};
    const bool few_rows_per_expert = rows <= 64 * static_cast<int64_t>(active);
    for (int s = 0; s < 5; ++s) {
      if (s == 2 && !few_rows_per_expert) continue;
      if (s == 3 && !fp8->grouped_gemm_supported()) continue;
      fp8_ms[s] = MedianMs(
          [&] {
            ExitOnError(fp8->Run(x, offsets, fp8_gate_up, fp8_down, y_fp8, fp8_strategies[s]));
          },
          10, stream);
    }
    // The two quantization kernels alone (activation traffic that bf16 does not have).
    double quantize_ms = 0;
    {
      auto groups = moeserve::kernels::MakeFp8RowGroups(offsets);
      ExitOnError(groups.status());
      const size_t padded = groups->padded_rows();
      __nv_fp8_e4m3* values = nullptr;
      float* scales = nullptr;
      __nv_bfloat16* gate_up_rows = nullptr;
      CHECK_CUDA(cudaMalloc(&values, padded * kHidden));
      CHECK_CUDA(cudaMalloc(&scales, padded * (kHidden / 128) * sizeof(float)));
      CHECK_CUDA(cudaMalloc(&gate_up_rows, padded * 2 * kIntermediate * sizeof(__nv_bfloat16)));
      CHECK_CUDA(cudaMemset(gate_up_rows, 0, padded * 2 * kIntermediate * sizeof(__nv_bfloat16)));
      quantize_ms = MedianMs(
          [&] {
            ExitOnError(moeserve::kernels::QuantizeActivationGroupsFp8(x, *groups, kHidden, values,
                                                                       scales, stream));
            ExitOnError(moeserve::kernels::SiluMulQuantizeFp8(gate_up_rows, *groups, kIntermediate,
                                                              values, scales, stream));
          },
          10, stream);
      // The grouped wgmma GEMMs alone on these operands, in both tile shapes.
      if (fp8->grouped_gemm_supported()) {
        char line[256];
        int length = std::snprintf(line, sizeof(line), "| %s |", layout.name.c_str());
        for (const auto tiles :
             {moeserve::kernels::Fp8GemmTiles::kNarrow, moeserve::kernels::Fp8GemmTiles::kWide}) {
          const double gemm_ms =
              GroupedGemmsMs(values, scales, static_cast<int>(padded), offsets, fp8_gate_up,
                             fp8_down, gate_up_rows, y_fp8, tiles, stream);
          length += std::snprintf(line + length, sizeof(line) - length, " %.3f | %.0f |", gemm_ms,
                                  flops / gemm_ms / 1e9);
        }
        gemm_lines.push_back(line);
      }
      cudaFree(values);
      cudaFree(scales);
      cudaFree(gate_up_rows);
    }
    // From the received rows, as serving runs the experts: the rows arrive in the order the
    // exchange delivers them (here shuffled; on one GPU holding every expert, a token's row is
    // read by each of its 8 experts) and go to expert order. bf16 permutes them first; FP8's
    // GEMM strategies read them in place in the activation quantization (x_rows); its
    // weight-only strategy permutes as bf16 does.
    {
      const bool one_gpu = experts == 256;
      const int64_t sources = one_gpu ? 128 : rows;
      std::vector<int32_t> x_rows(rows);
      std::mt19937 rng(5);
      for (int64_t i = 0; i < rows; ++i) {
        x_rows[i] = static_cast<int32_t>(one_gpu ? rng() % sources : i);
      }
      if (!one_gpu) std::shuffle(x_rows.begin(), x_rows.end(), rng);
      int32_t* device_x_rows = nullptr;
      CHECK_CUDA(cudaMalloc(&device_x_rows, rows * sizeof(int32_t)));
      CHECK_CUDA(
          cudaMemcpy(device_x_rows, x_rows.data(), rows * sizeof(int32_t), cudaMemcpyHostToDevice));
      __nv_bfloat16* received = RandomBf16(static_cast<size_t>(sources) * kHidden, 8, 1.0f);
      const int best_bf16_strategy = static_cast<int>(std::min_element(ms, ms + 3) - ms);
      const double bf16_ms = MedianMs(
          [&] {
            ExitOnError(
                moeserve::kernels::PermuteRows(received, device_x_rows, x, rows, kHidden, stream));
            ExitOnError(mlp->Run(x, offsets, gate_up, down, y, strategies[best_bf16_strategy]));
          },
          10, stream);
      // The fastest of the strategies that read x_rows (NaN, where one did not run, loses).
      int gemm = fp8_ms[0] <= fp8_ms[1] ? 0 : 1;
      for (int s : {3, 4}) {
        if (fp8_ms[s] < fp8_ms[gemm]) gemm = s;
      }
      const auto gemm_strategy = fp8_strategies[gemm];
      double fp8_from_received_ms = MedianMs(
          [&] {
            ExitOnError(fp8->Run(received, offsets, fp8_gate_up, fp8_down, y_fp8, gemm_strategy,
                                 device_x_rows));
          },
          10, stream);
      if (few_rows_per_expert) {
        fp8_from_received_ms =
            std::min(fp8_from_received_ms,
                     MedianMs(
                         [&] {
                           ExitOnError(moeserve::kernels::PermuteRows(received, device_x_rows, x,
                                                                      rows, kHidden, stream));
                           ExitOnError(fp8->Run(x, offsets, fp8_gate_up, fp8_down, y_fp8,
                                                Fp8ExpertMlp::Strategy::kWeightOnly));
                         },
                         10, stream));
      }
      char line[512];
      int length = std::snprintf(line, sizeof(line), "| %s | %lld | %.3f | %.3f | **%.2fx** |",
                                 layout.name.c_str(), static_cast<long long>(sources), bf16_ms,
                                 fp8_from_received_ms, bf16_ms / fp8_from_received_ms);
      if (one_gpu) {
        std::snprintf(line + length, sizeof(line) - length, " – | – | – | – |");
      } else {
        // As a group's FP8 dispatch delivers them: packed rows that their senders quantized,
        // moved into place where bf16 rows are quantized. The senders' side is timed apart: the
        // quantization into packed rows takes the place of their bf16 permute into send order.
        uint8_t* packed = nullptr;
        CHECK_CUDA(cudaMalloc(&packed, sources * moeserve::kernels::Fp8PackedRowBytes(kHidden)));
        const double fp8_sender_ms = MedianMs(
            [&] {
              ExitOnError(moeserve::kernels::QuantizeRowsToPackedFp8(
                  received, device_x_rows, static_cast<int>(rows), kHidden, packed, stream));
            },
            10, stream);
        const double bf16_sender_ms = MedianMs(
            [&] {
              ExitOnError(moeserve::kernels::PermuteRows(received, device_x_rows, x, rows, kHidden,
                                                         stream));
            },
            10, stream);
        ExitOnError(moeserve::kernels::QuantizeRowsToPackedFp8(
            received, nullptr, static_cast<int>(sources), kHidden, packed, stream));
        const moeserve::kernels::Fp8InputRows packed_rows{.packed = packed, .rows = device_x_rows};
        const double fp8_packed_ms = MedianMs(
            [&] {
              ExitOnError(
                  fp8->Run(packed_rows, offsets, fp8_gate_up, fp8_down, y_fp8, gemm_strategy));
            },
            10, stream);
        std::snprintf(line + length, sizeof(line) - length, " %.3f | **%.2fx** | %.3f | %.3f |",
                      fp8_packed_ms, bf16_ms / fp8_packed_ms, bf16_sender_ms, fp8_sender_ms);
        cudaFree(packed);
      }
      received_lines.push_back(line);
      cudaFree(received);
      cudaFree(device_x_rows);
    }
    ExitOnError(mlp->Run(x, offsets, gate_up, down, y, ExpertMlp::Strategy::kPerExpertGemm));
    ExitOnError(fp8->Run(x, offsets, fp8_gate_up, fp8_down, y_fp8));
    CHECK_CUDA(cudaDeviceSynchronize());
    const double difference = SampledRelativeRms(y_fp8, y, offsets, kHidden);
    const double bytes_fp8 = Fp8Bytes(active, rows);
    const double bytes_floor_fp8 = bytes_fp8 / (copy * 1e9) * 1e3;
    const double floor_fp8 = std::max(flops / (fp8_tflops * 1e12), bytes_fp8 / (copy * 1e9)) * 1e3;
    const double best_bf16 = std::min({ms[0], ms[1], ms[2]});
    double best_fp8 = std::min(fp8_ms[0], fp8_ms[1]);
    for (int s : {2, 3, 4}) {
      if (!std::isnan(fp8_ms[s])) best_fp8 = std::min(best_fp8, fp8_ms[s]);
    }
    char weight_only[32] = "–", grouped[32] = "–";
    if (!std::isnan(fp8_ms[2])) std::snprintf(weight_only, sizeof(weight_only), "%.3f", fp8_ms[2]);
    if (!std::isnan(fp8_ms[3])) std::snprintf(grouped, sizeof(grouped), "%.3f", fp8_ms[3]);
    char line[512];
    std::snprintf(
        line, sizeof(line),
        "| %s | %.3f | %.3f | %.3f | %.3f | %.3f | %.3f | %.3f | %.3f | %s | %s | **%.2fx** | "
        "%.0f%% | %.3f | %.1e |",
        layout.name.c_str(), bytes_floor_fp8, floor_fp8, ms[0], ms[1], ms[2], fp8_ms[0], fp8_ms[1],
        fp8_ms[4], weight_only, grouped, best_bf16 / best_fp8, 100 * floor_fp8 / best_fp8,
        quantize_ms, difference);
    fp8_lines.push_back(line);
    for (void* p : fp8_owned) cudaFree(p);
    cudaFree(y_fp8);
    for (auto* p : owned) cudaFree(p);
    cudaFree(x);
    cudaFree(y);
  }
  std::printf(
      "\n| layout | FP8 bytes floor ms | FP8 floor ms | bf16 per-expert ms | bf16 grouped ms | "
      "bf16 "
      "concurrent ms | FP8 per-expert ms | FP8 concurrent ms | FP8 pipelined ms | FP8 weight-only "
      "ms | FP8 grouped (wgmma) ms | FP8 speed-up vs best bf16 | best FP8 %% of floor | quantize "
      "kernels ms | FP8 "
      "vs bf16 rms diff |\n");
  std::printf(
      "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
      "| ---: | ---: |\n");
  for (const std::string& line : fp8_lines) std::printf("%s\n", line.c_str());
  std::printf(
      "\nFrom the received rows (the permute into expert order included); then from rows an FP8 "
      "dispatch delivers (quantized by their senders), and the senders' side of each dispatch "
      "(the sent rows into send order: bf16 copied, or quantized into packed FP8 rows):\n"
      "| layout | received rows read | bf16: permute + best MLP ms | FP8: best MLP, permute in "
      "the quantization ms | FP8 speed-up | FP8 rows received: best MLP ms | FP8 speed-up | "
      "sender, bf16 rows ms | sender, FP8 rows ms |\n"
      "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
  for (const std::string& line : received_lines) std::printf("%s\n", line.c_str());
  std::printf(
      "\nThe grouped wgmma GEMMs alone (gate/up and down, activations quantized beforehand), by "
      "tile shape:\n| layout | narrow tiles ms | narrow TFLOP/s | wide tiles ms | wide TFLOP/s "
      "|\n| --- | ---: | ---: | ---: | ---: |\n");
  for (const std::string& line : gemm_lines) std::printf("%s\n", line.c_str());
  CrossoverTable(stream);
  DecodeTable(stream, copy);
  return 0;
}
