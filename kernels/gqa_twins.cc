#include "kernels/gqa_twins.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/bf16.h"

namespace moeserve::kernels {

void GqaWriteCacheTwin(const float* qkv, const uint16_t* q_norm, const uint16_t* k_norm, float eps,
                       const int32_t* positions, const int64_t* cache_rows, const float* cos_table,
                       const float* sin_table, uint16_t* queries, uint16_t* cache, int tokens,
                       const GqaShape& shape) {
  const int dim = shape.head_dim;
  const int half = dim / 2;
  const int row_dim = shape.row_dim();
  const int kv_dim = shape.kv_heads * dim;
  std::vector<float> head(dim);
  for (int t = 0; t < tokens; ++t) {
    const float* projection = qkv + static_cast<size_t>(t) * shape.projection_dim();
    uint16_t* row = cache + cache_rows[t] * row_dim;
    const float* c = cos_table + static_cast<size_t>(positions[t]) * half;
    const float* s = sin_table + static_cast<size_t>(positions[t]) * half;
    // Queries and keys: norm, then rotation.
    for (int h = 0; h < shape.heads + shape.kv_heads; ++h) {
      const bool is_query = h < shape.heads;
      const float* in = projection + static_cast<size_t>(h) * dim;
      const uint16_t* norm = is_query ? q_norm : k_norm;
      float inverse_rms = 1.0f;
      if (norm != nullptr) {
        float sum = 0;
        for (int i = 0; i < dim; ++i) sum += in[i] * in[i];
        inverse_rms = 1.0f / std::sqrt(sum / dim + eps);
      }
      for (int i = 0; i < dim; ++i) {
        head[i] = in[i] * inverse_rms * (norm != nullptr ? Bf16ToFloat(norm[i]) : 1.0f);
      }
      uint16_t* out = is_query ? queries + (static_cast<size_t>(t) * shape.heads + h) * dim
                               : row + static_cast<size_t>(h - shape.heads) * dim;
      for (int i = 0; i < half; ++i) {
        const float x = head[i];
        const float y = head[i + half];
        out[i] = FloatToBf16(x * c[i] - y * s[i]);
        out[i + half] = FloatToBf16(y * c[i] + x * s[i]);
      }
    }
    // Values as they are.
    const float* values = projection + static_cast<size_t>(shape.heads + shape.kv_heads) * dim;
    for (int i = 0; i < kv_dim; ++i) row[kv_dim + i] = FloatToBf16(values[i]);
  }
}

void GqaPagedAttentionTwin(const uint16_t* queries, const uint16_t* cache,
                           const int32_t* block_tables, int max_blocks,
                           const int32_t* token_sequence, const int32_t* positions, uint16_t* out,
                           int tokens, const GqaShape& shape, int block_size, float scale) {
  const int dim = shape.head_dim;
  const int row_dim = shape.row_dim();
  const int kv_dim = shape.kv_heads * dim;
  std::vector<float> scores;
  for (int t = 0; t < tokens; ++t) {
    const int context = positions[t] + 1;
    const int32_t* table = block_tables + static_cast<size_t>(token_sequence[t]) * max_blocks;
    auto row = [&](int p) {
      return cache +
             (static_cast<int64_t>(table[p / block_size]) * block_size + p % block_size) * row_dim;
    };
    for (int h = 0; h < shape.heads; ++h) {
      const int kv_head = h / shape.heads_per_kv();
      const uint16_t* q = queries + (static_cast<size_t>(t) * shape.heads + h) * dim;
      scores.assign(context, 0.0f);
      float max = -std::numeric_limits<float>::infinity();
      for (int p = 0; p < context; ++p) {
        const uint16_t* key = row(p) + static_cast<size_t>(kv_head) * dim;
        float dot = 0;
        for (int d = 0; d < dim; ++d) dot += Bf16ToFloat(q[d]) * Bf16ToFloat(key[d]);
        scores[p] = dot * scale;
        max = std::max(max, scores[p]);
      }
      float sum = 0;
      for (float& score : scores) sum += (score = std::exp(score - max));
      for (int d = 0; d < dim; ++d) {
        float value = 0;
        for (int p = 0; p < context; ++p) {
          value += scores[p] * Bf16ToFloat(row(p)[kv_dim + static_cast<size_t>(kv_head) * dim + d]);
        }
        out[(static_cast<size_t>(t) * shape.heads + h) * dim + d] = FloatToBf16(value / sum);
      }
    }
  }
}

}  // namespace moeserve::kernels
