// moeserve-ep-bench: step time of an expert-parallel group on the CPU and the share of its
// dispatch/combine time that two-micro-batch overlap hides, at several EP sizes, overlap off
// and on. Ranks are threads of this process (as in `moeserve serve`), or with `--ranks
// processes` one forked process each that meet through Gloo over loopback TCP (as `moeserve
// rank` processes do), so the two can be compared. Each rank first runs `--agreements` bare
// step agreements (the one small all-reduce every step starts with), then decodes `--batch`
// sequences with `--context` cached tokens (or prefills `--batch` tokens with --prefill).
// Prints a table.
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "engine/comm/gloo_communicator.h"
#include "engine/model/loader.h"
#include "engine/ops/cpu_ops.h"
#include "engine/parallel/ep_group.h"
#include "engine/runtime/block_allocator.h"
#include "gloo/rendezvous/file_store.h"

namespace {

using moeserve::engine::BatchSequence;
using moeserve::engine::BlockAllocator;
using moeserve::engine::ExpertPlacement;
using moeserve::engine::KvRows;
using moeserve::engine::Model;
namespace parallel = moeserve::engine::parallel;

struct Result {
  double step_ms = 0;
  double agreement_us = 0;
  double communication_ms = 0;             // dispatch + combine, per step and rank
  double dispatch_kb = 0, combine_kb = 0;  // KiB sent per token (context fill included)
  double exposed_ms = 0;  // of which the compute thread waited for, per step and rank
  double hidden = 0;
};

struct Setup {
  int ep = 0;
  bool overlap = false;
  int batch = 0;
  int context = 0;
  bool prefill = false;
  int steps = 0;
  int agreements = 0;
};

parallel::GroupOptions Options(const Setup& setup) {
  parallel::GroupOptions options;
  options.size = setup.ep;
  options.two_batch_overlap = setup.overlap;
  options.overlap_min_tokens = 1;
  return options;
}

ExpertPlacement DefaultPlacement(const Model& model, int ep) {
  const auto& c = model.config();
  const int slots =
      c.n_routed_experts % ep == 0 ? c.n_routed_experts : (c.n_routed_experts / ep + 1) * ep;
  return ExpertPlacement::Default(c.num_moe_layers(), c.n_routed_experts, slots);
}

[[noreturn]] void Die(const absl::Status& status) {
  std::fprintf(stderr, "%s\n", std::string(status.message()).c_str());
  std::exit(1);
}

// What one rank measured: seconds per bare agreement, and seconds for the timed steps.
struct RankTimes {
  double agreement_seconds = 0;
  double step_seconds = 0;
};

// One rank's part of the measurement, on its thread or in its process.
RankTimes RunRank(const Model& model, parallel::ExpertParallelGroup& g, int rank,
                  const Setup& setup) {
  moeserve::engine::cpu::ConfigureBlasThreads(1);
  const auto& c = model.config();
  const int block_size = 16;
  const int tokens_per_sequence = setup.prefill ? setup.batch : setup.context + setup.steps + 1;
  const int sequences = setup.prefill ? 1 : setup.batch;
  const int blocks = (tokens_per_sequence + block_size - 1) / block_size;
  KvRows cache(c.num_hidden_layers, sequences * blocks * (setup.prefill ? setup.steps + 1 : 1),
               block_size, model.kv_row_dim());
  BlockAllocator cache_blocks(cache.num_blocks());
  std::vector<std::vector<int32_t>> tables, tokens;
  for (int s = 0; s < sequences * (setup.prefill ? setup.steps + 1 : 1); ++s) {
    tables.push_back(*cache_blocks.Allocate(blocks));
    std::vector<int32_t> t(tokens_per_sequence);
    for (int i = 0; i < tokens_per_sequence; ++i) t[i] = (rank * 131 + s * 17 + i * 7) % 256;
    tokens.push_back(std::move(t));
  }
  RankTimes times;
  const auto agreements_start = std::chrono::steady_clock::now();
  for (int i = 0; i < setup.agreements; ++i) {
    if (absl::StatusOr<parallel::StepAgreement> a = g.Agree(rank, 1, false); !a.ok()) {
      Die(a.status());
    }
  }
  times.agreement_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - agreements_start).count() /
      std::max(1, setup.agreements);
  auto run = [&](std::vector<BatchSequence>& batch_sequences) {
    auto agreement = g.Agree(rank, 1, false);
    if (!agreement.ok()) Die(agreement.status());
    auto logits = g.forward().Run(batch_sequences, cache, g.placement(rank), g.resources(rank),
                                  agreement->split);
    if (!logits.ok()) Die(logits.status());
  };
  if (!setup.prefill) {
    // Fill the context (not timed).
    std::vector<BatchSequence> fill;
    for (int s = 0; s < sequences; ++s) {
      fill.push_back(
          {std::span<const int32_t>(tokens[s].data(), setup.context), 0, &tables[s], false});
    }
    run(fill);
  }
  const auto start = std::chrono::steady_clock::now();
  for (int step = 0; step < setup.steps; ++step) {
    std::vector<BatchSequence> batch_sequences;
    if (setup.prefill) {
      batch_sequences.push_back({tokens[step], 0, &tables[step], false});
    } else {
      for (int s = 0; s < sequences; ++s) {
        batch_sequences.push_back({std::span<const int32_t>(&tokens[s][setup.context + step], 1),
                                   setup.context + step, &tables[s], false});
      }
    }
    run(batch_sequences);
  }
  times.step_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return times;
}

