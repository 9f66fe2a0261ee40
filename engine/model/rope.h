// Rotary position embedding (RoPE), plain or YaRN-scaled, in DeepSeek's interleaved layout or the
// rotate-half layout of Llama-style checkpoints (Qwen3-MoE, Mixtral).
//
// Owns a cos/sin table precomputed for the first positions (at most kMaxPrecomputedPositions);
// positions past it are computed when applied, with the same formula, so a context of millions
// of positions costs nothing until it is used. Immutable after construction; safe to share
// between threads.
#pragma once

#include <vector>

#include "engine/model/model_config.h"

namespace moeserve::engine {

class RotaryEmbedding {
 public:
  // 65,536 positions of DeepSeek-V3's 32 rope pairs take 16 MB.
  static constexpr int kMaxPrecomputedPositions = 1 << 16;

  // `rotary_dim` must be even; positions range over [0, max_positions).
  RotaryEmbedding(int rotary_dim, int max_positions, double theta, const RopeScaling& scaling,
                  bool interleaved = true);
  explicit RotaryEmbedding(const ModelConfig& config)
      : RotaryEmbedding(config.rotary_dim(), config.max_position_embeddings, config.rope_theta,
                        config.rope_scaling, config.rope_interleaved) {}

  // Rotates pair i by position * inv_freq[i] (and applies YaRN's magnitude scale). Interleaved:
  // pair i is `vector[2i], vector[2i+1]` — DeepSeek's checkpoints store rope dimensions that
  // way, and rotating pairs in place gives the same dot products as the reference's
  // de-interleave-then-rotate-half. Otherwise pair i is `vector[i], vector[i + dim/2]`.
  void Apply(float* vector, int position) const;

  int rotary_dim() const { return rotary_dim_; }
  const std::vector<double>& inverse_frequencies() const { return inverse_frequencies_; }
  // YaRN's cos/sin magnitude, 1 for plain RoPE.
  double magnitude_scale() const { return magnitude_scale_; }
  int precomputed_positions() const { return precomputed_positions_; }
  // The rotation table of positions [0, positions), [positions, rotary_dim / 2], magnitude
  // scale included: the precomputed rows, then rows computed now (the GPU backend copies the
  // positions its KV cache can hold to the device).
  void Table(int positions, std::vector<float>& cos, std::vector<float>& sin) const;

 private:
  // cos and sin of pair i at `position`, magnitude scale included.
  void Rotation(int position, int pair, float* cos, float* sin) const;

  int rotary_dim_;
  int max_positions_;
  bool interleaved_;
  std::vector<double> inverse_frequencies_;
  double magnitude_scale_ = 1.0;
  int precomputed_positions_ = 0;
  std::vector<float> cos_;  // [precomputed_positions, rotary_dim / 2]
  std::vector<float> sin_;
};

// YaRN helpers (exposed for tests).
double YarnMagnitude(double factor, double mscale);
std::vector<double> YarnInverseFrequencies(int rotary_dim, double theta,
                                           const RopeScaling& scaling);

}  // namespace moeserve::engine
