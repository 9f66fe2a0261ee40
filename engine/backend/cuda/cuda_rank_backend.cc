#include "engine/backend/cuda/cuda_rank_backend.h"

#include <algorithm>
#include <chrono>

#include "absl/cleanup/cleanup.h"
#include "base/load_progress.h"
#include "engine/backend/cuda/rank_state.h"
#include "engine/base/status_macros.h"
#include "engine/model/architecture.h"
#include "engine/parallel/overlap_schedule.h"
#include "kernels/fp8_grouped_gemm.h"
#include "kernels/fp8_quantize.h"
#include "kernels/kernels.h"
#include "kernels/mla.h"
#include "spdlog/spdlog.h"

namespace moeserve::engine::cuda {

absl::Status CudaRankBackend::State::ReserveMicroBatch(MicroBatchState& mb) {
  const ModelConfig& c = config();
  const size_t t = std::max(options.max_batch_tokens, 1);
  const size_t h = c.hidden_size;
  const size_t heads = c.num_attention_heads;
  const size_t top_k = std::max(c.num_experts_per_tok, 1);
  RETURN_IF_ERROR(mb.residual.Reserve(t * h));
  RETURN_IF_ERROR(mb.normed.Reserve(t * h));
  // The token layout's buffers at their largest up front, so that step graphs, which read them
  // where they are, rarely see them move (block tables past 64 blocks a sequence still grow).
  RETURN_IF_ERROR(mb.token_ids.Reserve(t));
  RETURN_IF_ERROR(mb.positions.Reserve(t));
  RETURN_IF_ERROR(mb.token_sequence.Reserve(t));
  RETURN_IF_ERROR(mb.cache_rows.Reserve(t));
  RETURN_IF_ERROR(mb.block_tables.Reserve(t * 64));
  if (c.uses_mla()) {
    const size_t row_dim = c.kv_lora_rank + c.qk_rope_head_dim;
    RETURN_IF_ERROR(mb.q_compressed.Reserve(t * std::max(c.q_lora_rank, 1)));
    RETURN_IF_ERROR(mb.q.Reserve(t * heads * c.qk_head_dim()));
    RETURN_IF_ERROR(mb.kv_a.Reserve(t * row_dim));
    RETURN_IF_ERROR(mb.q_absorbed.Reserve(t * heads * row_dim));
    RETURN_IF_ERROR(mb.attended.Reserve(t * heads * c.kv_lora_rank));
    RETURN_IF_ERROR(mb.values.Reserve(t * heads * c.v_head_dim));
  } else {
    const size_t projection = (heads + 2 * static_cast<size_t>(c.num_key_value_heads)) * c.head_dim;
    RETURN_IF_ERROR(mb.qkv.Reserve(t * projection));
    RETURN_IF_ERROR(mb.q.Reserve(t * heads * c.head_dim));
    RETURN_IF_ERROR(mb.values.Reserve(t * heads * c.head_dim));
  }
  RETURN_IF_ERROR(mb.gate_logits.Reserve(t * std::max(c.n_routed_experts, 1)));
  RETURN_IF_ERROR(mb.routing_experts.Reserve(t * top_k));
  RETURN_IF_ERROR(mb.routing_weights.Reserve(t * top_k));
  RETURN_IF_ERROR(mb.send.Reserve(t * top_k * h));
  RETURN_IF_ERROR(mb.returned.Reserve(t * top_k * h));
  RETURN_IF_ERROR(mb.received.Reserve(static_cast<size_t>(max_received) * h));
  RETURN_IF_ERROR(mb.expert_in.Reserve(static_cast<size_t>(max_received) * h));
  RETURN_IF_ERROR(mb.expert_out.Reserve(static_cast<size_t>(max_received) * h));
  RETURN_IF_ERROR(mb.results.Reserve(static_cast<size_t>(max_received) * h));
  RETURN_IF_ERROR(mb.moe_out.Reserve(t * h));
  RETURN_IF_ERROR(mb.shared_out.Reserve(t * h));
  return mb.head_in.Reserve(t * h);
}

CudaRankBackend::CudaRankBackend(std::unique_ptr<State> state) : state_(std::move(state)) {}

CudaRankBackend::~CudaRankBackend() {
  stager_.reset();
  if (state_ != nullptr) cudaSetDevice(state_->options.device);
  state_.reset();
}

namespace {

// Whether the routed experts run in FP8: builtin:v3-bench-fp8's always (an error where the GPU
// cannot), an FP8 checkpoint's unless options say bf16 (dequantized, with a log line where the
// GPU or the shapes cannot run FP8).
absl::StatusOr<bool> ServeExpertsInFp8(const Model& model, const CudaRankOptions& options,
                                       int slots_per_rank) {
  const ModelConfig& c = model.config();
  int first_moe_layer = 0;
  while (first_moe_layer < c.num_hidden_layers && model.moe_index(first_moe_layer) < 0) {
    ++first_moe_layer;
  }
  if (c.n_routed_experts == 0 || first_moe_layer == c.num_hidden_layers) return false;
  bool stored_fp8 = c.routed_experts_fp8;
  if (!c.routed_experts_on_device) {
    const std::string expert = absl::StrCat("model.layers.", first_moe_layer, ".mlp.experts.0.");
    const TensorSource& source = model.tensor_source();
    stored_fp8 = source.StoredAsFp8Blocks(expert + "gate_proj.weight") &&
                 source.StoredAsFp8Blocks(expert + "up_proj.weight") &&
                 source.StoredAsFp8Blocks(expert + "down_proj.weight");
  }
  if (!stored_fp8 || (!c.routed_experts_fp8 && !options.keep_fp8_experts)) return false;
  cudaDeviceProp properties{};
  RETURN_IF_ERROR(CudaStatus(cudaGetDeviceProperties(&properties, options.device), "GPU"));
  std::string problem;
  if (properties.major != 9) {
    problem = absl::StrCat("block-scaled FP8 GEMMs need a Hopper GPU (compute capability 9.x); ",
                           properties.name, " is ", properties.major, ".", properties.minor);
  } else if (c.hidden_size % kernels::kFp8BlockSize != 0 ||
             c.moe_intermediate_size % kernels::kFp8BlockSize != 0) {
    problem = "the experts' widths are not multiples of 128";
  } else if (slots_per_rank > kernels::kMaxFp8RowGroups) {
    problem = absl::StrCat(slots_per_rank, " expert slots per GPU, more than the FP8 path's ",
                           kernels::kMaxFp8RowGroups);
  }
  if (problem.empty()) return true;
  if (c.routed_experts_fp8) {
    return absl::FailedPreconditionError(absl::StrCat("`", c.name, "` cannot run: ", problem));
  }
  spdlog::info("moeserve: GPU {} serves the FP8 experts in bf16: {}", options.device, problem);
  return false;
}

// A decode step of more (token, expert) pairs than this many per local slot plans on the host:
// the device path reads a slot's weights once per 16 of its rows, cuBLAS once for all of them.
constexpr int kDevicePlanPairsPerSlot = 4;

// Step graphs kept (StepGraphs): a shape is a token count and a power-of-two table width, so a
// serving rank meets a few dozen; each graph holds only its launches' parameters.
constexpr int kStepGraphCapacity = 128;

}  // namespace

// Whether this rank plans decode steps on the device (CudaRankOptions::device_planned_moe), and
// if so the buffers it needs.
absl::Status CudaRankBackend::State::PrepareDevicePlan(int slots_per_rank) {
  const ModelConfig& c = config();
  int major = 0, shared_per_block = 0;
  RETURN_IF_ERROR(CudaStatus(
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, options.device), "GPU"));
  RETURN_IF_ERROR(
      CudaStatus(cudaDeviceGetAttribute(&shared_per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        options.device),
                 "GPU"));
  const int top_k = std::max(c.num_experts_per_tok, 1);
  device_plan_possible =
      options.device_planned_moe && (options.group_size == 1 || options.device_planned_exchange) &&
      c.n_routed_experts > 0 && major >= 8 &&
      static_cast<size_t>(shared_per_block) >= kernels::DeviceGroupedGemmSharedBytes() &&
      slots_per_rank <= kernels::kMaxPlannedSlots &&
      kernels::DeviceGroupedGemmSupports(2 * c.moe_intermediate_size, c.hidden_size) &&
      kernels::DeviceGroupedGemmSupports(c.hidden_size, c.moe_intermediate_size);
  if (!device_plan_possible) return absl::OkStatus();
  device_plan_max_pairs =
      std::min({kernels::kMaxPlannedPairs, std::max(options.max_batch_tokens, 1) * top_k,
                kDevicePlanPairsPerSlot * slots_per_rank});
  device_slots_per_rank = slots_per_rank;
  // In a group, a rank's experts run over the exchange's capacity of received entries, which
  // PlanStepExchange keeps within kMaxPlannedPairs.
  const int mlp_rows = options.group_size > 1 ? kernels::kMaxPlannedPairs : device_plan_max_pairs;
  ASSIGN_OR_RETURN(kernels::DeviceExpertMlp mlp,
                   kernels::DeviceExpertMlp::Create(
                       c.hidden_size, c.moe_intermediate_size, mlp_rows, stream,
                       fp8_experts && kernels::Fp8GroupedGemmSupported(options.device)
                           ? kernels::DeviceExpertMlp::Fp8Products::kRecipe
                           : kernels::DeviceExpertMlp::Fp8Products::kWidenedWeights));
  device_mlp = std::make_unique<kernels::DeviceExpertMlp>(std::move(mlp));
  for (MicroBatchState& mb : micro_batches) {
    RETURN_IF_ERROR(mb.plan_offsets.Reserve(slots_per_rank + 1));
    RETURN_IF_ERROR(mb.plan_source_rows.Reserve(device_plan_max_pairs));
    RETURN_IF_ERROR(mb.plan_positions.Reserve(device_plan_max_pairs));
  }
  slot_rows_count = static_cast<size_t>(c.num_moe_layers()) * slots_per_rank;
  RETURN_IF_ERROR(slot_rows.Reserve(slot_rows_count));
  RETURN_IF_ERROR(ClearSlotRows());
  if (options.group_size > 1) {
    exchange_fixed_entries = options.exchange_entries_capacity;
    RETURN_IF_ERROR(exchange_overflow.Reserve(1));
    RETURN_IF_ERROR(exchange_overflow_host.Reserve(sizeof(int32_t)));
  }
  spdlog::info("moeserve: GPU {} plans the experts{} of steps up to {} tokens on the device",
               options.device, options.group_size > 1 ? " and the exchange" : "",
               device_plan_max_pairs / top_k);
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<CudaRankBackend>> CudaRankBackend::Create(
    const Model& model, const ExpertPlacement& placement, const CudaRankOptions& options) {
  const ModelConfig& c = model.config();
  RETURN_IF_ERROR(CheckCudaSupport(c));
  RETURN_IF_ERROR(CudaStatus(cudaSetDevice(options.device), "select GPU"));
  auto state = std::make_unique<State>();
  State& s = *state;
  s.model = &model;
  s.options = options;
  RETURN_IF_ERROR(
      CudaStatus(cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking), "stream"));
  RETURN_IF_ERROR(
      CudaStatus(cudaStreamCreateWithFlags(&s.copy_stream, cudaStreamNonBlocking), "copy stream"));
  RETURN_IF_ERROR(CublasStatus(cublasCreate(&s.cublas), "cuBLAS handle"));
  RETURN_IF_ERROR(CublasStatus(cublasSetStream(s.cublas, s.stream), "cuBLAS stream"));
  RETURN_IF_ERROR(kernels::GiveCublasWorkspace(s.cublas, s.cublas_workspace));
  ASSIGN_OR_RETURN(s.side, SideLane::Create(s.stream));
  RETURN_IF_ERROR(
      CudaStatus(cudaEventCreateWithFlags(&s.produced, cudaEventDisableTiming), "exchange event"));

