#include "engine/backend/cuda/cuda_rank_backend.h"

#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "engine/backend/cuda/device_array.h"
#include "engine/backend/cuda/pinned_buffer.h"
#include "engine/model/architecture.h"
#include "engine/parallel/ep_forward.h"
#include "kernels/cpu_twins.h"
#include "kernels/expert_mlp.h"
#include "kernels/kernels.h"
#include "kernels/mla.h"
#include "kernels/sampling.h"

namespace moeserve::engine::cuda {
namespace {

using Bf16 = __nv_bfloat16;
using kernels::CublasStatus;
using kernels::CudaStatus;

#define RETURN_IF_ERROR(expr)                          \
  do {                                                 \
    if (absl::Status _s = (expr); !_s.ok()) return _s; \
  } while (0)

// Host fp32 → device bf16 (round to nearest even, as the kernels' twins do).
absl::Status UploadBf16(DeviceArray<Bf16>& out, std::span<const float> values,
                        cudaStream_t stream) {
  std::vector<uint16_t> converted(values.size());
  for (size_t i = 0; i < values.size(); ++i) converted[i] = kernels::FloatToBf16(values[i]);
  return out.Upload(reinterpret_cast<const Bf16*>(converted.data()), converted.size(), stream);
}

absl::Status UploadBf16(DeviceArray<Bf16>& out, const float* values, size_t count,
                        cudaStream_t stream) {
  return UploadBf16(out, std::span<const float>(values, count), stream);
}

// A SwiGLU MLP's weights as ExpertMlp wants them: [2I, H] (gate rows, then up rows) and [H, I].
struct DeviceMlp {
  DeviceArray<Bf16> gate_up;
  DeviceArray<Bf16> down;
};

// A routed expert that exists on the GPU only (ModelConfig::routed_experts_on_device): random
// weights from a seed of (layer, expert), so every replica of an expert is the same expert.
absl::Status GenerateMlp(DeviceMlp& out, int layer, int expert, int intermediate, int hidden,
                         cudaStream_t stream) {
  const size_t matrix = static_cast<size_t>(intermediate) * hidden;
  RETURN_IF_ERROR(out.gate_up.Reserve(2 * matrix));
  RETURN_IF_ERROR(out.down.Reserve(matrix));
  const uint64_t seed = 0x6d6f657365727665ull ^ (static_cast<uint64_t>(layer) << 40) ^
                        (static_cast<uint64_t>(expert) << 8);
  // Standard deviation 1/sqrt(fan-in), as the host-generated matrices have.
  RETURN_IF_ERROR(kernels::FillRandomBf16(out.gate_up.data(), static_cast<int64_t>(2 * matrix),
                                          seed, 1.0f / std::sqrt(static_cast<float>(hidden)),
                                          stream));
  return kernels::FillRandomBf16(out.down.data(), static_cast<int64_t>(matrix), seed + 1,
                                 1.0f / std::sqrt(static_cast<float>(intermediate)), stream);
}

absl::Status UploadMlp(DeviceMlp& out, const MlpWeights& mlp, int hidden, cudaStream_t stream) {
  const size_t matrix = static_cast<size_t>(mlp.intermediate_size) * hidden;
  std::vector<float> gate_up(2 * matrix);
  std::copy_n(mlp.gate_proj, matrix, gate_up.begin());
  std::copy_n(mlp.up_proj, matrix, gate_up.begin() + static_cast<std::ptrdiff_t>(matrix));
  RETURN_IF_ERROR(UploadBf16(out.gate_up, gate_up, stream));
  return UploadBf16(out.down, mlp.down_proj, matrix, stream);
}

struct DeviceLayer {
  DeviceArray<Bf16> input_norm, post_attention_norm;
  DeviceArray<Bf16> q_a, q_a_norm, q_b, q;  // q-LoRA pair, or the direct projection
  DeviceArray<Bf16> kv_a, kv_a_norm, kv_b, o;
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

}  // namespace

absl::Status CheckCudaSupport(const ModelConfig& config) {
  if (!ArchitectureOf(config).runs_on_gpu) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the GPU backend runs DeepSeek's multi-head latent attention models (deepseek_v2/v3); `",
        config.model_type, "` uses grouped-query attention: serve it with --device cpu"));
  }
  if (config.kv_lora_rank > 1024) {
    return absl::InvalidArgumentError("the GPU backend supports kv_lora_rank up to 1024");
  }
  if (config.n_routed_experts > 1024 || config.num_experts_per_tok > 32 || config.n_group > 32) {
    return absl::InvalidArgumentError(
        "the GPU backend's gate supports up to 1024 experts, 32 per token and 32 groups");
  }
  return absl::OkStatus();
}

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
  DeviceArray<Bf16> residual, normed, q_compressed, q, q_absorbed, attended, values;
  DeviceArray<float> kv_a, gate_logits, routing_weights;
  DeviceArray<int32_t> routing_experts;
  DeviceArray<Bf16> send, received, expert_in, expert_out, results, returned, moe_out, shared_out;
  DeviceArray<Bf16> head_in;
  DeviceIndex send_source, slot_order, received_order, assignment_rows, head_rows;
  PinnedBuffer routing_host;  // the routing's way back to the host
  // The current MoE layer's exchange.
  parallel::DispatchPlan plan;
  std::vector<int64_t> receive_rows;
  std::vector<int64_t> slot_offsets;
  int64_t received_count = 0;
  const Bf16* received_rows = nullptr;  // where the dispatched rows are (send when alone)
  const Bf16* returned_rows = nullptr;  // where the combined rows are
  // The exchange in flight on the communication stream, until its consumer waits for it.
  std::optional<comm::CollectiveCompletion> in_flight;
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

  DeviceArray<Bf16> embed, final_norm, lm_head;
  DeviceArray<float> rope_cos, rope_sin;
  std::vector<DeviceLayer> layers;
  int64_t placement_version = -1;
  kernels::GateOptions gate_options;

  DeviceArray<Bf16> kv_rows;  // [layers, blocks, block_size, latent + rope]
  int64_t rows_per_layer = 0;

  std::unique_ptr<kernels::ExpertMlp> dense_mlp, shared_mlp, routed_mlp;
  MicroBatchState micro_batches[2];
  int max_received = 0;

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
  }

  const ModelConfig& config() const { return model->config(); }
  std::string EventName(const char* what, int layer, const MicroBatchState& mb) const {
    return absl::StrCat(what, " L", layer, " mb", &mb - micro_batches);
  }

  // y[rows, out] = x[rows, in] · w[out, in]^T (+ beta * y); bf16 inputs, fp32 accumulation, y
  // in bf16 or fp32.
  absl::Status Linear(const Bf16* x, const Bf16* w, void* y, cudaDataType y_type, int rows, int in,
                      int out, float beta = 0.0f) {
    if (rows == 0) return absl::OkStatus();
    const float alpha = 1.0f;
    return CublasStatus(cublasGemmEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, out, rows, in, &alpha, w,
                                     CUDA_R_16BF, in, x, CUDA_R_16BF, in, &beta, y, y_type, out,
                                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                        "linear");
  }

  absl::Status ReserveMicroBatch(MicroBatchState& mb);
  absl::Status LoadSlots(const ExpertPlacement& placement);
  absl::Status Prepare(MicroBatchState& mb, int block_size);
  absl::Status Attention(int layer, MicroBatchState& mb);
  // MoE in three phases, so that two micro-batches can interleave them: gate and dispatch,
  // the local experts and combine, then the weighted sum into the residual.
  absl::Status GateAndDispatch(int layer, MicroBatchState& mb, const ExpertPlacement& placement,
                               parallel::RankResources& rank);
  absl::Status ExpertsAndCombine(int layer, MicroBatchState& mb, parallel::RankResources& rank);
  absl::Status FinishMoe(MicroBatchState& mb);
  // The rows of a micro-batch that need logits (parallel::MicroBatchLogitRows).
  static std::vector<int32_t> LogitRows(const MicroBatchState& mb);
  // Final norm and LM head over `rows`, the logits (fp32) written to `out` on the device.
  absl::Status Head(MicroBatchState& mb, const std::vector<int32_t>& rows, float* out);
  // Puts an all-to-all of activations on the communication stream behind the compute stream's
  // work so far, as mb.in_flight; AwaitExchange makes the compute stream wait for it (its
  // consumer's work comes next), so the compute stream stays free until then.
  absl::Status EnqueueExchange(MicroBatchState& mb, const Bf16* send_buffer,
                               std::span<const int64_t> send_rows, Bf16* receive_buffer,
                               std::span<const int64_t> receive_rows, bool dispatch);
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

