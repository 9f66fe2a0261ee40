#include "engine/model/model.h"

#include <algorithm>

#include "engine/ops/cpu_ops.h"

namespace moeserve::engine {

Model::Model(ModelWeights weights) : Model(std::move(weights), nullptr) {}

Model::Model(ModelWeights weights, std::shared_ptr<const TensorSource> source)
    : weights_(std::move(weights)),
      source_(std::move(source)),
      rope_(weights_.config()),
      attention_(weights_.config(), rope_),
      grouped_query_attention_(weights_.config(), rope_) {
  int next = 0;
  for (int layer = 0; layer < config().num_hidden_layers; ++layer) {
    moe_index_.push_back(config().is_moe_layer(layer) ? next++ : -1);
  }
}

std::vector<SequenceSpan> Model::Layout(std::span<const BatchSequence> batch, int* num_tokens) {
  std::vector<SequenceSpan> spans;
  spans.reserve(batch.size());
  int tokens = 0;
  for (const BatchSequence& seq : batch) {
    spans.push_back(
        {tokens, static_cast<int>(seq.tokens.size()), seq.start_position, seq.block_table});
    tokens += static_cast<int>(seq.tokens.size());
  }
  *num_tokens = tokens;
  return spans;
}

void Model::Embed(std::span<const BatchSequence> batch, float* residual) const {
  const int hidden = config().hidden_size;
  size_t row = 0;
  for (const BatchSequence& seq : batch) {
    for (int32_t token : seq.tokens) {
      std::copy_n(weights_.embed_tokens() + static_cast<int64_t>(token) * hidden, hidden,
                  residual + (row++) * hidden);
    }
  }
}

void Model::AttentionBlock(int layer, std::span<const SequenceSpan> spans, int num_tokens,
                           KvRows& cache, float* residual, float* normed) const {
  const ModelConfig& c = config();
  const LayerWeights& w = weights_.layer(layer);
  const size_t size = static_cast<size_t>(num_tokens) * c.hidden_size;
  std::vector<float> attention_output(size);
  cpu::RmsNorm(residual, w.input_layernorm, normed, num_tokens, c.hidden_size, c.rms_norm_eps);
  if (c.uses_mla()) {
    attention_.Forward(layer, w.attention, normed, num_tokens, spans, cache,
                       attention_output.data());
  } else {
    grouped_query_attention_.Forward(layer, w.attention, normed, num_tokens, spans, cache,
                                     attention_output.data());
  }
  for (size_t i = 0; i < size; ++i) residual[i] += attention_output[i];
  cpu::RmsNorm(residual, w.post_attention_layernorm, normed, num_tokens, c.hidden_size,
               c.rms_norm_eps);
}

void Model::DenseBlock(int layer, const float* normed, int num_tokens, float* residual) const {
  const int hidden = config().hidden_size;
  std::vector<float> output(static_cast<size_t>(num_tokens) * hidden);
  RunMlp(weights_.layer(layer).dense_mlp, normed, num_tokens, hidden, output.data());
  for (size_t i = 0; i < output.size(); ++i) residual[i] += output[i];
}

Routing Model::Route(int layer, const float* normed, int num_tokens) const {
  return ComputeRouting(config(), weights_.layer(layer).moe, normed, num_tokens);
}

std::vector<float> Model::SharedExperts(int layer, const float* normed, int num_tokens) const {
  const MoeWeights& moe = weights_.layer(layer).moe;
  if (!moe.has_shared) return {};
  std::vector<float> shared(static_cast<size_t>(num_tokens) * config().hidden_size);
  RunMlp(moe.shared, normed, num_tokens, config().hidden_size, shared.data());
  return shared;
}

void Model::FinishMoe(const Routing& routing, const float* expert_outputs, const float* shared,
                      int num_tokens, float* residual) const {
  const int hidden = config().hidden_size;
  std::vector<float> output(static_cast<size_t>(num_tokens) * hidden);
  CombineExpertOutputs(routing, expert_outputs, shared, hidden, output.data());
  for (size_t i = 0; i < output.size(); ++i) residual[i] += output[i];
}

std::vector<int> Model::LogitRows(std::span<const BatchSequence> batch,
                                  std::span<const SequenceSpan> spans) {
  std::vector<int> rows;
  for (size_t s = 0; s < batch.size(); ++s) {
    if (batch[s].all_logits) {
      for (int i = 0; i < spans[s].num_tokens; ++i) rows.push_back(spans[s].token_offset + i);
    } else if (spans[s].num_tokens > 0) {
      rows.push_back(spans[s].token_offset + spans[s].num_tokens - 1);
    }
  }
  return rows;
}

std::vector<float> Model::Head(const float* residual, std::span<const int> rows) const {
  const ModelConfig& c = config();
  const int hidden = c.hidden_size;
  const int count = static_cast<int>(rows.size());
  std::vector<float> final_hidden(static_cast<size_t>(count) * hidden);
  for (int r = 0; r < count; ++r) {
    cpu::RmsNorm(residual + static_cast<size_t>(rows[r]) * hidden, weights_.final_norm(),
                 &final_hidden[static_cast<size_t>(r) * hidden], 1, hidden, c.rms_norm_eps);
  }
  std::vector<float> logits(static_cast<size_t>(count) * c.vocab_size);
  cpu::Linear(final_hidden.data(), weights_.lm_head(), logits.data(), count, hidden, c.vocab_size);
  return logits;
}

std::vector<float> Model::Forward(std::span<const BatchSequence> batch, KvRows& cache) const {
  const ModelConfig& c = config();
  int num_tokens = 0;
  const std::vector<SequenceSpan> spans = Layout(batch, &num_tokens);
  std::vector<float> residual(static_cast<size_t>(num_tokens) * c.hidden_size);
  std::vector<float> normed(residual.size());
  Embed(batch, residual.data());
  for (int layer = 0; layer < c.num_hidden_layers; ++layer) {
    AttentionBlock(layer, spans, num_tokens, cache, residual.data(), normed.data());
    if (moe_index(layer) < 0) {
      DenseBlock(layer, normed.data(), num_tokens, residual.data());
      continue;
    }
    const Routing routing = Route(layer, normed.data(), num_tokens);
    const std::vector<float> expert_outputs =
        RunRoutedExpertsLocally(weights_.layer(layer).moe, routing, normed.data(), c.hidden_size);
    const std::vector<float> shared = SharedExperts(layer, normed.data(), num_tokens);
    FinishMoe(routing, expert_outputs.data(), shared.empty() ? nullptr : shared.data(), num_tokens,
              residual.data());
  }
  return Head(residual.data(), LogitRows(batch, spans));
}

}  // namespace moeserve::engine
