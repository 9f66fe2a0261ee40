// The GPU backend's state of one rank and the device structures it is built from. Internal to
// engine/backend/cuda/: CudaRankBackend's implementation is split by job over weights.cc
// (uploading and staging weights), attention.cc (token layout, MLA and grouped-query
// attention), moe_exchange.cc (gate, dispatch, experts, combine on the communication stream),
// sampling.cc (LM head, logits, next tokens) and cuda_rank_backend.cc (creation and the step).
//
// Not thread-safe: a rank's thread drives its State; only StageSlots runs on the group's
// staging thread, on its own stream and its own staged buffers.
#pragma once

#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/backend/cuda/cuda_rank_backend.h"
#include "engine/backend/cuda/gpu_stage_timer.h"
#include "engine/backend/cuda/pinned_buffer.h"
#include "engine/backend/cuda/side_lane.h"
#include "engine/backend/cuda/step_graphs.h"
#include "engine/backend/cuda/weight_uploader.h"
#include "engine/comm/nccl_communicator.h"
#include "engine/model/model.h"
#include "engine/parallel/ep_forward.h"
#include "kernels/cpu_twins.h"
#include "kernels/device_array.h"
#include "kernels/device_exchange.h"
#include "kernels/device_moe.h"
#include "kernels/expert_mlp.h"
#include "kernels/fp8_expert_mlp.h"
#include "kernels/fp8_linear.h"
#include "kernels/kernels.h"
#include "kernels/logit_head.h"