absl::Status CudaRankBackend::State::ReserveMicroBatch(MicroBatchState& mb) {
  const ModelConfig& c = config();
  const size_t t = std::max(options.max_batch_tokens, 1);
  const size_t h = c.hidden_size;
  const size_t heads = c.num_attention_heads;
  const size_t row_dim = c.kv_lora_rank + c.qk_rope_head_dim;
  const size_t top_k = std::max(c.num_experts_per_tok, 1);
  RETURN_IF_ERROR(mb.residual.Reserve(t * h));
  RETURN_IF_ERROR(mb.normed.Reserve(t * h));
  RETURN_IF_ERROR(mb.q_compressed.Reserve(t * std::max(c.q_lora_rank, 1)));
  RETURN_IF_ERROR(mb.q.Reserve(t * heads * c.qk_head_dim()));
  RETURN_IF_ERROR(mb.kv_a.Reserve(t * row_dim));
  RETURN_IF_ERROR(mb.q_absorbed.Reserve(t * heads * row_dim));
  RETURN_IF_ERROR(mb.attended.Reserve(t * heads * c.kv_lora_rank));
  RETURN_IF_ERROR(mb.values.Reserve(t * heads * c.v_head_dim));
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

absl::Status CudaRankBackend::State::LoadSlots(const ExpertPlacement& placement) {
  if (placement.version() == placement_version) return absl::OkStatus();
  const ModelConfig& c = config();
  const int slots_per_rank = placement.num_physical() / options.group_size;
  const int first_slot = options.rank * slots_per_rank;
  for (int layer = 0; layer < c.num_hidden_layers; ++layer) {
    const int moe_layer = model->moe_index(layer);
    if (moe_layer < 0) continue;
    DeviceLayer& d = layers[layer];
    d.slots.resize(slots_per_rank);
    d.slot_expert.resize(slots_per_rank, -1);
    const MoeWeights& moe = model->weights().layer(layer).moe;
    for (int slot = 0; slot < slots_per_rank; ++slot) {
      const int expert = placement.phy2log(moe_layer)[first_slot + slot];
      if (d.slot_expert[slot] == expert) continue;  // unchanged slots keep their weights
      if (c.routed_experts_on_device) {
        RETURN_IF_ERROR(GenerateMlp(d.slots[slot], layer, expert, c.moe_intermediate_size,
                                    c.hidden_size, stream));
      } else {
        RETURN_IF_ERROR(UploadMlp(d.slots[slot], moe.experts[expert], c.hidden_size, stream));
      }
      d.slot_expert[slot] = expert;
    }
  }
  placement_version = placement.version();
  return absl::OkStatus();
}

absl::Status CudaRankBackend::State::Prepare(MicroBatchState& mb, int block_size) {
  // Token layout: ids, positions, owning sequence, cache rows and block tables.
  mb.spans = Model::Layout(mb.sequences, &mb.tokens);
  if (mb.tokens > options.max_batch_tokens) {
    return absl::InternalError(absl::StrCat(
        "GPU step of ", mb.tokens, " tokens exceeds the rank's ", options.max_batch_tokens));
  }
  std::vector<int32_t> ids, positions, token_sequence;
  std::vector<int64_t> cache_rows;
  mb.max_blocks = 1;
  for (const BatchSequence& seq : mb.sequences) {
    mb.max_blocks = std::max(mb.max_blocks, static_cast<int>(seq.block_table->size()));
  }
  std::vector<int32_t> block_tables(mb.sequences.size() * mb.max_blocks, 0);
  for (size_t i = 0; i < mb.sequences.size(); ++i) {
    const BatchSequence& seq = mb.sequences[i];
    std::copy(seq.block_table->begin(), seq.block_table->end(),
              block_tables.begin() + static_cast<std::ptrdiff_t>(i * mb.max_blocks));
    for (size_t j = 0; j < seq.tokens.size(); ++j) {
      const int position = seq.start_position + static_cast<int>(j);
      ids.push_back(seq.tokens[j]);
      positions.push_back(position);
      token_sequence.push_back(static_cast<int32_t>(i));
      cache_rows.push_back(static_cast<int64_t>((*seq.block_table)[position / block_size]) *
                               block_size +
                           position % block_size);
    }
  }
  RETURN_IF_ERROR(mb.token_ids.Upload(ids.data(), ids.size(), stream));
  RETURN_IF_ERROR(mb.positions.Upload(positions.data(), positions.size(), stream));
  RETURN_IF_ERROR(mb.token_sequence.Upload(token_sequence.data(), token_sequence.size(), stream));
  RETURN_IF_ERROR(mb.cache_rows.Upload(cache_rows.data(), cache_rows.size(), stream));
  RETURN_IF_ERROR(mb.block_tables.Upload(block_tables.data(), block_tables.size(), stream));
  return kernels::Embedding(embed.data(), mb.token_ids.data(), mb.residual.data(), mb.tokens,
                            config().hidden_size, stream);
}

absl::Status CudaRankBackend::State::Attention(int layer, MicroBatchState& mb) {
  const ModelConfig& c = config();
  const DeviceLayer& w = layers[layer];
  const int tokens = mb.tokens;
  const int heads = c.num_attention_heads;
  const int nope = c.qk_nope_head_dim;
  const int rope = c.qk_rope_head_dim;
  const int qk = c.qk_head_dim();
  const int v = c.v_head_dim;
  const int latent = c.kv_lora_rank;
  const int row_dim = latent + rope;
  const int hidden = c.hidden_size;
  const float eps = static_cast<float>(c.rms_norm_eps);

  RETURN_IF_ERROR(kernels::RmsNorm(mb.residual.data(), w.input_norm.data(), mb.normed.data(),
                                   tokens, hidden, eps, stream));
  if (c.q_lora_rank > 0) {
    RETURN_IF_ERROR(Linear(mb.normed.data(), w.q_a.data(), mb.q_compressed.data(), CUDA_R_16BF,
                           tokens, hidden, c.q_lora_rank));
    RETURN_IF_ERROR(kernels::RmsNorm(mb.q_compressed.data(), w.q_a_norm.data(),
                                     mb.q_compressed.data(), tokens, c.q_lora_rank, eps, stream));
    RETURN_IF_ERROR(Linear(mb.q_compressed.data(), w.q_b.data(), mb.q.data(), CUDA_R_16BF, tokens,
                           c.q_lora_rank, heads * qk));
  } else {
    RETURN_IF_ERROR(
        Linear(mb.normed.data(), w.q.data(), mb.q.data(), CUDA_R_16BF, tokens, hidden, heads * qk));
  }
  RETURN_IF_ERROR(
      Linear(mb.normed.data(), w.kv_a.data(), mb.kv_a.data(), CUDA_R_32F, tokens, hidden, row_dim));
  Bf16* layer_rows = kv_rows.data() + layer * rows_per_layer * row_dim;
  RETURN_IF_ERROR(kernels::MlaWriteCache(
      mb.kv_a.data(), w.kv_a_norm.data(), eps, mb.positions.data(), mb.cache_rows.data(),
      rope_cos.data(), rope_sin.data(), layer_rows, tokens, latent, rope, stream));
  RETURN_IF_ERROR(kernels::MlaQueryRope(mb.q.data(), mb.positions.data(), rope_cos.data(),
                                        rope_sin.data(), mb.q_absorbed.data(), tokens, heads, nope,
                                        rope, latent, stream));
  // Absorbed queries: q_absorbed[t, h, :latent] = q_nope[t, h] · W_UK(h), W_UK(h) = the head's
  // [nope, latent] rows of kv_b_proj; one strided batched GEMM over the heads.
  const float one = 1.0f, zero = 0.0f;
  const int64_t kv_b_head = static_cast<int64_t>(nope + v) * latent;
  if (tokens > 0) {
    RETURN_IF_ERROR(CublasStatus(
        cublasGemmStridedBatchedEx(cublas, CUBLAS_OP_N, CUBLAS_OP_N, latent, tokens, nope, &one,
                                   w.kv_b.data(), CUDA_R_16BF, latent, kv_b_head, mb.q.data(),
                                   CUDA_R_16BF, heads * qk, qk, &zero, mb.q_absorbed.data(),
                                   CUDA_R_16BF, heads * row_dim, row_dim, heads, CUBLAS_COMPUTE_32F,
                                   CUBLAS_GEMM_DEFAULT),
        "absorbed queries"));
  }
  RETURN_IF_ERROR(kernels::MlaPagedAttention(
      mb.q_absorbed.data(), layer_rows, mb.block_tables.data(), mb.max_blocks,
      mb.token_sequence.data(), mb.positions.data(), mb.attended.data(), tokens, heads, latent,
      rope, options.kv_block_size, static_cast<float>(c.attention_softmax_scale()), stream));
  // Values: out(h) = attended(h) · W_UV(h)^T, W_UV(h) = the head's [v, latent] rows.
  if (tokens > 0) {
    RETURN_IF_ERROR(CublasStatus(
        cublasGemmStridedBatchedEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, v, tokens, latent, &one,
                                   w.kv_b.data() + static_cast<int64_t>(nope) * latent, CUDA_R_16BF,
                                   latent, kv_b_head, mb.attended.data(), CUDA_R_16BF,
                                   heads * latent, latent, &zero, mb.values.data(), CUDA_R_16BF,
                                   heads * v, v, heads, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
        "attention values"));
  }
  // residual += o_proj(values), then the post-attention norm.
  RETURN_IF_ERROR(Linear(mb.values.data(), w.o.data(), mb.residual.data(), CUDA_R_16BF, tokens,
                         heads * v, hidden, 1.0f));
  return kernels::RmsNorm(mb.residual.data(), w.post_attention_norm.data(), mb.normed.data(),
                          tokens, hidden, eps, stream);
}

absl::Status CudaRankBackend::State::SynchronizeCompute(const char* what) {
  for (comm::CollectiveCompletion& completion : awaited) RETURN_IF_ERROR(completion.Wait());
  awaited.clear();
  return CudaStatus(cudaStreamSynchronize(stream), what);
}

absl::Status CudaRankBackend::State::AwaitExchange(MicroBatchState& mb) {
  if (!mb.in_flight.has_value()) return absl::OkStatus();
  RETURN_IF_ERROR(mb.in_flight->MakeStreamWait(stream));
  awaited.push_back(std::move(*mb.in_flight));
  mb.in_flight.reset();
  return absl::OkStatus();
}

absl::Status CudaRankBackend::State::DrainExchanges() {
  absl::Status status;
  for (MicroBatchState& mb : micro_batches) {
    if (mb.in_flight.has_value()) status.Update(mb.in_flight->Wait());
    mb.in_flight.reset();
  }
  for (comm::CollectiveCompletion& completion : awaited) status.Update(completion.Wait());
  awaited.clear();
  return status;
}

absl::Status CudaRankBackend::State::EnqueueExchange(MicroBatchState& mb, const Bf16* send_buffer,
                                                     std::span<const int64_t> send_rows,
                                                     Bf16* receive_buffer,
                                                     std::span<const int64_t> receive_rows,
                                                     bool dispatch) {
  const int64_t row_bytes = static_cast<int64_t>(config().hidden_size) * sizeof(Bf16);
  std::vector<int64_t> send_bytes(send_rows.size()), receive_bytes(receive_rows.size());
  int64_t total = 0;
  for (size_t p = 0; p < send_rows.size(); ++p) {
    send_bytes[p] = send_rows[p] * row_bytes;
    receive_bytes[p] = receive_rows[p] * row_bytes;
    total += send_bytes[p];
  }
  comm::NcclCommunicator& nccl = *options.exchange;
  TimedCollective timer;
  if (!spare_timers.empty()) {
    timer = spare_timers.back();
    spare_timers.pop_back();
  } else {
    RETURN_IF_ERROR(CudaStatus(cudaEventCreate(&timer.start), "exchange timer"));
    RETURN_IF_ERROR(CudaStatus(cudaEventCreate(&timer.stop), "exchange timer"));
  }
  timer.bytes = total;
  timer.dispatch = dispatch;
  timed.push_back(timer);
  RETURN_IF_ERROR(CudaStatus(cudaEventRecord(produced, stream), "exchange event"));
  RETURN_IF_ERROR(nccl.WaitForEvent(produced));
  RETURN_IF_ERROR(CudaStatus(cudaEventRecord(timer.start, nccl.stream()), "exchange timer"));
  RETURN_IF_ERROR(nccl.EnqueueAllToAllV(send_buffer, send_bytes, receive_buffer, receive_bytes));
  RETURN_IF_ERROR(CudaStatus(cudaEventRecord(timer.stop, nccl.stream()), "exchange timer"));
  absl::StatusOr<comm::CollectiveCompletion> done = nccl.RecordCompletion();
  if (!done.ok()) return done.status();
  mb.in_flight.emplace(std::move(*done));
  return absl::OkStatus();
}

void CudaRankBackend::State::PublishExchangeTimes(parallel::RankResources& rank) {
  for (TimedCollective& t : timed) {
    float milliseconds = 0;
    if (rank.metrics != nullptr &&
        cudaEventElapsedTime(&milliseconds, t.start, t.stop) == cudaSuccess) {
      if (t.dispatch) {
        rank.metrics->AddDispatch(t.bytes, milliseconds / 1e3);
      } else {
        rank.metrics->AddCombine(t.bytes, milliseconds / 1e3);
      }
    }
    spare_timers.push_back(t);
  }
  timed.clear();
}

absl::Status CudaRankBackend::State::GateAndDispatch(int layer, MicroBatchState& mb,
                                                     const ExpertPlacement& placement,
                                                     parallel::RankResources& rank) {
  const ModelConfig& c = config();
  const DeviceLayer& w = layers[layer];
  const int hidden = c.hidden_size;
  const int top_k = c.num_experts_per_tok;
  const int tokens = mb.tokens;
  const int size = options.group_size;
  const int assignments = tokens * top_k;

  // Gate: fp32 logits, then scores, group limit and top-k in one kernel.
  RETURN_IF_ERROR(Linear(mb.normed.data(), w.gate.data(), mb.gate_logits.data(), CUDA_R_32F, tokens,
                         hidden, c.n_routed_experts));
  if (tokens > 0) {
    RETURN_IF_ERROR(kernels::GateTopK(
        mb.gate_logits.data(), w.has_correction_bias ? w.correction_bias.data() : nullptr, tokens,
        gate_options, mb.routing_experts.data(), mb.routing_weights.data(), stream));
  }
  if (w.has_shared) {
    RETURN_IF_ERROR(shared_mlp->Run(mb.normed.data(), {0, tokens}, {w.shared.gate_up.data()},
                                    {w.shared.down.data()}, mb.shared_out.data()));
  }
  std::vector<int32_t> experts(assignments);
  if (assignments > 0) {
    PinnedBuffer& host = mb.routing_host;
    RETURN_IF_ERROR(host.Reserve(sizeof(int32_t) * assignments));
    RETURN_IF_ERROR(
        CudaStatus(cudaMemcpyAsync(host.data(), mb.routing_experts.data(),
                                   sizeof(int32_t) * assignments, cudaMemcpyDeviceToHost, stream),
                   "routing to host"));
    {
      ScopedTraceEvent event(rank.trace, rank.trace_pid, kHostLane,
                             EventName("routing wait", layer, mb), "gpu wait");
      RETURN_IF_ERROR(SynchronizeCompute("routing to host"));
    }
    std::memcpy(experts.data(), host.data(), sizeof(int32_t) * assignments);
  }

  // Dispatch: the same replica choice and send order as the CPU backend.
  mb.plan = parallel::PlanDispatch(experts, top_k, model->moe_index(layer), placement, options.rank,
                                   size);
  std::vector<int32_t> source_token(assignments);
  for (int row = 0; row < assignments; ++row) {
    source_token[row] = mb.plan.sent_assignment[row] / top_k;
  }
  RETURN_IF_ERROR(mb.send_source.Upload(source_token, stream));
  RETURN_IF_ERROR(kernels::PermuteRows(mb.normed.data(), mb.send_source.device.data(),
                                       mb.send.data(), assignments, hidden, stream));
  mb.receive_rows.assign(size, 0);
  std::vector<int32_t> received_slots;
  if (size > 1) {
    // Counts and slot ids are small and go through the host communicator; the activations go
    // GPU to GPU.
    ScopedTraceEvent event(rank.trace, rank.trace_pid, kHostLane,
                           EventName("counts exchange", layer, mb), "communication");
    RETURN_IF_ERROR(rank.compute->AllToAllCounts(mb.plan.send_rows, mb.receive_rows));
    int64_t total = 0;
    for (int64_t rows : mb.receive_rows) total += rows;
    received_slots.assign(total, 0);
    std::vector<int64_t> send_bytes(size), receive_bytes(size);
    for (int p = 0; p < size; ++p) {
      send_bytes[p] = mb.plan.send_rows[p] * static_cast<int64_t>(sizeof(int32_t));
      receive_bytes[p] = mb.receive_rows[p] * static_cast<int64_t>(sizeof(int32_t));
    }
    RETURN_IF_ERROR(rank.compute->AllToAllV(mb.plan.send_slots.data(), send_bytes,
                                            received_slots.data(), receive_bytes));
    if (total > max_received) {
      return absl::InternalError(
          absl::StrCat("rank received ", total, " rows, above ", max_received));
    }
    RETURN_IF_ERROR(EnqueueExchange(mb, mb.send.data(), mb.plan.send_rows, mb.received.data(),
                                    mb.receive_rows, /*dispatch=*/true));
    mb.received_rows = mb.received.data();
  } else {
    mb.receive_rows[0] = assignments;
    received_slots = mb.plan.send_slots;
    mb.received_rows = mb.send.data();
  }

  // Order the received rows by local slot (the experts' GEMM groups).
  mb.received_count = static_cast<int64_t>(received_slots.size());
  const int slots = static_cast<int>(w.slots.size());
  mb.slot_offsets.assign(slots + 1, 0);
  for (int32_t slot : received_slots) ++mb.slot_offsets[slot + 1];
  for (int s = 0; s < slots; ++s) mb.slot_offsets[s + 1] += mb.slot_offsets[s];
  std::vector<int32_t> by_slot(mb.received_count), back_to_received(mb.received_count);
  std::vector<int64_t> cursor(mb.slot_offsets.begin(), mb.slot_offsets.end() - 1);
  for (int64_t row = 0; row < mb.received_count; ++row) {
    const int64_t at = cursor[received_slots[row]]++;
    by_slot[at] = static_cast<int32_t>(row);
    back_to_received[row] = static_cast<int32_t>(at);
  }
  RETURN_IF_ERROR(mb.slot_order.Upload(by_slot, stream));
  RETURN_IF_ERROR(mb.received_order.Upload(back_to_received, stream));
  std::vector<int32_t> position(assignments);
  for (int row = 0; row < assignments; ++row) position[mb.plan.sent_assignment[row]] = row;
  return mb.assignment_rows.Upload(position, stream);
}

absl::Status CudaRankBackend::State::ExpertsAndCombine(int layer, MicroBatchState& mb,
                                                       parallel::RankResources& rank) {
  const DeviceLayer& w = layers[layer];
  const int hidden = config().hidden_size;
  const int received = static_cast<int>(mb.received_count);
  RETURN_IF_ERROR(AwaitExchange(mb));  // the dispatched rows
  RETURN_IF_ERROR(kernels::PermuteRows(mb.received_rows, mb.slot_order.device.data(),
                                       mb.expert_in.data(), received, hidden, stream));
  std::vector<const Bf16*> gate_up, down;
  for (const DeviceMlp& slot : w.slots) {
    gate_up.push_back(slot.gate_up.data());
    down.push_back(slot.down.data());
  }
  // Many slots with few rows each (decode) fill the GPU best as one grouped GEMM; slots with
  // many rows each (prefill) run faster as one large GEMM apiece (docs/PERFORMANCE.md).
  const int slots = static_cast<int>(w.slots.size());
  int busy_slots = 0;
  for (int s = 0; s < slots; ++s) busy_slots += mb.slot_offsets[s + 1] > mb.slot_offsets[s];
  const bool small_groups = busy_slots > 0 && received / busy_slots < 512;
  RETURN_IF_ERROR(routed_mlp->Run(mb.expert_in.data(), mb.slot_offsets, gate_up, down,
                                  mb.expert_out.data(),
                                  small_groups ? kernels::ExpertMlp::Strategy::kGroupedGemm
                                               : kernels::ExpertMlp::Strategy::kPerExpertGemm));
  RETURN_IF_ERROR(kernels::PermuteRows(mb.expert_out.data(), mb.received_order.device.data(),
                                       mb.results.data(), received, hidden, stream));
  if (rank.load != nullptr) {
    const int moe_layer = model->moe_index(layer);
    for (int s = 0; s < slots; ++s) {
      if (mb.slot_offsets[s + 1] > mb.slot_offsets[s]) {
        rank.load->Record(moe_layer, w.slot_expert[s], mb.slot_offsets[s + 1] - mb.slot_offsets[s]);
      }
    }
  }
  // Combine: results travel back along the reverse of the dispatch.
  if (options.group_size > 1) {
    RETURN_IF_ERROR(EnqueueExchange(mb, mb.results.data(), mb.receive_rows, mb.returned.data(),
                                    mb.plan.send_rows, /*dispatch=*/false));
    mb.returned_rows = mb.returned.data();
  } else {
    mb.returned_rows = mb.results.data();
  }
  return absl::OkStatus();
}

absl::Status CudaRankBackend::State::FinishMoe(MicroBatchState& mb) {
  const ModelConfig& c = config();
  const int hidden = c.hidden_size;
  RETURN_IF_ERROR(AwaitExchange(mb));  // the combined rows
  RETURN_IF_ERROR(kernels::WeightedUnpermute(
      mb.returned_rows, mb.assignment_rows.device.data(), mb.routing_weights.data(),
      c.n_shared_experts > 0 ? mb.shared_out.data() : nullptr, mb.moe_out.data(), mb.tokens,
      c.num_experts_per_tok, hidden, stream));
  return kernels::AddInPlace(mb.residual.data(), mb.moe_out.data(),
                             static_cast<int64_t>(mb.tokens) * hidden, stream);
}

std::vector<int32_t> CudaRankBackend::State::LogitRows(const MicroBatchState& mb) {
  const std::vector<int> rows =
      parallel::MicroBatchLogitRows(mb.sequences, mb.spans, mb.emits_logits);
  return std::vector<int32_t>(rows.begin(), rows.end());
}

absl::Status CudaRankBackend::State::Head(MicroBatchState& mb, const std::vector<int32_t>& rows,
                                          float* out) {
  const ModelConfig& c = config();
  const int hidden = c.hidden_size;
  if (rows.empty()) return absl::OkStatus();
  const int count = static_cast<int>(rows.size());
  RETURN_IF_ERROR(mb.head_rows.Upload(rows, stream));
  RETURN_IF_ERROR(kernels::PermuteRows(mb.residual.data(), mb.head_rows.device.data(),
                                       mb.head_in.data(), count, hidden, stream));
  RETURN_IF_ERROR(kernels::RmsNorm(mb.head_in.data(), final_norm.data(), mb.head_in.data(), count,
                                   hidden, static_cast<float>(c.rms_norm_eps), stream));
  return Linear(mb.head_in.data(), lm_head.data(), out, CUDA_R_32F, count, hidden, c.vocab_size);
}

CudaRankBackend::CudaRankBackend(std::unique_ptr<State> state) : state_(std::move(state)) {}

CudaRankBackend::~CudaRankBackend() {
  if (state_ != nullptr) cudaSetDevice(state_->options.device);
  state_.reset();
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
  RETURN_IF_ERROR(CublasStatus(cublasCreate(&s.cublas), "cuBLAS handle"));
  RETURN_IF_ERROR(CublasStatus(cublasSetStream(s.cublas, s.stream), "cuBLAS stream"));
  RETURN_IF_ERROR(
      CudaStatus(cudaEventCreateWithFlags(&s.produced, cudaEventDisableTiming), "exchange event"));

  const ModelWeights& weights = model.weights();
  const int hidden = c.hidden_size;
  const cudaStream_t stream = s.stream;
  RETURN_IF_ERROR(UploadBf16(s.embed, weights.embed_tokens(),
                             static_cast<size_t>(c.vocab_size) * hidden, stream));
  RETURN_IF_ERROR(UploadBf16(s.final_norm, weights.final_norm(), hidden, stream));
  RETURN_IF_ERROR(
      UploadBf16(s.lm_head, weights.lm_head(), static_cast<size_t>(c.vocab_size) * hidden, stream));
  // Rotations for every position this rank's KV cache can hold (no request reaches further).
  std::vector<float> rope_cos, rope_sin;
  model.rope().Table(static_cast<int>(std::min<int64_t>(
                         c.max_position_embeddings,
                         static_cast<int64_t>(options.kv_blocks) * options.kv_block_size)),
                     rope_cos, rope_sin);
  RETURN_IF_ERROR(s.rope_cos.Upload(rope_cos.data(), rope_cos.size(), stream));
  RETURN_IF_ERROR(s.rope_sin.Upload(rope_sin.data(), rope_sin.size(), stream));
  const int heads = c.num_attention_heads;
  const int qk = c.qk_head_dim();
  const int row_dim = c.kv_lora_rank + c.qk_rope_head_dim;
  s.layers.resize(c.num_hidden_layers);
  for (int layer = 0; layer < c.num_hidden_layers; ++layer) {
    const LayerWeights& l = weights.layer(layer);
    DeviceLayer& d = s.layers[layer];
    const AttentionWeights& a = l.attention;
    RETURN_IF_ERROR(UploadBf16(d.input_norm, l.input_layernorm, hidden, stream));
    RETURN_IF_ERROR(UploadBf16(d.post_attention_norm, l.post_attention_layernorm, hidden, stream));
    if (c.q_lora_rank > 0) {
      RETURN_IF_ERROR(
          UploadBf16(d.q_a, a.q_a_proj, static_cast<size_t>(c.q_lora_rank) * hidden, stream));
      RETURN_IF_ERROR(UploadBf16(d.q_a_norm, a.q_a_layernorm, c.q_lora_rank, stream));
      RETURN_IF_ERROR(
          UploadBf16(d.q_b, a.q_b_proj, static_cast<size_t>(heads) * qk * c.q_lora_rank, stream));
    } else {
      RETURN_IF_ERROR(UploadBf16(d.q, a.q_proj, static_cast<size_t>(heads) * qk * hidden, stream));
    }
    RETURN_IF_ERROR(
        UploadBf16(d.kv_a, a.kv_a_proj_with_mqa, static_cast<size_t>(row_dim) * hidden, stream));
    RETURN_IF_ERROR(UploadBf16(d.kv_a_norm, a.kv_a_layernorm, c.kv_lora_rank, stream));
    RETURN_IF_ERROR(UploadBf16(
        d.kv_b, a.kv_b_proj,
        static_cast<size_t>(heads) * (c.qk_nope_head_dim + c.v_head_dim) * c.kv_lora_rank, stream));
    RETURN_IF_ERROR(
        UploadBf16(d.o, a.o_proj, static_cast<size_t>(hidden) * heads * c.v_head_dim, stream));
    if (!l.is_moe) {
      RETURN_IF_ERROR(UploadMlp(d.dense, l.dense_mlp, hidden, stream));
      continue;
    }
    RETURN_IF_ERROR(
        UploadBf16(d.gate, l.moe.gate, static_cast<size_t>(c.n_routed_experts) * hidden, stream));
    if (l.moe.e_score_correction_bias != nullptr) {
      d.has_correction_bias = true;
      RETURN_IF_ERROR(
          d.correction_bias.Upload(l.moe.e_score_correction_bias, c.n_routed_experts, stream));
    }
    if (l.moe.has_shared) {
      d.has_shared = true;
      RETURN_IF_ERROR(UploadMlp(d.shared, l.moe.shared, hidden, stream));
    }
  }
  RETURN_IF_ERROR(s.LoadSlots(placement));

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
  s.rows_per_layer = static_cast<int64_t>(options.kv_blocks) * options.kv_block_size;
  RETURN_IF_ERROR(
      s.kv_rows.Reserve(static_cast<size_t>(c.num_hidden_layers) * s.rows_per_layer * row_dim));
  const int max_tokens = std::max(options.max_batch_tokens, 1);
  const int top_k = std::max(c.num_experts_per_tok, 1);
  // Worst case of rows one rank receives: every rank's every assignment.
  s.max_received = max_tokens * top_k * options.group_size;
  auto make_mlp = [&](int intermediate, int rows, int experts,
                      std::unique_ptr<kernels::ExpertMlp>& out) -> absl::Status {
    absl::StatusOr<kernels::ExpertMlp> mlp =
        kernels::ExpertMlp::Create(hidden, intermediate, rows, experts, stream);
    if (!mlp.ok()) return mlp.status();
    out = std::make_unique<kernels::ExpertMlp>(std::move(*mlp));
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(make_mlp(std::max(c.intermediate_size, 1), max_tokens, 1, s.dense_mlp));
  if (c.n_routed_experts > 0) {
    const int slots = placement.num_physical() / options.group_size;
    RETURN_IF_ERROR(make_mlp(std::max(c.moe_intermediate_size * c.n_shared_experts, 1), max_tokens,
                             1, s.shared_mlp));
    RETURN_IF_ERROR(
        make_mlp(std::max(c.moe_intermediate_size, 1), s.max_received, slots, s.routed_mlp));
  }
  for (MicroBatchState& mb : s.micro_batches) RETURN_IF_ERROR(s.ReserveMicroBatch(mb));
  // A step has at most a row of logits per token.
  RETURN_IF_ERROR(s.step_logits.Reserve(static_cast<size_t>(max_tokens) * c.vocab_size));
  return std::unique_ptr<CudaRankBackend>(new CudaRankBackend(std::move(state)));
}

absl::Status CudaRankBackend::Forward(std::span<const BatchSequence> batch,
                                      const ExpertPlacement& placement,
                                      parallel::RankResources& rank, bool two_micro_batches) {
  State& s = *state_;
  const ModelConfig& c = s.config();
  s.step_rows = 0;  // no logits to read until this step has them all
  RETURN_IF_ERROR(CudaStatus(cudaSetDevice(s.options.device), "select GPU"));
  RETURN_IF_ERROR(s.LoadSlots(placement));
  // Two micro-batches split the batch as the CPU backend does; every rank of the group splits
  // (the step agreement decides), so their exchanges pair up.
  std::vector<std::vector<parallel::BatchPiece>> parts;
  if (two_micro_batches) {
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
    RETURN_IF_ERROR(s.Prepare(mb, s.options.kv_block_size));
    micro_batches.push_back(&mb);
  }

  // Each phase runs for every micro-batch before the next phase, so one micro-batch's exchange
  // (on the communication stream) overlaps the other's compute: dispatch of the first with the
  // attention and gate of the second, combine of the first with the experts of the second.
  absl::Status status;
  std::vector<int64_t> received_per_layer(c.num_moe_layers(), 0);
  for (int layer = 0; layer < c.num_hidden_layers && status.ok(); ++layer) {
    const int moe_layer = s.model->moe_index(layer);
    for (MicroBatchState* mb : micro_batches) {
      {
        ScopedTraceEvent event(rank.trace, rank.trace_pid, kHostLane,
                               s.EventName("attention", layer, *mb), "compute");
        status.Update(s.Attention(layer, *mb));
      }
      if (!status.ok()) break;
      if (moe_layer < 0) {
        const DeviceLayer& w = s.layers[layer];
        status.Update(s.dense_mlp->Run(mb->normed.data(), {0, mb->tokens}, {w.dense.gate_up.data()},
                                       {w.dense.down.data()}, mb->moe_out.data()));
        status.Update(kernels::AddInPlace(mb->residual.data(), mb->moe_out.data(),
                                          static_cast<int64_t>(mb->tokens) * c.hidden_size,
                                          s.stream));
        continue;
      }
      ScopedTraceEvent event(rank.trace, rank.trace_pid, kHostLane,
                             s.EventName("gate and dispatch", layer, *mb), "compute");
      status.Update(s.GateAndDispatch(layer, *mb, placement, rank));
      if (!status.ok()) break;
    }
    if (moe_layer < 0 || !status.ok()) continue;
    for (MicroBatchState* mb : micro_batches) {
      ScopedTraceEvent event(rank.trace, rank.trace_pid, kHostLane,
                             s.EventName("experts and combine", layer, *mb), "compute");
      status.Update(s.ExpertsAndCombine(layer, *mb, rank));
      received_per_layer[moe_layer] += mb->received_count;
      if (!status.ok()) break;
    }
    for (MicroBatchState* mb : micro_batches) {
      if (status.ok()) status.Update(s.FinishMoe(*mb));
    }
  }
  // Whatever happened, nothing may still be in flight into this step's buffers.
  absl::Status drained;
  {
    ScopedTraceEvent event(rank.trace, rank.trace_pid, kHostLane, "layers wait", "gpu wait");
    drained = s.DrainExchanges();
    drained.Update(CudaStatus(cudaStreamSynchronize(s.stream), "step"));
  }
  if (!status.ok()) return status;
  RETURN_IF_ERROR(drained);
  s.PublishExchangeTimes(rank);
  if (rank.metrics != nullptr && !received_per_layer.empty()) {
    RETURN_IF_ERROR(parallel::PublishBalancedness(received_per_layer, rank));
  }
  // The logits stay on the device: NextTokens() reads a few candidates of each row back,
  // Logits() all of them.
  std::vector<std::vector<int32_t>> rows;
  size_t total_rows = 0;
  for (MicroBatchState* mb : micro_batches) {
    rows.push_back(State::LogitRows(*mb));
    total_rows += rows.back().size();
  }
  const size_t vocab = static_cast<size_t>(c.vocab_size);
  ScopedTraceEvent event(rank.trace, rank.trace_pid, kHostLane, "LM head", "compute");
  RETURN_IF_ERROR(s.step_logits.Reserve(total_rows * vocab));
  size_t offset = 0;
  for (size_t i = 0; i < micro_batches.size(); ++i) {
    RETURN_IF_ERROR(s.Head(*micro_batches[i], rows[i], s.step_logits.data() + offset * vocab));
    offset += rows[i].size();
  }
  // The step's staging buffers are rewritten by the next Forward(): it must have run.
  RETURN_IF_ERROR(s.SynchronizeCompute("LM head"));
  s.step_rows = total_rows;
  return absl::OkStatus();
}

// Copies the rows of positions [0, num_tokens) of `block_table` between the device cache and
// `host` (layer-major), one contiguous run of a block at a time.
absl::Status CudaRankBackend::State::CopyKvRows(const std::vector<int32_t>& block_table,
                                                int num_tokens, std::byte* host, bool to_host) {
  State& s = *this;
  const ModelConfig& c = s.config();
  const int block_size = s.options.kv_block_size;
  const size_t row_bytes = sizeof(Bf16) * (c.kv_lora_rank + c.qk_rope_head_dim);
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
              (c.kv_lora_rank + c.qk_rope_head_dim) * sizeof(Bf16));
  return state_->CopyKvRows(block_table, num_tokens, rows.data(), /*to_host=*/true);
}

absl::Status CudaRankBackend::ImportKv(const std::vector<int32_t>& block_table, int num_tokens,
                                       std::span<const std::byte> rows) {
  const ModelConfig& c = state_->config();
  if (rows.size() != static_cast<size_t>(c.num_hidden_layers) * std::max(num_tokens, 0) *
                         (c.kv_lora_rank + c.qk_rope_head_dim) * sizeof(Bf16)) {
    return absl::InternalError("KV handoff: the rows do not match the tokens");
  }
  return state_->CopyKvRows(block_table, num_tokens, const_cast<std::byte*>(rows.data()),
                            /*to_host=*/false);
}

absl::StatusOr<std::span<const float>> CudaRankBackend::Logits() {
  State& s = *state_;
  RETURN_IF_ERROR(CudaStatus(cudaSetDevice(s.options.device), "select GPU"));
  const size_t count = s.step_rows * static_cast<size_t>(s.config().vocab_size);
  RETURN_IF_ERROR(s.host_logits.Reserve(std::max<size_t>(count, 1) * sizeof(float)));
  float* host = static_cast<float*>(s.host_logits.data());
  RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(host, s.step_logits.data(), count * sizeof(float),
                                             cudaMemcpyDeviceToHost, s.stream),
                             "logits to host"));
  RETURN_IF_ERROR(s.SynchronizeCompute("logits to host"));
  return std::span<const float>(host, count);
}

