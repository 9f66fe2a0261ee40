// Rotary position embedding (RoPE), plain or YaRN-scaled, in DeepSeek's interleaved layout.
//
// Owns the precomputed cos/sin table for every position up to the context length. Immutable
// after construction; safe to share between threads.
#pragma once

#include <vector>

#include "engine/model/model_config.h"

namespace moeserve::engine {

class RotaryEmbedding {
 public:
  // `rotary_dim` must be even; positions range over [0, max_positions).
  RotaryEmbedding(int rotary_dim, int max_positions, double theta, const RopeScaling& scaling);
  explicit RotaryEmbedding(const ModelConfig& config)
      : RotaryEmbedding(config.qk_rope_head_dim, config.max_position_embeddings,
                        config.rope_theta, config.rope_scaling) {}

  // Rotates `vector[2i], vector[2i+1]` by position * inv_freq[i] (and applies YaRN's magnitude
  // scale). DeepSeek's checkpoints store rope dimensions interleaved; rotating pairs in place
  // gives the same dot products as the reference's de-interleave-then-rotate-half.
  void Apply(float* vector, int position) const;

  int rotary_dim() const { return rotary_dim_; }
  const std::vector<double>& inverse_frequencies() const { return inverse_frequencies_; }
  // YaRN's cos/sin magnitude, 1 for plain RoPE.
  double magnitude_scale() const { return magnitude_scale_; }

 private:
  int rotary_dim_;
  int max_positions_;
  std::vector<double> inverse_frequencies_;
  double magnitude_scale_ = 1.0;
  std::vector<float> cos_;  // [max_positions, rotary_dim / 2]
  std::vector<float> sin_;
};

// YaRN helpers (exposed for tests).
double YarnMagnitude(double factor, double mscale);
std::vector<double> YarnInverseFrequencies(int rotary_dim, double theta, const RopeScaling& scaling);

}  // namespace moeserve::engine