namespace moeserve::engine::cuda {

using Bf16 = __nv_bfloat16;
using kernels::CublasStatus;
using kernels::CudaStatus;
using kernels::DeviceArray;

// A projection's weight [out, in] on the device: bf16, or e4m3 codes with 128 x 128 block scales
// (kernels/fp8.h) where the rank serves it in FP8 (State::fp8_dense, State::fp8_experts).
struct DeviceLinear {
  DeviceArray<Bf16> bf16;
  DeviceArray<__nv_fp8_e4m3> codes;
  DeviceArray<float> scales;
  bool fp8 = false;
  kernels::Fp8Weight Fp8() const { return {codes.data(), scales.data()}; }
};

// A SwiGLU MLP's weights: gate_up [2I, H] (gate rows, then up rows) and down [H, I], as ExpertMlp
// (bf16) or Fp8ExpertMlp and Fp8Linear (FP8) take them.
struct DeviceMlp {
  DeviceLinear gate_up, down;
  // Both projections bf16: the MLP runs through an ExpertMlp (RunMlp), on that MLP's stream.
  bool bf16() const { return !gate_up.fp8 && !down.fp8; }
};

struct DeviceLayer {
  DeviceArray<Bf16> input_norm, post_attention_norm;
  // MLA.
  DeviceLinear q_a, q_b, q;  // q-LoRA pair, or the direct projection
  DeviceArray<Bf16> q_a_norm;
  // kv_a's 576 outputs are not whole FP8 blocks, and kv_b is read per head: both stay bf16.
  DeviceArray<Bf16> kv_a, kv_a_norm, kv_b;
  // Grouped-query attention: q, k and v projections stacked into one [(heads + 2 * kv_heads) *
  // head_dim, hidden] matrix (one GEMM), and Qwen3's per-head norms (empty for Mixtral).
  DeviceArray<Bf16> qkv, q_norm, k_norm;
  bool has_qk_norm = false;
  DeviceLinear o;  // output projection (both)
  DeviceMlp dense;
  DeviceArray<Bf16> gate;
  DeviceArray<float> correction_bias;
  bool has_correction_bias = false;
  DeviceMlp shared;
  bool has_shared = false;
  std::vector<DeviceMlp> slots;      // this rank's placement slots (MoE layers)
  std::vector<int32_t> slot_expert;  // the logical expert each slot holds (-1: none yet)
};

// Trace events of the backend go on the rank's compute lane (as the CPU backend's do). They
// are host time: GPU work shows where the host waits for it.
constexpr int kHostLane = parallel::kTraceComputeLane;
// The GPU time of a traced step's stages (GpuStageTimer) goes on a lane of its own.
constexpr int kGpuLane = parallel::kTraceStepLane + 1;

// A routed expert that exists on the GPU only (ModelConfig::routed_experts_on_device): bf16, or
// FP8 (quantized from the same bf16 values through `scratch`).
absl::Status GenerateMlp(DeviceMlp& out, int layer, int expert, int intermediate, int hidden,
                         bool fp8, DeviceArray<Bf16>& scratch, cudaStream_t stream);
// A SwiGLU MLP's tensors `prefix` + gate_proj/up_proj/down_proj.weight, in bf16 or as stored
// in FP8.
absl::Status UploadMlp(WeightUploader& uploader, DeviceMlp& out, const std::string& prefix,
                       bool fp8);
// The bytes a rank uploads at start-up: its slots' experts in bf16 or (`fp8_experts`) FP8, and
// the dense weights in bf16, or (`fp8_dense`) in FP8 where they are stored so and UploadLinear
// keeps them.
uint64_t RankUploadBytes(const ModelConfig& config, const TensorSource& source, int slots_per_rank,
                         bool fp8_experts, bool fp8_dense);

// An index array (row numbers) on its way to the device.
struct DeviceIndex {
  DeviceArray<int32_t> device;
  PinnedBuffer staging;
  absl::Status Upload(const std::vector<int32_t>& values, cudaStream_t stream) {
    RETURN_IF_ERROR(device.Reserve(values.size()));
    return staging.CopyToDevice(device.data(), values.data(), values.size() * sizeof(int32_t),
                                stream);
  }
};

// One micro-batch's activations and exchange state. With two-batch overlap a step has two,
// and one's dispatch or combine runs on the communication stream while the other computes;
// every buffer either side may touch while the other runs is the micro-batch's own.
struct MicroBatchState {
  std::vector<BatchSequence> sequences;
  std::vector<bool> emits_logits;
  std::vector<SequenceSpan> spans;
  int tokens = 0;
  int max_blocks = 1;
  DeviceArray<int32_t> token_ids, positions, token_sequence, block_tables;
  DeviceArray<int64_t> cache_rows;
  // q: MLA's queries, or GQA's rotated queries; values: either's attention output before o_proj.
  DeviceArray<Bf16> residual, normed, q_compressed, q, q_absorbed, attended, values;
  DeviceArray<float> kv_a, gate_logits, routing_weights;
  DeviceArray<float> qkv;  // GQA: the fused q/k/v projection, fp32
  DeviceArray<int32_t> routing_experts;
  DeviceArray<Bf16> send, received, expert_in, expert_out, results, returned, moe_out, shared_out;
  DeviceArray<Bf16> head_in;
  DeviceIndex send_source, slot_order, received_order, assignment_rows, head_rows;
  PinnedBuffer routing_host;  // the routing's way back to the host
  // Ranks sharing a GPU exchange activations through these and the host communicator.
  PinnedBuffer host_send, host_receive;
  // The current MoE layer planned on the device (State::UsesDevicePlan): its slots' row groups
  // (kernels/device_moe.h) and each pair's grouped row, for the weighted sum.
  bool device_planned = false;
  DeviceArray<int32_t> plan_offsets, plan_source_rows, plan_positions;
  // In a group, the device-planned exchange's (kernels/device_exchange.h): the token of each
  // dispatch row, each received entry's grouped row, and the plan's per-destination overflow.
  DeviceArray<int32_t> dispatch_index, grouped_rows, peer_overflow;
  // The current MoE layer's exchange.
  parallel::DispatchPlan plan;
  std::vector<int64_t> receive_entries;  // per source rank; the combine sends back as many rows
  std::vector<int64_t> slot_offsets;
  int64_t received_count = 0;
  // Where the dispatched rows are: `received`, or `normed` itself when alone (so nothing may
  // write this micro-batch's `normed` between its dispatch and its experts). With
  // `received_fp8` (State::fp8_dispatch) they are packed FP8 rows (kernels/fp8_quantize.h),
  // quantized by their senders, in `received`'s memory.
  const void* received_rows = nullptr;
  bool received_fp8 = false;
  const Bf16* returned_rows = nullptr;  // where the combined rows are
  // The exchange in flight on the communication stream, until its consumer waits for it.
  std::optional<comm::CollectiveCompletion> in_flight;
};

// What the device plan of one MoE layer reads (kernels/device_moe.h), rebuilt from the slots
// whenever the placement changes: where each expert's replicas are, and the slots' weights.
struct DevicePlanTables {
  DeviceArray<int32_t> replica_begin, replica_slots;
  DeviceArray<const Bf16*> gate_up, down;                 // bf16 experts
  DeviceArray<kernels::Fp8Weight> gate_up_fp8, down_fp8;  // FP8 experts
  // The slots' projections as DeviceGroupedGemm reads them.
  kernels::DeviceSlotWeights GateUp(bool fp8) const {
    return fp8 ? kernels::DeviceSlotWeights{nullptr, gate_up_fp8.data()}
               : kernels::DeviceSlotWeights{gate_up.data(), nullptr};
  }
  kernels::DeviceSlotWeights Down(bool fp8) const {
    return fp8 ? kernels::DeviceSlotWeights{nullptr, down_fp8.data()}
               : kernels::DeviceSlotWeights{down.data(), nullptr};
  }
};

// GPU time of one collective on the communication stream, read once the step is done.
struct TimedCollective {
  cudaEvent_t start = nullptr, stop = nullptr;
  int64_t bytes = 0;
  bool dispatch = true;
};

struct CudaRankBackend::State {
  const Model* model = nullptr;
  CudaRankOptions options;
  cudaStream_t stream = nullptr;  // compute
  cublasHandle_t cublas = nullptr;
  DeviceArray<uint8_t> cublas_workspace;  // cublas's own (kernels::GiveCublasWorkspace)

