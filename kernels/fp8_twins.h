// CPU twins of the FP8 kernels (fp8_gemm.h, fp8_expert_mlp.h): DeepSeek-V3's block-scaled FP8
// recipe on host memory, in the layouts of fp8.h (e4m3 stored as uint8_t, bf16 as uint16_t,
// fp32 scales). They are the reference the GPU kernels are tested against, and they build and run
// without CUDA. Stateless functions; thread-safe.
#pragma once

#include <cstdint>
#include <vector>

namespace moeserve::kernels {

// x bf16 [rows, cols] -> e4m3 values [Fp8PaddedRows(rows), cols] (padding rows zero) and the 1 x
// 128 scales in the activation layout of fp8.h: scale = amax / 448 of the tile (0 for an all-zero
// tile), value = e4m3(x * (448 / amax)). cols % 128 == 0.
void QuantizeActivationsFp8Twin(const uint16_t* x, int rows, int cols, uint8_t* values,
                                float* scales);

// w bf16 [out, in] -> e4m3 [out, in] and 128 x 128 block scales in the weight layout of fp8.h
// (padding entries 0). Builds FP8 weights for tests and benchmarks from bf16 ones.
void QuantizeWeightBlocksFp8Twin(const uint16_t* w, int out, int in, uint8_t* values,
                                 float* scales);

// The real values of a block-scaled weight, fp32 [out, in].
std::vector<float> DequantizeWeightFp8Twin(const uint8_t* values, const float* scales, int out,
                                           int in);

// A block-scaled weight as the twins take it (host pointers, layout of fp8.h).
struct Fp8WeightTwin {
  const uint8_t* values = nullptr;  // e4m3 [out, in]
  const float* scales = nullptr;    // [ceil(out / 128)][WeightScaleStride(in)]
};

// y bf16 [rows, n] = x [rows, k] · w [n, k]^T on the dequantized operands, fp32 accumulation:
// per 128-column block b, scale_x(row, b) * scale_w(n / 128, b) * sum of e4m3 products.
void Fp8GemmTwin(const uint8_t* x_values, const float* x_scales, int rows, Fp8WeightTwin w, int n,
                 int k, uint16_t* y);

// The routed experts' SwiGLU MLP in FP8, rows already grouped by expert (offsets, experts + 1
// entries): per expert, quantize x (1 x 128) -> gate_up = x · W_gate_up^T (bf16, [2I] gate then
// up) -> act = bf16(silu(gate) * up) -> quantize act -> y = act · W_down^T (bf16).
void Fp8ExpertMlpTwin(const uint16_t* x, const std::vector<int64_t>& offsets,
                      const std::vector<Fp8WeightTwin>& gate_up,
                      const std::vector<Fp8WeightTwin>& down, int hidden, int intermediate,
                      uint16_t* y);

// y bf16 [rows, n] = x bf16 [rows, k] · dequant(w)^T without quantizing x (the decode path,
// fp8_weight_only_gemm.h): per 128-column block b, scale_w(n / 128, b) * sum of x * e4m3, in
// fp32.
void Fp8WeightOnlyGemmTwin(const uint16_t* x, int rows, Fp8WeightTwin w, int n, int k, uint16_t* y);

// The experts' MLP of the decode path: the same as Fp8ExpertMlpTwin with the weight-only
// products (x and act stay bf16).
void Fp8WeightOnlyExpertMlpTwin(const uint16_t* x, const std::vector<int64_t>& offsets,
                                const std::vector<Fp8WeightTwin>& gate_up,
                                const std::vector<Fp8WeightTwin>& down, int hidden,
                                int intermediate, uint16_t* y);

}  // namespace moeserve::kernels
