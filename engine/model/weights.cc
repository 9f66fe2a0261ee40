#include "engine/model/weights.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <fstream>
#include <random>
#include <set>
#include <thread>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/base/status_macros.h"
#include "kernels/bf16.h"
#include "nlohmann/json.hpp"

namespace moeserve::engine {
namespace {

using Shape = std::vector<int64_t>;

std::string LayerPrefix(int layer) { return absl::StrCat("model.layers.", layer, "."); }

// Where expected tensors go: a list, or a visitor that may stop the walk.
using TensorSink = std::function<bool(const std::string&, const Shape&)>;

bool AddMlp(const TensorSink& out, const std::string& prefix, int64_t hidden,
            int64_t intermediate) {
  return out(prefix + "gate_proj.weight", {intermediate, hidden}) &&
         out(prefix + "up_proj.weight", {intermediate, hidden}) &&
         out(prefix + "down_proj.weight", {hidden, intermediate});
}

// FNV-1a: a stable hash of a tensor's name, so each tensor's random stream does not depend on
// the order tensors are generated in.
uint64_t StableHash(const std::string& text) {
  uint64_t hash = 1469598103934665603ull;
  for (unsigned char c : text) hash = (hash ^ c) * 1099511628211ull;
  return hash;
}

bool AddAttention(const TensorSink& out, const ModelConfig& c, const std::string& a) {
  const int64_t hidden = c.hidden_size;
  const int64_t heads = c.num_attention_heads;
  if (!c.uses_mla()) {
    const int64_t q_dim = heads * c.head_dim;
    const int64_t kv_dim = static_cast<int64_t>(c.num_key_value_heads) * c.head_dim;
    if (!out(a + "q_proj.weight", {q_dim, hidden}) || !out(a + "k_proj.weight", {kv_dim, hidden}) ||
        !out(a + "v_proj.weight", {kv_dim, hidden}) || !out(a + "o_proj.weight", {hidden, q_dim})) {
      return false;
    }
    if (c.attention_bias &&
        (!out(a + "q_proj.bias", {q_dim}) || !out(a + "k_proj.bias", {kv_dim}) ||
         !out(a + "v_proj.bias", {kv_dim}) || !out(a + "o_proj.bias", {hidden}))) {
      return false;
    }
    if (c.qk_norm &&
        (!out(a + "q_norm.weight", {c.head_dim}) || !out(a + "k_norm.weight", {c.head_dim}))) {
      return false;
    }
    return true;
  }
  if (c.q_lora_rank > 0) {
    if (!out(a + "q_a_proj.weight", {c.q_lora_rank, hidden}) ||
        !out(a + "q_a_layernorm.weight", {c.q_lora_rank}) ||
        !out(a + "q_b_proj.weight", {heads * c.qk_head_dim(), c.q_lora_rank})) {
      return false;
    }
  } else if (!out(a + "q_proj.weight", {heads * c.qk_head_dim(), hidden})) {
    return false;
  }
  return out(a + "kv_a_proj_with_mqa.weight", {c.kv_lora_rank + c.qk_rope_head_dim, hidden}) &&
         out(a + "kv_a_layernorm.weight", {c.kv_lora_rank}) &&
         out(a + "kv_b_proj.weight",
             {heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank}) &&
         out(a + "o_proj.weight", {hidden, heads * c.v_head_dim});
}

}  // namespace

int64_t Tensor::num_elements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

void ForEachExpectedTensor(const ModelConfig& c, const TensorSink& out) {
  const int64_t hidden = c.hidden_size;
  if (!out("model.embed_tokens.weight", {c.vocab_size, hidden})) return;
  for (int layer = 0; layer < c.num_hidden_layers; ++layer) {
    const std::string p = LayerPrefix(layer);
    if (!out(p + "input_layernorm.weight", {hidden}) ||
        !out(p + "post_attention_layernorm.weight", {hidden}) ||
        !AddAttention(out, c, p + "self_attn.")) {
      return;
    }
    if (c.is_moe_layer(layer)) {
      if (!out(p + "mlp.gate.weight", {c.n_routed_experts, hidden})) return;
      if (c.uses_mla() && c.topk_method == TopKMethod::kNoAuxTc &&
          !out(p + "mlp.gate.e_score_correction_bias", {c.n_routed_experts})) {
        return;
      }
      for (int e = 0; e < c.n_routed_experts; ++e) {
        if (!AddMlp(out, absl::StrCat(p, "mlp.experts.", e, "."), hidden,
                    c.moe_intermediate_size)) {
          return;
        }
      }
      if (c.n_shared_experts > 0 &&
          !AddMlp(out, p + "mlp.shared_experts.", hidden,
                  static_cast<int64_t>(c.moe_intermediate_size) * c.n_shared_experts)) {
        return;
      }
    } else if (!AddMlp(out, p + "mlp.", hidden, c.intermediate_size)) {
      return;
    }
  }
  if (!out("model.norm.weight", {hidden})) return;
  if (!c.tie_word_embeddings) out("lm_head.weight", {c.vocab_size, hidden});
}

std::vector<std::pair<std::string, Shape>> ExpectedTensors(const ModelConfig& c) {
  std::vector<std::pair<std::string, Shape>> out;
  ForEachExpectedTensor(c, [&](const std::string& name, const Shape& shape) {
    out.emplace_back(name, shape);
    return true;
  });
  return out;
}

ModelWeights ModelWeights::Generate(const ModelConfig& config, uint64_t seed) {
  ModelWeights weights;
  weights.config_ = config;
  // Each tensor is drawn in chunks of kChunk values, chunk i from its own generator, so that
  // large tensors generate in parallel; a tensor of one chunk (every tensor of the tiny
  // built-ins) is one stream seeded by its name, as it always was.
  constexpr int64_t kChunk = int64_t{1} << 24;
  struct Job {
    const std::string* name;
    Tensor* tensor;
    int64_t chunk;
  };
  std::vector<Job> jobs;
  for (auto& [name, shape] : ExpectedTensors(config)) {
    if (config.routed_experts_on_device && name.find(".mlp.experts.") != std::string::npos) {
      continue;
    }
    auto [it, inserted] = weights.tensors_.emplace(name, Tensor{shape, {}});
    Tensor& tensor = it->second;
    tensor.data.resize(tensor.num_elements());
    for (int64_t chunk = 0; chunk * kChunk < tensor.num_elements(); ++chunk) {
      jobs.push_back({&it->first, &tensor, chunk});
    }
  }
  auto run = [&](const Job& job) {
    const std::string& name = *job.name;
    std::mt19937_64 rng((seed ^ StableHash(name)) +
                        static_cast<uint64_t>(job.chunk) * 0x9e3779b97f4a7c15ull);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    const int64_t begin = job.chunk * kChunk;
    const int64_t end = std::min(begin + kChunk, job.tensor->num_elements());
    float* data = job.tensor->data.data();
    float scale = 1.0f, offset = 0.0f;
    if (name.ends_with("norm.weight")) {
      // Non-trivial norm weights, so a reference that ignores them would disagree.
      scale = 0.1f;
      offset = 1.0f;
    } else if (name.ends_with("e_score_correction_bias") || name.ends_with(".bias")) {
      scale = 0.05f;
    } else if (name != "model.embed_tokens.weight") {
      // Matrices [out, in]: std 1/sqrt(in) keeps activations O(1) through the layers; the LM
      // head is sharper so that greedy choices are not near-ties.
      const float in = static_cast<float>(job.tensor->shape.back());
      scale = (name == "lm_head.weight" ? 3.0f : 1.0f) / std::sqrt(in);
    }
    for (int64_t i = begin; i < end; ++i) data[i] = offset + scale * normal(rng);
  };
  const int workers = static_cast<int>(
      std::min<size_t>(jobs.size(), std::max(1u, std::thread::hardware_concurrency())));
  std::atomic<size_t> next{0};
  std::vector<std::thread> threads;
  for (int w = 0; w < workers; ++w) {
    threads.emplace_back([&] {
      for (size_t j = next++; j < jobs.size(); j = next++) run(jobs[j]);
    });
  }
  for (auto& thread : threads) thread.join();
  absl::Status status = weights.BindViews();
  (void)status;  // Generated tensors always match ExpectedTensors.
  return weights;
}

absl::Status CheckExpectedTensors(const ModelConfig& config,
                                  const std::map<std::string, Shape>& shapes) {
  // Walks the expected tensors and stops at the first problem, so a config that describes far
  // more tensors than are stored costs no more than the stored ones.
  absl::Status problem;
  size_t matched = 0;
  ForEachExpectedTensor(config, [&](const std::string& name, const Shape& shape) {
    auto it = shapes.find(name);
    if (it == shapes.end()) {
      problem = absl::InvalidArgumentError(absl::StrCat("weights: missing tensor `", name, "`"));
      return false;
    }
    if (it->second != shape) {
      problem = absl::InvalidArgumentError(
          absl::StrCat("weights: tensor `", name, "` has shape [", absl::StrJoin(it->second, ", "),
                       "], expected [", absl::StrJoin(shape, ", "), "]"));
      return false;
    }
    ++matched;
    return true;
  });
  if (!problem.ok()) return problem;
  if (matched == shapes.size()) return absl::OkStatus();
  // Every expected tensor is there, so some stored one was not expected: name it.
  std::set<std::string> expected_names;
  ForEachExpectedTensor(config, [&](const std::string& name, const Shape&) {
    expected_names.insert(name);
    return true;
  });
  for (const auto& [name, shape] : shapes) {
    if (!expected_names.contains(name)) {
      return absl::InvalidArgumentError(absl::StrCat("weights: unexpected tensor `", name, "`"));
    }
  }
  return absl::OkStatus();
}

std::string LmHeadTensorName(const ModelConfig& config) {
  return config.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
}

absl::StatusOr<ModelWeights> ModelWeights::FromTensors(const ModelConfig& config,
                                                       std::map<std::string, Tensor> tensors) {
  std::map<std::string, std::vector<int64_t>> shapes;
  for (const auto& [name, tensor] : tensors) shapes.emplace(name, tensor.shape);
  RETURN_IF_ERROR(CheckExpectedTensors(config, shapes));
  ModelWeights weights;
  weights.config_ = config;
  weights.tensors_ = std::move(tensors);
  RETURN_IF_ERROR(weights.BindViews());
  return weights;
}

ModelWeights ModelWeights::ConfigOnly(const ModelConfig& config) {
  ModelWeights weights;
  weights.config_ = config;
  absl::Status status = weights.BindViews();
  (void)status;  // with no tensors every view is null, which is not an error
  return weights;
}

const std::vector<int64_t>* ModelWeights::Shape(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second.shape;
}

absl::Status ModelWeights::ReadFloat(const std::string& name, int64_t first,
                                     std::span<float> out) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) {
    return absl::NotFoundError(absl::StrCat("the model holds no tensor `", name, "`"));
  }
  const std::vector<float>& data = it->second.data;
  if (first < 0 || first > static_cast<int64_t>(data.size()) ||
      out.size() > data.size() - static_cast<size_t>(first)) {
    return absl::OutOfRangeError(
        absl::StrCat("elements [", first, ", ", first + static_cast<int64_t>(out.size()),
                     ") are outside tensor `", name, "` of ", data.size()));
  }
  std::copy_n(data.begin() + first, out.size(), out.begin());
  return absl::OkStatus();
}

