// moeserve-sampler-bench: time per sampled token of engine::Sampler on a large vocabulary
// (DeepSeek-V3's 129280 by default) against the plain rule — a full sort of the vocabulary —
// measured in the same run. Random normal logits; a narrow spread is the hard case (top-p then
// keeps many tokens), a wide one is closer to a trained model. Prints a table.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "CLI/CLI.hpp"
#include "engine/sampling/sampler.h"

namespace {

using Clock = std::chrono::steady_clock;
using moeserve::engine::Sampler;
using moeserve::engine::SamplingOptions;

double MillisecondsPer(int count, Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count() / count;
}

// The baseline: sort every candidate, then walk the order (what the sampler did before it
// sorted only the head it needs).
int32_t FullSortSample(const std::vector<float>& logits, const SamplingOptions& o,
                       std::mt19937_64& rng) {
  std::vector<int32_t> order(logits.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  size_t keep = o.top_k > 0 ? std::min<size_t>(order.size(), o.top_k) : order.size();
  std::vector<double> p(keep);
  double total = 0;
  for (size_t i = 0; i < keep; ++i) {
    total += p[i] = std::exp((logits[order[i]] - logits[order[0]]) / o.temperature);
  }
  if (o.top_p > 0 && o.top_p < 1) {
    double mass = 0, prefix = 0;
    for (size_t i = 0; i < keep; ++i) {
      mass += p[i] / total;
      prefix += p[i];
      if (mass >= o.top_p) {
        keep = i + 1;
        break;
      }
    }
    total = prefix;
  }
  const double u = static_cast<double>(rng() >> 11) * (1.0 / 9007199254740992.0) * total;
  double cumulative = 0;
  for (size_t i = 0; i < keep; ++i) {
    if (u < (cumulative += p[i])) return order[i];
  }
  return order[keep - 1];
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"moeserve-sampler-bench: time per sampled token on a large vocabulary"};
  int vocab = 129280;
  int draws = 50;
  app.add_option("--vocab", vocab, "Vocabulary size")->capture_default_str();
  app.add_option("--draws", draws, "Tokens sampled per row")->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  struct Case {
    const char* name;
    float temperature, top_p;
    int top_k;
  };
  const Case cases[] = {{"T 0.7", 0.7f, 1.0f, 0},
                        {"T 0.7, top-p 0.95", 0.7f, 0.95f, 0},
                        {"T 0.7, top-k 50", 0.7f, 1.0f, 50},
                        {"T 1, top-k 50, top-p 0.9", 1.0f, 0.9f, 50}};
  std::printf("vocabulary %d, %d draws per row\n", vocab, draws);
  std::printf("| logit std | options | sampler ms/token | full-sort rule ms/token | speed-up |\n");
  std::printf("| ---: | --- | ---: | ---: | ---: |\n");
  for (float spread : {2.0f, 6.0f}) {
    std::mt19937 data(1);
    std::normal_distribution<float> normal(0.0f, spread);
    std::vector<float> logits(vocab);
    for (float& v : logits) v = normal(data);
    for (const Case& c : cases) {
      SamplingOptions options;
      options.temperature = c.temperature;
      options.top_p = c.top_p;
      options.top_k = c.top_k;
      options.seed = 7;
      Sampler sampler(options);
      int64_t sink = 0;
      auto start = Clock::now();
      for (int i = 0; i < draws; ++i) sink += sampler.Sample(logits);
      const double ours = MillisecondsPer(draws, start);
      std::mt19937_64 rng(7);
      start = Clock::now();
      for (int i = 0; i < draws; ++i) sink += FullSortSample(logits, options, rng);
      const double baseline = MillisecondsPer(draws, start);
      std::printf("| %.0f | %s | %.2f | %.2f | %.1fx |\n", spread, c.name, ours, baseline,
                  baseline / ours);
      if (sink < 0) std::printf("?\n");  // keeps the draws from being optimized away
    }
  }
  return 0;
}