Result Summarize(const Setup& setup, const std::vector<RankTimes>& ranks,
                 const parallel::ParallelMetrics::Totals& totals) {
  Result result;
  for (const RankTimes& r : ranks) {
    result.step_ms = std::max(result.step_ms, r.step_seconds / setup.steps * 1000);
    result.agreement_us += r.agreement_seconds * 1e6 / ranks.size();
  }
  // Totals include the untimed context fill for decode; they are per rank and summed.
  const double per = 1000.0 / (setup.steps + (setup.prefill ? 0 : 1)) / setup.ep;
  result.communication_ms = totals.communication_seconds() * per;
  // Bytes per token need no fill correction: every token the group ran was exchanged alike.
  const double tokens =
      static_cast<double>(setup.ep) *
      (setup.prefill ? static_cast<double>(setup.batch) * setup.steps
                     : static_cast<double>(setup.batch) * (setup.context + setup.steps));
  result.dispatch_kb = static_cast<double>(totals.dispatch_bytes) / tokens / 1024;
  result.combine_kb = static_cast<double>(totals.combine_bytes) / tokens / 1024;
  result.exposed_ms = totals.exposed_seconds * per;
  result.hidden = totals.overlap_ratio();
  return result;
}

// Ranks as threads of this process, one in-process group.
Result MeasureThreads(const Model& model, const Setup& setup) {
  auto group = parallel::ExpertParallelGroup::Create(
      model, Options(setup), DefaultPlacement(model, setup.ep), nullptr, nullptr);
  if (!group.ok()) Die(group.status());
  std::vector<RankTimes> ranks(setup.ep);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < setup.ep; ++rank) {
    threads.emplace_back([&, rank] { ranks[rank] = RunRank(model, **group, rank, setup); });
  }
  for (auto& t : threads) t.join();
  return Summarize(setup, ranks, (*group)->metrics().totals());
}