  // How long a rank's weights take to reach its GPU is part of every (re)start; say it.
  const auto upload_start = std::chrono::steady_clock::now();
  const int slots_per_rank = placement.num_physical() / options.group_size;
  ASSIGN_OR_RETURN(s.fp8_experts, ServeExpertsInFp8(model, options, slots_per_rank));
  // The dense projections in FP8 where asked: the experts' conditions hold for them too (Hopper,
  // FP8 as stored or a built-in FP8 model).
  s.fp8_dense = s.fp8_experts && options.keep_fp8_dense;
  base::LoadProgress& progress = base::LoadProgress::Global();
  progress.Begin(
      absl::StrCat(c.name, " onto GPU ", options.device),
      RankUploadBytes(c, model.tensor_source(), slots_per_rank, s.fp8_experts, s.fp8_dense));
  {
    // A failed load ends the progress too (the rank's error says why).
    absl::Cleanup finish_progress = [&progress] { progress.Finish(); };
    WeightUploader uploader(model.tensor_source(), s.stream);
    RETURN_IF_ERROR(s.LoadWeights(uploader));
    RETURN_IF_ERROR(s.LoadSlots(placement));
  }
  RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(s.stream), "weight upload"));
  size_t free_bytes = 0, total_bytes = 0;
  RETURN_IF_ERROR(CudaStatus(cudaMemGetInfo(&free_bytes, &total_bytes), "device memory"));
  spdlog::info(
      "moeserve: GPU {} holds its weights after {:.1f} s ({:.1f} of {:.1f} GiB in use)",
      options.device,
      std::chrono::duration<double>(std::chrono::steady_clock::now() - upload_start).count(),
      static_cast<double>(total_bytes - free_bytes) / (1 << 30),
      static_cast<double>(total_bytes) / (1 << 30));

  // The gate kernel applies the same routing rule as RouteTokens on the CPU.
  const RoutingRule rule = RoutingRuleOf(c);
  s.gate_options = {.num_experts = rule.num_experts,
                    .top_k = rule.top_k,
                    .num_groups = rule.num_groups,
                    .topk_groups = rule.topk_groups,
                    .sigmoid = rule.sigmoid,
                    .group_score_top2_sum = rule.group_score_top2_sum,
                    .normalize = rule.normalize,
                    .scaling = rule.scaling};

  // KV rows on the device, and the fixed-size scratch of a step.
  const int hidden = c.hidden_size;
  const int row_dim = s.kv_row_dim();
  const cudaStream_t stream = s.stream;
  s.rows_per_layer = static_cast<int64_t>(options.kv_blocks) * options.kv_block_size;
  RETURN_IF_ERROR(
      s.kv_rows.Reserve(static_cast<size_t>(c.num_hidden_layers) * s.rows_per_layer * row_dim));
  if (c.uses_mla()) {
    RETURN_IF_ERROR(s.attention_workspace.Reserve(
        kernels::MlaPagedAttentionWorkspaceBytes(c.kv_lora_rank) / sizeof(float)));
  }
  const int max_tokens = std::max(options.max_batch_tokens, 1);
  const int top_k = std::max(c.num_experts_per_tok, 1);
  // Worst case of rows one rank receives: every rank's every assignment.
  s.max_received = max_tokens * top_k * options.group_size;
  auto make_mlp = [&](int intermediate, int rows, int experts, cudaStream_t on,
                      std::unique_ptr<kernels::ExpertMlp>& out) -> absl::Status {
    absl::StatusOr<kernels::ExpertMlp> mlp =
        kernels::ExpertMlp::Create(hidden, intermediate, rows, experts, on);
    if (!mlp.ok()) return mlp.status();
    out = std::make_unique<kernels::ExpertMlp>(std::move(*mlp));
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(make_mlp(std::max(c.intermediate_size, 1), max_tokens, 1, stream, s.dense_mlp));
  if (c.n_routed_experts > 0) {
    const int slots = placement.num_physical() / options.group_size;
    RETURN_IF_ERROR(make_mlp(std::max(c.moe_intermediate_size * c.n_shared_experts, 1), max_tokens,
                             1, s.side->stream(), s.shared_mlp));
    if (s.fp8_experts) {
      ASSIGN_OR_RETURN(kernels::Fp8ExpertMlp fp8_mlp,
                       kernels::Fp8ExpertMlp::Create(hidden, c.moe_intermediate_size,
                                                     s.max_received, slots, stream));
      s.routed_fp8_mlp = std::make_unique<kernels::Fp8ExpertMlp>(std::move(fp8_mlp));
      // The receivers' strategies must all read packed rows: not the weight-only kernel, which
      // serving takes only where the grouped GEMM does not run.
      s.fp8_dispatch = options.fp8_dispatch && options.group_size > 1 &&
                       s.routed_fp8_mlp->grouped_gemm_supported();
    } else {
      RETURN_IF_ERROR(make_mlp(std::max(c.moe_intermediate_size, 1), s.max_received, slots, stream,
                               s.routed_mlp));
    }
  }
  for (MicroBatchState& mb : s.micro_batches) RETURN_IF_ERROR(s.ReserveMicroBatch(mb));
  RETURN_IF_ERROR(s.PrepareDevicePlan(slots_per_rank));
  // A group's steps can be graphs where their exchange is planned on the GPUs and goes over
  // NCCL (ranks sharing a GPU in one process exchange through the host, which a graph cannot).
  const bool group_graphs = options.device_planned_exchange && options.exchange != nullptr;
  if (options.cuda_graphs && s.device_plan_possible && (options.group_size == 1 || group_graphs)) {
    s.step_graphs = std::make_unique<StepGraphs>(kStepGraphCapacity);
    spdlog::info("moeserve: GPU {} runs device-planned decode steps as CUDA graphs{}",
                 options.device, options.group_size > 1 ? ", their exchange included" : "");
  }
  // A step has at most a row of logits per token.
  RETURN_IF_ERROR(s.step_logits.Reserve(static_cast<size_t>(max_tokens) * c.vocab_size));
  auto backend = std::unique_ptr<CudaRankBackend>(new CudaRankBackend(std::move(state)));
  if (options.background_placement_staging) {
    backend->stager_ = std::make_unique<SlotStager>(*backend->state_);
  }
  return backend;
}

