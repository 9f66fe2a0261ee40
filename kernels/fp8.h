// FP8 (e4m3) on the host and the block-scaled layouts of DeepSeek-V3's FP8 recipe, shared by the
// GPU kernels (fp8_gemm.h, fp8_expert_mlp.h), their CPU twins (fp8_twins.h), tests, benchmarks
// and, later, the checkpoint loader. Header-only, stateless, thread-safe.
//
// The recipe: weights are e4m3 with one fp32 scale per 128 x 128 block of the [out, in] matrix
// (a checkpoint's `weight_scale_inv`: real value = e4m3 value * scale); activations are quantized
// per 1 x 128 tile (one fp32 scale per row and 128 input columns, scale = amax / 448); products
// accumulate in fp32 and come out in bf16.
//
// Layouts (what cuBLASLt's block-scaled FP8 modes read on Hopper):
// - weight scales: [ceil(out / 128)][WeightScaleStride(in)], row-major; the row stride is the
//   number of 128-column blocks rounded up to a multiple of 4 (entries past the last block are
//   padding). For DeepSeek-V3 (in = 7168 or 2048) this is the checkpoint's own layout.
// - activations: e4m3 rows [Fp8PaddedRows(rows), cols] (the rows past `rows` are zero), and
//   1 x 128 scales column-major: scale of (row, block b) at b * Fp8PaddedRows(rows) + row. Each
//   block's column of scales must start 16-byte aligned, hence rows padded to a multiple of 4.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace moeserve::kernels {

inline constexpr int kFp8BlockSize = 128;   // the 1 x 128 and 128 x 128 scale blocks
inline constexpr float kE4m3Max = 448.0f;   // largest finite e4m3 value
inline constexpr int kFp8RowAlignment = 4;  // activation rows come in groups of 4 (see above)

inline constexpr int64_t Fp8PaddedRows(int64_t rows) {
  return (rows + kFp8RowAlignment - 1) / kFp8RowAlignment * kFp8RowAlignment;
}
inline constexpr int Fp8Blocks(int64_t size) {
  return static_cast<int>((size + kFp8BlockSize - 1) / kFp8BlockSize);
}
// Row stride, in floats, of a weight's 128 x 128 block scales.
inline constexpr int WeightScaleStride(int64_t in) { return (Fp8Blocks(in) + 3) / 4 * 4; }
// Floats in a weight's block scales (padding included).
inline constexpr int64_t WeightScaleCount(int64_t out, int64_t in) {
  return static_cast<int64_t>(Fp8Blocks(out)) * WeightScaleStride(in);
}
// Floats in the 1 x 128 scales of `rows` activation rows of `cols` columns (padding included).
inline constexpr int64_t ActivationScaleCount(int64_t rows, int64_t cols) {
  return Fp8PaddedRows(rows) * Fp8Blocks(cols);
}

// FP8 rows as a GPU group's dispatch carries them to FP8 experts (fp8_quantize.h): each row its
// `cols` e4m3 codes, then its cols / 128 fp32 tile scales, the whole padded to 16 bytes. About
// half a bf16 row's bytes (7,392 against 14,336 at DeepSeek-V3's 7168 columns).
inline constexpr int64_t Fp8PackedRowBytes(int64_t cols) {
  return (cols + 4 * ((cols + kFp8BlockSize - 1) / kFp8BlockSize) + 15) / 16 * 16;
}

// fp32 -> e4m3 (OCP "e4m3fn": bias 7, no infinities, 0x7f / 0xff are NaN), round to nearest
// even, finite values beyond +-448 saturate to +-448, and every NaN becomes 0x7f (the sign is
// dropped) — what the GPU's cvt.rn.satfinite does, bit for bit (tests/gpu/fp8_kernels_test.cu).
inline uint8_t FloatToE4m3(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const uint8_t sign = static_cast<uint8_t>((bits >> 24) & 0x80u);
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return 0x7f;  // NaN, either sign
  const float absolute = std::fabs(value);
  if (absolute >= kE4m3Max) return sign | 0x7e;  // 448 = 1.75 * 2^8, also for +-inf
  if (absolute < 0.015625f) {
    // Subnormal range (below 2^-6): multiples of 2^-9. A result of 8 is 2^-6, whose encoding
    // (exponent 1, mantissa 0) is also 8.
    const float steps = std::nearbyint(absolute * 512.0f);  // exact scaling; ties to even
    return sign | static_cast<uint8_t>(steps);
  }
  int exponent = static_cast<int>(magnitude >> 23) - 127;  // -6 .. 8
  uint32_t mantissa = (magnitude & 0x7fffffu) >> 20;       // top 3 bits
  const uint32_t rest = magnitude & 0xfffffu;              // the 20 bits rounded away
  if (rest > 0x80000u || (rest == 0x80000u && (mantissa & 1u) != 0)) ++mantissa;
  if (mantissa == 8) {
    mantissa = 0;
    ++exponent;
  }
  // absolute < 448 rounds to at most 448 (exponent 8, mantissa 6).
  return sign | static_cast<uint8_t>(((exponent + 7) << 3) | mantissa);
}

inline float E4m3ToFloat(uint8_t value) {
  const int exponent = (value >> 3) & 0xf, mantissa = value & 7;
  const float sign = (value & 0x80) != 0 ? -1.0f : 1.0f;
  if (exponent == 0xf && mantissa == 7) return std::nanf("");
  if (exponent == 0) return sign * std::ldexp(static_cast<float>(mantissa), -9);
  return sign * std::ldexp(1.0f + mantissa / 8.0f, exponent - 7);
}

}  // namespace moeserve::kernels
