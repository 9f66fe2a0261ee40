#include "kernels/cpu_twins.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

namespace moeserve::kernels {

void RmsNormTwin(const uint16_t* x, const uint16_t* weight, uint16_t* out, int rows, int dim,
                 float eps) {
  for (int r = 0; r < rows; ++r) {
    float sum = 0;
    for (int i = 0; i < dim; ++i) {
      const float v = Bf16ToFloat(x[static_cast<size_t>(r) * dim + i]);
      sum += v * v;
    }
    const float inv = 1.0f / std::sqrt(sum / dim + eps);
    for (int i = 0; i < dim; ++i) {
      const size_t at = static_cast<size_t>(r) * dim + i;
      out[at] = FloatToBf16(Bf16ToFloat(x[at]) * inv * Bf16ToFloat(weight[i]));
    }
  }
}

void SiluMulTwin(const uint16_t* gate_up, uint16_t* out, int rows, int inter) {
  for (int r = 0; r < rows; ++r) {
    for (int i = 0; i < inter; ++i) {
      const float g = Bf16ToFloat(gate_up[static_cast<size_t>(r) * 2 * inter + i]);
      const float u = Bf16ToFloat(gate_up[static_cast<size_t>(r) * 2 * inter + inter + i]);
      out[static_cast<size_t>(r) * inter + i] = FloatToBf16(g / (1.0f + std::exp(-g)) * u);
    }
  }
}

void RopeInterleavedTwin(float* vectors, const int32_t* positions, const float* cos_table,
                         const float* sin_table, int rows, int heads, int dim) {
  const int half = dim / 2;
  for (int r = 0; r < rows; ++r) {
    const float* c = cos_table + static_cast<size_t>(positions[r]) * half;
    const float* s = sin_table + static_cast<size_t>(positions[r]) * half;
    for (int h = 0; h < heads; ++h) {
      float* v = vectors + (static_cast<size_t>(r) * heads + h) * dim;
      for (int i = 0; i < half; ++i) {
        const float even = v[2 * i], odd = v[2 * i + 1];
        v[2 * i] = even * c[i] - odd * s[i];
        v[2 * i + 1] = odd * c[i] + even * s[i];
      }
    }
  }
}

void EmbeddingTwin(const uint16_t* table, const int32_t* ids, uint16_t* out, int rows, int hidden) {
  for (int r = 0; r < rows; ++r) {
    std::memcpy(out + static_cast<size_t>(r) * hidden, table + static_cast<size_t>(ids[r]) * hidden,
                sizeof(uint16_t) * hidden);
  }
}

namespace {
// Index of the largest value among `allowed`, lowest index on ties; -1 if none.
int ArgMaxAllowed(const std::vector<float>& values, const std::vector<bool>& allowed) {
  int best = -1;
  for (size_t i = 0; i < values.size(); ++i) {
    if (allowed[i] && (best < 0 || values[i] > values[best])) best = static_cast<int>(i);
  }
  return best;
}
}  // namespace

void GateTopKTwin(const float* logits, const float* bias, int tokens, const GateOptions& o,
                  int32_t* experts, float* weights) {
  const int per_group = o.num_experts / o.num_groups;
  std::vector<float> scores(o.num_experts), choice(o.num_experts), group_scores(o.num_groups);
  for (int t = 0; t < tokens; ++t) {
    const float* row = logits + static_cast<size_t>(t) * o.num_experts;
    if (o.sigmoid) {
      for (int e = 0; e < o.num_experts; ++e) scores[e] = 1.0f / (1.0f + std::exp(-row[e]));
    } else {
      const float max = *std::max_element(row, row + o.num_experts);
      float sum = 0;
      for (int e = 0; e < o.num_experts; ++e) sum += scores[e] = std::exp(row[e] - max);
      for (float& s : scores) s /= sum;
    }
    for (int e = 0; e < o.num_experts; ++e) choice[e] = scores[e] + (bias ? bias[e] : 0.0f);
    std::vector<bool> allowed(o.num_experts, true);
    if (o.num_groups > 1) {
      for (int g = 0; g < o.num_groups; ++g) {
        std::vector<float> members(choice.begin() + g * per_group,
                                   choice.begin() + (g + 1) * per_group);
        std::vector<bool> all(per_group, true);
        const int first = ArgMaxAllowed(members, all);
        if (o.group_score_top2_sum) {
          all[first] = false;
          group_scores[g] = members[first] + members[ArgMaxAllowed(members, all)];
        } else {
          group_scores[g] = members[first];
        }
      }
      std::vector<bool> group_allowed(o.num_groups, true), chosen_group(o.num_groups, false);
      for (int i = 0; i < o.topk_groups; ++i) {
        const int g = ArgMaxAllowed(group_scores, group_allowed);
        group_allowed[g] = false;
        chosen_group[g] = true;
      }
      for (int e = 0; e < o.num_experts; ++e) allowed[e] = chosen_group[e / per_group];
    }
    float sum = 0;
    for (int k = 0; k < o.top_k; ++k) {
      const int e = ArgMaxAllowed(choice, allowed);
      allowed[e] = false;
      experts[t * o.top_k + k] = e;
      weights[t * o.top_k + k] = scores[e];
      sum += scores[e];
    }
    for (int k = 0; k < o.top_k; ++k) {
      float& w = weights[t * o.top_k + k];
      if (o.normalize) w /= (sum + 1e-20f);
      w *= o.scaling;
    }
  }
}

void PermuteRowsTwin(const uint16_t* x, const int32_t* source_rows, uint16_t* out, int rows,
                     int hidden) {
  for (int r = 0; r < rows; ++r) {
    std::memcpy(out + static_cast<size_t>(r) * hidden,
                x + static_cast<size_t>(source_rows[r]) * hidden, sizeof(uint16_t) * hidden);
  }
}

void WeightedUnpermuteTwin(const uint16_t* expert_rows, const int32_t* position,
                           const float* weights, const uint16_t* shared, uint16_t* out, int tokens,
                           int top_k, int hidden) {
  for (int t = 0; t < tokens; ++t) {
    for (int i = 0; i < hidden; ++i) {
      float sum = 0;
      for (int k = 0; k < top_k; ++k) {
        const size_t row = static_cast<size_t>(position[t * top_k + k]);
        sum += weights[t * top_k + k] * Bf16ToFloat(expert_rows[row * hidden + i]);
      }
      if (shared != nullptr) sum += Bf16ToFloat(shared[static_cast<size_t>(t) * hidden + i]);
      out[static_cast<size_t>(t) * hidden + i] = FloatToBf16(sum);
    }
  }
}

void GroupedLinearTwin(const uint16_t* x, const std::vector<const uint16_t*>& weights,
                       const std::vector<int64_t>& offsets, uint16_t* y, int n, int k) {
  for (size_t e = 0; e + 1 < offsets.size(); ++e) {
    for (int64_t m = offsets[e]; m < offsets[e + 1]; ++m) {
      for (int j = 0; j < n; ++j) {
        float sum = 0;
        for (int i = 0; i < k; ++i) {
          sum +=
              Bf16ToFloat(x[m * k + i]) * Bf16ToFloat(weights[e][static_cast<size_t>(j) * k + i]);
        }
        y[m * n + j] = FloatToBf16(sum);
      }
    }
  }
}

void PlanSlotsTwin(const int32_t* experts, int tokens, int top_k, const int32_t* replica_begin,
                   const int32_t* replica_slots, int slots, int32_t* offsets, int32_t* source_rows,
                   int32_t* positions, int32_t* load) {
  const int pairs = tokens * top_k;
  std::vector<int32_t> slot_of(pairs);
  std::vector<int32_t> next(slots + 1, 0);
  for (int p = 0; p < pairs; ++p) {
    const int32_t begin = replica_begin[experts[p]];
    const int32_t replicas = replica_begin[experts[p] + 1] - begin;
    slot_of[p] = replica_slots[begin + (p / top_k) % replicas];
    ++next[slot_of[p] + 1];
  }
  for (int s = 0; s < slots; ++s) {
    if (load != nullptr) load[s] += next[s + 1];
    next[s + 1] += next[s];
  }
  std::copy(next.begin(), next.end(), offsets);
  for (int p = 0; p < pairs; ++p) {
    positions[p] = next[slot_of[p]]++;
    source_rows[positions[p]] = p / top_k;
  }
}

namespace {
int32_t* TwinHeader(uint16_t* buffer, const ExchangeShape& shape, int p) {
  return reinterpret_cast<int32_t*>(buffer + shape.BlockOffset(p));
}
const int32_t* TwinHeader(const uint16_t* buffer, const ExchangeShape& shape, int p) {
  return reinterpret_cast<const int32_t*>(buffer + shape.BlockOffset(p));
}
}  // namespace

void PlanDestinationsTwin(const int32_t* experts, int tokens, int top_k,
                          const int32_t* replica_begin, const int32_t* replica_slots,
                          int slots_per_rank, int rank, const ExchangeShape& shape,
                          uint16_t* dispatch, int32_t* dispatch_index, int32_t* positions) {
  std::fill(dispatch_index, dispatch_index + shape.dispatch_rows(), -1);
  std::vector<int32_t> rows(shape.ranks, 0), entries(shape.ranks, 0);
  auto slot_of = [&](int token, int j) {
    const int expert = experts[token * top_k + j];
    const int32_t begin = replica_begin[expert];
    const int32_t replicas = replica_begin[expert + 1] - begin;
    return replica_slots[begin + (token + rank) % replicas];
  };
  for (int token = 0; token < tokens; ++token) {
    std::vector<int32_t> row_here(shape.ranks, -1);
    for (int j = 0; j < top_k; ++j) {
      const int slot = slot_of(token, j);
      const int p = slot / slots_per_rank;
      if (row_here[p] < 0) {
        row_here[p] = rows[p]++;
        if (row_here[p] < shape.rows) dispatch_index[shape.DispatchRow(p, row_here[p])] = token;
      }
      const int entry = entries[p]++;
      int32_t* header = TwinHeader(dispatch, shape, p);
      if (row_here[p] < shape.rows && entry < shape.entries) {
        header[ExchangeShape::kHeaderInts + 2 * entry] = slot % slots_per_rank;
        header[ExchangeShape::kHeaderInts + 2 * entry + 1] = row_here[p];
        positions[token * top_k + j] = p * shape.entries + entry;
      } else {
        positions[token * top_k + j] = 0;
      }
    }
  }
  int overflowed = 0;
  for (int p = 0; p < shape.ranks; ++p) {
    overflowed |= rows[p] > shape.rows || entries[p] > shape.entries;
  }
  for (int p = 0; p < shape.ranks; ++p) {
    int32_t* header = TwinHeader(dispatch, shape, p);
    header[0] = rows[p];
    header[1] = entries[p];
    header[2] = overflowed;
    header[3] = 0;
  }
}

void PlanReceivedTwin(const uint16_t* received, const ExchangeShape& shape, int slots,
                      int32_t* offsets, int32_t* source_rows, int32_t* grouped_rows, int32_t* load,
                      int32_t* overflow) {
  const int pairs = shape.ranks * shape.entries;
  std::vector<int32_t> slot_of(pairs, -1), next(slots + 1, 0);
  bool bad = false;
  for (int q = 0; q < pairs; ++q) {
    const int p = q / shape.entries, e = q % shape.entries;
    const int32_t* header = TwinHeader(received, shape, p);
    const int rows = header[0], entries = header[1];
    if (e == 0 && (header[2] != 0 || rows < 0 || rows > shape.rows || entries < 0 ||
                   entries > shape.entries)) {
      bad = true;
    }
    if (e >= std::min(entries, shape.entries)) continue;
    const int slot = header[ExchangeShape::kHeaderInts + 2 * e];
    const int row = header[ExchangeShape::kHeaderInts + 2 * e + 1];
    if (slot < 0 || slot >= slots || row < 0 || row >= std::min(rows, shape.rows)) {
      bad = true;
      continue;
    }
    slot_of[q] = slot;
    ++next[slot + 1];
  }
  for (int s = 0; s < slots; ++s) {
    if (load != nullptr) load[s] += next[s + 1];
    next[s + 1] += next[s];
  }
  std::copy(next.begin(), next.end(), offsets);
  for (int q = 0; q < pairs; ++q) {
    if (slot_of[q] < 0) {
      grouped_rows[q] = -1;
      continue;
    }
    const int p = q / shape.entries, e = q % shape.entries;
    const int row = TwinHeader(received, shape, p)[ExchangeShape::kHeaderInts + 2 * e + 1];
    grouped_rows[q] = next[slot_of[q]]++;
    source_rows[grouped_rows[q]] = static_cast<int32_t>(shape.DispatchRow(p, row));
  }
  if (bad) *overflow = 1;
}

void FillRandomBf16Twin(uint16_t* out, int64_t count, uint64_t seed, float scale) {
  for (int64_t i = 0; i < count; ++i) out[i] = FloatToBf16(RandomUniformValue(seed, i, scale));
}

void MlaWriteCacheTwin(const float* kv_a, const uint16_t* norm_weight, float eps,
                       const int32_t* positions, const int64_t* cache_rows, const float* cos_table,
                       const float* sin_table, uint16_t* cache, int tokens, int latent, int rope) {
  const int row_dim = latent + rope;
  const int half = rope / 2;
  for (int t = 0; t < tokens; ++t) {
    const float* in = kv_a + static_cast<size_t>(t) * row_dim;
    uint16_t* out = cache + cache_rows[t] * row_dim;
    float sum = 0;
    for (int i = 0; i < latent; ++i) sum += in[i] * in[i];
    const float inv = 1.0f / std::sqrt(sum / latent + eps);
    for (int i = 0; i < latent; ++i)
      out[i] = FloatToBf16(in[i] * inv * Bf16ToFloat(norm_weight[i]));
    const float* c = cos_table + static_cast<size_t>(positions[t]) * half;
    const float* s = sin_table + static_cast<size_t>(positions[t]) * half;
    for (int i = 0; i < half; ++i) {
      const float x = in[latent + 2 * i];
      const float y = in[latent + 2 * i + 1];
      out[latent + 2 * i] = FloatToBf16(x * c[i] - y * s[i]);
      out[latent + 2 * i + 1] = FloatToBf16(y * c[i] + x * s[i]);
    }
  }
}

void MlaQueryRopeTwin(const uint16_t* q, const int32_t* positions, const float* cos_table,
                      const float* sin_table, uint16_t* q_absorbed, int tokens, int heads, int nope,
                      int rope, int latent) {
  const int half = rope / 2;
  for (int t = 0; t < tokens; ++t) {
    const float* c = cos_table + static_cast<size_t>(positions[t]) * half;
    const float* s = sin_table + static_cast<size_t>(positions[t]) * half;
    for (int h = 0; h < heads; ++h) {
      const uint16_t* in = q + (static_cast<size_t>(t) * heads + h) * (nope + rope) + nope;
      uint16_t* out = q_absorbed + (static_cast<size_t>(t) * heads + h) * (latent + rope) + latent;
      for (int i = 0; i < half; ++i) {
        const float x = Bf16ToFloat(in[2 * i]);
        const float y = Bf16ToFloat(in[2 * i + 1]);
        out[2 * i] = FloatToBf16(x * c[i] - y * s[i]);
        out[2 * i + 1] = FloatToBf16(y * c[i] + x * s[i]);
      }
    }
  }
}

void MlaPagedAttentionTwin(const uint16_t* q_absorbed, const uint16_t* cache,
                           const int32_t* block_tables, int max_blocks,
                           const int32_t* token_sequence, const int32_t* positions, uint16_t* out,
                           int tokens, int heads, int latent, int rope, int block_size,
                           float scale) {
  const int row_dim = latent + rope;
  std::vector<float> scores;
  for (int t = 0; t < tokens; ++t) {
    const int context = positions[t] + 1;
    const int32_t* table = block_tables + static_cast<size_t>(token_sequence[t]) * max_blocks;
    auto row = [&](int p) {
      return cache +
             (static_cast<int64_t>(table[p / block_size]) * block_size + p % block_size) * row_dim;
    };
    for (int h = 0; h < heads; ++h) {
      const uint16_t* q = q_absorbed + (static_cast<size_t>(t) * heads + h) * row_dim;
      scores.assign(context, 0.0f);
      float max = -std::numeric_limits<float>::infinity();
      for (int p = 0; p < context; ++p) {
        float dot = 0;
        for (int d = 0; d < row_dim; ++d) dot += Bf16ToFloat(q[d]) * Bf16ToFloat(row(p)[d]);
        scores[p] = dot * scale;
        max = std::max(max, scores[p]);
      }
      float sum = 0;
      for (float& s : scores) sum += (s = std::exp(s - max));
      for (int d = 0; d < latent; ++d) {
        float value = 0;
        for (int p = 0; p < context; ++p) value += scores[p] * Bf16ToFloat(row(p)[d]);
        out[(static_cast<size_t>(t) * heads + h) * latent + d] = FloatToBf16(value / sum);
      }
    }
  }
}

void LogitHeadsTwin(const float* logits, int rows, int vocab, const LogitHeadParams* params,
                    int32_t* ids, float* values, double* kept_weight) {
  std::vector<int32_t> order(vocab);
  for (int r = 0; r < rows; ++r) {
    const LogitHeadParams& p = params[r];
    if (p.head_size <= 0) continue;
    const float* row = logits + static_cast<int64_t>(r) * vocab;
    auto before = [&](int32_t a, int32_t b) {
      return row[a] > row[b] || (row[a] == row[b] && a < b);
    };
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + p.head_size, order.end(), before);
    for (int j = 0; j < p.head_size; ++j) {
      ids[p.output_offset + j] = order[j];
      values[p.output_offset + j] = row[order[j]];
    }
    if (!p.kept_weight_needed) continue;
    const double max_logit = row[order[0]];
    if (p.keep_limit < vocab) {
      std::nth_element(order.begin(), order.begin() + p.keep_limit, order.end(), before);
    }
    double total = 0.0;
    for (int j = 0; j < std::min(p.keep_limit, vocab); ++j) {
      total += std::exp((row[order[j]] - max_logit) / p.temperature);
    }
    kept_weight[r] = total;
  }
}

}  // namespace moeserve::kernels