absl::Status CudaRankBackend::State::RunMlp(const DeviceMlp& w, kernels::ExpertMlp& bf16_mlp,
                                            const Bf16* x, int rows, int intermediate, Bf16* y) {
  if (w.bf16()) {
    return bf16_mlp.Run(x, {0, rows}, {w.gate_up.bf16.data()}, {w.down.bf16.data()}, y);
  }
  const int hidden = config().hidden_size;
  RETURN_IF_ERROR(Linear(x, w.gate_up, fp8_mlp_gate_up.data(), rows, hidden, 2 * intermediate));
  RETURN_IF_ERROR(
      kernels::SiluMul(fp8_mlp_gate_up.data(), fp8_mlp_act.data(), rows, intermediate, stream));
  return Linear(fp8_mlp_act.data(), w.down, y, rows, intermediate, hidden);
}

// The GPU's stages of the overlap schedule. The host enqueues work; the compute stream waits for
// an exchange (through an event) only where its result is used. The gate and the shared
// experts run with the dispatch; the drain waits for both streams with the group timeout, except
// while a step graph captures the stages (State::capturing_step: the graph's launch is what the
// host waits for).
class CudaRankBackend::GpuStages : public parallel::MicroBatchStages {
 public:
  GpuStages(State& state, std::vector<MicroBatchState*>& micro_batches,
            const ExpertPlacement& placement, parallel::RankResources& rank)
      : s_(state),
        micro_batches_(micro_batches),
        placement_(placement),
        rank_(rank),
        received_per_layer_(state.config().num_moe_layers(), 0) {}

