// moeserve-placement-bench: what a live expert-placement update costs the requests in flight.
// Streams of greedy requests run closed-loop through the Engine facade while new placements
// (some slots given other experts) are pushed every few seconds; for each update it reports how
// long the update took to commit and the inter-token gap of the step that committed it, against
// the median gap of all steps. Benchmark, not a test.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "engine/engine.h"

namespace {

using Clock = std::chrono::steady_clock;
using moeserve::engine::Engine;

double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

// Every token's arrival time, per stream.
struct Arrivals {
  std::mutex mutex;
  std::vector<std::vector<Clock::time_point>> per_stream;
};

void RunStream(Engine& engine, int stream, int prompt_tokens, int max_tokens, int vocab,
               std::atomic<bool>& stop, Arrivals& arrivals) {
  std::mt19937 random(stream);
  while (!stop.load()) {
    moeserve::engine::GenerationInput input;
    for (int i = 0; i < prompt_tokens; ++i) {
      input.prompt_tokens.push_back(static_cast<int32_t>(random() % vocab));
    }
    input.max_tokens = max_tokens;
    input.ignore_eos = true;
    auto submitted = engine.Submit(std::move(input));
    if (!submitted.ok()) {
      std::fprintf(stderr, "submit: %s\n", std::string(submitted.status().message()).c_str());
      return;
    }
    std::vector<Clock::time_point> times;
    while (true) {
      auto output = (*submitted)->Next(std::chrono::milliseconds(100));
      if (!output.has_value()) continue;
      times.push_back(Clock::now());
      if (!output->status.ok()) {
        std::fprintf(stderr, "stream: %s\n", std::string(output->status.message()).c_str());
        return;
      }
      if (output->is_last()) break;
    }
    std::lock_guard lock(arrivals.mutex);
    arrivals.per_stream[stream].insert(arrivals.per_stream[stream].end(), times.begin(),
                                       times.end());
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "moeserve-placement-bench: the cost of live placement updates to in-flight requests"};
  moeserve::engine::EngineOptions options;
  options.model = "builtin:v3-bench";
  options.device = "cuda";
  int64_t kv_cache_mib = 4096;
  int streams = 8, prompt_tokens = 128, max_tokens = 256, updates = 4, changed_slots = 8;
  double interval_seconds = 3;
  std::string staging = "background";
  app.add_option("--model", options.model)->capture_default_str();
  app.add_option("--device", options.device)->capture_default_str();
  app.add_option("--ep", options.parallel.decode_ep)->capture_default_str();
  app.add_option("--num-redundant-experts", options.parallel.num_redundant_experts)
      ->capture_default_str();
  app.add_option("--kv-cache-mib", kv_cache_mib)->capture_default_str();
  app.add_option("--streams", streams)->capture_default_str();
  app.add_option("--prompt-tokens", prompt_tokens)->capture_default_str();
  app.add_option("--max-tokens", max_tokens)->capture_default_str();
  app.add_option("--updates", updates)->capture_default_str();
  app.add_option("--interval-seconds", interval_seconds)->capture_default_str();
  app.add_option("--changed-slots", changed_slots, "Slots per MoE layer given another expert")
      ->capture_default_str();
  app.add_option("--staging", staging, "background or in-step")
      ->capture_default_str()
      ->check(CLI::IsMember({"background", "in-step"}));
  CLI11_PARSE(app, argc, argv);
  options.kv_cache_bytes = kv_cache_mib << 20;
  options.parallel.background_placement_staging = staging == "background";

  auto engine = Engine::Create(options);
  if (!engine.ok()) {
    std::fprintf(stderr, "%s\n", std::string(engine.status().message()).c_str());
    return 1;
  }
  const int vocab = (*engine)->model_info().vocab_size;
  Arrivals arrivals;
  arrivals.per_stream.resize(streams);
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  for (int s = 0; s < streams; ++s) {
    threads.emplace_back(
        [&, s] { RunStream(**engine, s, prompt_tokens, max_tokens, vocab, stop, arrivals); });
  }
  std::this_thread::sleep_for(std::chrono::seconds(3));  // warm up, reach steady decode

  struct Update {
    Clock::time_point committed;
    double seconds = 0;
    bool ok = false;
  };
  std::vector<Update> done;
  std::mt19937 random(7);
  for (int u = 0; u < updates; ++u) {
    auto current = (*engine)->GetPlacement("");
    if (!current.ok()) return 1;
    moeserve::engine::PlacementUpdate update;
    update.version = current->version + 1;
    update.phy2log = current->phy2log;
    update.timeout_seconds = 600;
    // Swap pairs of slots holding different experts: every expert keeps a replica.
    for (auto& layer : update.phy2log) {
      const int slots = static_cast<int>(layer.size());
      for (int changed = 0; changed + 1 < changed_slots;) {
        const int a = static_cast<int>(random() % slots), b = static_cast<int>(random() % slots);
        if (a == b || layer[a] == layer[b]) continue;
        std::swap(layer[a], layer[b]);
        changed += 2;
      }
    }
    auto result = (*engine)->UpdatePlacement(update);
    done.push_back({Clock::now(), result.ok() ? result->seconds : 0, result.ok()});
    if (!result.ok()) {
      std::fprintf(stderr, "update: %s\n", std::string(result.status().message()).c_str());
    }
    std::this_thread::sleep_for(std::chrono::duration<double>(interval_seconds));
  }
  stop = true;
  for (auto& thread : threads) thread.join();

  // Gaps between consecutive tokens of a stream; the committing step is the first gap of each
  // stream that ends after the update returned (it returns as the commit's step begins).
  std::vector<double> gaps;
  for (const auto& times : arrivals.per_stream) {
    for (size_t i = 1; i < times.size(); ++i) gaps.push_back(Ms(times[i] - times[i - 1]));
  }
  std::vector<double> sorted = gaps;
  std::sort(sorted.begin(), sorted.end());
  const double median = sorted.empty() ? 0 : sorted[sorted.size() / 2];
  std::printf("| staging | update | commit s | committing step gap ms | median gap ms | ratio |\n");
  std::printf("| --- | --- | --- | --- | --- | --- |\n");
  for (size_t u = 0; u < done.size(); ++u) {
    double gap = 0;
    for (const auto& times : arrivals.per_stream) {
      for (size_t i = 1; i < times.size(); ++i) {
        if (times[i] > done[u].committed) {
          gap = std::max(gap, Ms(times[i] - times[i - 1]));
          break;
        }
      }
    }
    std::printf("| %s | %zu | %.3f | %.2f | %.2f | %.2fx |\n", staging.c_str(), u + 1,
                done[u].seconds, gap, median, median > 0 ? gap / median : 0.0);
  }
  (*engine)->Shutdown();
  return 0;
}
