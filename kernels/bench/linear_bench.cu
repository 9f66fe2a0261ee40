// moeserve-linear-bench: DeepSeek-V3's dense projections (attention's q_a, q_b, kv_a and o, the
// dense MLP's and the shared expert's gate_up and down, the LM head) on one GPU, at decode and
// prefill row counts: bf16 weights through cuBLAS (the bf16 path's Linear) against FP8
// block-scaled weights through Fp8Linear's two paths — the weight-only kernel (bf16 activations)
// and DeepSeek-V3's recipe (activations quantized per 1 x 128, cuBLASLt block-scaled GEMM) — and,
// up to FewRowsLinear::kMaxRows rows, both formats through FewRowsLinear, the kernel decode steps
// take (--gpu-decode-projections moeserve). Each weight is cycled through enough copies to exceed
// the L2 cache, as a step's other layers evict it in serving. The floor is the weight's bytes at
// the copy bandwidth measured in the same run. Prints a markdown table; no argument.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "kernels/bench/bench_timing.h"
#include "kernels/few_rows_linear.h"
#include "kernels/fp8.h"
#include "kernels/fp8_linear.h"
#include "kernels/fp8_quantize.h"
#include "kernels/kernels.h"

namespace {

using moeserve::kernels::FewRowsLinear;
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
  int n, k;         // out, in
  bool fp8 = true;  // stored in FP8 (kv_a's 576 outputs are not whole blocks; the head is bf16)
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
    if (!p.fp8) {
      w.bf16.push_back(bf16);
      continue;
    }
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
      {"q_a (7168 -> 1536)", 1536, 7168},
      {"q_b (1536 -> 24576)", 24576, 1536},
      {"kv_a (7168 -> 576)", 576, 7168, false},
      {"o (16384 -> 7168)", 7168, 16384},
      {"dense gate_up (7168 -> 36864)", 36864, 7168},
      {"dense down (18432 -> 7168)", 7168, 18432},
      {"shared gate_up (7168 -> 4096)", 4096, 7168},
      {"shared down (2048 -> 7168)", 7168, 2048},
      {"LM head (7168 -> 129280)", 129280, 7168, false},
  };
  const int row_counts[] = {1, 2, 4, 8, 16, 32, 64, 256};
  const int max_rows = 256, max_k = 18432, max_n = 129280;
  __nv_bfloat16* x = Allocate<__nv_bfloat16>(static_cast<size_t>(max_rows) * max_k);
  __nv_bfloat16* y = Allocate<__nv_bfloat16>(static_cast<size_t>(max_rows) * max_n);
  ExitOnError(moeserve::kernels::FillRandomBf16(x, int64_t{max_rows} * max_k, 3, 1.0f, stream));
  const int fp8_max_n = 36864;
  auto weight_only = Fp8Linear::Create(max_rows, max_k, fp8_max_n, stream, INT_MAX);
  auto recipe = Fp8Linear::Create(max_rows, max_k, fp8_max_n, stream, 0);
  auto few_rows = FewRowsLinear::Create(max_n, stream);
  ExitOnError(weight_only.status());
  ExitOnError(recipe.status());
  ExitOnError(few_rows.status());

  std::printf("# moeserve-linear-bench on %s: copy bandwidth %.0f GB/s (read + write)\n\n",
              properties.name, copy_gbps);
  std::printf(
      "| projection | rows | bf16 floor us | bf16 cuBLAS us | bf16 FewRowsLinear us | FP8 floor "
      "us | FP8 weight-only us | FP8 recipe us | FP8 FewRowsLinear us | best FP8 / best bf16 | k "
      "shares |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
  for (const Projection& p : projections) {
    const double bf16_bytes = 2.0 * p.n * p.k;
    // Enough copies that a cycle through them (at least 256 MB) flushes the L2.
    const int copies = std::max(1, static_cast<int>((256e6 + bf16_bytes - 1) / bf16_bytes));
    Weights w = MakeWeights(p, copies, stream);
    CHECK_CUDA(cudaStreamSynchronize(stream));
    for (const int rows : row_counts) {
      const float one = 1.0f, zero = 0.0f;
      auto per_copy_ms = [&](auto&& run_copy) {
        return MedianMs(
                   [&] {
                     for (int c = 0; c < copies; ++c) run_copy(c);
                   },
                   10, stream) /
               copies;
      };
      const double bf16_ms = per_copy_ms([&](int c) {
        cublasGemmEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, p.n, rows, p.k, &one, w.bf16[c], CUDA_R_16BF,
                     p.k, x, CUDA_R_16BF, p.k, &zero, y, CUDA_R_16BF, p.n, CUBLAS_COMPUTE_32F,
                     CUBLAS_GEMM_DEFAULT);
      });
      const bool few = rows <= FewRowsLinear::kMaxRows;
      const double nan = std::numeric_limits<double>::quiet_NaN();
      auto few_rows_ms = [&](bool fp8) {
        if (!few || (fp8 && !p.fp8)) return nan;
        return per_copy_ms([&](int c) {
          const FewRowsLinear::Weight weight =
              fp8 ? FewRowsLinear::Weight{.bf16 = nullptr, .fp8 = w.fp8[c]}
                  : FewRowsLinear::Weight{.bf16 = w.bf16[c], .fp8 = {}};
          ExitOnError(few_rows->Run(x, rows, weight, p.n, p.k, y, CUDA_R_16BF));
        });
      };
      auto fp8_ms = [&](Fp8Linear& linear) {
        if (!p.fp8) return nan;
        return per_copy_ms([&](int c) { ExitOnError(linear.Run(x, rows, w.fp8[c], p.n, p.k, y)); });
      };
      const double bf16_own_ms = few_rows_ms(false);
      const double weight_only_ms = fp8_ms(*weight_only);
      const double recipe_ms = fp8_ms(*recipe);
      const double fp8_own_ms = few_rows_ms(true);
      const double floor_bf16_us = bf16_bytes / (copy_gbps * 1e9) * 1e6;
      auto best = [](std::initializer_list<double> values) {
        double out = std::numeric_limits<double>::infinity();
        for (double v : values) {
          if (!std::isnan(v)) out = std::min(out, v);
        }
        return out;
      };
      auto us = [](double ms) {
        char text[32];
        if (std::isnan(ms)) return std::string("-");
        std::snprintf(text, sizeof(text), "%.1f", ms * 1e3);
        return std::string(text);
      };
      const double best_fp8 = best({weight_only_ms, recipe_ms, fp8_own_ms});
      char ratio[32] = "-";
      if (p.fp8)
        std::snprintf(ratio, sizeof(ratio), "%.2f", best_fp8 / best({bf16_ms, bf16_own_ms}));
      std::printf("| %s | %d | %.1f | %s | %s | %s | %s | %s | %s | %s | %s |\n", p.name, rows,
                  floor_bf16_us, us(bf16_ms).c_str(), us(bf16_own_ms).c_str(),
                  p.fp8 ? us(floor_bf16_us / 2e3).c_str() : "-", us(weight_only_ms).c_str(),
                  us(recipe_ms).c_str(), us(fp8_own_ms).c_str(), ratio,
                  few ? std::to_string(few_rows->KShares(p.n, p.k)).c_str() : "-");
    }
    FreeWeights(w);
  }
  cublasDestroy(cublas);
  return 0;
}