  absl::Status Attention(int layer, int index) override {
    MicroBatchState& mb = *micro_batches_[index];
    ScopedTraceEvent event(rank_.trace, rank_.trace_pid, kHostLane,
                           s_.EventName("attention", layer, mb), "compute");
    RETURN_IF_ERROR(s_.Attention(layer, mb));
    return s_.MarkStage("attention", layer, mb);
  }
  absl::Status DenseMlp(int layer, int index) override {
    MicroBatchState& mb = *micro_batches_[index];
    const DeviceLayer& w = s_.layers[layer];
    RETURN_IF_ERROR(s_.RunMlp(w.dense, *s_.dense_mlp, mb.normed.data(), mb.tokens,
                              s_.config().intermediate_size, mb.moe_out.data()));
    RETURN_IF_ERROR(kernels::AddInPlace(mb.residual.data(), mb.moe_out.data(),
                                        static_cast<int64_t>(mb.tokens) * s_.config().hidden_size,
                                        s_.stream));
    return s_.MarkStage("dense MLP", layer, mb);
  }
  absl::Status StartDispatch(int layer, int index) override {
    MicroBatchState& mb = *micro_batches_[index];
    ScopedTraceEvent event(rank_.trace, rank_.trace_pid, kHostLane,
                           s_.EventName("gate and dispatch", layer, mb), "compute");
    RETURN_IF_ERROR(s_.GateAndDispatch(layer, mb, placement_, rank_));
    return s_.MarkStage("gate and dispatch", layer, mb);
  }
  absl::Status Experts(int layer, int index) override {
    MicroBatchState& mb = *micro_batches_[index];
    ScopedTraceEvent event(rank_.trace, rank_.trace_pid, kHostLane,
                           s_.EventName("experts and combine", layer, mb), "compute");
    RETURN_IF_ERROR(s_.ExpertsAndCombine(layer, mb, rank_));
    received_per_layer_[s_.model->moe_index(layer)] += mb.received_count;
    return s_.MarkStage("experts and combine", layer, mb);
  }
  absl::Status FinishMoe(int layer, int index) override {
    MicroBatchState& mb = *micro_batches_[index];
    RETURN_IF_ERROR(s_.FinishMoe(mb));
    return s_.MarkStage("weighted sum", layer, mb);
  }
  absl::Status DrainExchanges() override {
    // Whatever happened, nothing may still be in flight into this step's buffers.
    ScopedTraceEvent event(rank_.trace, rank_.trace_pid, kHostLane, "layers wait", "gpu wait");
    absl::Status drained = s_.DrainExchanges();
    if (!s_.capturing_step) drained.Update(CudaStatus(cudaStreamSynchronize(s_.stream), "step"));
    return drained;
  }
  const std::vector<int64_t>& received_per_layer() const { return received_per_layer_; }