  DeviceArray<Bf16> embed, final_norm, lm_head;
  DeviceArray<float> rope_cos, rope_sin;
  std::vector<DeviceLayer> layers;
  int64_t placement_version = -1;
  kernels::GateOptions gate_options;

  // [layers, blocks, block_size, row_dim]; a row is MLA's latent + rope key, or GQA's keys and
  // values of every key/value head (Model::kv_row_dim()).
  DeviceArray<Bf16> kv_rows;
  int64_t rows_per_layer = 0;
  // MLA attention's split contexts (kernels::MlaPagedAttention), used on the compute stream.
  DeviceArray<float> attention_workspace;
  int kv_row_dim() const { return model->kv_row_dim(); }
  int64_t Bf16RowBytes() const { return int64_t{config().hidden_size} * int64_t{sizeof(Bf16)}; }

  // MLA's latent rows and the bf16 shared experts run here, beside the compute stream.
  // Declared before the MLPs, so that it outlives shared_mlp, which is bound to its stream.
  std::unique_ptr<SideLane> side;
  std::unique_ptr<kernels::ExpertMlp> dense_mlp, shared_mlp, routed_mlp;
  // The routed experts in FP8 (an FP8 checkpoint's, or builtin:v3-bench-fp8's): their slots
  // hold e4m3 weights and run through routed_fp8_mlp instead of routed_mlp.
  bool fp8_experts = false;
  std::unique_ptr<kernels::Fp8ExpertMlp> routed_fp8_mlp;
  // A group's host-planned dispatch carries those experts' rows in FP8
  // (CudaRankOptions::fp8_dispatch): each sender quantizes its rows once per 1 x 128 tile, as
  // the receiving experts would, so the bytes halve and the results stay the same bits.
  bool fp8_dispatch = false;
  // The dense projections (attention's, the dense MLPs', the shared experts') in FP8 as well
  // (with FP8 experts and CudaRankOptions::keep_fp8_dense), for every weight whose widths are
  // whole FP8 blocks (an FP8 checkpoint's as stored, the built-in FP8 models' quantized on
  // upload). They run through fp8_linear, the MLPs with fp8_mlp_gate_up and fp8_mlp_act as
  // scratch.
  bool fp8_dense = false;
  std::unique_ptr<kernels::Fp8Linear> fp8_linear;
  DeviceArray<Bf16> fp8_mlp_gate_up, fp8_mlp_act;
  MicroBatchState micro_batches[2];
  int max_received = 0;

