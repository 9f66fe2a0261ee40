// moeserve-expert-bench: the routed experts' SwiGLU MLP (ExpertMlp) at DeepSeek-V3 shapes
// (hidden 7168, expert intermediate 2048, bf16) on one GPU, against the card's limits measured in
// the same run: floor = max(flops / dense bf16 GEMM rate, bytes / device copy bandwidth).
// Layouts: EP32 prefill (9 local experts x ~14.5K tokens), EP128 decode (3 x ~340), and one GPU
// holding all 256 experts with 128 tokens routed top-8. Prints a markdown table.
#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "kernels/expert_mlp.h"
#include "kernels/kernels.h"

namespace {

using moeserve::kernels::ExpertMlp;

#define CHECK_CUDA(call)                                                             \
  do {                                                                               \
    cudaError_t e = (call);                                                          \
    if (e != cudaSuccess) {                                                          \
      std::fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); \
      std::exit(1);                                                                  \
    }                                                                                \
  } while (0)

constexpr int kHidden = 7168;
constexpr int kIntermediate = 2048;

template <typename F>
double MedianMs(F&& body, int iterations, cudaStream_t stream) {
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  for (int i = 0; i < 3; ++i) body();  // warm-up
  std::vector<float> times;
  for (int i = 0; i < iterations; ++i) {
    cudaEventRecord(start, stream);
    body();
    cudaEventRecord(stop, stream);
    cudaEventSynchronize(stop);
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    times.push_back(ms);
  }
  std::sort(times.begin(), times.end());
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return times[times.size() / 2];
}

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

double CopyGBps(cudaStream_t stream) {
  const size_t bytes = size_t{2} << 30;
  void *a, *b;
  CHECK_CUDA(cudaMalloc(&a, bytes));
  CHECK_CUDA(cudaMalloc(&b, bytes));
  const double ms =
      MedianMs([&] { cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, stream); }, 10, stream);
  cudaFree(a);
  cudaFree(b);
  return 2.0 * bytes / (ms * 1e-3) / 1e9;  // read + write
}

struct Layout {
  std::string name;
  std::vector<int64_t> rows_per_expert;
};

}  // namespace

int main() {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  cudaDeviceProp properties{};
  CHECK_CUDA(cudaGetDeviceProperties(&properties, 0));
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  const double tflops = DenseTflops(stream);
  const double copy = CopyGBps(stream);

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

  std::printf("GPU: %s; dense bf16 GEMM %.0f TFLOP/s; device copy %.0f GB/s\n", properties.name,
              tflops, copy);
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
    const double bytes =
        active * 3.0 * kHidden * kIntermediate * 2 +
        rows * (kHidden * 2.0 * 2 + 2 * kIntermediate * 2.0 * 2 + kIntermediate * 2.0 * 2);
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
    for (auto* p : owned) cudaFree(p);
    cudaFree(x);
    cudaFree(y);
  }
  return 0;
}
