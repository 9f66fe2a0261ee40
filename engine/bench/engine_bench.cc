// moeserve-engine-bench: decode step time and tokens/s of a model's forward pass on the CPU at
// several batch sizes (each sequence has a 128-token prompt already prefilled). Prints a table.
#include <chrono>
#include <cstdio>
#include <numeric>
#include <vector>

#include "CLI/CLI.hpp"
#include "engine/model/loader.h"
#include "engine/ops/cpu_ops.h"
#include "engine/runtime/block_allocator.h"

namespace {

using Clock = std::chrono::steady_clock;
using moeserve::engine::BatchSequence;
using moeserve::engine::BlockAllocator;
using moeserve::engine::KvRows;

struct Row {
  int batch;
  double prefill_tokens_per_second;
  double step_ms;
  double decode_tokens_per_second;
};

Row Measure(const moeserve::engine::Model& model, int batch, int prompt_length, int decode_steps) {
  const auto& config = model.config();
  const int block_size = 16;
  const int tokens_per_sequence = prompt_length + decode_steps;
  const int blocks_per_sequence = (tokens_per_sequence + block_size - 1) / block_size;
  KvRows cache(config.num_hidden_layers, batch * blocks_per_sequence, block_size,
               model.kv_row_dim());
  BlockAllocator cache_blocks(cache.num_blocks());
  std::vector<std::vector<int32_t>> tables, tokens;
  for (int b = 0; b < batch; ++b) {
    tables.push_back(*cache_blocks.Allocate(blocks_per_sequence));
    std::vector<int32_t> prompt(prompt_length);
    for (int i = 0; i < prompt_length; ++i) prompt[i] = (b * 31 + i * 7) % 256;
    tokens.push_back(prompt);
  }
  std::vector<BatchSequence> prefill;
  for (int b = 0; b < batch; ++b) prefill.push_back({tokens[b], 0, &tables[b], false});
  const auto prefill_start = Clock::now();
  std::vector<float> logits = model.Forward(prefill, cache);
  const double prefill_seconds =
      std::chrono::duration<double>(Clock::now() - prefill_start).count();
  const int vocab = config.vocab_size;
  std::vector<int32_t> next(batch);
  auto argmax = [&](int b) {
    const float* row = &logits[static_cast<size_t>(b) * vocab];
    return static_cast<int32_t>(std::max_element(row, row + vocab) - row);
  };
  for (int b = 0; b < batch; ++b) next[b] = argmax(b);
  const auto decode_start = Clock::now();
  for (int step = 0; step < decode_steps; ++step) {
    std::vector<BatchSequence> decode;
    for (int b = 0; b < batch; ++b) {
      decode.push_back(
          {std::span<const int32_t>(&next[b], 1), prompt_length + step, &tables[b], false});
    }
    logits = model.Forward(decode, cache);
    for (int b = 0; b < batch; ++b) next[b] = argmax(b);
  }
  const double decode_seconds = std::chrono::duration<double>(Clock::now() - decode_start).count();
  return {batch, batch * prompt_length / prefill_seconds, decode_seconds / decode_steps * 1000,
          batch * decode_steps / decode_seconds};
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"moeserve-engine-bench: CPU forward-pass throughput of a model"};
  std::string model_spec = "builtin:tiny";
  std::vector<int> batches = {1, 8, 32};
  int prompt_length = 128, decode_steps = 64, threads = 1;
  app.add_option("--model", model_spec, "Model")->capture_default_str();
  app.add_option("--batch", batches, "Batch sizes")->delimiter(',');
  app.add_option("--prompt", prompt_length, "Prompt tokens per sequence")->capture_default_str();
  app.add_option("--steps", decode_steps, "Decode steps to time")->capture_default_str();
  app.add_option("--blas-threads", threads, "OpenBLAS threads (the server uses 1)")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  moeserve::engine::cpu::ConfigureBlasThreads(threads);
  auto loaded = moeserve::engine::LoadModel(model_spec);
  if (!loaded.ok()) {
    std::fprintf(stderr, "%s\n", std::string(loaded.status().message()).c_str());
    return 1;
  }
  Measure(*loaded->model, 1, 16, 4);  // warm-up
  std::printf("model %s, prompt %d tokens, %d decode steps, %d BLAS thread(s)\n",
              model_spec.c_str(), prompt_length, decode_steps, threads);
  std::printf("| batch | prefill tokens/s | decode step ms | decode tokens/s |\n");
  std::printf("| ---: | ---: | ---: | ---: |\n");
  for (int batch : batches) {
    Row row = Measure(*loaded->model, batch, prompt_length, decode_steps);
    std::printf("| %d | %.0f | %.3f | %.0f |\n", row.batch, row.prefill_tokens_per_second,
                row.step_ms, row.decode_tokens_per_second);
  }
  return 0;
}
