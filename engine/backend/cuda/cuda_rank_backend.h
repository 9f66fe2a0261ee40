// CudaRankBackend: one rank's part of a forward step on one GPU — DeepSeek's MLA models (V2/V3)
// and the grouped-query attention models (Qwen3-MoE, Mixtral) in bf16 with fp32 accumulation.
// It owns the rank's device copies of the weights (dense weights in full; routed experts only
// for the rank's placement slots), the paged KV cache rows in device memory (the rank's block
// allocator decides which blocks a sequence owns), cuBLAS, and the scratch activations of a
// step.
//
// A step: embedding → per layer [RMSNorm → attention → RMSNorm → dense MLP, or MoE (gate GEMM
// and top-k in one kernel; dispatch to the ranks holding the chosen replicas; the local slots'
// SwiGLU as grouped GEMMs; combine and the weighted sum with the shared expert, if any)] →
// final norm → LM head. Attention is MLA (q-LoRA, latent cache write with RoPE, absorbed
// attention over the paged latent cache, output projection) or GQA (one fused q/k/v GEMM,
// Qwen3's per-head q/k norms and rotate-half RoPE with the cache write, paged attention of each
// query group over its key/value head, output projection); the MoE part is the same for both. The
// logits stay on the device: the sampler gets each row's head, ranked there (kernels/sampling.h),
// unless a caller asks for the whole rows. The dispatch plan (which replica serves each token) is
// computed on the host with the same rule as the CPU backend, so both send each token to the same
// replica. Counts and slot ids go through the group's host communicator; activations go GPU to GPU
// through NCCL on the communication stream. With two micro-batches, one's dispatch runs while the
// other computes its attention and gate, and one's combine while the other runs its experts; the
// compute stream waits for an exchange (on the GPU, through an event) only where its result is
// used.
//
// A new placement's changed slots are staged in the background (the backend's ExpertStager:
// uploaded or generated into spare device buffers on a copy stream while the rank computes)
// and swapped in by pointer at the step boundary where the group commits it, so the committing
// step does no weight traffic. The spare buffers hold only the changed slots, until the commit.
// Without background staging (CudaRankOptions), the changed slots are written in place at the
// start of the committing step instead: no spare memory, but that step stalls.
//
// Not thread-safe: called by its rank's thread only.
#pragma once

#include <memory>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend/rank_backend.h"
#include "engine/comm/nccl_communicator.h"
#include "engine/model/model.h"
#include "engine/placement/expert_placement.h"

namespace moeserve::engine::cuda {

struct CudaRankOptions {
  int device = 0;
  int rank = 0;
  int group_size = 1;
  int kv_blocks = 0;
  int kv_block_size = 16;
  int max_batch_tokens = 256;  // tokens per step on this rank
  // Activations exchange (dispatch/combine) of the group. Null for a group of one rank, and for
  // ranks that share a GPU (NCCL puts one rank on a GPU): their activations go through pinned
  // host memory and the group's host communicator instead, which is slow but exact (tests of
  // expert parallelism on one GPU).
  comm::NcclCommunicator* exchange = nullptr;
  std::shared_ptr<const void> exchange_owner;  // keeps `exchange` alive as long as the backend
  // Stage new placements in the background (see above); off: in the committing step.
  bool background_placement_staging = true;
  // An FP8 checkpoint's routed experts stay FP8 on the GPU (block-scaled FP8 GEMMs, Hopper);
  // off: dequantized to bf16 like the rest.
  bool keep_fp8_experts = true;
  // With FP8 experts, the checkpoint's dense projections whole in 128 x 128 blocks stay FP8 too
  // (State::fp8_dense); off: bf16.
  bool keep_fp8_dense = false;
  // With FP8 experts on Hopper, a group's host-planned dispatch carries packed FP8 rows: the
  // sender quantizes each row per 1 x 128 tile (the recipe's own activation quantization) and
  // the receivers' experts read the codes as they are: half the bytes, the same results. Every
  // rank of a group must have the same setting. Off: bf16 rows, quantized by the receivers.
  bool fp8_dispatch = true;
  // A step of few tokens (decode) routes, groups and runs its experts on the GPU
  // (kernels/device_moe.h) with no host round trip per MoE layer. Off: the host plans every
  // MoE layer, as it does for prefill steps.
  bool device_planned_moe = false;
  // In a group of several GPUs, with device_planned_moe: the exchange is planned on the GPUs
  // too, in blocks of a fixed shape (kernels/device_exchange.h). Every rank of a group must
  // have the same setting (and GPUs of one kind).
  bool device_planned_exchange = false;
  // The device-planned exchange's capacity of (token, expert) entries per destination GPU: 0
  // sizes it from the group's largest batch (twice the even share, and some); a number fixes
  // it until it first overflows (tests force overflows with it). A step that overflows is
  // redone with the host's plan, and the capacity grows for the steps after it.
  int exchange_entries_capacity = 0;
  // Decode steps planned on the device (above) run as CUDA graphs, one captured per step shape
  // and replayed (step_graphs.h): one launch a step instead of about 15 a layer.
  bool cuda_graphs = false;
};

class CudaRankBackend : public RankBackend {
 public:
  // Uploads the weights (and the slots of `placement` for this rank) to options.device.
  // INVALID_ARGUMENT for models the GPU backend does not run (CheckCudaSupport).
  static absl::StatusOr<std::unique_ptr<CudaRankBackend>> Create(const Model& model,
                                                                 const ExpertPlacement& placement,
                                                                 const CudaRankOptions& options);
  ~CudaRankBackend() override;

  // `step.split` overlaps the exchanges with compute as described above.
  absl::Status Forward(std::span<const BatchSequence> batch, const ExpertPlacement& placement,
                       parallel::RankResources& rank, const parallel::StepAgreement& step) override;
  absl::StatusOr<std::span<const float>> Logits() override;
  // Ranks each sampled row's head on the device (kernels/sampling.h) and finishes it on the
  // host; only a row whose walk goes past its head is copied whole.
  absl::StatusOr<std::vector<int32_t>> NextTokens(std::span<Sampler* const> samplers) override;
  // The KV handoff copies rows between the device and host memory, block by block.
  absl::Status ExportKv(const std::vector<int32_t>& block_table, int num_tokens,
                        std::vector<std::byte>& rows) override;
  absl::Status ImportKv(const std::vector<int32_t>& block_table, int num_tokens,
                        std::span<const std::byte> rows) override;
  ExpertStager* expert_stager() override;

 private:
  struct State;
  class GpuStages;
  class SlotStager;
  explicit CudaRankBackend(std::unique_ptr<State> state);
  std::unique_ptr<State> state_;
  std::unique_ptr<SlotStager> stager_;  // null without background staging
};

// Checks that a model can run on the GPU backend (INVALID_ARGUMENT with the reason otherwise).
absl::Status CheckCudaSupport(const ModelConfig& config);

}  // namespace moeserve::engine::cuda
