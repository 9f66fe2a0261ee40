// bf16 on the host: the one conversion between fp32 and bfloat16 bits that every part of
// moeserve uses (checkpoint loading, weight upload, the kernels' CPU twins, tests, benchmarks),
// so that host-rounded values equal what the GPU kernels produce. Round to nearest, ties to
// even; a NaN stays a NaN of the same sign (made quiet). Header-only, stateless.
#pragma once

#include <cstdint>
#include <cstring>

namespace moeserve::kernels {

inline uint16_t FloatToBf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  const uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

inline float Bf16ToFloat(uint16_t value) {
  const uint32_t bits = static_cast<uint32_t>(value) << 16;
  float result;
  std::memcpy(&result, &bits, sizeof(result));
  return result;
}

}  // namespace moeserve::kernels
