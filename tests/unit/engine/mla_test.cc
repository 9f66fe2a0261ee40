// MlaAttention (absorbed MLA over the paged latent KV cache) against a naive, non-absorbed MLA
// written here in double precision: per head, keys k = [W_UK · latent, rotated k_pe] and values
// W_UV · latent, causal softmax with the config's scale, then o_proj.
#include <algorithm>
#include <cmath>
#include <numbers>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "engine/model/attention.h"
#include "engine/model/kv_rows.h"
#include "engine/model/model_config.h"
#include "engine/model/rope.h"
#include "engine/model/weights.h"
#include "gtest/gtest.h"

namespace moeserve::engine {
namespace {

constexpr int kBlockSize = 4;
constexpr int kNumBlocks = 16;

struct Variant {
  std::string name;
  int q_lora_rank;
  bool yarn;
};

void PrintTo(const Variant& variant, std::ostream* os) { *os << variant.name; }

ModelConfig SmallConfig(const Variant& variant) {
  ModelConfig c;
  c.name = "test:mla";
  c.model_type = "deepseek_v3";
  c.vocab_size = 8;
  c.bos_token_id = 0;
  c.eos_token_id = 1;
  c.hidden_size = 16;
  c.intermediate_size = 8;
  c.num_hidden_layers = 1;
  c.first_k_dense_replace = 1;
  c.n_routed_experts = 0;
  c.num_attention_heads = 2;
  c.q_lora_rank = variant.q_lora_rank;
  c.kv_lora_rank = 8;
  c.qk_nope_head_dim = 4;
  c.qk_rope_head_dim = 4;
  c.v_head_dim = 4;
  c.max_position_embeddings = 64;
  c.rope_theta = 10000.0;
  c.rms_norm_eps = 1e-6;
  if (variant.yarn) {
    c.rope_scaling.type = RopeScaling::Type::kYarn;
    c.rope_scaling.factor = 4.0;
    c.rope_scaling.original_max_position_embeddings = 16;
    c.rope_scaling.beta_fast = 32.0;
    c.rope_scaling.beta_slow = 1.0;
    c.rope_scaling.mscale = 1.0;
    c.rope_scaling.mscale_all_dim = 0.8;
  }
  return c;
}

// ---- The naive reference (double precision, independent of engine code) ----

using Vec = std::vector<double>;

// y = W x with W row-major [out, in] (Hugging Face linear layout).
Vec LinearRef(const Vec& x, const float* w, int in, int out) {
  Vec y(out, 0.0);
  for (int o = 0; o < out; ++o) {
    for (int i = 0; i < in; ++i) y[o] += static_cast<double>(w[o * in + i]) * x[i];
  }
  return y;
}

Vec RmsNormRef(const Vec& x, const float* weight, double eps) {
  double mean_square = 0;
  for (double v : x) mean_square += v * v;
  mean_square /= static_cast<double>(x.size());
  Vec y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = x[i] / std::sqrt(mean_square + eps) * weight[i];
  return y;
}

double Mscale(double factor, double m) {
  return factor <= 1.0 ? 1.0 : 0.1 * m * std::log(factor) + 1.0;
}

// Inverse frequencies and cos/sin magnitude, from the RoPE / YaRN formulas.
struct RopeRef {
  Vec inverse_frequencies;
  double magnitude = 1.0;

  explicit RopeRef(const ModelConfig& c) {
    const int d = c.qk_rope_head_dim;
    const double theta = c.rope_theta;
    for (int i = 0; i < d / 2; ++i) inverse_frequencies.push_back(std::pow(theta, -2.0 * i / d));
    if (c.rope_scaling.type != RopeScaling::Type::kYarn) return;
    const RopeScaling& y = c.rope_scaling;
    auto correction = [&](double rotations) {
      return d * std::log(y.original_max_position_embeddings / (rotations * 2 * std::numbers::pi)) /
             (2 * std::log(theta));
    };
    const double low = std::max(std::floor(correction(y.beta_fast)), 0.0);
    double high = std::min(std::ceil(correction(y.beta_slow)), d - 1.0);
    if (high == low) high += 0.001;
    for (int i = 0; i < d / 2; ++i) {
      const double ramp = std::clamp((i - low) / (high - low), 0.0, 1.0);
      const double extra = inverse_frequencies[i];
      inverse_frequencies[i] = extra / y.factor * ramp + extra * (1 - ramp);
    }
    magnitude = Mscale(y.factor, y.mscale) / Mscale(y.factor, y.mscale_all_dim);
  }