absl::StatusOr<std::vector<int32_t>> CudaRankBackend::NextTokens(
    std::span<Sampler* const> samplers) {
  State& s = *state_;
  if (samplers.size() != s.step_rows) {
    return absl::InternalError(absl::StrCat("NextTokens: ", samplers.size(), " samplers for ",
                                            s.step_rows, " rows of logits"));
  }
  RETURN_IF_ERROR(CudaStatus(cudaSetDevice(s.options.device), "select GPU"));
  const int vocab = s.config().vocab_size;
  const int rows = static_cast<int>(samplers.size());
  std::vector<int32_t> tokens(samplers.size(), -1);
  if (rows == 0) return tokens;
  // Each row's request, packed: the heads follow one another in ids/values.
  std::vector<kernels::LogitHeadParams> params(rows);
  int32_t head_total = 0;
  for (int r = 0; r < rows; ++r) {
    if (samplers[r] == nullptr) continue;
    params[r] = samplers[r]->HeadParams(vocab);
    params[r].output_offset = head_total;
    head_total += params[r].head_size;
  }
  if (head_total == 0) return tokens;
  RETURN_IF_ERROR(s.head_params.Reserve(rows));
  RETURN_IF_ERROR(s.head_ids.Reserve(head_total));
  RETURN_IF_ERROR(s.head_values.Reserve(head_total));
  RETURN_IF_ERROR(s.kept_weight.Reserve(rows));
  RETURN_IF_ERROR(s.head_params_staging.CopyToDevice(s.head_params.data(), params.data(),
                                                     params.size() * sizeof(params[0]), s.stream));
  RETURN_IF_ERROR(kernels::LogitHeads(s.step_logits.data(), rows, vocab, s.head_params.data(),
                                      s.head_ids.data(), s.head_values.data(), s.kept_weight.data(),
                                      s.stream));
  // One pinned block comes back: kept weights, then ids, then values.
  const size_t weight_bytes = rows * sizeof(double);
  const size_t id_bytes = head_total * sizeof(int32_t);
  RETURN_IF_ERROR(s.head_results.Reserve(weight_bytes + 2 * id_bytes));
  auto* results = static_cast<char*>(s.head_results.data());
  auto* kept_weight = reinterpret_cast<double*>(results);
  auto* ids = reinterpret_cast<int32_t*>(results + weight_bytes);
  auto* values = reinterpret_cast<float*>(results + weight_bytes + id_bytes);
  for (auto [host, device, bytes] :
       {std::tuple<void*, const void*, size_t>{kept_weight, s.kept_weight.data(), weight_bytes},
        {ids, s.head_ids.data(), id_bytes},
        {values, s.head_values.data(), id_bytes}}) {
    RETURN_IF_ERROR(CudaStatus(
        cudaMemcpyAsync(host, device, bytes, cudaMemcpyDeviceToHost, s.stream), "heads to host"));
  }
  RETURN_IF_ERROR(s.SynchronizeCompute("logit heads"));
  std::vector<float> row;  // a whole row, for the rare walk past its head
  for (int r = 0; r < rows; ++r) {
    if (samplers[r] == nullptr) continue;
    const kernels::LogitHeadParams& p = params[r];
    auto whole_row = [&]() -> absl::StatusOr<std::span<const float>> {
      row.resize(vocab);
      RETURN_IF_ERROR(CudaStatus(
          cudaMemcpyAsync(row.data(), s.step_logits.data() + static_cast<size_t>(r) * vocab,
                          row.size() * sizeof(float), cudaMemcpyDeviceToHost, s.stream),
          "logit row to host"));
      RETURN_IF_ERROR(s.SynchronizeCompute("logit row to host"));
      return std::span<const float>(row);
    };
    absl::StatusOr<int32_t> token =
        samplers[r]->SampleFromHead({ids + p.output_offset, static_cast<size_t>(p.head_size)},
                                    {values + p.output_offset, static_cast<size_t>(p.head_size)},
                                    kept_weight[r], vocab, whole_row);
    if (!token.ok()) return token.status();
    tokens[r] = *token;
  }
  return tokens;
}

}  // namespace moeserve::engine::cuda
