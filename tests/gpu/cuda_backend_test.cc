// The GPU backend against the CPU backend: logits of the built-in MLA models on 1, 2, 4 and 8
// GPUs (as many as are visible) within the measured bf16 tolerance; chunked prefill + decode
// through the device's paged cache against one pass; and the real server with
// `--device cuda --ep N` generating the CPU server's tokens. Skipped where no GPU is present.
// Grouped-query attention models (Qwen3-MoE, Mixtral): cuda_backend_gqa_test.cc.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "engine/backend/cuda/cuda_backend_factory.h"
#include "engine/model/loader.h"
#include "engine/tools/group_logits.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/gpu/logit_agreement.h"
#include "tests/integration/server_process.h"

namespace moeserve::engine::cuda {
namespace {

using ::testing::HasSubstr;

#define REQUIRE_GPUS(n) \
  if (VisibleCudaDevices() < (n)) GTEST_SKIP() << "needs " << (n) << " GPU(s)"

// bf16 weights and activations against the fp32 CPU engine, on the built-in models (measured
// on H200; docs/PERFORMANCE.md records the values). With DeepSeek-V3's routing (sigmoid scores,
// top-k weights normalized and scaled by 2.5) the routed experts dominate each MoE output, and
// bf16 rounding of the gate input flips near-tied expert choices for a few percent of tokens
// per layer (the MoE layer test measures 96% same routing); a flipped token's logits move a lot,
// and later tokens see it through attention. So V3-style models are held to the typical
// (median) position and the argmax, and the largest difference only loosely; V2's softmax
// weights are small and it meets a tight bound everywhere.
struct Tolerance {
  double relative_error;    // max over all logits
  double median_row_error;  // median over positions
  double argmax_agreement;
};
Tolerance ToleranceFor(const std::string& model) {
  if (model == "builtin:tiny-v2") return {5e-2, 5e-2, 1.0};
  return {0.6, 5e-2, 0.80};
}
// The GPU backend on N GPUs against itself on one: the same experts see the same rows, so only
// GEMM shapes differ.
constexpr double kGpuEpInvariance = 1e-2;

std::vector<int32_t> Prompt(int length) {
  std::vector<int32_t> tokens = {256};  // <bos>
  const std::string text = "Expert parallelism on GPUs must give the CPU's logits. ";
  for (int i = 0; tokens.size() < static_cast<size_t>(length); ++i) {
    tokens.push_back(static_cast<unsigned char>(text[i % text.size()]));
  }
  return tokens;
}

TEST(CudaBackend, LogitsMatchTheCpuWithinTheBf16Tolerance) {
  REQUIRE_GPUS(1);
  const std::vector<int32_t> tokens = Prompt(70);
  for (const std::string name :
       {"builtin:tiny", "builtin:tiny-nolora", "builtin:tiny-v2", "builtin:tiny-e256"}) {
    auto loaded = LoadModel(name);
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    const Model& model = *loaded->model;
    auto cpu = testing::GroupLogits(model, tokens, 1, 0, false);
    ASSERT_TRUE(cpu.ok()) << cpu.status();
    auto gpu_single = testing::GroupLogits(model, tokens, 1, 0, true);
    ASSERT_TRUE(gpu_single.ok()) << name << ": " << gpu_single.status();
    const Tolerance tolerance = ToleranceFor(name);
    for (int ep : {1, 2, 4, 8}) {
      if (ep > VisibleCudaDevices()) continue;
      for (auto [redundant, overlap] : {std::pair{0, false}, {ep, false}, {ep, true}}) {
        auto gpu = testing::GroupLogits(model, tokens, ep, redundant, true, overlap);
        ASSERT_TRUE(gpu.ok()) << name << " EP" << ep << ": " << gpu.status();
        const testing::LogitAgreement a =
            testing::CompareLogits(*gpu, *cpu, model.config().vocab_size);
        const testing::LogitAgreement self =
            testing::CompareLogits(*gpu, *gpu_single, model.config().vocab_size);
        std::printf(
            "%s EP%d redundant %d%s: vs CPU relative error max %.2e, median position %.2e, "
            "same argmax %.1f%%; vs GPU EP1 %.2e\n",
            name.c_str(), ep, redundant, overlap ? " overlap" : "", a.relative_error,
            a.median_row_error, 100 * a.argmax_agreement, self.relative_error);
        EXPECT_LT(a.relative_error, tolerance.relative_error) << name << " EP" << ep;
        EXPECT_LT(a.median_row_error, tolerance.median_row_error) << name << " EP" << ep;
        EXPECT_GE(a.argmax_agreement, tolerance.argmax_agreement) << name << " EP" << ep;
        EXPECT_LT(self.relative_error, kGpuEpInvariance) << name << " EP" << ep;
      }
    }
  }
}

// builtin:tiny as a group of one rank on GPU 0, for driving a backend by hand.
class TinyOnOneGpu : public ::testing::Test {
 protected:
  void SetUp() override {
    if (VisibleCudaDevices() < 1) GTEST_SKIP() << "needs 1 GPU";
    auto loaded = LoadModel("builtin:tiny");
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    model_ = loaded->model;
    const ModelConfig& c = model_->config();
    parallel::GroupOptions options;
    options.size = 1;
    auto group = parallel::ExpertParallelGroup::Create(
        *model_, options,
        ExpertPlacement::Default(c.num_moe_layers(), c.n_routed_experts, c.n_routed_experts),
        nullptr, nullptr);
    ASSERT_TRUE(group.ok()) << group.status();
    group_ = std::move(*group);
  }
  // A fresh backend: 8 KV blocks of 16 rows, up to 64 tokens a step.
  absl::StatusOr<std::unique_ptr<RankBackend>> MakeBackend() {
    return MakeCudaBackendFactory()({.model = model_.get(),
                                     .group = group_.get(),
                                     .rank = 0,
                                     .kv_blocks = 8,
                                     .kv_block_size = 16,
                                     .max_batch_tokens = 64});
  }
  absl::Status Forward(RankBackend& backend, const BatchSequence& sequence) {
    return backend.Forward({&sequence, 1}, group_->placement(0), group_->resources(0), {});
  }
  std::shared_ptr<const Model> model_;
  std::unique_ptr<parallel::ExpertParallelGroup> group_;
};

// Sampling on the device (each row's head ranked on the GPU, finished by the host sampler)
// picks the tokens the host sampler picks from the whole rows, draw for draw.
TEST_F(TinyOnOneGpu, NextTokensPickTheHostSamplersTokens) {
  const Model& model = *model_;
  const ModelConfig& c = model.config();
  auto backend = MakeBackend();
  ASSERT_TRUE(backend.ok()) << backend.status();
  std::vector<int32_t> table = {0, 1, 2, 3};
  const std::vector<int32_t> tokens = Prompt(45);
  BatchSequence sequence{tokens, 0, &table, /*all_logits=*/true};
  ASSERT_TRUE(Forward(**backend, sequence).ok());
  // Every row gets a request of its own kind; row 7 gets none.
  std::vector<std::unique_ptr<Sampler>> on_gpu, on_host;
  for (int row = 0; row < 45; ++row) {
    SamplingOptions o;
    o.temperature = row % 5 == 0 ? 0.0f : 0.4f * (row % 4 + 1);
    o.top_k = row % 3 == 0 ? 0 : 3 + row;
    o.top_p = row % 2 == 0 ? 1.0f : 0.8f;
    o.seed = 100 + row;
    on_gpu.push_back(row == 7 ? nullptr : std::make_unique<Sampler>(o));
    on_host.push_back(std::make_unique<Sampler>(o));
  }
  std::vector<Sampler*> samplers;
  for (auto& sampler : on_gpu) samplers.push_back(sampler.get());
  for (int draw = 0; draw < 20; ++draw) {
    absl::StatusOr<std::vector<int32_t>> picked = (*backend)->NextTokens(samplers);
    ASSERT_TRUE(picked.ok()) << picked.status();
    absl::StatusOr<std::span<const float>> logits = (*backend)->Logits();
    ASSERT_TRUE(logits.ok()) << logits.status();
    for (int row = 0; row < 45; ++row) {
      if (row == 7) {
        EXPECT_EQ((*picked)[row], -1);
        continue;
      }
      EXPECT_EQ((*picked)[row], on_host[row]->Sample(logits->subspan(
                                    static_cast<size_t>(row) * c.vocab_size, c.vocab_size)))
          << "row " << row << " draw " << draw;
    }
  }
}

TEST_F(TinyOnOneGpu, ChunkedPrefillAndDecodeMatchOnePass) {
  const Model& model = *model_;
  const ModelConfig& c = model.config();
  const std::vector<int32_t> tokens = Prompt(45);
  auto run_in_chunks = [&](std::vector<int> chunk_sizes) -> std::vector<float> {
    auto backend = MakeBackend();
    EXPECT_TRUE(backend.ok()) << backend.status();
    if (!backend.ok()) return {};
    // Blocks in reverse order, so that logical and physical positions differ.
    std::vector<int32_t> table = {3, 2, 1, 0};
    std::vector<float> logits;
    int start = 0;
    for (int size : chunk_sizes) {
      BatchSequence sequence{std::span<const int32_t>(tokens).subspan(start, size), start, &table,
                             true};
      const absl::Status forward = Forward(**backend, sequence);
      auto result = forward.ok() ? (*backend)->Logits() : forward;
      EXPECT_TRUE(result.ok()) << result.status();
      if (!result.ok()) return {};
      logits.insert(logits.end(), result->begin(), result->end());
      start += size;
    }
    return logits;
  };
  const std::vector<float> one_pass = run_in_chunks({45});
  // Prefill in two chunks, then decode one token at a time.
  std::vector<int> chunks = {20, 17};
  for (int i = 37; i < 45; ++i) chunks.push_back(1);
  const std::vector<float> stepwise = run_in_chunks(chunks);
  ASSERT_EQ(one_pass.size(), stepwise.size());
  const testing::LogitAgreement a = testing::CompareLogits(stepwise, one_pass, c.vocab_size);
  std::printf("chunked vs one pass: relative error %.2e, same argmax %.1f%%\n", a.relative_error,
              100 * a.argmax_agreement);
  EXPECT_LT(a.relative_error, 1e-2);
  EXPECT_EQ(a.argmax_agreement, 1.0);
}

std::vector<std::vector<uint32_t>> ConcurrentGreedy(testing::ServerProcess& server, int count) {
  return testing::ConcurrentGreedy(server, count, [](int) { return 16; });
}

// Greedy generation through the server on GPUs against the CPU server, counting each request's
// tokens up to its first divergence. The random tiny models have many near-tied logits, and
// with DeepSeek-V3's routing bf16 rounding also flips near-tied expert choices; greedy decoding
// amplifies each flip, so where the first divergence falls depends on rounding details. Measured
// on one H100 (12 requests of 16 tokens): tiny-v2 142 of 192 and tiny 139 with one MLA kernel,
// 125 and 111 with the next, whose logits are as close to the CPU's. A broken path diverges at
// the first tokens: at least half must match.
class ServerOnGpus : public ::testing::TestWithParam<std::pair<const char*, double>> {};

TEST_P(ServerOnGpus, GeneratesTheCpuServersTokens) {
  REQUIRE_GPUS(1);
  const auto [model, required_fraction] = GetParam();
  std::vector<std::vector<uint32_t>> cpu;
  {
    testing::ServerProcess server({"--model", model});
    ASSERT_TRUE(server.ok());
    cpu = ConcurrentGreedy(server, 12);
  }
  for (int ep : {1, 2, 4, 8}) {
    if (ep > VisibleCudaDevices()) continue;
    // Two GPUs and more also overlap the exchanges with compute (two micro-batches).
    std::vector<std::string> args = {"--model",
                                     model,
                                     "--device",
                                     "cuda",
                                     "--ep",
                                     std::to_string(ep),
                                     "--num-redundant-experts",
                                     std::to_string(ep)};
    if (ep > 1) args.insert(args.end(), {"--two-batch-overlap", "--overlap-min-tokens", "1"});
    testing::ServerProcess server(args);
    ASSERT_TRUE(server.ok()) << server.output();
    const std::vector<std::vector<uint32_t>> gpu = ConcurrentGreedy(server, 12);
    int same = 0, total = 0;
    for (size_t r = 0; r < cpu.size(); ++r) {
      ASSERT_EQ(gpu[r].size(), 16u);
      // Tokens agree up to the first divergence (after which the contexts differ).
      size_t i = 0;
      while (i < cpu[r].size() && gpu[r][i] == cpu[r][i]) ++i;
      same += static_cast<int>(i);
      total += static_cast<int>(cpu[r].size());
    }
    std::printf("%s EP%d: %d of %d greedy tokens before the first divergence match the CPU\n",
                model, ep, same, total);
    EXPECT_GE(same, required_fraction * total) << model << " EP" << ep;
    if (server.metrics_port() > 0) {
      const std::string metrics = testing::ScrapeMetrics(server.metrics_port());
      EXPECT_GT(testing::MetricValue(metrics, "moeserve_generation_tokens_total"), 0) << metrics;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Routings, ServerOnGpus,
                         ::testing::Values(std::make_pair("builtin:tiny-v2", 0.5),
                                           std::make_pair("builtin:tiny", 0.5)));

TEST(CudaBackend, RefusesLayoutsItCannotRun) {
  REQUIRE_GPUS(1);
  {
    testing::ServerProcess server({"--device", "cuda", "--ep", "64"}, /*expect_ready=*/false);
    EXPECT_FALSE(server.ok());
    EXPECT_NE(server.WaitForExit(30), 0) << server.output();
    EXPECT_THAT(server.output(), HasSubstr("needs 64 GPUs"));
  }
  {
    testing::ServerProcess server({"--device", "cuda", "--prefill-ep", "1", "--decode-ep", "1"},
                                  /*expect_ready=*/false);
    EXPECT_FALSE(server.ok());
    EXPECT_THAT(server.output(), HasSubstr("disaggregation runs on the CPU only"));
  }
}

}  // namespace
}  // namespace moeserve::engine::cuda
