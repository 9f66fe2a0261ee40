// Helpers shared by the expert-parallel tests: the built-in tiny model (loaded once per test
// binary), single-rank reference logits through Model::Forward, the relative error used by the
// invariance checks (max |diff| / max |reference|), and random valid placements.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "engine/model/kv_rows.h"
#include "engine/model/loader.h"
#include "engine/model/model.h"
#include "engine/placement/expert_placement.h"
#include "engine/runtime/block_allocator.h"
#include "gtest/gtest.h"

namespace moeserve::engine::parallel::testing {

inline const Model& TinyModel() {
  static const std::shared_ptr<const Model> model = [] {
    absl::StatusOr<LoadedModel> loaded = LoadModel("builtin:tiny");
    EXPECT_TRUE(loaded.ok()) << loaded.status();
    return loaded.ok() ? loaded->model : nullptr;
  }();
  return *model;
}

// One sequence of a test batch: its tokens and whether it wants logits for every token.
struct TestSequence {
  std::vector<int32_t> tokens;
  bool all_logits = false;
};

// Logits of Model::Forward (one rank, every expert) for `batch` from an empty cache.
inline std::vector<float> ReferenceLogits(const Model& model,
                                          const std::vector<TestSequence>& batch) {
  constexpr int kBlockSize = 16;
  int blocks = 0;
  for (const auto& seq : batch)
    blocks += (static_cast<int>(seq.tokens.size()) + kBlockSize - 1) / kBlockSize;
  KvRows cache(model.config().num_hidden_layers, std::max(blocks, 1), kBlockSize,
               model.kv_row_dim());
  BlockAllocator cache_blocks(cache.num_blocks());
  std::vector<std::vector<int32_t>> tables;
  tables.reserve(batch.size());
  std::vector<BatchSequence> sequences;
  for (const auto& seq : batch) {
    tables.push_back(*cache_blocks.Allocate(cache.BlocksFor(static_cast<int>(seq.tokens.size()))));
    sequences.push_back({seq.tokens, 0, &tables.back(), seq.all_logits});
  }
  return model.Forward(sequences, cache);
}

inline double MaxAbs(std::span<const float> values) {
  double max = 0;
  for (float v : values) max = std::max(max, static_cast<double>(std::abs(v)));
  return max;
}

// max |actual - reference| / max |reference|; infinity when the sizes differ.
inline double RelativeError(std::span<const float> actual, std::span<const float> reference) {
  if (actual.size() != reference.size()) return INFINITY;
  double max_diff = 0;
  for (size_t i = 0; i < actual.size(); ++i) {
    const double diff = std::abs(static_cast<double>(actual[i]) - reference[i]);
    if (!(diff <= max_diff)) max_diff = diff;  // NaN propagates as a failure
  }
  return max_diff / std::max(MaxAbs(reference), 1e-30);
}

// Every expert once plus `extra` random replicas, slots shuffled, per layer.
inline ExpertPlacement RandomPlacement(int num_layers, int num_logical, int extra, uint32_t seed,
                                       int64_t version) {
  std::mt19937 random(seed);
  std::vector<std::vector<int32_t>> phy2log(num_layers);
  for (auto& layer : phy2log) {
    layer.resize(num_logical);
    std::iota(layer.begin(), layer.end(), 0);
    std::uniform_int_distribution<int32_t> expert(0, num_logical - 1);
    for (int i = 0; i < extra; ++i) layer.push_back(expert(random));
    std::shuffle(layer.begin(), layer.end(), random);
  }
  absl::StatusOr<ExpertPlacement> placement =
      ExpertPlacement::FromPhy2Log(std::move(phy2log), num_logical, version);
  EXPECT_TRUE(placement.ok()) << placement.status();
  return *placement;
}

// A 12-token prompt: <bos> and 11 bytes.
inline std::vector<int32_t> Tokens12() {
  const std::string text = "Experts, go!";
  std::vector<int32_t> tokens = {256};
  for (size_t i = 0; i + 1 < text.size(); ++i) tokens.push_back(static_cast<uint8_t>(text[i]));
  return tokens;
}

}  // namespace moeserve::engine::parallel::testing
