#include "engine/backend/cuda/cuda_rank_backend.h"

#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "engine/backend/cuda/device_array.h"
#include "engine/parallel/ep_forward.h"
#include "kernels/cpu_twins.h"
#include "kernels/expert_mlp.h"
#include "kernels/kernels.h"
#include "kernels/mla.h"

namespace moeserve::engine::cuda {
namespace {

using Bf16 = __nv_bfloat16;
using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

absl::Status Cuda(cudaError_t error, const char* what) { return kernels::CudaStatus(error, what); }

absl::Status Cublas(cublasStatus_t status, const char* what) {
  if (status == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": cuBLAS status ", static_cast<int>(status)));
}

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

}  // namespace

absl::Status CheckCudaSupport(const ModelConfig& config) {
  if (!config.uses_mla()) {
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

struct CudaRankBackend::State {
  const Model* model = nullptr;
  CudaRankOptions options;
  cudaStream_t stream = nullptr;
  cublasHandle_t cublas = nullptr;
  int64_t weight_bytes = 0;

  DeviceArray<Bf16> embed, final_norm, lm_head;
  DeviceArray<float> rope_cos, rope_sin;
  std::vector<DeviceLayer> layers;
  int64_t placement_version = -1;
  kernels::GateOptions gate_options;

  DeviceArray<Bf16> kv_rows;  // [layers, blocks, block_size, latent + rope]
  int64_t rows_per_layer = 0;

  std::unique_ptr<kernels::ExpertMlp> dense_mlp, shared_mlp, routed_mlp;

  // Step scratch.
  DeviceArray<int32_t> token_ids, positions, token_sequence, block_tables, row_index;
  DeviceArray<int64_t> cache_rows;
  DeviceArray<Bf16> residual, normed, q_compressed, q, q_absorbed, attended, values;
  DeviceArray<float> kv_a;
  DeviceArray<float> gate_logits, routing_weights;
  DeviceArray<int32_t> routing_experts;
  DeviceArray<Bf16> send, received, expert_in, expert_out, results, returned, moe_out, shared_out;
  DeviceArray<Bf16> head_in;
  DeviceArray<float> logits;
  cudaEvent_t produced = nullptr;  // compute-stream work the exchange must wait for

  ~State() {
    if (produced != nullptr) cudaEventDestroy(produced);
    if (cublas != nullptr) cublasDestroy(cublas);
    if (stream != nullptr) cudaStreamDestroy(stream);
  }

  const ModelConfig& config() const { return model->config(); }

  // y[rows, out] = x[rows, in] · w[out, in]^T (+ beta * y); bf16 inputs, fp32 accumulation, y
  // in bf16 or fp32.
  absl::Status Linear(const Bf16* x, const Bf16* w, void* y, cudaDataType y_type, int rows, int in,
                      int out, float beta = 0.0f) {
    if (rows == 0) return absl::OkStatus();
    const float alpha = 1.0f;
    return Cublas(cublasGemmEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, out, rows, in, &alpha, w,
                               CUDA_R_16BF, in, x, CUDA_R_16BF, in, &beta, y, y_type, out,
                               CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                  "linear");
  }

  absl::Status LoadSlots(const ExpertPlacement& placement);
  absl::Status Attention(int layer, int tokens, int sequences, int max_blocks);
  absl::Status Moe(int layer, int tokens, const ExpertPlacement& placement,
                   parallel::RankResources& rank, int64_t& received_rows);
  absl::Status Exchange(const Bf16* send_buffer, std::span<const int64_t> send_rows,
                        Bf16* receive_buffer, std::span<const int64_t> receive_rows);
};

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

absl::Status CudaRankBackend::State::Attention(int layer, int tokens, int sequences,
                                               int max_blocks) {
  const ModelConfig& c = config();
  const DeviceLayer& w = layers[layer];
  const int heads = c.num_attention_heads;
  const int nope = c.qk_nope_head_dim;
  const int rope = c.qk_rope_head_dim;
  const int qk = c.qk_head_dim();
  const int v = c.v_head_dim;
  const int latent = c.kv_lora_rank;
  const int row_dim = latent + rope;
  const int hidden = c.hidden_size;
  const float eps = static_cast<float>(c.rms_norm_eps);
  (void)sequences;

  RETURN_IF_ERROR(kernels::RmsNorm(residual.data(), w.input_norm.data(), normed.data(), tokens,
                                   hidden, eps, stream));
  if (c.q_lora_rank > 0) {
    RETURN_IF_ERROR(Linear(normed.data(), w.q_a.data(), q_compressed.data(), CUDA_R_16BF, tokens,
                           hidden, c.q_lora_rank));
    RETURN_IF_ERROR(kernels::RmsNorm(q_compressed.data(), w.q_a_norm.data(), q_compressed.data(),
                                     tokens, c.q_lora_rank, eps, stream));
    RETURN_IF_ERROR(Linear(q_compressed.data(), w.q_b.data(), q.data(), CUDA_R_16BF, tokens,
                           c.q_lora_rank, heads * qk));
  } else {
    RETURN_IF_ERROR(
        Linear(normed.data(), w.q.data(), q.data(), CUDA_R_16BF, tokens, hidden, heads * qk));
  }
  RETURN_IF_ERROR(
      Linear(normed.data(), w.kv_a.data(), kv_a.data(), CUDA_R_32F, tokens, hidden, row_dim));
  Bf16* layer_rows = kv_rows.data() + layer * rows_per_layer * row_dim;
  RETURN_IF_ERROR(kernels::MlaWriteCache(kv_a.data(), w.kv_a_norm.data(), eps, positions.data(),
                                         cache_rows.data(), rope_cos.data(), rope_sin.data(),
                                         layer_rows, tokens, latent, rope, stream));
  RETURN_IF_ERROR(kernels::MlaQueryRope(q.data(), positions.data(), rope_cos.data(),
                                        rope_sin.data(), q_absorbed.data(), tokens, heads, nope,
                                        rope, latent, stream));
  // Absorbed queries: q_absorbed[t, h, :latent] = q_nope[t, h] · W_UK(h), W_UK(h) = the head's
  // [nope, latent] rows of kv_b_proj; one strided batched GEMM over the heads.
  const float one = 1.0f, zero = 0.0f;
  const int64_t kv_b_head = static_cast<int64_t>(nope + v) * latent;
  if (tokens > 0) {
    RETURN_IF_ERROR(
        Cublas(cublasGemmStridedBatchedEx(cublas, CUBLAS_OP_N, CUBLAS_OP_N, latent, tokens, nope,
                                          &one, w.kv_b.data(), CUDA_R_16BF, latent, kv_b_head,
                                          q.data(), CUDA_R_16BF, heads * qk, qk, &zero,
                                          q_absorbed.data(), CUDA_R_16BF, heads * row_dim, row_dim,
                                          heads, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
               "absorbed queries"));
  }
  RETURN_IF_ERROR(kernels::MlaPagedAttention(
      q_absorbed.data(), layer_rows, block_tables.data(), max_blocks, token_sequence.data(),
      positions.data(), attended.data(), tokens, heads, latent, rope, options.kv_block_size,
      static_cast<float>(c.attention_softmax_scale()), stream));
  // Values: out(h) = attended(h) · W_UV(h)^T, W_UV(h) = the head's [v, latent] rows.
  if (tokens > 0) {
    RETURN_IF_ERROR(Cublas(
        cublasGemmStridedBatchedEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, v, tokens, latent, &one,
                                   w.kv_b.data() + static_cast<int64_t>(nope) * latent, CUDA_R_16BF,
                                   latent, kv_b_head, attended.data(), CUDA_R_16BF, heads * latent,
                                   latent, &zero, values.data(), CUDA_R_16BF, heads * v, v, heads,
                                   CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
        "attention values"));
  }
  // residual += o_proj(values), then the post-attention norm.
  RETURN_IF_ERROR(Linear(values.data(), w.o.data(), residual.data(), CUDA_R_16BF, tokens, heads * v,
                         hidden, 1.0f));
  return kernels::RmsNorm(residual.data(), w.post_attention_norm.data(), normed.data(), tokens,
                          hidden, eps, stream);
}

absl::Status CudaRankBackend::State::Exchange(const Bf16* send_buffer,
                                              std::span<const int64_t> send_rows,
                                              Bf16* receive_buffer,
                                              std::span<const int64_t> receive_rows) {
  const int64_t row_bytes = static_cast<int64_t>(config().hidden_size) * sizeof(Bf16);
  std::vector<int64_t> send_bytes(send_rows.size()), receive_bytes(receive_rows.size());
  for (size_t p = 0; p < send_rows.size(); ++p) {
    send_bytes[p] = send_rows[p] * row_bytes;
    receive_bytes[p] = receive_rows[p] * row_bytes;
  }
  parallel::NcclCommunicator& nccl = *options.exchange;
  RETURN_IF_ERROR(Cuda(cudaEventRecord(produced, stream), "exchange event"));
  RETURN_IF_ERROR(nccl.WaitForEvent(produced));
  RETURN_IF_ERROR(nccl.EnqueueAllToAllV(send_buffer, send_bytes, receive_buffer, receive_bytes));
  absl::StatusOr<parallel::CollectiveCompletion> done = nccl.RecordCompletion();
  if (!done.ok()) return done.status();
  // The host waits (with the group timeout) rather than only the stream: a peer that never
  // arrives must fail the step, not hang the next kernel launch.
  return done->Wait();
}

absl::Status CudaRankBackend::State::Moe(int layer, int tokens, const ExpertPlacement& placement,
                                         parallel::RankResources& rank, int64_t& received_rows) {
  const ModelConfig& c = config();
  const DeviceLayer& w = layers[layer];
  const int hidden = c.hidden_size;
  const int top_k = c.num_experts_per_tok;
  const int moe_layer = model->moe_index(layer);
  const int size = options.group_size;
  const int assignments = tokens * top_k;

  // Gate: fp32 logits, then scores, group limit and top-k in one kernel.
  RETURN_IF_ERROR(Linear(normed.data(), w.gate.data(), gate_logits.data(), CUDA_R_32F, tokens,
                         hidden, c.n_routed_experts));
  if (tokens > 0) {
    RETURN_IF_ERROR(kernels::GateTopK(
        gate_logits.data(), w.has_correction_bias ? w.correction_bias.data() : nullptr, tokens,
        gate_options, routing_experts.data(), routing_weights.data(), stream));
  }
  if (w.has_shared) {
    RETURN_IF_ERROR(shared_mlp->Run(normed.data(), {0, tokens}, {w.shared.gate_up.data()},
                                    {w.shared.down.data()}, shared_out.data()));
  }
  std::vector<int32_t> experts(assignments);
  if (assignments > 0) {
    RETURN_IF_ERROR(
        Cuda(cudaMemcpyAsync(experts.data(), routing_experts.data(), sizeof(int32_t) * assignments,
                             cudaMemcpyDeviceToHost, stream),
             "routing to host"));
    RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(stream), "routing to host"));
  }

  // Dispatch: the same replica choice and send order as the CPU backend.
  const auto dispatch_start = Clock::now();
  parallel::DispatchPlan plan =
      parallel::PlanDispatch(experts, top_k, moe_layer, placement, options.rank, size);
  std::vector<int32_t> source_token(assignments);
  for (int row = 0; row < assignments; ++row) source_token[row] = plan.sent_assignment[row] / top_k;
  RETURN_IF_ERROR(row_index.Upload(source_token.data(), source_token.size(), stream));
  RETURN_IF_ERROR(kernels::PermuteRows(normed.data(), row_index.data(), send.data(), assignments,
                                       hidden, stream));
  std::vector<int64_t> receive_rows(size, 0);
  std::vector<int32_t> received_slots;
  const Bf16* received_activations = send.data();
  if (size > 1) {
    RETURN_IF_ERROR(rank.compute->AllToAllCounts(plan.send_rows, receive_rows));
    int64_t total = 0;
    for (int64_t rows : receive_rows) total += rows;
    received_slots.assign(total, 0);
    std::vector<int64_t> send_bytes(size), receive_bytes(size);
    for (int p = 0; p < size; ++p) {
      send_bytes[p] = plan.send_rows[p] * static_cast<int64_t>(sizeof(int32_t));
      receive_bytes[p] = receive_rows[p] * static_cast<int64_t>(sizeof(int32_t));
    }
    RETURN_IF_ERROR(rank.compute->AllToAllV(plan.send_slots.data(), send_bytes,
                                            received_slots.data(), receive_bytes));
    RETURN_IF_ERROR(received.Reserve(static_cast<size_t>(std::max<int64_t>(total, 1)) * hidden));
    RETURN_IF_ERROR(Exchange(send.data(), plan.send_rows, received.data(), receive_rows));
    received_activations = received.data();
  } else {
    receive_rows[0] = assignments;
    received_slots = plan.send_slots;
  }
  if (rank.metrics != nullptr) {
    rank.metrics->AddDispatch(
        assignments * static_cast<int64_t>(hidden * sizeof(Bf16) + sizeof(int32_t)),
        SecondsSince(dispatch_start));
  }

  // Local experts: order the received rows by slot, run the slots as grouped GEMMs, and put the
  // results back in received order.
  const int64_t received_count = static_cast<int64_t>(received_slots.size());
  received_rows += received_count;
  const int slots = static_cast<int>(w.slots.size());
  std::vector<int64_t> offsets(slots + 1, 0);
  for (int32_t slot : received_slots) ++offsets[slot + 1];
  for (int s = 0; s < slots; ++s) offsets[s + 1] += offsets[s];
  std::vector<int32_t> by_slot(received_count), back_to_received(received_count);
  {
    std::vector<int64_t> cursor(offsets.begin(), offsets.end() - 1);
    for (int64_t row = 0; row < received_count; ++row) {
      const int64_t at = cursor[received_slots[row]]++;
      by_slot[at] = static_cast<int32_t>(row);
      back_to_received[row] = static_cast<int32_t>(at);
    }
  }
  RETURN_IF_ERROR(row_index.Upload(by_slot.data(), by_slot.size(), stream));
  RETURN_IF_ERROR(kernels::PermuteRows(received_activations, row_index.data(), expert_in.data(),
                                       static_cast<int>(received_count), hidden, stream));
  std::vector<const Bf16*> gate_up, down;
  for (const DeviceMlp& slot : w.slots) {
    gate_up.push_back(slot.gate_up.data());
    down.push_back(slot.down.data());
  }
  // Many slots with few rows each (decode) fill the GPU best as one grouped GEMM; slots with
  // many rows each (prefill) run faster as one large GEMM apiece (docs/PERFORMANCE.md).
  int busy_slots = 0;
  for (int s = 0; s < slots; ++s) busy_slots += offsets[s + 1] > offsets[s] ? 1 : 0;
  const bool small_groups = busy_slots > 0 && received_count / busy_slots < 512;
  RETURN_IF_ERROR(routed_mlp->Run(expert_in.data(), offsets, gate_up, down, expert_out.data(),
                                  small_groups ? kernels::ExpertMlp::Strategy::kGroupedGemm
                                               : kernels::ExpertMlp::Strategy::kPerExpertGemm));
  RETURN_IF_ERROR(row_index.Upload(back_to_received.data(), back_to_received.size(), stream));
  RETURN_IF_ERROR(kernels::PermuteRows(expert_out.data(), row_index.data(), results.data(),
                                       static_cast<int>(received_count), hidden, stream));
  if (rank.load != nullptr) {
    for (int s = 0; s < slots; ++s) {
      if (offsets[s + 1] > offsets[s]) {
        rank.load->Record(moe_layer, w.slot_expert[s], offsets[s + 1] - offsets[s]);
      }
    }
  }

  // Combine: results travel back along the reverse of the dispatch.
  const auto combine_start = Clock::now();
  const Bf16* returned_rows = results.data();
  if (size > 1) {
    RETURN_IF_ERROR(Exchange(results.data(), receive_rows, returned.data(), plan.send_rows));
    returned_rows = returned.data();
  }
  if (rank.metrics != nullptr) {
    rank.metrics->AddCombine(received_count * static_cast<int64_t>(hidden * sizeof(Bf16)),
                             SecondsSince(combine_start));
  }
  std::vector<int32_t> position(assignments);
  for (int row = 0; row < assignments; ++row) position[plan.sent_assignment[row]] = row;
  RETURN_IF_ERROR(row_index.Upload(position.data(), position.size(), stream));
  RETURN_IF_ERROR(kernels::WeightedUnpermute(
      returned_rows, row_index.data(), routing_weights.data(),
      w.has_shared ? shared_out.data() : nullptr, moe_out.data(), tokens, top_k, hidden, stream));
  return kernels::AddInPlace(residual.data(), moe_out.data(), static_cast<int64_t>(tokens) * hidden,
                             stream);
}

CudaRankBackend::CudaRankBackend(std::unique_ptr<State> state) : state_(std::move(state)) {}

CudaRankBackend::~CudaRankBackend() {
  if (state_ != nullptr) cudaSetDevice(state_->options.device);
  state_.reset();
}

int64_t CudaRankBackend::weight_bytes() const { return state_->weight_bytes; }

int64_t CudaRankBackend::kv_bytes() const {
  return static_cast<int64_t>(state_->kv_rows.capacity()) * sizeof(Bf16);
}

absl::StatusOr<std::unique_ptr<CudaRankBackend>> CudaRankBackend::Create(
    const Model& model, const ExpertPlacement& placement, const CudaRankOptions& options) {
  const ModelConfig& c = model.config();
  RETURN_IF_ERROR(CheckCudaSupport(c));
  RETURN_IF_ERROR(Cuda(cudaSetDevice(options.device), "select GPU"));
  auto state = std::make_unique<State>();
  State& s = *state;
  s.model = &model;
  s.options = options;
  RETURN_IF_ERROR(Cuda(cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking), "stream"));
  RETURN_IF_ERROR(Cublas(cublasCreate(&s.cublas), "cuBLAS handle"));
  RETURN_IF_ERROR(Cublas(cublasSetStream(s.cublas, s.stream), "cuBLAS stream"));
  RETURN_IF_ERROR(
      Cuda(cudaEventCreateWithFlags(&s.produced, cudaEventDisableTiming), "exchange event"));

  size_t free_before = 0, total = 0;
  cudaMemGetInfo(&free_before, &total);
  const ModelWeights& weights = model.weights();
  const int hidden = c.hidden_size;
  const cudaStream_t stream = s.stream;
  RETURN_IF_ERROR(UploadBf16(s.embed, weights.embed_tokens(),
                             static_cast<size_t>(c.vocab_size) * hidden, stream));
  RETURN_IF_ERROR(UploadBf16(s.final_norm, weights.final_norm(), hidden, stream));
  RETURN_IF_ERROR(
      UploadBf16(s.lm_head, weights.lm_head(), static_cast<size_t>(c.vocab_size) * hidden, stream));
  RETURN_IF_ERROR(
      s.rope_cos.Upload(model.rope().cos_table().data(), model.rope().cos_table().size(), stream));
  RETURN_IF_ERROR(
      s.rope_sin.Upload(model.rope().sin_table().data(), model.rope().sin_table().size(), stream));
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
  size_t free_after = 0;
  cudaMemGetInfo(&free_after, &total);
  s.weight_bytes = static_cast<int64_t>(free_before) - static_cast<int64_t>(free_after);

  // The gate kernel's options, mirroring RouteTokens on the CPU.
  kernels::GateOptions& g = s.gate_options;
  g.num_experts = std::max(c.n_routed_experts, 1);
  g.top_k = std::max(c.num_experts_per_tok, 1);
  const bool grouped = c.topk_method != TopKMethod::kGreedy && c.n_group > 1;
  g.num_groups = grouped ? c.n_group : 1;
  g.topk_groups = grouped ? c.topk_group : 1;
  g.sigmoid = c.scoring_func == ScoringFunction::kSigmoid;
  g.group_score_top2_sum = c.topk_method == TopKMethod::kNoAuxTc;
  g.normalize = c.norm_topk_prob && (c.num_experts_per_tok > 1 || c.model_type != "deepseek_v2");
  g.scaling = (!g.normalize || c.model_type == "deepseek_v3")
                  ? static_cast<float>(c.routed_scaling_factor)
                  : 1.0f;

  // KV rows on the device, and the fixed-size scratch of a step.
  s.rows_per_layer = static_cast<int64_t>(options.kv_blocks) * options.kv_block_size;
  RETURN_IF_ERROR(
      s.kv_rows.Reserve(static_cast<size_t>(c.num_hidden_layers) * s.rows_per_layer * row_dim));
  const int max_tokens = std::max(options.max_batch_tokens, 1);
  const int top_k = std::max(c.num_experts_per_tok, 1);
  // Worst case of rows one rank receives: every rank's every assignment.
  const int64_t max_received = static_cast<int64_t>(max_tokens) * top_k * options.group_size;
  const int max_intermediate = std::max(c.intermediate_size, 1);
  const int shared_intermediate = std::max(c.moe_intermediate_size * c.n_shared_experts, 1);
  auto make_mlp = [&](int intermediate, int64_t rows, int experts,
                      std::unique_ptr<kernels::ExpertMlp>& out) -> absl::Status {
    absl::StatusOr<kernels::ExpertMlp> mlp =
        kernels::ExpertMlp::Create(hidden, intermediate, static_cast<int>(rows), experts, stream);
    if (!mlp.ok()) return mlp.status();
    out = std::make_unique<kernels::ExpertMlp>(std::move(*mlp));
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(make_mlp(max_intermediate, max_tokens, 1, s.dense_mlp));
  if (c.n_routed_experts > 0) {
    const int slots = placement.num_physical() / options.group_size;
    RETURN_IF_ERROR(make_mlp(shared_intermediate, max_tokens, 1, s.shared_mlp));
    RETURN_IF_ERROR(
        make_mlp(std::max(c.moe_intermediate_size, 1), max_received, slots, s.routed_mlp));
  }
  const size_t t = max_tokens;
  const size_t h = hidden;
  RETURN_IF_ERROR(s.residual.Reserve(t * h));
  RETURN_IF_ERROR(s.normed.Reserve(t * h));
  RETURN_IF_ERROR(s.q_compressed.Reserve(t * std::max(c.q_lora_rank, 1)));
  RETURN_IF_ERROR(s.q.Reserve(t * heads * qk));
  RETURN_IF_ERROR(s.kv_a.Reserve(t * row_dim));
  RETURN_IF_ERROR(s.q_absorbed.Reserve(t * heads * row_dim));
  RETURN_IF_ERROR(s.attended.Reserve(t * heads * c.kv_lora_rank));
  RETURN_IF_ERROR(s.values.Reserve(t * heads * c.v_head_dim));
  RETURN_IF_ERROR(s.gate_logits.Reserve(t * std::max(c.n_routed_experts, 1)));
  RETURN_IF_ERROR(s.routing_experts.Reserve(t * top_k));
  RETURN_IF_ERROR(s.routing_weights.Reserve(t * top_k));
  RETURN_IF_ERROR(s.send.Reserve(t * top_k * h));
  RETURN_IF_ERROR(s.returned.Reserve(t * top_k * h));
  RETURN_IF_ERROR(s.expert_in.Reserve(static_cast<size_t>(max_received) * h));
  RETURN_IF_ERROR(s.expert_out.Reserve(static_cast<size_t>(max_received) * h));
  RETURN_IF_ERROR(s.results.Reserve(static_cast<size_t>(max_received) * h));
  RETURN_IF_ERROR(s.moe_out.Reserve(t * h));
  RETURN_IF_ERROR(s.shared_out.Reserve(t * h));
  RETURN_IF_ERROR(s.head_in.Reserve(t * h));
  RETURN_IF_ERROR(s.logits.Reserve(t * c.vocab_size));
  return std::unique_ptr<CudaRankBackend>(new CudaRankBackend(std::move(state)));
}

absl::StatusOr<std::vector<float>> CudaRankBackend::Run(std::span<const BatchSequence> batch,
                                                        KvCache& cache,
                                                        const ExpertPlacement& placement,
                                                        parallel::RankResources& rank,
                                                        bool two_micro_batches) {
  // One batch per step: the exchange is synchronous here, so splitting into micro-batches would
  // only add launches (two-batch overlap on GPUs is measured by moeserve-dispatch-bench).
  (void)two_micro_batches;
  State& s = *state_;
  const ModelConfig& c = s.config();
  RETURN_IF_ERROR(Cuda(cudaSetDevice(s.options.device), "select GPU"));
  RETURN_IF_ERROR(s.LoadSlots(placement));
  const int hidden = c.hidden_size;

  // Token layout: ids, positions, owning sequence, cache rows and block tables.
  int tokens = 0;
  std::vector<SequenceSpan> spans = Model::Layout(batch, &tokens);
  if (tokens > s.options.max_batch_tokens) {
    return absl::InternalError(absl::StrCat("GPU step of ", tokens, " tokens exceeds the rank's ",
                                            s.options.max_batch_tokens));
  }
  std::vector<int32_t> ids, positions, token_sequence;
  std::vector<int64_t> cache_rows;
  int max_blocks = 1;
  for (const BatchSequence& seq : batch) {
    max_blocks = std::max(max_blocks, static_cast<int>(seq.block_table->size()));
  }
  std::vector<int32_t> block_tables(batch.size() * max_blocks, 0);
  const int block_size = cache.block_size();
  for (size_t i = 0; i < batch.size(); ++i) {
    const BatchSequence& seq = batch[i];
    std::copy(seq.block_table->begin(), seq.block_table->end(),
              block_tables.begin() + static_cast<std::ptrdiff_t>(i * max_blocks));
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
  RETURN_IF_ERROR(s.token_ids.Upload(ids.data(), ids.size(), s.stream));
  RETURN_IF_ERROR(s.positions.Upload(positions.data(), positions.size(), s.stream));
  RETURN_IF_ERROR(s.token_sequence.Upload(token_sequence.data(), token_sequence.size(), s.stream));
  RETURN_IF_ERROR(s.cache_rows.Upload(cache_rows.data(), cache_rows.size(), s.stream));
  RETURN_IF_ERROR(s.block_tables.Upload(block_tables.data(), block_tables.size(), s.stream));

  RETURN_IF_ERROR(kernels::Embedding(s.embed.data(), s.token_ids.data(), s.residual.data(), tokens,
                                     hidden, s.stream));
  std::vector<int64_t> received_per_layer(c.num_moe_layers(), 0);
  for (int layer = 0; layer < c.num_hidden_layers; ++layer) {
    RETURN_IF_ERROR(s.Attention(layer, tokens, static_cast<int>(batch.size()), max_blocks));
    const int moe_layer = s.model->moe_index(layer);
    if (moe_layer < 0) {
      const DeviceLayer& w = s.layers[layer];
      RETURN_IF_ERROR(s.dense_mlp->Run(s.normed.data(), {0, tokens}, {w.dense.gate_up.data()},
                                       {w.dense.down.data()}, s.moe_out.data()));
      RETURN_IF_ERROR(kernels::AddInPlace(s.residual.data(), s.moe_out.data(),
                                          static_cast<int64_t>(tokens) * hidden, s.stream));
      continue;
    }
    RETURN_IF_ERROR(s.Moe(layer, tokens, placement, rank, received_per_layer[moe_layer]));
  }
  if (rank.metrics != nullptr && !received_per_layer.empty()) {
    RETURN_IF_ERROR(parallel::PublishBalancedness(received_per_layer, rank));
  }

  // Logits of the rows that need them (see Model::LogitRows).
  std::vector<int> rows = Model::LogitRows(batch, spans);
  std::vector<float> logits(rows.size() * static_cast<size_t>(c.vocab_size));
  if (rows.empty()) return logits;
  std::vector<int32_t> row_ids(rows.begin(), rows.end());
  RETURN_IF_ERROR(s.row_index.Upload(row_ids.data(), row_ids.size(), s.stream));
  const int head_rows = static_cast<int>(rows.size());
  RETURN_IF_ERROR(kernels::PermuteRows(s.residual.data(), s.row_index.data(), s.head_in.data(),
                                       head_rows, hidden, s.stream));
  RETURN_IF_ERROR(kernels::RmsNorm(s.head_in.data(), s.final_norm.data(), s.head_in.data(),
                                   head_rows, hidden, static_cast<float>(c.rms_norm_eps),
                                   s.stream));
  RETURN_IF_ERROR(s.Linear(s.head_in.data(), s.lm_head.data(), s.logits.data(), CUDA_R_32F,
                           head_rows, hidden, c.vocab_size));
  RETURN_IF_ERROR(
      Cuda(cudaMemcpyAsync(logits.data(), s.logits.data(), logits.size() * sizeof(float),
                           cudaMemcpyDeviceToHost, s.stream),
           "logits to host"));
  RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(s.stream), "step"));
  return logits;
}

}  // namespace moeserve::engine::cuda