  // Rotates interleaved pairs (2i, 2i+1) of `v[offset, offset + d)`.
  void Apply(Vec& v, int offset, int position) const {
    for (size_t i = 0; i < inverse_frequencies.size(); ++i) {
      const double angle = position * inverse_frequencies[i];
      const double x = v[offset + 2 * i], y = v[offset + 2 * i + 1];
      v[offset + 2 * i] = magnitude * (x * std::cos(angle) - y * std::sin(angle));
      v[offset + 2 * i + 1] = magnitude * (y * std::cos(angle) + x * std::sin(angle));
    }
  }
};

struct NaiveResult {
  std::vector<Vec> output;     // [tokens][hidden]
  std::vector<Vec> cache_row;  // [tokens][kv_lora + rope]: normalized latent, rotated k_pe
};

// Causal MLA over one sequence whose tokens are at positions 0..T-1.
NaiveResult NaiveMla(const ModelConfig& c, const AttentionWeights& w,
                     const std::vector<float>& input, int num_tokens) {
  const int hidden = c.hidden_size, heads = c.num_attention_heads;
  const int nope = c.qk_nope_head_dim, rope_dim = c.qk_rope_head_dim, v_dim = c.v_head_dim;
  const int qk = nope + rope_dim, latent_dim = c.kv_lora_rank;
  const RopeRef rope(c);
  const double scale =
      1.0 / std::sqrt(static_cast<double>(qk)) *
      (c.rope_scaling.type == RopeScaling::Type::kYarn && c.rope_scaling.mscale_all_dim != 0
           ? std::pow(Mscale(c.rope_scaling.factor, c.rope_scaling.mscale_all_dim), 2)
           : 1.0);

  std::vector<Vec> queries, keys, values;  // queries/keys [T][heads * qk], values [T][heads * v]
  NaiveResult result;
  for (int t = 0; t < num_tokens; ++t) {
    Vec x(input.begin() + t * hidden, input.begin() + (t + 1) * hidden);
    Vec q;
    if (c.q_lora_rank > 0) {
      q = LinearRef(RmsNormRef(LinearRef(x, w.q_a_proj, hidden, c.q_lora_rank), w.q_a_layernorm,
                               c.rms_norm_eps),
                    w.q_b_proj, c.q_lora_rank, heads * qk);
    } else {
      q = LinearRef(x, w.q_proj, hidden, heads * qk);
    }
    for (int h = 0; h < heads; ++h) rope.Apply(q, h * qk + nope, t);
    const Vec kv_a = LinearRef(x, w.kv_a_proj_with_mqa, hidden, latent_dim + rope_dim);
    const Vec latent =
        RmsNormRef(Vec(kv_a.begin(), kv_a.begin() + latent_dim), w.kv_a_layernorm, c.rms_norm_eps);
    Vec k_pe(kv_a.begin() + latent_dim, kv_a.end());
    rope.Apply(k_pe, 0, t);
    Vec row = latent;
    row.insert(row.end(), k_pe.begin(), k_pe.end());
    result.cache_row.push_back(row);
    // Non-absorbed: expand the latent to per-head keys and values with kv_b_proj.
    const Vec kv = LinearRef(latent, w.kv_b_proj, latent_dim, heads * (nope + v_dim));
    Vec k(heads * qk), v(heads * v_dim);
    for (int h = 0; h < heads; ++h) {
      for (int i = 0; i < nope; ++i) k[h * qk + i] = kv[h * (nope + v_dim) + i];
      for (int i = 0; i < rope_dim; ++i) k[h * qk + nope + i] = k_pe[i];
      for (int i = 0; i < v_dim; ++i) v[h * v_dim + i] = kv[h * (nope + v_dim) + nope + i];
    }
    queries.push_back(q);
    keys.push_back(k);
    values.push_back(v);
  }
  for (int t = 0; t < num_tokens; ++t) {
    Vec attended(heads * v_dim, 0.0);
    for (int h = 0; h < heads; ++h) {
      Vec scores(t + 1);
      for (int s = 0; s <= t; ++s) {
        double dot = 0;
        for (int i = 0; i < qk; ++i) dot += queries[t][h * qk + i] * keys[s][h * qk + i];
        scores[s] = dot * scale;
      }
      const double max_score = *std::max_element(scores.begin(), scores.end());
      double total = 0;
      for (double& s : scores) total += (s = std::exp(s - max_score));
      for (int s = 0; s <= t; ++s) {
        for (int i = 0; i < v_dim; ++i) {
          attended[h * v_dim + i] += scores[s] / total * values[s][h * v_dim + i];
        }
      }
    }
    result.output.push_back(LinearRef(attended, w.o_proj, heads * v_dim, hidden));
  }
  return result;
}

// ---- Helpers ----

std::vector<float> RandomInput(int num_tokens, int hidden, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(num_tokens) * hidden);
  for (float& v : x) v = normal(rng);
  return x;
}

// max |actual - expected| / max |expected| over all rows.
double RelativeError(const std::vector<float>& actual, const std::vector<Vec>& expected) {
  double max_error = 0, max_value = 0;
  size_t index = 0;
  for (const Vec& row : expected) {
    for (double e : row) {
      max_error = std::max(max_error, std::abs(actual[index++] - e));
      max_value = std::max(max_value, std::abs(e));
    }
  }
  EXPECT_EQ(index, actual.size());
  return max_error / max_value;
}

double RelativeError(const std::vector<float>& actual, const std::vector<float>& expected) {
  std::vector<Vec> rows{Vec(expected.begin(), expected.end())};
  return RelativeError(actual, rows);
}

class MlaTest : public ::testing::TestWithParam<Variant> {
 protected:
  MlaTest()
      : config_(SmallConfig(GetParam())),
        weights_(ModelWeights::Generate(config_, 1234)),
        rope_(config_),
        attention_(config_, rope_) {}