// Ranks as processes: each forked child loads the model, forms a Gloo group through a file
// store and reports its times (and its dispatch/combine totals) through a pipe.
Result MeasureProcesses(const std::string& model_spec, const Setup& setup) {
  const std::string store_dir = (std::filesystem::temp_directory_path() /
                                 ("moeserve-ep-bench-" + std::to_string(getpid()) + "-" +
                                  std::to_string(setup.ep) + (setup.overlap ? "-overlap" : "")))
                                    .string();
  std::filesystem::create_directories(store_dir);
  std::vector<pid_t> children;
  std::vector<int> pipes;
  for (int rank = 0; rank < setup.ep; ++rank) {
    int fds[2];
    if (pipe(fds) != 0) Die(absl::InternalError("pipe failed"));
    const pid_t pid = fork();
    if (pid == 0) {
      close(fds[0]);
      auto loaded = moeserve::engine::LoadModel(model_spec);
      if (!loaded.ok()) Die(loaded.status());
      const Model& model = *loaded->model;
      moeserve::engine::comm::GlooGroupOptions gloo;
      gloo.size = setup.ep;
      gloo.rank = rank;
      gloo.timeout = std::chrono::seconds(120);
      auto communicators = moeserve::engine::comm::GlooCommunicatorGroup::Create(
          std::make_shared<gloo::rendezvous::FileStore>(store_dir), gloo);
      if (!communicators.ok()) Die(communicators.status());
      parallel::GroupParts parts;
      parts.communicators = std::move(*communicators);
      auto group = parallel::ExpertParallelGroup::Create(model, Options(setup),
                                                         DefaultPlacement(model, setup.ep), nullptr,
                                                         nullptr, 0, std::move(parts));
      if (!group.ok()) Die(group.status());
      const RankTimes times = RunRank(model, **group, rank, setup);
      const parallel::ParallelMetrics::Totals totals = (*group)->metrics().totals();
      const std::string line =
          std::to_string(times.agreement_seconds) + " " + std::to_string(times.step_seconds) + " " +
          std::to_string(totals.dispatch_seconds) + " " + std::to_string(totals.combine_seconds) +
          " " + std::to_string(totals.exposed_seconds) + " " +
          std::to_string(totals.dispatch_bytes) + " " + std::to_string(totals.combine_bytes) + "\n";
      if (write(fds[1], line.data(), line.size()) != static_cast<ssize_t>(line.size())) _exit(3);
      close(fds[1]);
      // The peers may still be in their last collective: leave without tearing the group down.
      _exit(0);
    }
    close(fds[1]);
    children.push_back(pid);
    pipes.push_back(fds[0]);
  }
  std::vector<RankTimes> ranks(setup.ep);
  parallel::ParallelMetrics::Totals totals;
  for (int rank = 0; rank < setup.ep; ++rank) {
    std::string text;
    char buffer[256];
    ssize_t n = 0;
    while ((n = read(pipes[rank], buffer, sizeof(buffer))) > 0) text.append(buffer, n);
    close(pipes[rank]);
    double dispatch = 0, combine = 0, exposed = 0;
    long long dispatch_bytes = 0, combine_bytes = 0;
    if (std::sscanf(text.c_str(), "%lf %lf %lf %lf %lf %lld %lld", &ranks[rank].agreement_seconds,
                    &ranks[rank].step_seconds, &dispatch, &combine, &exposed, &dispatch_bytes,
                    &combine_bytes) != 7) {
      Die(absl::InternalError("a rank process failed (its error is above)"));
    }
    totals.dispatch_seconds += dispatch;
    totals.combine_seconds += combine;
    totals.exposed_seconds += exposed;
    totals.dispatch_bytes += dispatch_bytes;
    totals.combine_bytes += combine_bytes;
  }
  for (pid_t pid : children) waitpid(pid, nullptr, 0);
  std::filesystem::remove_all(store_dir);
  return Summarize(setup, ranks, totals);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"moeserve-ep-bench: expert-parallel step time and overlap on the CPU"};
  std::string model_spec = "builtin:tiny-e256";
  std::vector<int> eps = {4, 8, 32};
  std::vector<std::string> rank_kinds = {"threads"};
  Setup setup{.batch = 64, .context = 64, .steps = 20, .agreements = 200};
  bool prefill = false;
  std::vector<std::string> overlap_modes = {"off", "on"};
  app.add_option("--model", model_spec, "Model")->capture_default_str();
  app.add_option("--ep", eps, "EP sizes")->delimiter(',');
  app.add_option("--ranks", rank_kinds,
                 "threads (one process, as serve), processes (one each, Gloo over loopback, as "
                 "rank processes), or both: threads,processes")
      ->delimiter(',')
      ->check(CLI::IsMember({"threads", "processes"}));
  app.add_option("--overlap", overlap_modes, "Two-batch overlap: off, on, or off,on")
      ->delimiter(',')
      ->check(CLI::IsMember({"off", "on"}));
  app.add_option("--batch", setup.batch, "Sequences per rank (decode) or tokens per rank (prefill)")
      ->capture_default_str();
  app.add_option("--context", setup.context, "Cached tokens per sequence (decode)")
      ->capture_default_str();
  app.add_option("--steps", setup.steps, "Timed steps")->capture_default_str();
  app.add_option("--agreements", setup.agreements, "Bare step agreements timed per rank")
      ->capture_default_str();
  app.add_flag("--prefill", prefill, "Time prefill chunks instead of decode steps");
  CLI11_PARSE(app, argc, argv);
  setup.prefill = prefill;
  auto loaded = moeserve::engine::LoadModel(model_spec);
  if (!loaded.ok()) Die(loaded.status());
  std::printf("model %s, %s, %d %s per rank, %d steps, %d agreements; %u cores\n",
              model_spec.c_str(), prefill ? "prefill" : "decode", setup.batch,
              prefill ? "tokens" : "sequences", setup.steps, setup.agreements,
              std::thread::hardware_concurrency());
  std::printf(
      "| EP | ranks | overlap | agreement us | step ms | dispatch+combine ms/step/rank | exposed "
      "ms/step/rank | hidden | dispatch KiB/token | combine KiB/token |\n");
  std::printf("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
  for (int ep : eps) {
    for (const std::string& kind : rank_kinds) {
      for (const std::string& overlap : overlap_modes) {
        setup.ep = ep;
        setup.overlap = overlap == "on";
        const Result r = kind == "threads" ? MeasureThreads(*loaded->model, setup)
                                           : MeasureProcesses(model_spec, setup);
        std::printf("| %d | %s | %s | %.1f | %.2f | %.3f | %.3f | %.0f%% | %.2f | %.2f |\n", ep,
                    kind.c_str(), overlap.c_str(), r.agreement_us, r.step_ms, r.communication_ms,
                    r.exposed_ms, 100.0 * r.hidden, r.dispatch_kb, r.combine_kb);
        std::fflush(stdout);
      }
    }
  }
  return 0;
}
