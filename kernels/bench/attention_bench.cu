// moeserve-attention-bench: MLA decode attention (MlaPagedAttention) at DeepSeek-V3's shape —
// 128 heads, latent 512 + rope 64, 16-row cache blocks — on one GPU. Each of S sequences decodes
// one token over a context of C cached rows, its blocks scattered over the cache as a serving
// cache's are. Measured against the card's copy bandwidth from the same run: floor = (the
// sequences' KV rows + queries + outputs) / bandwidth, as if every byte were read once from
// memory. Each case runs with whole contexts per block and with contexts split across blocks
// where the batch cannot fill the GPU (the serving default); "of floor" and TFLOPS are the
// split run's. Prints a markdown table; no argument.
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/bench/bench_timing.h"
#include "kernels/kernels.h"
#include "kernels/mla.h"

namespace {

using moeserve::kernels::bench::CopyGBps;
using moeserve::kernels::bench::ExitOnError;
using moeserve::kernels::bench::MedianMs;

constexpr int kHeads = 128;
constexpr int kLatent = 512;
constexpr int kRope = 64;
constexpr int kRowDim = kLatent + kRope;
constexpr int kBlockSize = 16;

template <typename T>
T* DeviceCopy(const std::vector<T>& values) {
  T* device = nullptr;
  CHECK_CUDA(cudaMalloc(&device, values.size() * sizeof(T)));
  CHECK_CUDA(cudaMemcpy(device, values.data(), values.size() * sizeof(T), cudaMemcpyHostToDevice));
  return device;
}

__nv_bfloat16* RandomBf16(size_t count, uint64_t seed, float scale) {
  __nv_bfloat16* device = nullptr;
  CHECK_CUDA(cudaMalloc(&device, count * sizeof(__nv_bfloat16)));
  ExitOnError(moeserve::kernels::FillRandomBf16(device, count, seed, scale, nullptr));
  return device;
}

}  // namespace

int main() {
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  cudaDeviceProp properties{};
  CHECK_CUDA(cudaGetDeviceProperties(&properties, 0));
  const double copy_gbps = CopyGBps(stream);
  std::printf(
      "# MLA decode attention (MlaPagedAttention), %s: %d heads, rows of %d + %d, "
      "blocks of %d; copy bandwidth %.0f GB/s\n\n",
      properties.name, kHeads, kLatent, kRope, kBlockSize, copy_gbps);
  std::printf(
      "| sequences | context | KV rows (MB) | time (us) | floor (us) | of floor | "
      "TFLOPS |\n| --- | --- | --- | --- | --- | --- | --- |\n");
  const float scale = 0.0722f;  // 1 / sqrt(192), DeepSeek-V3's query-key width
  for (const int sequences : {1, 8, 64, 128}) {
    for (const int context : {256, 1024, 4096}) {
      const int blocks_per_sequence = (context + kBlockSize - 1) / kBlockSize;
      const int blocks = sequences * blocks_per_sequence;
      std::vector<int32_t> tables(blocks);
      std::iota(tables.begin(), tables.end(), 0);
      std::shuffle(tables.begin(), tables.end(), std::mt19937(sequences * 7919 + context));
      const std::vector<int32_t> positions(sequences, context - 1);
      std::vector<int32_t> token_sequence(sequences);
      std::iota(token_sequence.begin(), token_sequence.end(), 0);
      __nv_bfloat16* cache =
          RandomBf16(static_cast<size_t>(blocks) * kBlockSize * kRowDim, 1, 1.0f);
      __nv_bfloat16* queries =
          RandomBf16(static_cast<size_t>(sequences) * kHeads * kRowDim, 2, 0.05f);
      __nv_bfloat16* out = nullptr;
      CHECK_CUDA(cudaMalloc(&out, sizeof(__nv_bfloat16) * sequences * kHeads * kLatent));
      int32_t* d_tables = DeviceCopy(tables);
      int32_t* d_positions = DeviceCopy(positions);
      int32_t* d_sequence = DeviceCopy(token_sequence);
      float* workspace = nullptr;
      CHECK_CUDA(
          cudaMalloc(&workspace, moeserve::kernels::MlaPagedAttentionWorkspaceBytes(kLatent)));
      bool failed = false;
      auto time_with = [&](float* split_workspace) {
        return MedianMs(
            [&] {
              failed |= !moeserve::kernels::MlaPagedAttention(
                             queries, cache, d_tables, blocks_per_sequence, d_sequence, d_positions,
                             out, sequences, kHeads, kLatent, kRope, kBlockSize, scale,
                             split_workspace, stream)
                             .ok();
            },
            20, stream);
      };
      const double whole_ms = time_with(nullptr);
      const double ms = time_with(workspace);
      CHECK_CUDA(cudaStreamSynchronize(stream));
      if (failed) {
        std::fprintf(stderr, "MlaPagedAttention failed\n");
        return 1;
      }
      const double kv_bytes = 2.0 * sequences * context * kRowDim;
      const double bytes = kv_bytes + 2.0 * sequences * kHeads * (kRowDim + kLatent);
      const double floor_us = bytes / (copy_gbps * 1e9) * 1e6;
      const double flops = 2.0 * sequences * kHeads * context * (kRowDim + kLatent);
      std::printf("| %d | %d | %.1f | %.1f | %.1f | %.1f | %.0f%% | %.1f |\n", sequences, context,
                  kv_bytes / 1e6, whole_ms * 1e3, ms * 1e3, floor_us, 100.0 * floor_us / (ms * 1e3),
                  flops / (ms * 1e-3) / 1e12);
      for (void* p :
           {static_cast<void*>(cache), static_cast<void*>(queries), static_cast<void*>(out),
            static_cast<void*>(d_tables), static_cast<void*>(d_positions),
            static_cast<void*>(d_sequence), static_cast<void*>(workspace)}) {
        CHECK_CUDA(cudaFree(p));
      }
    }
  }
  return 0;
}
