#include "engine/model/moe.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "engine/model/architecture.h"
#include "engine/ops/cpu_ops.h"

namespace moeserve::engine {
namespace {

// Indices of the `k` largest values, largest first; ties go to the lower index.
std::vector<int> TopKIndices(const float* values, int count, int k) {
  std::vector<int> order(count);
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int a, int b) {
    return values[a] > values[b] || (values[a] == values[b] && a < b);
  });
  order.resize(k);
  return order;
}

}  // namespace

Routing RouteTokens(const ModelConfig& c, const float* gate_logits, int num_tokens,
                    const float* correction_bias) {
  const RoutingRule rule = RoutingRuleOf(c);
  const int num_experts = c.n_routed_experts;
  const int top_k = c.num_experts_per_tok;
  const int experts_per_group = num_experts / rule.num_groups;
  Routing routing{num_tokens, top_k, std::vector<int32_t>(num_tokens * top_k),
                  std::vector<float>(num_tokens * top_k)};
  std::vector<float> scores(num_experts), choice(num_experts), group_scores(rule.num_groups);
  for (int t = 0; t < num_tokens; ++t) {
    const float* logits = gate_logits + static_cast<int64_t>(t) * num_experts;
    if (rule.sigmoid) {
      for (int e = 0; e < num_experts; ++e) scores[e] = 1.0f / (1.0f + std::exp(-logits[e]));
    } else {
      std::copy(logits, logits + num_experts, scores.begin());
      cpu::SoftmaxInPlace(scores.data(), num_experts);
    }
    for (int e = 0; e < num_experts; ++e) {
      choice[e] = scores[e] + (correction_bias != nullptr ? correction_bias[e] : 0.0f);
    }
    if (rule.group_limited) {
      for (int g = 0; g < rule.num_groups; ++g) {
        const float* group = &choice[g * experts_per_group];
        if (rule.group_score_top2_sum) {
          auto best = TopKIndices(group, experts_per_group, 2);
          group_scores[g] = group[best[0]] + group[best[1]];
        } else {
          group_scores[g] = *std::max_element(group, group + experts_per_group);
        }
      }
      std::vector<bool> group_chosen(rule.num_groups, false);
      for (int g : TopKIndices(group_scores.data(), rule.num_groups, rule.topk_groups)) {
        group_chosen[g] = true;
      }
      for (int e = 0; e < num_experts; ++e) {
        if (!group_chosen[e / experts_per_group])
          choice[e] = -std::numeric_limits<float>::infinity();
      }
    }
    const std::vector<int> chosen = TopKIndices(choice.data(), num_experts, top_k);
    float sum = 0.0f;
    for (int k = 0; k < top_k; ++k) sum += scores[chosen[k]];
    for (int k = 0; k < top_k; ++k) {
      float weight = scores[chosen[k]];
      if (rule.normalize) weight /= (sum + 1e-20f);
      routing.experts[t * top_k + k] = chosen[k];
      routing.weights[t * top_k + k] = weight * rule.scaling;
    }
  }
  return routing;
}

Routing ComputeRouting(const ModelConfig& c, const MoeWeights& w, const float* x, int num_tokens) {
  std::vector<float> logits(static_cast<size_t>(num_tokens) * c.n_routed_experts);
  cpu::Linear(x, w.gate, logits.data(), num_tokens, c.hidden_size, c.n_routed_experts);
  return RouteTokens(c, logits.data(), num_tokens, w.e_score_correction_bias);
}

void RunMlp(const MlpWeights& mlp, const float* input, int64_t num_rows, int hidden,
            float* output) {
  if (num_rows == 0) return;
  const int64_t inter = mlp.intermediate_size;
  std::vector<float> gate(num_rows * inter), up(num_rows * inter);
  cpu::Linear(input, mlp.gate_proj, gate.data(), num_rows, hidden, inter);
  cpu::Linear(input, mlp.up_proj, up.data(), num_rows, hidden, inter);
  cpu::SiluMul(gate.data(), up.data(), num_rows * inter);
  cpu::Linear(gate.data(), mlp.down_proj, output, num_rows, inter, hidden);
}

std::vector<float> RunRoutedExpertsLocally(const MoeWeights& w, const Routing& routing,
                                           const float* x, int hidden) {
  const int num_experts = static_cast<int>(w.experts.size());
  const int assignments = routing.num_tokens * routing.top_k;
  std::vector<std::vector<int>> rows_of_expert(num_experts);
  for (int a = 0; a < assignments; ++a) rows_of_expert[routing.experts[a]].push_back(a);
  std::vector<float> outputs(static_cast<size_t>(assignments) * hidden);
  std::vector<float> gathered, result;
  for (int e = 0; e < num_experts; ++e) {
    const auto& rows = rows_of_expert[e];
    if (rows.empty()) continue;
    gathered.resize(rows.size() * hidden);
    result.resize(rows.size() * hidden);
    for (size_t i = 0; i < rows.size(); ++i) {
      const int token = rows[i] / routing.top_k;
      std::copy_n(x + static_cast<int64_t>(token) * hidden, hidden, &gathered[i * hidden]);
    }
    RunMlp(w.experts[e], gathered.data(), rows.size(), hidden, result.data());
    for (size_t i = 0; i < rows.size(); ++i) {
      std::copy_n(&result[i * hidden], hidden, &outputs[static_cast<size_t>(rows[i]) * hidden]);
    }
  }
  return outputs;
}

void CombineExpertOutputs(const Routing& routing, const float* expert_outputs,
                          const float* shared_output, int hidden, float* output) {
  for (int t = 0; t < routing.num_tokens; ++t) {
    float* out = output + static_cast<int64_t>(t) * hidden;
    std::fill(out, out + hidden, 0.0f);
    for (int k = 0; k < routing.top_k; ++k) {
      const float weight = routing.weights[t * routing.top_k + k];
      const float* row = expert_outputs + static_cast<int64_t>(t * routing.top_k + k) * hidden;
      for (int i = 0; i < hidden; ++i) out[i] += weight * row[i];
    }
    if (shared_output != nullptr) {
      const float* shared = shared_output + static_cast<int64_t>(t) * hidden;
      for (int i = 0; i < hidden; ++i) out[i] += shared[i];
    }
  }
}

}  // namespace moeserve::engine