absl::Status ModelWeights::ReadBf16(const std::string& name, int64_t first,
                                    std::span<uint16_t> out) const {
  // Through a small buffer: the range may be a large share of a large tensor.
  constexpr size_t kRun = 4096;
  float values[kRun];
  for (size_t done = 0; done < out.size(); done += kRun) {
    const size_t run = std::min(kRun, out.size() - done);
    RETURN_IF_ERROR(ReadFloat(name, first + static_cast<int64_t>(done), std::span(values, run)));
    for (size_t i = 0; i < run; ++i) out[done + i] = kernels::FloatToBf16(values[i]);
  }
  return absl::OkStatus();
}

absl::Status ModelWeights::BindViews() {
  const ModelConfig& c = config_;
  auto get = [&](const std::string& name) -> const float* {
    auto it = tensors_.find(name);
    return it == tensors_.end() ? nullptr : it->second.data.data();
  };
  auto mlp = [&](const std::string& prefix, int intermediate) {
    return MlpWeights{get(prefix + "gate_proj.weight"), get(prefix + "up_proj.weight"),
                      get(prefix + "down_proj.weight"), intermediate};
  };
  embed_tokens_ = get("model.embed_tokens.weight");
  final_norm_ = get("model.norm.weight");
  lm_head_ = c.tie_word_embeddings ? embed_tokens_ : get("lm_head.weight");
  layers_.assign(c.num_hidden_layers, {});
  for (int layer = 0; layer < c.num_hidden_layers; ++layer) {
    const std::string p = LayerPrefix(layer);
    LayerWeights& w = layers_[layer];
    w.input_layernorm = get(p + "input_layernorm.weight");
    w.post_attention_layernorm = get(p + "post_attention_layernorm.weight");
    const std::string a = p + "self_attn.";
    AttentionWeights& attention = w.attention;
    attention.q_a_proj = get(a + "q_a_proj.weight");
    attention.q_a_layernorm = get(a + "q_a_layernorm.weight");
    attention.q_b_proj = get(a + "q_b_proj.weight");
    attention.q_proj = get(a + "q_proj.weight");
    attention.kv_a_proj_with_mqa = get(a + "kv_a_proj_with_mqa.weight");
    attention.kv_a_layernorm = get(a + "kv_a_layernorm.weight");
    attention.kv_b_proj = get(a + "kv_b_proj.weight");
    attention.o_proj = get(a + "o_proj.weight");
    attention.k_proj = get(a + "k_proj.weight");
    attention.v_proj = get(a + "v_proj.weight");
    attention.q_norm = get(a + "q_norm.weight");
    attention.k_norm = get(a + "k_norm.weight");
    attention.q_bias = get(a + "q_proj.bias");
    attention.k_bias = get(a + "k_proj.bias");
    attention.v_bias = get(a + "v_proj.bias");
    attention.o_bias = get(a + "o_proj.bias");
    w.is_moe = c.is_moe_layer(layer);
    if (w.is_moe) {
      w.moe.gate = get(p + "mlp.gate.weight");
      w.moe.e_score_correction_bias = get(p + "mlp.gate.e_score_correction_bias");
      for (int e = 0; e < c.n_routed_experts; ++e) {
        w.moe.experts.push_back(
            mlp(absl::StrCat(p, "mlp.experts.", e, "."), c.moe_intermediate_size));
      }
      w.moe.has_shared = c.n_shared_experts > 0;
      if (w.moe.has_shared) {
        w.moe.shared = mlp(p + "mlp.shared_experts.", c.moe_intermediate_size * c.n_shared_experts);
      }
    } else {
      w.dense_mlp = mlp(p + "mlp.", c.intermediate_size);
    }
  }
  return absl::OkStatus();
}

absl::Status WriteSafetensors(const std::string& path,
                              const std::map<std::string, Tensor>& tensors) {
  // Layout: u64 little-endian header size, JSON header, then the raw data.
  nlohmann::json header = nlohmann::json::object();
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    const uint64_t bytes = tensor.data.size() * sizeof(float);
    header[name] = {
        {"dtype", "F32"}, {"shape", tensor.shape}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string header_text = header.dump();
  while (header_text.size() % 8 != 0) header_text.push_back(' ');
  std::ofstream out(path, std::ios::binary);
  if (!out) return absl::InternalError(absl::StrCat("cannot write ", path));
  const uint64_t header_size = header_text.size();
  out.write(reinterpret_cast<const char*>(&header_size), sizeof(header_size));
  out.write(header_text.data(), header_text.size());
  for (const auto& [name, tensor] : tensors) {
    out.write(reinterpret_cast<const char*>(tensor.data.data()),
              static_cast<std::streamsize>(tensor.data.size() * sizeof(float)));
  }
  if (!out) return absl::InternalError(absl::StrCat("write failed: ", path));
  return absl::OkStatus();
}

}  // namespace moeserve::engine