  // Decode steps planned on the device (CudaRankOptions::device_planned_moe): whether this rank
  // can (alone in its group, widths the kernels take), the tables by MoE layer and the
  // placement version they were built for, the experts' MLP, and the rows each slot served this
  // step ([MoE layers, slots], added up on the device, read by the host once per step for the
  // expert-load metrics).
  bool device_plan_possible = false;
  int device_plan_max_pairs = 0;  // a step with more (token, expert) pairs plans on the host
  std::vector<DevicePlanTables> device_plan_tables;
  int64_t device_plan_tables_version = -1;
  std::unique_ptr<kernels::DeviceExpertMlp> device_mlp;
  DeviceArray<int32_t> slot_rows;
  size_t slot_rows_count = 0;
  PinnedBuffer slot_rows_host;
  bool slot_rows_written = false;    // since the host last read them
  bool slot_rows_read_back = false;  // ReadBackSlotRows copied them for this step
  // The device-planned exchange of a group (CudaRankOptions::device_planned_exchange,
  // group_size > 1): whether this step uses it and its shape (every rank of the group decides the
  // same from the step's agreement), the capacity's headroom over an even share (doubled after an
  // overflow), a fixed capacity while one is set (CudaRankOptions), and the step's overflow
  // mark (on the device, and its copy read after the step's one synchronization).
  bool step_exchange_on_device = false;
  int64_t step_max_tokens = 0;
  int device_slots_per_rank = 0;
  kernels::ExchangeShape exchange_shape;
  double exchange_headroom = 2.0;
  int exchange_fixed_entries = 0;
  DeviceArray<int32_t> exchange_overflow;
  PinnedBuffer exchange_overflow_host;
  // Device-planned decode steps as CUDA graphs (CudaRankOptions::cuda_graphs; null: off, or
  // turned off after a capture failed); while one captures a step, nothing may wait for the GPU
  // or time it (the exchange's timers).
  std::unique_ptr<StepGraphs> step_graphs;
  bool capturing_step = false;

  // Collectives the compute stream was made to wait for; the host waits for them (with the
  // group timeout) before it blocks on the compute stream, so a dead peer fails the step
  // instead of hanging it.
  std::vector<comm::CollectiveCompletion> awaited;
  // The step's logits, one row per batch row, kept on the device for NextTokens(); Logits()
  // copies them to host_logits.
  DeviceArray<float> step_logits;
  size_t step_rows = 0;
  PinnedBuffer host_logits;
  // NextTokens(): each row's head request, and the heads and kept weights coming back.
  DeviceArray<kernels::LogitHeadParams> head_params;
  DeviceArray<int32_t> head_ids;
  DeviceArray<float> head_values;
  DeviceArray<double> kept_weight;
  PinnedBuffer head_params_staging, head_results;
  std::vector<TimedCollective> timed;  // this step's
  std::vector<TimedCollective> spare_timers;
  cudaEvent_t produced = nullptr;  // compute-stream work the exchange must wait for

  // Slots staged for a placement that has not committed yet (StageSlots/CommitSlots).
  struct StagedSlot {
    int layer = 0;
    int slot = 0;
    int expert = -1;
    DeviceMlp weights;
  };
  std::vector<StagedSlot> staged_slots;
  int64_t staged_version = -1;
  // Buffers of slots replaced by earlier commits, reused by the next staging: the spare memory
  // stays at the largest update's changed slots, and no commit frees or allocates (cudaFree
  // would wait for the whole device in the committing step).
  std::vector<DeviceMlp> spare_slots;
  cudaStream_t copy_stream = nullptr;  // staging uploads, beside the compute stream
  GpuStageTimer stage_timer;           // a traced step's GPU stages

  ~State() {
    for (auto* list : {&timed, &spare_timers}) {
      for (TimedCollective& t : *list) {
        cudaEventDestroy(t.start);
        cudaEventDestroy(t.stop);
      }
    }
    awaited.clear();
    if (produced != nullptr) cudaEventDestroy(produced);
    if (cublas != nullptr) cublasDestroy(cublas);
    if (stream != nullptr) cudaStreamDestroy(stream);
    if (copy_stream != nullptr) cudaStreamDestroy(copy_stream);
  }

  const ModelConfig& config() const { return model->config(); }
  std::string EventName(const char* what, int layer, const MicroBatchState& mb) const {
    return absl::StrCat(what, " L", layer, " mb", &mb - micro_batches);
  }
  // Ends a GPU stage of a traced step (GpuStageTimer); names nothing in untraced steps.
  absl::Status MarkStage(const char* what, int layer, const MicroBatchState& mb) {
    return stage_timer.enabled() ? stage_timer.Mark(EventName(what, layer, mb)) : absl::OkStatus();
  }

