// moeserve-ep-bench: step time of an expert-parallel group on the CPU and the share of its
// dispatch/combine time that two-micro-batch overlap hides, at several EP sizes, overlap off
// and on. Ranks are threads; each rank decodes `--batch` sequences with `--context` cached
// tokens (or prefills `--batch` tokens with --prefill). Prints a table.
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "engine/model/loader.h"
#include "engine/ops/cpu_ops.h"
#include "engine/parallel/ep_group.h"
#include "engine/runtime/block_allocator.h"

namespace {

using moeserve::engine::BatchSequence;
using moeserve::engine::BlockAllocator;
using moeserve::engine::ExpertPlacement;
using moeserve::engine::KvRows;
using moeserve::engine::Model;
namespace parallel = moeserve::engine::parallel;

struct Result {
  double step_ms = 0;
  parallel::ParallelMetrics::Totals totals;
};

Result Measure(const Model& model, int ep, bool overlap, int batch, int context, bool prefill,
               int steps) {
  const auto& c = model.config();
  parallel::GroupOptions options;
  options.size = ep;
  options.two_batch_overlap = overlap;
  options.overlap_min_tokens = 1;
  const int slots =
      c.n_routed_experts % ep == 0 ? c.n_routed_experts : (c.n_routed_experts / ep + 1) * ep;
  auto group = parallel::ExpertParallelGroup::Create(
      model, options, ExpertPlacement::Default(c.num_moe_layers(), c.n_routed_experts, slots),
      nullptr, nullptr);
  if (!group.ok()) {
    std::fprintf(stderr, "%s\n", std::string(group.status().message()).c_str());
    std::exit(1);
  }
  const int block_size = 16;
  const int tokens_per_sequence = prefill ? batch : context + steps + 1;
  const int sequences = prefill ? 1 : batch;
  const int blocks = (tokens_per_sequence + block_size - 1) / block_size;
  std::vector<double> rank_seconds(ep, 0.0);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < ep; ++rank) {
    threads.emplace_back([&, rank] {
      moeserve::engine::cpu::ConfigureBlasThreads(1);
      parallel::ExpertParallelGroup& g = **group;
      KvRows cache(c.num_hidden_layers, sequences * blocks * (prefill ? steps + 1 : 1), block_size,
                   model.kv_row_dim());
      BlockAllocator cache_blocks(cache.num_blocks());
      std::vector<std::vector<int32_t>> tables, tokens;
      for (int s = 0; s < sequences * (prefill ? steps + 1 : 1); ++s) {
        tables.push_back(*cache_blocks.Allocate(blocks));
        std::vector<int32_t> t(tokens_per_sequence);
        for (int i = 0; i < tokens_per_sequence; ++i) t[i] = (rank * 131 + s * 17 + i * 7) % 256;
        tokens.push_back(std::move(t));
      }
      auto run = [&](std::vector<BatchSequence>& batch_sequences) {
        auto agreement = g.Agree(rank, 1, false);
        auto logits = g.forward().Run(batch_sequences, cache, g.placement(rank), g.resources(rank),
                                      agreement->split);
        if (!logits.ok()) std::exit(2);
      };
      if (!prefill) {
        // Fill the context (not timed).
        std::vector<BatchSequence> fill;
        for (int s = 0; s < sequences; ++s) {
          fill.push_back(
              {std::span<const int32_t>(tokens[s].data(), context), 0, &tables[s], false});
        }
        run(fill);
      }
      const auto start = std::chrono::steady_clock::now();
      for (int step = 0; step < steps; ++step) {
        std::vector<BatchSequence> batch_sequences;
        if (prefill) {
          batch_sequences.push_back({tokens[step], 0, &tables[step], false});
        } else {
          for (int s = 0; s < sequences; ++s) {
            batch_sequences.push_back({std::span<const int32_t>(&tokens[s][context + step], 1),
                                       context + step, &tables[s], false});
          }
        }
        run(batch_sequences);
      }
      rank_seconds[rank] =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    });
  }
  for (auto& t : threads) t.join();
  Result result;
  result.step_ms = *std::max_element(rank_seconds.begin(), rank_seconds.end()) / steps * 1000;
  result.totals = (*group)->metrics().totals();
  return result;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"moeserve-ep-bench: expert-parallel step time and overlap on the CPU"};
  std::string model_spec = "builtin:tiny-e256";
  std::vector<int> eps = {4, 8, 32};
  int batch = 64, context = 64, steps = 20;
  bool prefill = false;
  app.add_option("--model", model_spec, "Model")->capture_default_str();
  app.add_option("--ep", eps, "EP sizes")->delimiter(',');
  app.add_option("--batch", batch, "Sequences per rank (decode) or tokens per rank (prefill)")
      ->capture_default_str();
  app.add_option("--context", context, "Cached tokens per sequence (decode)")
      ->capture_default_str();
  app.add_option("--steps", steps, "Timed steps")->capture_default_str();
  app.add_flag("--prefill", prefill, "Time prefill chunks instead of decode steps");
  CLI11_PARSE(app, argc, argv);
  auto loaded = moeserve::engine::LoadModel(model_spec);
  if (!loaded.ok()) {
    std::fprintf(stderr, "%s\n", std::string(loaded.status().message()).c_str());
    return 1;
  }
  std::printf("model %s, %s, %d %s per rank, %d steps; ranks are threads on %u cores\n",
              model_spec.c_str(), prefill ? "prefill" : "decode", batch,
              prefill ? "tokens" : "sequences", steps, std::thread::hardware_concurrency());
  std::printf(
      "| EP | overlap | step ms | dispatch+combine ms/step/rank | exposed ms/step/rank | hidden "
      "|\n");
  std::printf("| ---: | --- | ---: | ---: | ---: | ---: |\n");
  for (int ep : eps) {
    for (bool overlap : {false, true}) {
      const Result r = Measure(*loaded->model, ep, overlap, batch, context, prefill, steps);
      // Totals include the untimed context fill for decode; they are per rank and summed.
      const double per = 1000.0 / (steps + (prefill ? 0 : 1)) / ep;
      std::printf("| %d | %s | %.2f | %.3f | %.3f | %.0f%% |\n", ep, overlap ? "on" : "off",
                  r.step_ms, r.totals.communication_seconds() * per, r.totals.exposed_seconds * per,
                  100.0 * r.totals.overlap_ratio());
    }
  }
  return 0;
}