 private:
  State& s_;
  std::vector<MicroBatchState*>& micro_batches_;
  const ExpertPlacement& placement_;
  parallel::RankResources& rank_;
  std::vector<int64_t> received_per_layer_;
};

// The ExpertStager the backend registers with its group: new placements are staged in the
// background into spare device buffers and swapped in at the commit (rank_state.h).
class CudaRankBackend::SlotStager : public ExpertStager {
 public:
  explicit SlotStager(State& state) : state_(state) {}
  absl::Status Stage(const ExpertPlacement& placement) override {
    return state_.StageSlots(placement);
  }
  void Commit(const ExpertPlacement& placement) override { state_.CommitSlots(placement); }
  void Discard() override { state_.DiscardStagedSlots(); }

 private:
  State& state_;
};

ExpertStager* CudaRankBackend::expert_stager() { return stager_.get(); }

absl::Status CudaRankBackend::Forward(std::span<const BatchSequence> batch,
                                      const ExpertPlacement& placement,
                                      parallel::RankResources& rank,
                                      const parallel::StepAgreement& step) {
  State& s = *state_;
  const ModelConfig& c = s.config();
  s.step_rows = 0;  // no logits to read until this step has them all
  RETURN_IF_ERROR(CudaStatus(cudaSetDevice(s.options.device), "select GPU"));
  RETURN_IF_ERROR(s.LoadSlots(placement));
  if (s.device_plan_possible && s.device_plan_tables_version != s.placement_version) {
    RETURN_IF_ERROR(s.BuildDevicePlanTables(placement));
  }
  if (s.slot_rows_written) {
    // A step that failed after planning on the device left its counts: they belong to no
    // step's metrics (and maybe to slots a commit has changed since).
    RETURN_IF_ERROR(s.ClearSlotRows());
  }
  RETURN_IF_ERROR(s.PlanStepExchange(step));
  // Two micro-batches split the batch as the CPU backend does; every rank of the group splits
  // (the step agreement decides), so their exchanges pair up.
  std::vector<std::vector<parallel::BatchPiece>> parts;
  if (step.split) {
    parts = parallel::SplitIntoMicroBatches(batch, 2);
  } else {
    parts.emplace_back();
    for (const BatchSequence& seq : batch) parts[0].push_back({seq, true});
  }
  std::vector<MicroBatchState*> micro_batches;
  for (size_t i = 0; i < parts.size(); ++i) {
    MicroBatchState& mb = s.micro_batches[i];
    mb.sequences.clear();
    mb.emits_logits.clear();
    for (const parallel::BatchPiece& piece : parts[i]) {
      mb.sequences.push_back(piece.sequence);
      mb.emits_logits.push_back(piece.emits_logits);
    }
    RETURN_IF_ERROR(s.UploadLayout(mb, s.options.kv_block_size));
    micro_batches.push_back(&mb);
  }
  std::vector<std::vector<int32_t>> rows;
  size_t total_rows = 0;
  for (MicroBatchState* mb : micro_batches) {
    rows.push_back(State::LogitRows(*mb));
    total_rows += rows.back().size();
  }
  const size_t vocab = static_cast<size_t>(c.vocab_size);
  RETURN_IF_ERROR(s.step_logits.Reserve(total_rows * vocab));

  // The whole step on the compute stream: embeddings, the layers (the shared two-batch-overlap
  // schedule, parallel/overlap_schedule.h: one micro-batch's exchange, on the communication
  // stream, overlaps the other's compute), then the LM head of the rows with logits, whose
  // logits stay on the device (NextTokens() reads a few candidates of each row back, Logits()
  // all of them). While a step graph captures it (`capturing`), nothing may wait for the GPU.
  std::vector<int64_t> received_per_layer;
  auto enqueue_step = [&](bool capturing) -> absl::Status {
    s.capturing_step = capturing;
    absl::Cleanup not_capturing = [&s] { s.capturing_step = false; };
    for (MicroBatchState* mb : micro_batches) RETURN_IF_ERROR(s.Embed(*mb));
    GpuStages stages(s, micro_batches, placement, rank);
    RETURN_IF_ERROR(parallel::RunOverlapSchedule(
        c.num_hidden_layers, [&](int layer) { return s.model->moe_index(layer) >= 0; },
        static_cast<int>(micro_batches.size()), stages));
    received_per_layer = stages.received_per_layer();
    ScopedTraceEvent event(rank.trace, rank.trace_pid, kHostLane, "LM head", "compute");
    size_t offset = 0;
    for (size_t i = 0; i < micro_batches.size(); ++i) {
      RETURN_IF_ERROR(s.Head(*micro_batches[i], rows[i], s.step_logits.data() + offset * vocab));
      offset += rows[i].size();
    }
    return s.stage_timer.Mark("LM head");
  };

  // One attempt at the step: as a graph where it can, kernel by kernel otherwise, then the
  // step's one wait for the GPU (in a group, with the group timeout: a dead peer fails the step).
  auto run_step = [&]() -> absl::Status {
    bool ran = false;
    if (s.step_exchange_on_device) RETURN_IF_ERROR(s.ClearExchangeOverflow());
    if (s.step_graphs != nullptr && micro_batches.size() == 1 && s.RunsAsGraph(*micro_batches[0])) {
      // A graph step has no GPU stages of its own on the trace: its work is one launch.
      RETURN_IF_ERROR(s.stage_timer.Begin(nullptr, s.stream));
      MicroBatchState& mb = *micro_batches[0];
      ScopedTraceEvent event(rank.trace, rank.trace_pid, kHostLane, "step graph", "compute");
      // A GPU alone never sets an exchange shape: its capacities are 0.
      const StepGraphs::Key key{mb.tokens, mb.max_blocks, s.exchange_shape.rows,
                                s.exchange_shape.entries};
      absl::StatusOr<bool> captured = s.step_graphs->Launch(
          key, s.GraphFingerprint(mb), s.stream, [&] { return enqueue_step(/*capturing=*/true); });
      if (captured.ok()) {
        ran = true;
        if (rank.metrics != nullptr) rank.metrics->AddStepGraph(*captured);
        if (!*captured) {
          // A replay: what the capture's host side recorded, again.
          received_per_layer.assign(c.num_moe_layers(),
                                    static_cast<int64_t>(mb.tokens) * c.num_experts_per_tok);
          s.slot_rows_written |= rank.load != nullptr || s.step_exchange_on_device;
        }
        if (s.options.group_size > 1) {
          // The graph holds the group's collectives: the host waits for it as for them.
          ASSIGN_OR_RETURN(comm::CollectiveCompletion launched,
                           s.options.exchange->RecordCompletion(s.stream));
          s.awaited.push_back(std::move(launched));
        }
      } else if (s.options.group_size > 1) {
        // The failed capture may have enqueued some of the group's collectives, which then never
        // run: the peers' would wait for them. The step fails, and so does the group, visibly.
        s.step_graphs.reset();
        return absl::InternalError(absl::StrCat(
            "GPU ", s.options.device, " could not capture a step of its group as a CUDA graph (",
            captured.status().ToString(), "); serve with --gpu-cuda-graphs off"));
      } else {
        // Nothing ran; the step goes kernel by kernel, and so do the next ones.
        spdlog::warn("moeserve: GPU {} runs its steps without CUDA graphs from now on: {}",
                     s.options.device, captured.status().ToString());
        s.step_graphs.reset();
        s.slot_rows_written = false;
        RETURN_IF_ERROR(s.ClearSlotRows());
      }
    }
    if (!ran) {
      RETURN_IF_ERROR(s.stage_timer.Begin(rank.trace, s.stream));
      RETURN_IF_ERROR(enqueue_step(/*capturing=*/false));
    }
    if (s.step_exchange_on_device) RETURN_IF_ERROR(s.ReadBackExchangeOverflow());
    s.PublishExchangeTimes(rank);
    RETURN_IF_ERROR(s.ReadBackSlotRows(rank));
    {
      // The step's staging buffers are rewritten by the next Forward(): it must have run.
      ScopedTraceEvent event(rank.trace, rank.trace_pid, kHostLane, "step wait", "gpu wait");
      RETURN_IF_ERROR(s.SynchronizeCompute("LM head"));
    }
    s.stage_timer.Publish(rank.trace_pid, kGpuLane);
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(run_step());
  if (s.step_exchange_on_device && s.ExchangeOverflowed()) {
    // Every rank received every rank's headers, so the whole group saw the overflow and redoes
    // the step together, planned on the host (its KV rows are written again, the same), and
    // sizes the next steps' exchanges larger.
    s.GrowExchangeAfterOverflow();
    if (rank.metrics != nullptr) rank.metrics->AddExchangeOverflow();
    s.slot_rows_read_back = false;  // the first attempt's counts
    RETURN_IF_ERROR(run_step());
  }
  RETURN_IF_ERROR(s.RecordDevicePlannedLoad(rank, received_per_layer));
  if (rank.metrics != nullptr && !received_per_layer.empty()) {
    RETURN_IF_ERROR(parallel::PublishBalancedness(received_per_layer, rank));
  }
  s.step_rows = total_rows;
  return absl::OkStatus();
}

bool CudaRankBackend::State::RunsAsGraph(const MicroBatchState& mb) const {
  if (!UsesDevicePlan(mb)) return false;
  for (size_t i = 0; i < mb.sequences.size(); ++i) {
    if (mb.sequences[i].tokens.size() != 1 || !mb.emits_logits[i]) return false;
  }
  return true;
}

uint64_t CudaRankBackend::State::GraphFingerprint(const MicroBatchState& mb) const {
  uint64_t hash = 14695981039346656037ull;  // FNV-1a over the addresses
  auto add = [&](const void* pointer) {
    hash ^= reinterpret_cast<uintptr_t>(pointer);
    hash *= 1099511628211ull;
  };
  add(mb.token_ids.data());
  add(mb.positions.data());
  add(mb.token_sequence.data());
  add(mb.cache_rows.data());
  add(mb.block_tables.data());
  add(attention_workspace.data());
  add(step_logits.data());
  add(slot_rows.data());
  // A group's exchange buffers (resized when its shape grows).
  for (const void* buffer :
       {static_cast<const void*>(mb.send.data()), static_cast<const void*>(mb.received.data()),
        static_cast<const void*>(mb.expert_out.data()), static_cast<const void*>(mb.results.data()),
        static_cast<const void*>(mb.returned.data()),
        static_cast<const void*>(mb.dispatch_index.data()),
        static_cast<const void*>(mb.grouped_rows.data()),
        static_cast<const void*>(mb.plan_source_rows.data()),
        static_cast<const void*>(mb.peer_overflow.data()),
        static_cast<const void*>(exchange_overflow.data())}) {
    add(buffer);
  }
  for (const DevicePlanTables& t : device_plan_tables) {
    add(t.replica_begin.data());
    add(t.replica_slots.data());
    add(t.gate_up.data());
    add(t.down.data());
    add(t.gate_up_fp8.data());
    add(t.down_fp8.data());
  }
  return hash;
}

// Copies the rows of positions [0, num_tokens) of `block_table` between the device cache and
// `host` (layer-major), one contiguous run of a block at a time.
absl::Status CudaRankBackend::State::CopyKvRows(const std::vector<int32_t>& block_table,
                                                int num_tokens, std::byte* host, bool to_host) {
  State& s = *this;
  const ModelConfig& c = s.config();
  const int block_size = s.options.kv_block_size;
  const size_t row_bytes = sizeof(Bf16) * s.kv_row_dim();
  if (num_tokens < 0 ||
      (num_tokens + block_size - 1) / block_size > static_cast<int>(block_table.size())) {
    return absl::InternalError("KV handoff: the block table does not cover the tokens");
  }
  RETURN_IF_ERROR(CudaStatus(cudaSetDevice(s.options.device), "select GPU"));
  for (int layer = 0; layer < c.num_hidden_layers; ++layer) {
    auto* layer_rows = reinterpret_cast<std::byte*>(s.kv_rows.data()) +
                       static_cast<size_t>(layer) * s.rows_per_layer * row_bytes;
    for (int first = 0; first < num_tokens; first += block_size) {
      const size_t count = std::min(block_size, num_tokens - first);
      std::byte* device = layer_rows + static_cast<size_t>(block_table[first / block_size]) *
                                           block_size * row_bytes;
      std::byte* at = host + (static_cast<size_t>(layer) * num_tokens + first) * row_bytes;
      RETURN_IF_ERROR(CudaStatus(
          cudaMemcpyAsync(to_host ? static_cast<void*>(at) : device, to_host ? device : at,
                          count * row_bytes,
                          to_host ? cudaMemcpyDeviceToHost : cudaMemcpyHostToDevice, s.stream),
          "KV handoff copy"));
    }
  }
  return s.SynchronizeCompute("KV handoff");
}

absl::Status CudaRankBackend::ExportKv(const std::vector<int32_t>& block_table, int num_tokens,
                                       std::vector<std::byte>& rows) {
  const ModelConfig& c = state_->config();
  rows.resize(static_cast<size_t>(c.num_hidden_layers) * std::max(num_tokens, 0) *
              state_->kv_row_dim() * sizeof(Bf16));
  return state_->CopyKvRows(block_table, num_tokens, rows.data(), /*to_host=*/true);
}

absl::Status CudaRankBackend::ImportKv(const std::vector<int32_t>& block_table, int num_tokens,
                                       std::span<const std::byte> rows) {
  const ModelConfig& c = state_->config();
  if (rows.size() != static_cast<size_t>(c.num_hidden_layers) * std::max(num_tokens, 0) *
                         state_->kv_row_dim() * sizeof(Bf16)) {
    return absl::InternalError("KV handoff: the rows do not match the tokens");
  }
  return state_->CopyKvRows(block_table, num_tokens, const_cast<std::byte*>(rows.data()),
                            /*to_host=*/false);
}

}  // namespace moeserve::engine::cuda
