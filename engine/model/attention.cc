#include "engine/model/attention.h"

#include <algorithm>
#include <cstring>
#include <limits>

#include "engine/ops/cpu_ops.h"

namespace moeserve::engine {

void MlaAttention::Forward(int layer, const AttentionWeights& w, const float* x, int num_tokens,
                           std::span<const SequenceSpan> sequences, KvRows& cache,
                           float* output) const {
  // An idle rank still steps with its group; with no tokens there is nothing to attend to (and
  // the per-head slices below would index empty buffers).
  if (num_tokens == 0) return;
  const ModelConfig& c = config_;
  const int hidden = c.hidden_size;
  const int heads = c.num_attention_heads;
  const int nope = c.qk_nope_head_dim;
  const int rope_dim = c.qk_rope_head_dim;
  const int qk = c.qk_head_dim();
  const int v_dim = c.v_head_dim;
  const int latent = c.kv_lora_rank;
  const int row_dim = latent + rope_dim;  // one KV cache row
  const int64_t t = num_tokens;

  // Queries [t, heads, qk].
  std::vector<float> q(t * heads * qk);
  if (c.q_lora_rank > 0) {
    std::vector<float> q_compressed(t * c.q_lora_rank);
    cpu::Linear(x, w.q_a_proj, q_compressed.data(), t, hidden, c.q_lora_rank);
    cpu::RmsNorm(q_compressed.data(), w.q_a_layernorm, q_compressed.data(), t, c.q_lora_rank,
                 c.rms_norm_eps);
    cpu::Linear(q_compressed.data(), w.q_b_proj, q.data(), t, c.q_lora_rank, heads * qk);
  } else {
    cpu::Linear(x, w.q_proj, q.data(), t, hidden, heads * qk);
  }
  // Latent KV [t, latent + rope]: normalize the latent part, rotate the rope key.
  std::vector<float> kv(t * row_dim);
  cpu::Linear(x, w.kv_a_proj_with_mqa, kv.data(), t, hidden, row_dim);
  for (int64_t i = 0; i < t; ++i) {
    cpu::RmsNorm(&kv[i * row_dim], w.kv_a_layernorm, &kv[i * row_dim], 1, latent, c.rms_norm_eps);
  }
  std::vector<int> positions(t);
  for (const SequenceSpan& seq : sequences) {
    for (int i = 0; i < seq.num_tokens; ++i) {
      positions[seq.token_offset + i] = seq.start_position + i;
    }
  }
  for (int64_t i = 0; i < t; ++i) {
    rope_.Apply(&kv[i * row_dim + latent], positions[i]);
    for (int h = 0; h < heads; ++h) rope_.Apply(&q[(i * heads + h) * qk + nope], positions[i]);
  }
  for (const SequenceSpan& seq : sequences) {
    for (int i = 0; i < seq.num_tokens; ++i) {
      std::memcpy(cache.RowAt(layer, *seq.block_table, seq.start_position + i),
                  &kv[(seq.token_offset + i) * row_dim], sizeof(float) * row_dim);
    }
  }

  // Absorbed queries [t, heads, latent + rope]: q_latent = q_nope · W_UK(head), where W_UK(head)
  // is the head's [nope, latent] slice of kv_b_proj.
  const int kv_b_rows_per_head = nope + v_dim;
  std::vector<float> q_absorbed(t * heads * row_dim);
  for (int h = 0; h < heads; ++h) {
    const float* w_uk = w.kv_b_proj + static_cast<int64_t>(h) * kv_b_rows_per_head * latent;
    cpu::Gemm(false, false, t, latent, nope, 1.0f, &q[h * qk], heads * qk, w_uk, latent, 0.0f,
              &q_absorbed[h * row_dim], heads * row_dim);
    for (int64_t i = 0; i < t; ++i) {
      std::memcpy(&q_absorbed[(i * heads + h) * row_dim + latent], &q[(i * heads + h) * qk + nope],
                  sizeof(float) * rope_dim);
    }
  }

  // Attention per sequence over its cached rows; result in latent space [t, heads, latent].
  const float scale = static_cast<float>(c.attention_softmax_scale());
  std::vector<float> attended_latent(t * heads * latent);
  std::vector<float> keys;
  std::vector<float> scores;
  for (const SequenceSpan& seq : sequences) {
    const int context = seq.start_position + seq.num_tokens;
    keys.resize(static_cast<size_t>(context) * row_dim);
    for (int p = 0; p < context; ++p) {
      std::memcpy(&keys[static_cast<size_t>(p) * row_dim], cache.RowAt(layer, *seq.block_table, p),
                  sizeof(float) * row_dim);
    }
    const int rows = seq.num_tokens * heads;
    scores.resize(static_cast<size_t>(rows) * context);
    cpu::Gemm(false, true, rows, context, row_dim, scale,
              &q_absorbed[static_cast<size_t>(seq.token_offset) * heads * row_dim], row_dim,
              keys.data(), row_dim, 0.0f, scores.data(), context);
    for (int i = 0; i < seq.num_tokens; ++i) {
      const int visible = seq.start_position + i + 1;  // causal
      for (int h = 0; h < heads; ++h) {
        float* row = &scores[static_cast<size_t>(i * heads + h) * context];
        cpu::SoftmaxInPlace(row, visible);
        std::fill(row + visible, row + context, 0.0f);
      }
    }
    cpu::Gemm(false, false, rows, latent, context, 1.0f, scores.data(), context, keys.data(),
              row_dim, 0.0f,
              &attended_latent[static_cast<size_t>(seq.token_offset) * heads * latent], latent);
  }

  // Values: out(head) = attended_latent(head) · W_UV(head)^T, W_UV(head) = [v, latent].
  std::vector<float> values(t * heads * v_dim);
  for (int h = 0; h < heads; ++h) {
    const float* w_uv =
        w.kv_b_proj + (static_cast<int64_t>(h) * kv_b_rows_per_head + nope) * latent;
    cpu::Gemm(false, true, t, v_dim, latent, 1.0f, &attended_latent[h * latent], heads * latent,
              w_uv, latent, 0.0f, &values[h * v_dim], heads * v_dim);
  }
  cpu::Linear(values.data(), w.o_proj, output, t, heads * v_dim, hidden);
}

}  // namespace moeserve::engine
