#include "engine/model/rope.h"

#include <algorithm>
#include <cmath>
#include <numbers>

namespace moeserve::engine {
namespace {

// The (fractional) dimension index whose wavelength completes `rotations` turns over the
// original context length.
double CorrectionDimension(double rotations, int dim, double theta, int max_positions) {
  return dim * std::log(max_positions / (rotations * 2.0 * std::numbers::pi)) /
         (2.0 * std::log(theta));
}

}  // namespace

double YarnMagnitude(double factor, double mscale) {
  if (factor <= 1.0) return 1.0;
  return 0.1 * mscale * std::log(factor) + 1.0;
}

std::vector<double> YarnInverseFrequencies(int rotary_dim, double theta,
                                           const RopeScaling& scaling) {
  const int half = rotary_dim / 2;
  std::vector<double> inverse(half);
  const int original = scaling.original_max_position_embeddings;
  double low = std::floor(CorrectionDimension(scaling.beta_fast, rotary_dim, theta, original));
  double high = std::ceil(CorrectionDimension(scaling.beta_slow, rotary_dim, theta, original));
  low = std::max(low, 0.0);
  high = std::min(high, static_cast<double>(rotary_dim - 1));
  if (low == high) high += 0.001;  // avoid a zero-width ramp
  for (int i = 0; i < half; ++i) {
    const double extrapolated = 1.0 / std::pow(theta, 2.0 * i / rotary_dim);
    const double interpolated = extrapolated / scaling.factor;
    // Dimensions below `low` rotate fast and keep their frequency (extrapolation); those above
    // `high` are interpolated by the scaling factor; in between, a linear blend.
    const double ramp = std::clamp((i - low) / (high - low), 0.0, 1.0);
    const double extrapolation_weight = 1.0 - ramp;
    inverse[i] = interpolated * (1.0 - extrapolation_weight) + extrapolated * extrapolation_weight;
  }
  return inverse;
}

RotaryEmbedding::RotaryEmbedding(int rotary_dim, int max_positions, double theta,
                                 const RopeScaling& scaling, bool interleaved)
    : rotary_dim_(rotary_dim), max_positions_(max_positions), interleaved_(interleaved) {
  const int half = rotary_dim / 2;
  if (scaling.type == RopeScaling::Type::kYarn) {
    inverse_frequencies_ = YarnInverseFrequencies(rotary_dim, theta, scaling);
    magnitude_scale_ = YarnMagnitude(scaling.factor, scaling.mscale) /
                       YarnMagnitude(scaling.factor, scaling.mscale_all_dim);
  } else {
    inverse_frequencies_.resize(half);
    for (int i = 0; i < half; ++i)
      inverse_frequencies_[i] = 1.0 / std::pow(theta, 2.0 * i / rotary_dim);
  }
  precomputed_positions_ = std::min(max_positions, kMaxPrecomputedPositions);
  Table(precomputed_positions_, cos_, sin_);
}

void RotaryEmbedding::Rotation(int position, int pair, float* cos, float* sin) const {
  // Angles are formed in float32, as the reference computes position * inv_freq.
  const float angle = static_cast<float>(position) * static_cast<float>(inverse_frequencies_[pair]);
  *cos = static_cast<float>(std::cos(angle) * magnitude_scale_);
  *sin = static_cast<float>(std::sin(angle) * magnitude_scale_);
}

void RotaryEmbedding::Table(int positions, std::vector<float>& cos, std::vector<float>& sin) const {
  const int half = rotary_dim_ / 2;
  cos.resize(static_cast<size_t>(positions) * half);
  sin.resize(cos.size());
  for (int position = 0; position < positions; ++position) {
    for (int i = 0; i < half; ++i) {
      const size_t at = static_cast<size_t>(position) * half + i;
      Rotation(position, i, &cos[at], &sin[at]);
    }
  }
}

void RotaryEmbedding::Apply(float* vector, int position) const {
  const int half = rotary_dim_ / 2;
  const float* cos;
  const float* sin;
  std::vector<float> computed;  // [cos..., sin...] of a position past the precomputed ones
  if (position < precomputed_positions_) {
    cos = &cos_[static_cast<size_t>(position) * half];
    sin = &sin_[static_cast<size_t>(position) * half];
  } else {
    computed.resize(2 * static_cast<size_t>(half));
    for (int i = 0; i < half; ++i) Rotation(position, i, &computed[i], &computed[half + i]);
    cos = computed.data();
    sin = computed.data() + half;
  }
  const int first_stride = interleaved_ ? 2 : 1;  // where pair i's first element is
  const int partner_offset = interleaved_ ? 1 : half;
  for (int i = 0; i < half; ++i) {
    float* first = vector + i * first_stride;
    float* second = first + partner_offset;
    const float x = *first;
    const float y = *second;
    *first = x * cos[i] - y * sin[i];
    *second = y * cos[i] + x * sin[i];
  }
}

}  // namespace moeserve::engine
