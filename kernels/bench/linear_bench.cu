// moeserve-linear-bench: DeepSeek-V3's dense projections (attention's q_a, q_b and o, the dense
// MLP's and the shared expert's gate_up and down) on one GPU, at decode and prefill row counts:
// bf16 weights through cuBLAS (the bf16 path's Linear) against FP8 block-scaled weights through
// Fp8Linear's two paths — the weight-only kernel (bf16 activations) and DeepSeek-V3's recipe
// (activations quantized per 1 x 128, cuBLASLt block-scaled GEMM). Each weight is cycled through
// enough copies to exceed the L2 cache, as a step's other layers evict it in serving. The floor
// is the weight's bytes at the copy bandwidth measured in the same run. Prints a markdown table;
// no argument.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "kernels/bench/bench_timing.h"
#include "kernels/fp8.h"
#include "kernels/fp8_linear.h"
#include "kernels/fp8_quantize.h"
#include "kernels/kernels.h"

namespace {

using moeserve::kernels::Fp8Linear;
using moeserve::kernels::Fp8Weight;
using moeserve::kernels::bench::CopyGBps;
using moeserve::kernels::bench::ExitOnError;
using moeserve::kernels::bench::MedianMs;

template <typename T>
T* Allocate(size_t count) {
  T* device = nullptr;
  CHECK_CUDA(cudaMalloc(&device, count * sizeof(T)));
  return device;
}

struct Projection {
  const char* name;
  int n, k;  // out, in
};

// One weight in both precisions, `copies` times.
struct Weights {
  std::vector<__nv_bfloat16*> bf16;
  std::vector<Fp8Weight> fp8;
};

Weights MakeWeights(const Projection& p, int copies, cudaStream_t stream) {
  Weights w;
  const size_t count = static_cast<size_t>(p.n) * p.k;
  for (int c = 0; c < copies; ++c) {
    __nv_bfloat16* bf16 = Allocate<__nv_bfloat16>(count);
    ExitOnError(
        moeserve::kernels::FillRandomBf16(bf16, static_cast<int64_t>(count), 7 + c, 0.02f, stream));
    auto* values = Allocate<__nv_fp8_e4m3>(count);
    auto* scales = Allocate<float>(moeserve::kernels::WeightScaleCount(p.n, p.k));
    ExitOnError(moeserve::kernels::QuantizeWeightBlocksFp8(bf16, p.n, p.k, values, scales, stream));
    w.bf16.push_back(bf16);
    w.fp8.push_back({values, scales});
  }
  return w;
}

void FreeWeights(Weights& w) {
  for (auto* p : w.bf16) cudaFree(p);
  for (auto& f : w.fp8) {
    cudaFree(const_cast<__nv_fp8_e4m3*>(f.values));
    cudaFree(const_cast<float*>(f.scales));
  }
}

}  // namespace

int main() {
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  cudaDeviceProp properties{};
  CHECK_CUDA(cudaGetDeviceProperties(&properties, 0));
  const double copy_gbps = CopyGBps(stream);
  cublasHandle_t cublas;
  if (cublasCreate(&cublas) != CUBLAS_STATUS_SUCCESS) return 1;
  cublasSetStream(cublas, stream);

  const Projection projections[] = {
      {"q_a (7168 -> 1536)", 1536, 7168},          {"q_b (1536 -> 24576)", 24576, 1536},
      {"o (16384 -> 7168)", 7168, 16384},          {"dense gate_up (7168 -> 36864)", 36864, 7168},
      {"dense down (18432 -> 7168)", 7168, 18432}, {"shared gate_up (7168 -> 4096)", 4096, 7168},
      {"shared down (2048 -> 7168)", 7168, 2048},
  };
  const int row_counts[] = {1, 2, 4, 8, 16, 32, 64, 256};
  const int max_rows = 256, max_dim = 36864;
  __nv_bfloat16* x = Allocate<__nv_bfloat16>(static_cast<size_t>(max_rows) * max_dim);
  __nv_bfloat16* y = Allocate<__nv_bfloat16>(static_cast<size_t>(max_rows) * max_dim);
  ExitOnError(moeserve::kernels::FillRandomBf16(x, int64_t{max_rows} * max_dim, 3, 1.0f, stream));
  auto weight_only = Fp8Linear::Create(max_rows, max_dim, max_dim, stream, INT_MAX);
  auto recipe = Fp8Linear::Create(max_rows, max_dim, max_dim, stream, 0);
  ExitOnError(weight_only.status());
  ExitOnError(recipe.status());

  std::printf("# moeserve-linear-bench on %s: copy bandwidth %.0f GB/s (read + write)\n\n",
              properties.name, copy_gbps);
  std::printf(
      "| projection | rows | bf16 floor us | bf16 cuBLAS us | FP8 floor us | FP8 weight-only us | "
      "FP8 recipe us | best FP8 / bf16 |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n");
  for (const Projection& p : projections) {
    const double bf16_bytes = 2.0 * p.n * p.k;
    // Enough copies that a cycle through them (at least 256 MB) flushes the L2.
    const int copies = std::max(1, static_cast<int>((256e6 + bf16_bytes - 1) / bf16_bytes));
    Weights w = MakeWeights(p, copies, stream);
    CHECK_CUDA(cudaStreamSynchronize(stream));
    for (const int rows : row_counts) {
      const float one = 1.0f, zero = 0.0f;
      const double bf16_ms =
          MedianMs(
              [&] {
                for (int c = 0; c < copies; ++c) {
                  cublasGemmEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, p.n, rows, p.k, &one, w.bf16[c],
                               CUDA_R_16BF, p.k, x, CUDA_R_16BF, p.k, &zero, y, CUDA_R_16BF, p.n,
                               CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
                }
              },
              10, stream) /
          copies;
      auto fp8_ms = [&](Fp8Linear& linear) {
        return MedianMs(
                   [&] {
                     for (int c = 0; c < copies; ++c) {
                       ExitOnError(linear.Run(x, rows, w.fp8[c], p.n, p.k, y));
                     }
                   },
                   10, stream) /
               copies;
      };
      const double weight_only_ms = fp8_ms(*weight_only);
      const double recipe_ms = fp8_ms(*recipe);
      const double floor_bf16_us = bf16_bytes / (copy_gbps * 1e9) * 1e6;
      std::printf("| %s | %d | %.1f | %.1f | %.1f | %.1f | %.1f | %.2f |\n", p.name, rows,
                  floor_bf16_us, bf16_ms * 1e3, floor_bf16_us / 2, weight_only_ms * 1e3,
                  recipe_ms * 1e3, std::min(weight_only_ms, recipe_ms) / bf16_ms);
    }
    FreeWeights(w);
  }
  cublasDestroy(cublas);
  return 0;
}
