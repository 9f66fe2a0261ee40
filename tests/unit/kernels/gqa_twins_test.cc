// The GQA kernels' CPU twins against the engine's fp32 grouped-query attention: the twins are
// the reference the GPU kernels are tested against (tests/gpu/cuda_backend_gqa_test.cc), so
// they must compute what the model code computes — per-head q/k norms, rotate-half RoPE, the
// cache row layout and causal attention over paged rows, through chunked prefill and decode.
#include "kernels/gqa_twins.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "engine/model/gqa_attention.h"
#include "engine/model/kv_rows.h"
#include "engine/model/rope.h"
#include "engine/ops/cpu_ops.h"
#include "gtest/gtest.h"
#include "kernels/bf16.h"

namespace moeserve::kernels {
namespace {

std::vector<float> Random(size_t count, std::mt19937& rng, float scale, float offset = 0.0f) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> values(count);
  for (float& v : values) v = offset + scale * normal(rng);
  return values;
}

// Values that bf16 holds exactly, so that both sides use the same weights.
std::vector<float> RoundedToBf16(std::vector<float> values) {
  for (float& v : values) v = Bf16ToFloat(FloatToBf16(v));
  return values;
}

std::vector<uint16_t> ToBf16(const std::vector<float>& values) {
  std::vector<uint16_t> out(values.size());
  for (size_t i = 0; i < values.size(); ++i) out[i] = FloatToBf16(values[i]);
  return out;
}

TEST(GqaTwins, ChunkedAttentionMatchesTheEngineWithinBf16) {
  for (const bool qk_norm : {true, false}) {  // Qwen3-MoE, Mixtral
    engine::ModelConfig c;
    c.model_type = qk_norm ? "qwen3_moe" : "mixtral";
    c.attention_type = engine::AttentionType::kGroupedQuery;
    c.num_attention_heads = 8;
    c.num_key_value_heads = 2;
    c.head_dim = 32;
    c.hidden_size = c.num_attention_heads * c.head_dim;  // o_proj = identity shows the heads
    c.qk_norm = qk_norm;
    c.rope_interleaved = false;
    c.rope_theta = 1e6;
    c.max_position_embeddings = 256;
    c.rms_norm_eps = 1e-6;
    const GqaShape shape{c.num_attention_heads, c.num_key_value_heads, c.head_dim};
    const int hidden = c.hidden_size;
    const int q_dim = shape.heads * shape.head_dim;
    const int kv_dim = shape.kv_heads * shape.head_dim;

    std::mt19937 rng(qk_norm ? 11 : 12);
    const float matrix_scale = 1.0f / std::sqrt(static_cast<float>(hidden));
    const std::vector<float> q_proj =
        Random(static_cast<size_t>(q_dim) * hidden, rng, matrix_scale);
    const std::vector<float> k_proj =
        Random(static_cast<size_t>(kv_dim) * hidden, rng, matrix_scale);
    const std::vector<float> v_proj =
        Random(static_cast<size_t>(kv_dim) * hidden, rng, matrix_scale);
    const std::vector<float> q_norm = RoundedToBf16(Random(shape.head_dim, rng, 0.1f, 1.0f));
    const std::vector<float> k_norm = RoundedToBf16(Random(shape.head_dim, rng, 0.1f, 1.0f));
    std::vector<float> o_proj(static_cast<size_t>(hidden) * q_dim, 0.0f);
    for (int i = 0; i < hidden; ++i) o_proj[static_cast<size_t>(i) * q_dim + i] = 1.0f;
    engine::AttentionWeights weights;
    weights.q_proj = q_proj.data();
    weights.k_proj = k_proj.data();
    weights.v_proj = v_proj.data();
    weights.o_proj = o_proj.data();
    if (qk_norm) {
      weights.q_norm = q_norm.data();
      weights.k_norm = k_norm.data();
    }
    const engine::RotaryEmbedding rope(c);
    engine::GroupedQueryAttention attention(c, rope);
    std::vector<float> cos_table, sin_table;
    rope.Table(c.max_position_embeddings, cos_table, sin_table);

    // Two sequences in blocks of 4 rows, their tables out of order: a prefill of 9 then of 6
    // tokens (sequence 0) beside one of 5 (sequence 1); then one decode token each.
    const int block_size = 4, num_blocks = 12, max_blocks = 6;
    const std::vector<std::vector<int32_t>> tables = {{7, 2, 9, 0, 5, 11}, {3, 10, 1, 8, 6, 4}};
    std::vector<int32_t> flat_tables;
    for (const auto& table : tables)
      flat_tables.insert(flat_tables.end(), table.begin(), table.end());
    engine::KvRows engine_cache(1, num_blocks, block_size, shape.row_dim());
    std::vector<uint16_t> twin_cache(static_cast<size_t>(num_blocks) * block_size *
                                     shape.row_dim());
    int cached[2] = {0, 0};
    struct Chunk {
      int sequence;
      int tokens;
    };
    const std::vector<std::vector<Chunk>> steps = {{{0, 9}, {1, 5}}, {{0, 6}}, {{0, 1}, {1, 1}}};
    for (const std::vector<Chunk>& step : steps) {
      int tokens = 0;
      std::vector<engine::SequenceSpan> spans;
      std::vector<int32_t> positions, token_sequence;
      std::vector<int64_t> cache_rows;
      for (const Chunk& chunk : step) {
        spans.push_back({tokens, chunk.tokens, cached[chunk.sequence], &tables[chunk.sequence]});
        for (int i = 0; i < chunk.tokens; ++i) {
          const int position = cached[chunk.sequence] + i;
          positions.push_back(position);
          token_sequence.push_back(chunk.sequence);
          cache_rows.push_back(static_cast<int64_t>(tables[chunk.sequence][position / block_size]) *
                                   block_size +
                               position % block_size);
        }
        tokens += chunk.tokens;
        cached[chunk.sequence] += chunk.tokens;
      }
      const std::vector<float> x = Random(static_cast<size_t>(tokens) * hidden, rng, 1.0f);
      std::vector<float> expected(static_cast<size_t>(tokens) * hidden);
      attention.Forward(0, weights, x.data(), tokens, spans, engine_cache, expected.data());

      // The twins from the same fp32 projection.
      std::vector<float> qkv(static_cast<size_t>(tokens) * shape.projection_dim());
      const int width = shape.projection_dim();
      engine::cpu::Gemm(false, true, tokens, q_dim, hidden, 1.0f, x.data(), hidden, q_proj.data(),
                        hidden, 0.0f, qkv.data(), width);
      engine::cpu::Gemm(false, true, tokens, kv_dim, hidden, 1.0f, x.data(), hidden, k_proj.data(),
                        hidden, 0.0f, qkv.data() + q_dim, width);
      engine::cpu::Gemm(false, true, tokens, kv_dim, hidden, 1.0f, x.data(), hidden, v_proj.data(),
                        hidden, 0.0f, qkv.data() + q_dim + kv_dim, width);
      const std::vector<uint16_t> q_norm_bf16 = ToBf16(q_norm), k_norm_bf16 = ToBf16(k_norm);
      std::vector<uint16_t> queries(static_cast<size_t>(tokens) * q_dim);
      GqaWriteCacheTwin(qkv.data(), qk_norm ? q_norm_bf16.data() : nullptr,
                        qk_norm ? k_norm_bf16.data() : nullptr, static_cast<float>(c.rms_norm_eps),
                        positions.data(), cache_rows.data(), cos_table.data(), sin_table.data(),
                        queries.data(), twin_cache.data(), tokens, shape);
      std::vector<uint16_t> attended(static_cast<size_t>(tokens) * q_dim);
      GqaPagedAttentionTwin(queries.data(), twin_cache.data(), flat_tables.data(), max_blocks,
                            token_sequence.data(), positions.data(), attended.data(), tokens, shape,
                            block_size, static_cast<float>(c.attention_softmax_scale()));

      // The rows the step wrote hold the engine's keys and values, rounded once to bf16.
      for (int t = 0; t < tokens; ++t) {
        const float* engine_row =
            engine_cache.Row(0, static_cast<int32_t>(cache_rows[t] / block_size),
                             static_cast<int>(cache_rows[t] % block_size));
        const uint16_t* twin_row = &twin_cache[cache_rows[t] * shape.row_dim()];
        for (int i = 0; i < shape.row_dim(); ++i) {
          EXPECT_NEAR(Bf16ToFloat(twin_row[i]), engine_row[i],
                      1e-2 * std::fabs(engine_row[i]) + 1e-5)
              << "token " << t << " value " << i;
        }
      }
      double diff = 0, scale = 0;
      for (size_t i = 0; i < expected.size(); ++i) {
        diff =
            std::max(diff, std::fabs(static_cast<double>(Bf16ToFloat(attended[i])) - expected[i]));
        scale = std::max(scale, std::fabs(static_cast<double>(expected[i])));
      }
      EXPECT_LT(diff / scale, 2e-2)
          << (qk_norm ? "qwen3_moe" : "mixtral") << ", " << tokens << " tokens";
    }
  }
}

}  // namespace
}  // namespace moeserve::kernels
