#include "kernels/fp8_twins.h"

#include <algorithm>
#include <cmath>

#include "kernels/bf16.h"
#include "kernels/fp8.h"

namespace moeserve::kernels {

void QuantizeActivationsFp8Twin(const uint16_t* x, int rows, int cols, uint8_t* values,
                                float* scales) {
  const int64_t padded = Fp8PaddedRows(rows);
  const int blocks = Fp8Blocks(cols);
  std::fill(values, values + padded * cols, uint8_t{0});
  std::fill(scales, scales + padded * blocks, 0.0f);
  for (int r = 0; r < rows; ++r) {
    for (int b = 0; b < blocks; ++b) {
      const uint16_t* tile = x + static_cast<int64_t>(r) * cols + b * kFp8BlockSize;
      float amax = 0;
      for (int i = 0; i < kFp8BlockSize; ++i)
        amax = std::max(amax, std::fabs(Bf16ToFloat(tile[i])));
      const float scale = amax / kE4m3Max;
      scales[b * padded + r] = scale;
      if (amax == 0) continue;  // the values stay zero
      const float inverse = kE4m3Max / amax;
      uint8_t* out = values + static_cast<int64_t>(r) * cols + b * kFp8BlockSize;
      for (int i = 0; i < kFp8BlockSize; ++i) out[i] = FloatToE4m3(Bf16ToFloat(tile[i]) * inverse);
    }
  }
}

void QuantizeWeightBlocksFp8Twin(const uint16_t* w, int out, int in, uint8_t* values,
                                 float* scales) {
  const int stride = WeightScaleStride(in);
  std::fill(scales, scales + WeightScaleCount(out, in), 0.0f);
  for (int ob = 0; ob < Fp8Blocks(out); ++ob) {
    const int row_end = std::min(out, (ob + 1) * kFp8BlockSize);
    for (int ib = 0; ib < Fp8Blocks(in); ++ib) {
      const int col_end = std::min(in, (ib + 1) * kFp8BlockSize);
      float amax = 0;
      for (int r = ob * kFp8BlockSize; r < row_end; ++r) {
        for (int c = ib * kFp8BlockSize; c < col_end; ++c) {
          amax = std::max(amax, std::fabs(Bf16ToFloat(w[static_cast<int64_t>(r) * in + c])));
        }
      }
      const float scale = amax / kE4m3Max, inverse = kE4m3Max / amax;
      scales[ob * stride + ib] = scale;
      for (int r = ob * kFp8BlockSize; r < row_end; ++r) {
        for (int c = ib * kFp8BlockSize; c < col_end; ++c) {
          const int64_t i = static_cast<int64_t>(r) * in + c;
          values[i] = amax == 0 ? uint8_t{0} : FloatToE4m3(Bf16ToFloat(w[i]) * inverse);
        }
      }
    }
  }
}

std::vector<float> DequantizeWeightFp8Twin(const uint8_t* values, const float* scales, int out,
                                           int in) {
  std::vector<float> w(static_cast<size_t>(out) * in);
  const int stride = WeightScaleStride(in);
  for (int r = 0; r < out; ++r) {
    for (int c = 0; c < in; ++c) {
      const int64_t i = static_cast<int64_t>(r) * in + c;
      w[i] = E4m3ToFloat(values[i]) * scales[(r / kFp8BlockSize) * stride + c / kFp8BlockSize];
    }
  }
  return w;
}

namespace {

// y [rows, n] = bf16 of sum over 128-column blocks b of x_scale(r, b) * (w's scale of (j / 128,
// b)) * (the block's sum of x * w), with x [rows, k] already as floats and w's e4m3 codes
// decoded once: the block structure of the GPU kernels.
template <typename XScale>
void BlockScaledProducts(const std::vector<float>& x, int rows, Fp8WeightTwin w, int n, int k,
                         XScale x_scale, uint16_t* y) {
  const int blocks = Fp8Blocks(k);
  const int stride = WeightScaleStride(k);
  std::vector<float> wf(static_cast<size_t>(n) * k);
  for (size_t i = 0; i < wf.size(); ++i) wf[i] = E4m3ToFloat(w.values[i]);
  for (int r = 0; r < rows; ++r) {
    for (int j = 0; j < n; ++j) {
      float sum = 0;
      for (int b = 0; b < blocks; ++b) {
        float block_sum = 0;
        const float* xr = x.data() + static_cast<int64_t>(r) * k + b * kFp8BlockSize;
        const float* wr = wf.data() + static_cast<int64_t>(j) * k + b * kFp8BlockSize;
        for (int i = 0; i < kFp8BlockSize; ++i) block_sum += xr[i] * wr[i];
        sum += block_sum * x_scale(r, b) * w.scales[(j / kFp8BlockSize) * stride + b];
      }
      y[static_cast<int64_t>(r) * n + j] = FloatToBf16(sum);
    }
  }
}

// act [rows, inter] = bf16(silu(gate) * up) of gate_up [rows, 2 * inter] (gate, then up).
void SiluMulRows(const uint16_t* gate_up, int rows, int intermediate, uint16_t* act) {
  for (int r = 0; r < rows; ++r) {
    for (int i = 0; i < intermediate; ++i) {
      const float g = Bf16ToFloat(gate_up[static_cast<size_t>(r) * 2 * intermediate + i]);
      const float u =
          Bf16ToFloat(gate_up[static_cast<size_t>(r) * 2 * intermediate + intermediate + i]);
      act[static_cast<size_t>(r) * intermediate + i] = FloatToBf16(g / (1.0f + std::exp(-g)) * u);
    }
  }
}

}  // namespace

void Fp8GemmTwin(const uint8_t* x_values, const float* x_scales, int rows, Fp8WeightTwin w, int n,
                 int k, uint16_t* y) {
  const int64_t padded = Fp8PaddedRows(rows);
  std::vector<float> x(static_cast<size_t>(rows) * k);
  for (size_t i = 0; i < x.size(); ++i) x[i] = E4m3ToFloat(x_values[i]);
  BlockScaledProducts(
      x, rows, w, n, k, [&](int r, int b) { return x_scales[b * padded + r]; }, y);
}

void Fp8WeightOnlyGemmTwin(const uint16_t* x, int rows, Fp8WeightTwin w, int n, int k,
                           uint16_t* y) {
  std::vector<float> xf(static_cast<size_t>(rows) * k);
  for (size_t i = 0; i < xf.size(); ++i) xf[i] = Bf16ToFloat(x[i]);
  BlockScaledProducts(
      xf, rows, w, n, k, [](int, int) { return 1.0f; }, y);
}

void Fp8WeightOnlyExpertMlpTwin(const uint16_t* x, const std::vector<int64_t>& offsets,
                                const std::vector<Fp8WeightTwin>& gate_up,
                                const std::vector<Fp8WeightTwin>& down, int hidden,
                                int intermediate, uint16_t* y) {
  for (size_t e = 0; e + 1 < offsets.size(); ++e) {
    const int rows = static_cast<int>(offsets[e + 1] - offsets[e]);
    if (rows == 0) continue;
    std::vector<uint16_t> h(static_cast<size_t>(rows) * 2 * intermediate),
        act(static_cast<size_t>(rows) * intermediate);
    Fp8WeightOnlyGemmTwin(x + offsets[e] * hidden, rows, gate_up[e], 2 * intermediate, hidden,
                          h.data());
    SiluMulRows(h.data(), rows, intermediate, act.data());
    Fp8WeightOnlyGemmTwin(act.data(), rows, down[e], hidden, intermediate, y + offsets[e] * hidden);
  }
}

void Fp8ExpertMlpTwin(const uint16_t* x, const std::vector<int64_t>& offsets,
                      const std::vector<Fp8WeightTwin>& gate_up,
                      const std::vector<Fp8WeightTwin>& down, int hidden, int intermediate,
                      uint16_t* y) {
  for (size_t e = 0; e + 1 < offsets.size(); ++e) {
    const int rows = static_cast<int>(offsets[e + 1] - offsets[e]);
    if (rows == 0) continue;
    const int64_t padded = Fp8PaddedRows(rows);
    std::vector<uint8_t> x_values(padded * hidden), act_values(padded * intermediate);
    std::vector<float> x_scales(ActivationScaleCount(rows, hidden)),
        act_scales(ActivationScaleCount(rows, intermediate));
    QuantizeActivationsFp8Twin(x + offsets[e] * hidden, rows, hidden, x_values.data(),
                               x_scales.data());
    std::vector<uint16_t> h(static_cast<size_t>(rows) * 2 * intermediate),
        act(static_cast<size_t>(rows) * intermediate);
    Fp8GemmTwin(x_values.data(), x_scales.data(), rows, gate_up[e], 2 * intermediate, hidden,
                h.data());
    SiluMulRows(h.data(), rows, intermediate, act.data());
    QuantizeActivationsFp8Twin(act.data(), rows, intermediate, act_values.data(),
                               act_scales.data());
    Fp8GemmTwin(act_values.data(), act_scales.data(), rows, down[e], hidden, intermediate,
                y + offsets[e] * hidden);
  }
}

}  // namespace moeserve::kernels
