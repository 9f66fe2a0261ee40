// RankBackend: where one rank of an expert-parallel group computes its part of a forward step —
// the CPU (ExpertParallelForward over fp32 weights) or a GPU (CudaRankBackend, bf16). The step
// loop (runtime/rank_worker.h), the group agreement, placement and metrics are the same for
// both; only Run() differs.
//
// One backend object belongs to one rank and is called by that rank's thread only.
#pragma once

#include <cstddef>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/api/key_value_store.h"
#include "engine/model/kv_rows.h"
#include "engine/model/model.h"
#include "engine/parallel/ep_forward.h"
#include "engine/parallel/ep_group.h"
#include "engine/placement/expert_placement.h"
#include "engine/placement/expert_stager.h"
#include "engine/sampling/sampler.h"

namespace moeserve::engine {

class RankBackend {
 public:
  virtual ~RankBackend() = default;
  // Runs the rank's batch (see ExpertParallelForward::Run for the contract: every rank of the
  // group calls it for every step) over the backend's own KV rows; the batch's block tables
  // index them. `step` is the group's agreement for this step (two micro-batches or one; the
  // largest batch of any rank, which sizes exchanges the whole group must agree on). Each batch
  // row's logits (of its last token) stay with the backend until the next Forward().
  virtual absl::Status Forward(std::span<const BatchSequence> batch,
                               const ExpertPlacement& placement, parallel::RankResources& rank,
                               const parallel::StepAgreement& step) = 0;
  // The last Forward()'s logits on the host, [rows, vocab], in memory the backend owns until
  // its next Forward() (a GPU backend copies them into pinned memory: at DeepSeek-V3's
  // vocabulary 64 rows are 33 MB).
  virtual absl::StatusOr<std::span<const float>> Logits() = 0;
  // The next token of each row of the last Forward() whose sampler is set (-1 for the others),
  // each sampler taking its draw. This one samples Logits() on the host; a GPU backend ranks
  // each row's head on the device and copies only that (engine/sampling/sampler.h).
  virtual absl::StatusOr<std::vector<int32_t>> NextTokens(std::span<Sampler* const> samplers) {
    absl::StatusOr<std::span<const float>> logits = Logits();
    if (!logits.ok()) return logits.status();
    std::vector<int32_t> tokens(samplers.size(), -1);
    if (samplers.empty()) return tokens;
    const size_t vocab = logits->size() / samplers.size();
    for (size_t row = 0; row < samplers.size(); ++row) {
      if (samplers[row] != nullptr)
        tokens[row] = samplers[row]->Sample(logits->subspan(row * vocab, vocab));
    }
    return tokens;
  }
  // KV handoff (a prefill rank's prompt continues on a decode rank): copies the cached rows of
  // positions [0, num_tokens) of the sequence with `block_table` out, every layer, layer-major
  // ([layers][num_tokens][row bytes]); ImportKv writes such rows into another block table.
  // Both ranks must run the same backend (the rows' element type is the backend's).
  virtual absl::Status ExportKv(const std::vector<int32_t>& block_table, int num_tokens,
                                std::vector<std::byte>& rows) = 0;
  virtual absl::Status ImportKv(const std::vector<int32_t>& block_table, int num_tokens,
                                std::span<const std::byte> rows) = 0;
  // The backend's own stager of new placements' expert slots, which the rank's group uses
  // instead of host copies (engine/placement/expert_stager.h); null: the group's host stager.
  virtual ExpertStager* expert_stager() { return nullptr; }
};

// The CPU backend: the expert-parallel forward of engine/parallel/ over the model's fp32
// weights and host KV rows.
class CpuRankBackend : public RankBackend {
 public:
  CpuRankBackend(const parallel::ExpertParallelForward& forward, const Model& model, int kv_blocks,
                 int kv_block_size)
      : forward_(forward),
        rows_(model.config().num_hidden_layers, kv_blocks, kv_block_size, model.kv_row_dim()) {}
  absl::Status Forward(std::span<const BatchSequence> batch, const ExpertPlacement& placement,
                       parallel::RankResources& rank,
                       const parallel::StepAgreement& step) override {
    absl::StatusOr<std::vector<float>> logits =
        forward_.Run(batch, rows_, placement, rank, step.split);
    if (!logits.ok()) return logits.status();
    logits_ = std::move(*logits);
    return absl::OkStatus();
  }
  absl::StatusOr<std::span<const float>> Logits() override {
    return std::span<const float>(logits_);
  }
  absl::Status ExportKv(const std::vector<int32_t>& block_table, int num_tokens,
                        std::vector<std::byte>& rows) override;
  absl::Status ImportKv(const std::vector<int32_t>& block_table, int num_tokens,
                        std::span<const std::byte> rows) override;

 private:
  const parallel::ExpertParallelForward& forward_;
  KvRows rows_;
  std::vector<float> logits_;  // the last step's
};

// Makes rank `rank`'s backend for a group: called once per rank, in rank order, from the
// thread that builds the group, with the number of KV blocks each rank gets.
struct RankBackendRequest {
  const Model* model = nullptr;
  parallel::ExpertParallelGroup* group = nullptr;
  int rank = 0;
  int kv_blocks = 0;
  int kv_block_size = 16;
  int max_batch_tokens = 256;
  // A GPU backend stages new placements' slots in the background (off: in the committing step).
  bool background_placement_staging = true;
  // A GPU backend keeps an FP8 checkpoint's routed experts in FP8 (off: dequantized to bf16).
  bool keep_fp8_experts = true;
  // With FP8 experts, a GPU backend keeps the checkpoint's dense projections in FP8 too
  // (DeepSeek-V3's recipe: activations quantized per 1 x 128; less memory, larger error); off:
  // bf16.
  bool keep_fp8_dense = false;
  // With FP8 experts, a GPU group's dispatch carries the rows in FP8, quantized by the sender
  // (the same results, half the bytes); off: bf16.
  bool fp8_dispatch = true;
  // A GPU backend plans decode steps' experts on the device (off: the host); in a group of
  // several GPUs, with device_planned_exchange, their exchange too.
  bool device_planned_moe = false;
  bool device_planned_exchange = false;
  // The device-planned exchange's entries per destination GPU (0: sized from the batch; a
  // number: fixed until it first overflows, CudaRankOptions::exchange_entries_capacity).
  int exchange_entries_capacity = 0;
  // A GPU backend runs those device-planned decode steps as CUDA graphs (off: kernel by kernel).
  bool cuda_graphs = false;
  // A rank that is a process of its own: where its group's ranks meet (a GPU group publishes
  // its NCCL id there), unique per formation; and its GPU (-1: rank modulo the visible ones).
  KeyValueStore* rendezvous = nullptr;
  std::string rendezvous_prefix;
  int cuda_device = -1;
  // A GPU group's NCCL exchange uses at most this many CTAs per collective (0: NCCL's choice;
  // EngineOptions::gpu_exchange_max_ctas).
  int exchange_max_ctas = 0;
};
using RankBackendFactory =
    std::function<absl::StatusOr<std::unique_ptr<RankBackend>>(const RankBackendRequest&)>;

// The factory's backend for `request`, or the CPU backend where there is no factory.
inline absl::StatusOr<std::unique_ptr<RankBackend>> MakeRankBackend(
    const RankBackendFactory& factory, const RankBackendRequest& request) {
  if (!factory) {
    return std::make_unique<CpuRankBackend>(request.group->forward(), *request.model,
                                            request.kv_blocks, request.kv_block_size);
  }
  return factory(request);
}

}  // namespace moeserve::engine
