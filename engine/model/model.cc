#include "engine/model/model.h"

#include <algorithm>

#include "engine/backend/cpu_ops.h"

namespace moeserve::engine {

Model::Model(ModelWeights weights)
    : weights_(std::move(weights)), rope_(weights_.config()), attention_(weights_.config(), rope_) {}

void Model::FeedForward(int layer, const float* normed, int num_tokens, float* output) const {
  const ModelConfig& c = config();
  const LayerWeights& w = weights_.layer(layer);
  if (!w.is_moe) {
    RunMlp(w.dense_mlp, normed, num_tokens, c.hidden_size, output);
    return;
  }
  const Routing routing = ComputeRouting(c, w.moe, normed, num_tokens);
  const std::vector<float> expert_outputs =
      RunRoutedExpertsLocally(w.moe, routing, normed, c.hidden_size);
  std::vector<float> shared;
  if (w.moe.has_shared) {
    shared.resize(static_cast<size_t>(num_tokens) * c.hidden_size);
    RunMlp(w.moe.shared, normed, num_tokens, c.hidden_size, shared.data());
  }
  CombineExpertOutputs(routing, expert_outputs.data(), shared.empty() ? nullptr : shared.data(),
                       c.hidden_size, output);
}

std::vector<float> Model::Forward(std::span<const BatchSequence> batch, KvCache& cache) const {
  const ModelConfig& c = config();
  const int hidden = c.hidden_size;
  std::vector<SequenceSpan> spans;
  spans.reserve(batch.size());
  int num_tokens = 0;
  for (const BatchSequence& seq : batch) {
    spans.push_back({num_tokens, static_cast<int>(seq.tokens.size()), seq.start_position,
                     seq.block_table});
    num_tokens += static_cast<int>(seq.tokens.size());
  }
  // Residual stream [tokens, hidden].
  std::vector<float> residual(static_cast<size_t>(num_tokens) * hidden);
  int row = 0;
  for (const BatchSequence& seq : batch) {
    for (int32_t token : seq.tokens) {
      std::copy_n(weights_.embed_tokens() + static_cast<int64_t>(token) * hidden, hidden,
                  &residual[static_cast<size_t>(row++) * hidden]);
    }
  }
  std::vector<float> normed(residual.size()), block_output(residual.size());
  for (int layer = 0; layer < c.num_hidden_layers; ++layer) {
    const LayerWeights& w = weights_.layer(layer);
    cpu::RmsNorm(residual.data(), w.input_layernorm, normed.data(), num_tokens, hidden,
                 c.rms_norm_eps);
    attention_.Forward(layer, w.attention, normed.data(), num_tokens, spans, cache,
                       block_output.data());
    for (size_t i = 0; i < residual.size(); ++i) residual[i] += block_output[i];
    cpu::RmsNorm(residual.data(), w.post_attention_layernorm, normed.data(), num_tokens, hidden,
                 c.rms_norm_eps);
    FeedForward(layer, normed.data(), num_tokens, block_output.data());
    for (size_t i = 0; i < residual.size(); ++i) residual[i] += block_output[i];
  }
  // Final norm and LM head on the rows that need logits.
  std::vector<int> logit_rows;
  for (size_t s = 0; s < batch.size(); ++s) {
    const SequenceSpan& span = spans[s];
    if (batch[s].all_logits) {
      for (int i = 0; i < span.num_tokens; ++i) logit_rows.push_back(span.token_offset + i);
    } else if (span.num_tokens > 0) {
      logit_rows.push_back(span.token_offset + span.num_tokens - 1);
    }
  }
  const int rows = static_cast<int>(logit_rows.size());
  std::vector<float> final_hidden(static_cast<size_t>(rows) * hidden);
  for (int r = 0; r < rows; ++r) {
    cpu::RmsNorm(&residual[static_cast<size_t>(logit_rows[r]) * hidden], weights_.final_norm(),
                 &final_hidden[static_cast<size_t>(r) * hidden], 1, hidden, c.rms_norm_eps);
  }
  std::vector<float> logits(static_cast<size_t>(rows) * c.vocab_size);
  cpu::Linear(final_hidden.data(), weights_.lm_head(), logits.data(), rows, hidden, c.vocab_size);
  return logits;
}

}  // namespace moeserve::engine