  // y[rows, out] = x[rows, in] · w[out, in]^T (+ beta * y); bf16 inputs, fp32 accumulation, y
  // in bf16 or fp32; on the compute stream, or on `handle`'s (the side lane's).
  absl::Status Linear(const Bf16* x, const Bf16* w, void* y, cudaDataType y_type, int rows, int in,
                      int out, float beta = 0.0f, cublasHandle_t handle = nullptr) {
    if (rows == 0) return absl::OkStatus();
    const float alpha = 1.0f;
    return CublasStatus(
        cublasGemmEx(handle != nullptr ? handle : cublas, CUBLAS_OP_T, CUBLAS_OP_N, out, rows, in,
                     &alpha, w, CUDA_R_16BF, in, x, CUDA_R_16BF, in, &beta, y, y_type, out,
                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
        "linear");
  }

  // The same for a weight that may be FP8 (through fp8_linear), y bf16; `accumulate`: y += the
  // product.
  absl::Status Linear(const Bf16* x, const DeviceLinear& w, Bf16* y, int rows, int in, int out,
                      bool accumulate = false) {
    if (w.fp8) return fp8_linear->Run(x, rows, w.Fp8(), out, in, y, accumulate);
    return Linear(x, w.bf16.data(), y, CUDA_R_16BF, rows, in, out, accumulate ? 1.0f : 0.0f);
  }
  // y [rows, H] = a dense MLP or shared experts (w, `intermediate` wide) of x [rows, H]:
  // ExpertMlp `bf16_mlp` for bf16 weights; where either is FP8, a Linear per projection (each in
  // its own format) and SiLU · up between.
  absl::Status RunMlp(const DeviceMlp& w, kernels::ExpertMlp& bf16_mlp, const Bf16* x, int rows,
                      int intermediate, Bf16* y);

  absl::Status ReserveMicroBatch(MicroBatchState& mb);
  // Uploads the dense weights (everything but the routed experts' slots) to the device.
  absl::Status LoadWeights(WeightUploader& uploader);
  absl::Status UploadMlaWeights(WeightUploader& uploader, int layer, DeviceLayer& d);
  absl::Status UploadGroupedQueryWeights(WeightUploader& uploader, int layer, DeviceLayer& d);
  // A dense projection (parts stacked by rows): FP8 where fp8_dense and its widths allow, bf16
  // otherwise.
  absl::Status UploadLinear(WeightUploader& uploader, DeviceLinear& out,
                            std::initializer_list<std::string> names);
  // Creates fp8_linear and the FP8 MLP scratch once any dense weight is FP8.
  absl::Status PrepareFp8Dense();
  // Makes the slots hold `placement`'s experts now, in place (initial load; and placements
  // that commit without staging).
  absl::Status LoadSlots(const ExpertPlacement& placement);
  // Background staging (staging thread): the slots `placement` changes, into spare buffers on
  // copy_stream. CommitSlots (rank thread, between steps) swaps them in and frees the old ones.
  absl::Status StageSlots(const ExpertPlacement& placement);
  void CommitSlots(const ExpertPlacement& placement);
  void DiscardStagedSlots();
  // A micro-batch's token layout to the device (ids, positions, owning sequences, cache rows,
  // block tables), into buffers a step's graph reads; then its embeddings.
  absl::Status UploadLayout(MicroBatchState& mb, int block_size);
  absl::Status Embed(MicroBatchState& mb);
  // Whether this micro-batch's step can run as a graph (StepGraphs): a decode step (one token a
  // sequence, every one with logits) planned on the device.
  bool RunsAsGraph(const MicroBatchState& mb) const;
  // The addresses of the buffers a step's graph reads, hashed (StepGraphs's fingerprint).
  uint64_t GraphFingerprint(const MicroBatchState& mb) const;
  // residual += attention(input_norm(residual)); normed = post_attention_norm(residual).
  absl::Status Attention(int layer, MicroBatchState& mb);
  absl::Status MultiHeadLatentAttention(int layer, MicroBatchState& mb);
  absl::Status GroupedQueryAttention(int layer, MicroBatchState& mb);
  // MoE in three phases, so that two micro-batches can interleave them: gate and dispatch,
  // the local experts and combine, then the weighted sum into the residual.
  absl::Status GateAndDispatch(int layer, MicroBatchState& mb, const ExpertPlacement& placement,
                               parallel::RankResources& rank);
  // Decides device_plan_possible and, if so, makes the device plan's buffers.
  absl::Status PrepareDevicePlan(int slots_per_rank);
  // Whether a batch of `tokens` tokens is small enough for the device plan (and there is one).
  bool FitsDevicePlan(int64_t tokens) const;
  // Whether this micro-batch's MoE layers plan on the device (few tokens; in a group, what
  // PlanStepExchange decided for the whole step).
  bool UsesDevicePlan(const MicroBatchState& mb) const;
  // In a group: whether this step's exchanges are planned on the device, from the group's
  // agreement (the same answer on every rank), and their shape; reserves its buffers.
  absl::Status PlanStepExchange(const parallel::StepAgreement& step);
  // The exchange's shape for batches of up to `max_tokens` tokens a rank.
  kernels::ExchangeShape ExchangeShapeFor(int64_t max_tokens) const;
  // The device-planned exchange's halves: the dispatch (plan, rows into the blocks, the
  // all-to-all) and, once it has arrived, the grouping by slot, the experts and the combine.
  absl::Status DispatchOnDevice(int layer, MicroBatchState& mb, parallel::RankResources& rank);
  absl::Status ExpertsOnDevice(int layer, MicroBatchState& mb, parallel::RankResources& rank);
  // Rebuilds device_plan_tables from the slots (after LoadSlots or a commit).
  absl::Status BuildDevicePlanTables(const ExpertPlacement& placement);
  // The rows each slot served on the device path this step: copied to slot_rows_host behind the
  // step's work (and the counters zeroed), so that the step's one synchronization covers them;
  // then, once it has run, added to the expert-load metrics.
  // With the group's device-planned exchange the counts are read back whether or not a load
  // recorder wants them: they are what each MoE layer received (`received_per_layer`, for the
  // balancedness metric).
  absl::Status ReadBackSlotRows(parallel::RankResources& rank);
  absl::Status RecordDevicePlannedLoad(parallel::RankResources& rank,
                                       std::vector<int64_t>& received_per_layer);
  // The device-planned exchange's overflow mark: zeroed before a step, copied to the host
  // behind it, read after the step's synchronization; after an overflow, the step is redone
  // planned on the host and the capacity grows.
  absl::Status ClearExchangeOverflow();
  absl::Status ReadBackExchangeOverflow();
  bool ExchangeOverflowed();
  void GrowExchangeAfterOverflow();
  // Zeroes the slots' row counts (on the stream) and marks them unwritten.
  absl::Status ClearSlotRows();
  absl::Status ExpertsAndCombine(int layer, MicroBatchState& mb, parallel::RankResources& rank);
  absl::Status FinishMoe(MicroBatchState& mb);
  // The rows of a micro-batch that need logits (parallel::MicroBatchLogitRows).
  static std::vector<int32_t> LogitRows(const MicroBatchState& mb);
  // Final norm and LM head over `rows`, the logits (fp32) written to `out` on the device.
  absl::Status Head(MicroBatchState& mb, const std::vector<int32_t>& rows, float* out);
  // Puts an all-to-all of activations on the communication stream behind the compute stream's
  // work so far, as mb.in_flight; AwaitExchange makes the compute stream wait for it (its
  // consumer's work comes next), so the compute stream stays free until then.
  // Rows of `row_bytes` each: hidden-wide bf16 rows, or the FP8 dispatch's packed rows.
  absl::Status EnqueueExchange(MicroBatchState& mb, const void* send_buffer,
                               std::span<const int64_t> send_rows, void* receive_buffer,
                               std::span<const int64_t> receive_rows, int64_t row_bytes,
                               bool dispatch, parallel::RankResources& rank);
  // The same exchange for ranks without an NCCL communicator between them (ranks that share a
  // GPU): through pinned host memory and the group's host communicator, synchronously; its
  // bytes and time count in the dispatch or combine metrics as NCCL's do.
  absl::Status ExchangeThroughHost(MicroBatchState& mb, const void* send_buffer,
                                   std::span<const int64_t> send_bytes, void* receive_buffer,
                                   std::span<const int64_t> receive_bytes, bool dispatch,
                                   parallel::RankResources& rank);
  absl::Status AwaitExchange(MicroBatchState& mb);
  // Waits, on the host and with the group timeout, for every exchange still in flight.
  absl::Status DrainExchanges();
  // Waits for the compute stream on the host (after the awaited collectives, with timeouts).
  absl::Status SynchronizeCompute(const char* what);
  void PublishExchangeTimes(parallel::RankResources& rank);
  // The KV handoff: rows of positions [0, num_tokens) between the device cache and `host`.
  absl::Status CopyKvRows(const std::vector<int32_t>& block_table, int num_tokens, std::byte* host,
                          bool to_host);
};

}  // namespace moeserve::engine::cuda
