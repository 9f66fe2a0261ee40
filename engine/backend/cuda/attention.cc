// The GPU backend's attention: a micro-batch's token layout (ids, positions, cache rows, block
// tables), multi-head latent attention over the paged bf16 latent cache (DeepSeek) and
// grouped-query attention over the paged bf16 key/value cache (Qwen3-MoE, Mixtral).
#include "engine/backend/cuda/rank_state.h"
#include "engine/base/status_macros.h"
#include "kernels/gqa_attention.h"
#include "kernels/kernels.h"
#include "kernels/mla.h"

namespace moeserve::engine::cuda {
namespace {

int BlockTableWidth(int blocks) {
  int width = 1;
  while (width < blocks) width *= 2;
  return width;
}

}  // namespace

absl::Status CudaRankBackend::State::UploadLayout(MicroBatchState& mb, int block_size) {
  // Token layout: ids, positions, owning sequence, cache rows and block tables.
  mb.spans = Model::Layout(mb.sequences, &mb.tokens);
  if (mb.tokens > options.max_batch_tokens) {
    return absl::InternalError(absl::StrCat(
        "GPU step of ", mb.tokens, " tokens exceeds the rank's ", options.max_batch_tokens));
  }
  std::vector<int32_t> ids, positions, token_sequence;
  std::vector<int64_t> cache_rows;
  int longest_table = 1;
  for (const BatchSequence& seq : mb.sequences) {
    longest_table = std::max(longest_table, static_cast<int>(seq.block_table->size()));
  }
  // The tables' width goes up in powers of two, so that a step's shape (StepGraphs::Key) changes
  // only when the longest context doubles. The attention kernels read a sequence's own blocks
  // only; the width is the tables' stride and bounds how finely MLA splits a context.
  mb.max_blocks = BlockTableWidth(longest_table);
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
  return mb.block_tables.Upload(block_tables.data(), block_tables.size(), stream);
}

absl::Status CudaRankBackend::State::Embed(MicroBatchState& mb) {
  return kernels::Embedding(embed.data(), mb.token_ids.data(), mb.residual.data(), mb.tokens,
                            config().hidden_size, stream);
}

absl::Status CudaRankBackend::State::Attention(int layer, MicroBatchState& mb) {
  return config().uses_mla() ? MultiHeadLatentAttention(layer, mb)
                             : GroupedQueryAttention(layer, mb);
}

absl::Status CudaRankBackend::State::GroupedQueryAttention(int layer, MicroBatchState& mb) {
  const ModelConfig& c = config();
  const DeviceLayer& w = layers[layer];
  const int tokens = mb.tokens;
  const int hidden = c.hidden_size;
  const float eps = static_cast<float>(c.rms_norm_eps);
  const kernels::GqaShape shape{c.num_attention_heads, c.num_key_value_heads, c.head_dim};

  RETURN_IF_ERROR(kernels::RmsNorm(mb.residual.data(), w.input_norm.data(), mb.normed.data(),
                                   tokens, hidden, eps, stream));
  // The projection stays fp32 until the norms and rotations are done (one rounding to bf16, as
  // MLA's latent).
  RETURN_IF_ERROR(Linear(mb.normed.data(), w.qkv.data(), mb.qkv.data(), CUDA_R_32F, tokens, hidden,
                         shape.projection_dim()));
  Bf16* layer_rows = kv_rows.data() + layer * rows_per_layer * shape.row_dim();
  RETURN_IF_ERROR(kernels::GqaWriteCache(
      mb.qkv.data(), w.has_qk_norm ? w.q_norm.data() : nullptr,
      w.has_qk_norm ? w.k_norm.data() : nullptr, eps, mb.positions.data(), mb.cache_rows.data(),
      rope_cos.data(), rope_sin.data(), mb.q.data(), layer_rows, tokens, shape, stream));
  RETURN_IF_ERROR(kernels::GqaPagedAttention(
      mb.q.data(), layer_rows, mb.block_tables.data(), mb.max_blocks, mb.token_sequence.data(),
      mb.positions.data(), mb.values.data(), tokens, shape, options.kv_block_size,
      static_cast<float>(c.attention_softmax_scale()), stream));
  // residual += o_proj(attended), then the post-attention norm.
  RETURN_IF_ERROR(Linear(mb.values.data(), w.o, mb.residual.data(), tokens,
                         shape.heads * shape.head_dim, hidden, /*accumulate=*/true));
  return kernels::RmsNorm(mb.residual.data(), w.post_attention_norm.data(), mb.normed.data(),
                          tokens, hidden, eps, stream);
}

absl::Status CudaRankBackend::State::MultiHeadLatentAttention(int layer, MicroBatchState& mb) {
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
  // A traced step times MLA's pieces apart on the GPU lane; the stage's own mark, after this
  // returns, then covers the output projection and the norm.
  auto mark = [&](const char* piece) { return MarkStage(piece, layer, mb); };

  RETURN_IF_ERROR(kernels::RmsNorm(mb.residual.data(), w.input_norm.data(), mb.normed.data(),
                                   tokens, hidden, eps, stream));
  // The latent rows need only the normed rows: kv_a and the cache write run on the side lane,
  // beside the queries (small GEMMs that leave most SMs idle alone); the attention joins them.
  RETURN_IF_ERROR(side->Fork());
  RETURN_IF_ERROR(Linear(mb.normed.data(), w.kv_a.data(), mb.kv_a.data(), CUDA_R_32F, tokens,
                         hidden, row_dim, 0.0f, side->cublas()));
  Bf16* layer_rows = kv_rows.data() + layer * rows_per_layer * row_dim;
  RETURN_IF_ERROR(kernels::MlaWriteCache(
      mb.kv_a.data(), w.kv_a_norm.data(), eps, mb.positions.data(), mb.cache_rows.data(),
      rope_cos.data(), rope_sin.data(), layer_rows, tokens, latent, rope, side->stream()));
  if (c.q_lora_rank > 0) {
    RETURN_IF_ERROR(
        Linear(mb.normed.data(), w.q_a, mb.q_compressed.data(), tokens, hidden, c.q_lora_rank));
    RETURN_IF_ERROR(kernels::RmsNorm(mb.q_compressed.data(), w.q_a_norm.data(),
                                     mb.q_compressed.data(), tokens, c.q_lora_rank, eps, stream));
    RETURN_IF_ERROR(
        Linear(mb.q_compressed.data(), w.q_b, mb.q.data(), tokens, c.q_lora_rank, heads * qk));
  } else {
    RETURN_IF_ERROR(Linear(mb.normed.data(), w.q, mb.q.data(), tokens, hidden, heads * qk));
  }
  RETURN_IF_ERROR(mark("MLA queries"));
  RETURN_IF_ERROR(kernels::MlaQueryRope(mb.q.data(), mb.positions.data(), rope_cos.data(),
                                        rope_sin.data(), mb.q_absorbed.data(), tokens, heads, nope,
                                        rope, latent, stream));
  RETURN_IF_ERROR(mark("MLA query rope"));
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
  RETURN_IF_ERROR(mark("MLA absorbed queries"));
  RETURN_IF_ERROR(side->Join());  // the latent rows are in the cache
  RETURN_IF_ERROR(mark("MLA latent rows (side lane)"));
  RETURN_IF_ERROR(kernels::MlaPagedAttention(
      mb.q_absorbed.data(), layer_rows, mb.block_tables.data(), mb.max_blocks,
      mb.token_sequence.data(), mb.positions.data(), mb.attended.data(), tokens, heads, latent,
      rope, options.kv_block_size, static_cast<float>(c.attention_softmax_scale()),
      attention_workspace.data(), stream));
  RETURN_IF_ERROR(mark("MLA paged attention"));
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
  RETURN_IF_ERROR(mark("MLA values"));
  // residual += o_proj(values), then the post-attention norm.
  RETURN_IF_ERROR(Linear(mb.values.data(), w.o, mb.residual.data(), tokens, heads * v, hidden,
                         /*accumulate=*/true));
  return kernels::RmsNorm(mb.residual.data(), w.post_attention_norm.data(), mb.normed.data(),
                          tokens, hidden, eps, stream);
}

}  // namespace moeserve::engine::cuda