  const AttentionWeights& weights() const { return weights_.layer(0).attention; }
  int row_dim() const { return config_.kv_lora_rank + config_.qk_rope_head_dim; }
  KvRows NewCache() const { return KvRows(1, kNumBlocks, kBlockSize, row_dim()); }

  // Runs one call over `spans` (whose tokens are rows of `input`) and returns the output rows.
  std::vector<float> Run(const std::vector<float>& input, std::vector<SequenceSpan> spans,
                         KvRows& cache) const {
    int tokens = 0;
    for (const auto& s : spans) tokens += s.num_tokens;
    std::vector<float> output(static_cast<size_t>(tokens) * config_.hidden_size, -1.0f);
    attention_.Forward(0, weights(), input.data(), tokens, spans, cache, output.data());
    return output;
  }

  ModelConfig config_;
  ModelWeights weights_;
  RotaryEmbedding rope_;
  MlaAttention attention_;
};

TEST_P(MlaTest, MatchesNaiveNonAbsorbedAttention) {
  const int tokens = 11;
  const std::vector<float> input = RandomInput(tokens, config_.hidden_size, 7);
  KvRows cache = NewCache();
  const std::vector<int32_t> blocks = {0, 1, 2};
  const std::vector<float> output = Run(input, {{0, tokens, 0, &blocks}}, cache);
  const NaiveResult expected = NaiveMla(config_, weights(), input, tokens);
  EXPECT_LE(RelativeError(output, expected.output), 1e-5);
}

TEST_P(MlaTest, CacheHoldsNormalizedLatentAndRotatedRopeKey) {
  const int tokens = 6;
  const std::vector<float> input = RandomInput(tokens, config_.hidden_size, 8);
  KvRows cache = NewCache();
  const std::vector<int32_t> blocks = {3, 9};
  Run(input, {{0, tokens, 0, &blocks}}, cache);
  const NaiveResult expected = NaiveMla(config_, weights(), input, tokens);
  for (int p = 0; p < tokens; ++p) {
    const float* row = cache.Row(0, blocks[p / kBlockSize], p % kBlockSize);
    std::vector<float> actual(row, row + row_dim());
    EXPECT_LE(RelativeError(actual, {expected.cache_row[p]}), 1e-5) << "position " << p;
  }
}

TEST_P(MlaTest, ChunkedPrefillEqualsOneCall) {
  const int tokens = 10;
  const int hidden = config_.hidden_size;
  const std::vector<float> input = RandomInput(tokens, hidden, 9);
  const std::vector<int32_t> blocks = {0, 1, 2};
  KvRows whole_cache = NewCache();
  const std::vector<float> whole = Run(input, {{0, tokens, 0, &blocks}}, whole_cache);

  // First 3 tokens, then the remaining 7 starting at position 3 (crossing a block boundary).
  KvRows chunked_cache = NewCache();
  const std::vector<float> first(input.begin(), input.begin() + 3 * hidden);
  const std::vector<float> rest(input.begin() + 3 * hidden, input.end());
  std::vector<float> chunked = Run(first, {{0, 3, 0, &blocks}}, chunked_cache);
  const std::vector<float> second = Run(rest, {{0, tokens - 3, 3, &blocks}}, chunked_cache);
  chunked.insert(chunked.end(), second.begin(), second.end());
  EXPECT_LE(RelativeError(chunked, whole), 1e-5);

  // Token by token (decode), as the scheduler does after prefill.
  KvRows decode_cache = NewCache();
  std::vector<float> decoded;
  for (int t = 0; t < tokens; ++t) {
    const std::vector<float> one(input.begin() + t * hidden, input.begin() + (t + 1) * hidden);
    const std::vector<float> out = Run(one, {{0, 1, t, &blocks}}, decode_cache);
    decoded.insert(decoded.end(), out.begin(), out.end());
  }
  EXPECT_LE(RelativeError(decoded, whole), 1e-5);
  EXPECT_LE(RelativeError(decoded, NaiveMla(config_, weights(), input, tokens).output), 1e-5);
}

TEST_P(MlaTest, ScatteredOutOfOrderBlockTableGivesTheSameResult) {
  const int tokens = 11;
  const std::vector<float> input = RandomInput(tokens, config_.hidden_size, 10);
  KvRows contiguous_cache = NewCache();
  const std::vector<int32_t> contiguous = {0, 1, 2};
  const std::vector<float> expected = Run(input, {{0, tokens, 0, &contiguous}}, contiguous_cache);

  KvRows scattered_cache = NewCache();
  const std::vector<int32_t> scattered = {13, 4, 9};
  const std::vector<float> first =
      Run(std::vector<float>(input.begin(), input.begin() + 5 * config_.hidden_size),
          {{0, 5, 0, &scattered}}, scattered_cache);
  std::vector<float> actual = first;
  const std::vector<float> second =
      Run(std::vector<float>(input.begin() + 5 * config_.hidden_size, input.end()),
          {{0, tokens - 5, 5, &scattered}}, scattered_cache);
  actual.insert(actual.end(), second.begin(), second.end());
  EXPECT_LE(RelativeError(actual, expected), 1e-5);
  // Blocks outside the table are untouched.
  for (int32_t block : {0, 1, 2, 3, 5}) {
    for (int offset = 0; offset < kBlockSize; ++offset) {
      const float* row = scattered_cache.Row(0, block, offset);
      EXPECT_TRUE(std::all_of(row, row + row_dim(), [](float v) { return v == 0.0f; }))
          << "block " << block;
    }
  }
}

TEST_P(MlaTest, SequencesInOneBatchDoNotSeeEachOther) {
  // Sequence A (6 tokens) and sequence B (9 tokens) prefilled together, then A decodes a 7th
  // token while B's last 2 tokens are prefilled in the same call.
  const int hidden = config_.hidden_size;
  const std::vector<float> a = RandomInput(7, hidden, 11);
  const std::vector<float> b = RandomInput(11, hidden, 12);
  const std::vector<int32_t> a_blocks = {5, 1};
  const std::vector<int32_t> b_blocks = {2, 8, 0};
  KvRows cache = NewCache();

  std::vector<float> batch1(a.begin(), a.begin() + 6 * hidden);
  batch1.insert(batch1.end(), b.begin(), b.begin() + 9 * hidden);
  const std::vector<float> out1 = Run(batch1, {{0, 6, 0, &a_blocks}, {6, 9, 0, &b_blocks}}, cache);

  std::vector<float> batch2(b.begin() + 9 * hidden, b.end());  // B first in the batch this time
  batch2.insert(batch2.end(), a.begin() + 6 * hidden, a.end());
  const std::vector<float> out2 = Run(batch2, {{0, 2, 9, &b_blocks}, {2, 1, 6, &a_blocks}}, cache);

  const NaiveResult ref_a = NaiveMla(config_, weights(), a, 7);
  const NaiveResult ref_b = NaiveMla(config_, weights(), b, 11);
  std::vector<float> actual_a(out1.begin(), out1.begin() + 6 * hidden);
  actual_a.insert(actual_a.end(), out2.begin() + 2 * hidden, out2.end());
  std::vector<float> actual_b(out1.begin() + 6 * hidden, out1.end());
  actual_b.insert(actual_b.end(), out2.begin(), out2.begin() + 2 * hidden);
  EXPECT_LE(RelativeError(actual_a, ref_a.output), 1e-5);
  EXPECT_LE(RelativeError(actual_b, ref_b.output), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(
    Variants, MlaTest,
    ::testing::Values(Variant{"QLoraPlainRope", 8, false}, Variant{"NoQLoraPlainRope", 0, false},
                      Variant{"QLoraYarn", 8, true}, Variant{"NoQLoraYarn", 0, true}),
    [](const ::testing::TestParamInfo<Variant>& info) { return info.param.name; });

}  // namespace
}  // namespace moeserve::engine
