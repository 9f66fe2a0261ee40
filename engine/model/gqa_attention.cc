#include "engine/model/gqa_attention.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "engine/ops/cpu_ops.h"

namespace moeserve::engine {
namespace {

void AddBias(float* rows, const float* bias, int64_t num_rows, int64_t dim) {
  if (bias == nullptr) return;
  for (int64_t r = 0; r < num_rows; ++r) {
    for (int64_t i = 0; i < dim; ++i) rows[r * dim + i] += bias[i];
  }
}

}  // namespace

void GroupedQueryAttention::Forward(int layer, const AttentionWeights& w, const float* x,
                                    int num_tokens, std::span<const SequenceSpan> sequences,
                                    KvRows& cache, float* output) const {
  if (num_tokens == 0) return;  // an idle rank stepping with its group
  const ModelConfig& c = config_;
  const int hidden = c.hidden_size;
  const int heads = c.num_attention_heads;
  const int kv_heads = c.num_key_value_heads;
  const int head_dim = c.head_dim;
  const int heads_per_kv = heads / kv_heads;
  const int q_dim = heads * head_dim;
  const int kv_dim = kv_heads * head_dim;
  const int row_dim = 2 * kv_dim;  // one KV cache row: keys, then values
  const int64_t t = num_tokens;

  std::vector<float> q(t * q_dim);
  std::vector<float> kv(t * row_dim);
  cpu::Linear(x, w.q_proj, q.data(), t, hidden, q_dim);
  AddBias(q.data(), w.q_bias, t, q_dim);
  // Keys and values go straight into the row layout: [t, keys | values].
  cpu::Gemm(false, true, t, kv_dim, hidden, 1.0f, x, hidden, w.k_proj, hidden, 0.0f, kv.data(),
            row_dim);
  cpu::Gemm(false, true, t, kv_dim, hidden, 1.0f, x, hidden, w.v_proj, hidden, 0.0f,
            kv.data() + kv_dim, row_dim);
  for (int64_t i = 0; i < t; ++i) {
    float* keys = &kv[i * row_dim];
    float* values = keys + kv_dim;
    if (w.k_bias != nullptr) {
      for (int j = 0; j < kv_dim; ++j) keys[j] += w.k_bias[j];
    }
    if (w.v_bias != nullptr) {
      for (int j = 0; j < kv_dim; ++j) values[j] += w.v_bias[j];
    }
  }
  if (c.qk_norm) {
    // Each head's vector is normalized on its own (a row of head_dim values).
    cpu::RmsNorm(q.data(), w.q_norm, q.data(), t * heads, head_dim, c.rms_norm_eps);
    for (int64_t i = 0; i < t; ++i) {
      cpu::RmsNorm(&kv[i * row_dim], w.k_norm, &kv[i * row_dim], kv_heads, head_dim,
                   c.rms_norm_eps);
    }
  }
  for (const SequenceSpan& seq : sequences) {
    for (int i = 0; i < seq.num_tokens; ++i) {
      const int64_t token = seq.token_offset + i;
      const int position = seq.start_position + i;
      for (int h = 0; h < heads; ++h) rope_.Apply(&q[(token * heads + h) * head_dim], position);
      for (int h = 0; h < kv_heads; ++h) rope_.Apply(&kv[token * row_dim + h * head_dim], position);
      std::memcpy(cache.RowAt(layer, *seq.block_table, position), &kv[token * row_dim],
                  sizeof(float) * row_dim);
    }
  }

  // Per sequence: gather its cached rows, then per query head scores = q · k^T, causal
  // softmax, attended = p · v.
  const float scale = static_cast<float>(c.attention_softmax_scale());
  std::vector<float> attended(t * q_dim);
  std::vector<float> rows;
  std::vector<float> scores;
  for (const SequenceSpan& seq : sequences) {
    if (seq.num_tokens == 0) continue;
    const int context = seq.start_position + seq.num_tokens;
    rows.resize(static_cast<size_t>(context) * row_dim);
    for (int p = 0; p < context; ++p) {
      std::memcpy(&rows[static_cast<size_t>(p) * row_dim], cache.RowAt(layer, *seq.block_table, p),
                  sizeof(float) * row_dim);
    }
    scores.resize(static_cast<size_t>(seq.num_tokens) * context);
    for (int h = 0; h < heads; ++h) {
      const int kv_head = h / heads_per_kv;
      const float* query = &q[static_cast<size_t>(seq.token_offset) * q_dim + h * head_dim];
      const float* keys = &rows[static_cast<size_t>(kv_head) * head_dim];
      const float* values = keys + kv_dim;
      cpu::Gemm(false, true, seq.num_tokens, context, head_dim, scale, query, q_dim, keys, row_dim,
                0.0f, scores.data(), context);
      for (int i = 0; i < seq.num_tokens; ++i) {
        const int visible = seq.start_position + i + 1;  // causal
        float* row = &scores[static_cast<size_t>(i) * context];
        cpu::SoftmaxInPlace(row, visible);
        std::fill(row + visible, row + context, 0.0f);
      }
      cpu::Gemm(false, false, seq.num_tokens, head_dim, context, 1.0f, scores.data(), context,
                values, row_dim, 0.0f,
                &attended[static_cast<size_t>(seq.token_offset) * q_dim + h * head_dim], q_dim);
    }
  }
  cpu::Linear(attended.data(), w.o_proj, output, t, q_dim, hidden);
  AddBias(output, w.o_bias, t, hidden);
}

}  // namespace moeserve::engine
