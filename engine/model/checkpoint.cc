#include "engine/model/checkpoint.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <filesystem>
#include <optional>
#include <set>
#include <thread>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "base/bounded_json.h"
#include "base/load_progress.h"
#include "base/regular_file.h"
#include "engine/base/status_macros.h"
#include "engine/model/architecture.h"
#include "engine/model/safetensors.h"
#include "nlohmann/json.hpp"

namespace moeserve::engine {
namespace {

namespace fs = std::filesystem;

constexpr char kSingleFile[] = "model.safetensors";
// Threads that read and convert a checkpoint's tensors (at most one per core).
constexpr size_t kMaxLoadThreads = 16;
constexpr char kIndexFile[] = "model.safetensors.index.json";
constexpr char kScaleSuffix[] = "_scale_inv";
constexpr size_t kScaleSuffixLength = sizeof(kScaleSuffix) - 1;
// An index lists one line per tensor; DeepSeek-V3's is 9 MB.
constexpr uint64_t kMaxIndexBytes = 256ull << 20;

// A stored tensor and the file it came from (for messages).
struct StoredTensor {
  const TensorEntry* entry = nullptr;
  const std::string* file = nullptr;
};

// Opens the index's shards and checks that the index and the shards agree.
absl::Status OpenShards(const fs::path& folder, std::vector<SafetensorsFile>& files) {
  const fs::path index_path = folder / kIndexFile;
  auto bad_index = [&](absl::string_view what) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad index `", index_path.string(), "`: ", what));
  };
  absl::StatusOr<std::string> text = base::ReadRegularFile(index_path.string(), kMaxIndexBytes);
  if (!text.ok()) return text.status();
  absl::StatusOr<nlohmann::json> parsed = base::ParseBoundedJson(*text);
  if (!parsed.ok()) return bad_index(absl::StrCat("not valid JSON: ", parsed.status().message()));
  const nlohmann::json& index = *parsed;
  if (!index.is_object()) return bad_index("not a JSON object");
  auto weight_map = index.find("weight_map");
  if (weight_map == index.end() || !weight_map->is_object() || weight_map->empty()) {
    return bad_index("needs a non-empty `weight_map` object (tensor name -> shard file)");
  }
  std::map<std::string, size_t> shard_of_file;
  std::map<std::string, std::string> listed;  // tensor -> shard
  for (const auto& [tensor, shard_json] : weight_map->items()) {
    if (!shard_json.is_string())
      return bad_index(absl::StrCat("shard of `", tensor, "` is not a string"));
    const std::string shard = shard_json.get<std::string>();
    // Shards live in the folder itself: no paths that could read elsewhere.
    if (shard.empty() || shard.find('/') != std::string::npos || shard == "." || shard == "..") {
      return bad_index(absl::StrCat("shard name `", shard, "` of `", tensor,
                                    "` is not a file name in the model folder"));
    }
    listed[tensor] = shard;
    if (shard_of_file.contains(shard)) continue;
    absl::StatusOr<SafetensorsFile> file = SafetensorsFile::Open((folder / shard).string());
    if (!file.ok()) {
      if (absl::IsNotFound(file.status())) {
        return absl::NotFoundError(absl::StrCat("shard `", shard, "` listed in `",
                                                index_path.string(), "` (for `", tensor,
                                                "`) is missing"));
      }
      return file.status();
    }
    shard_of_file[shard] = files.size();
    files.push_back(*std::move(file));
  }
  for (const auto& [tensor, shard] : listed) {
    if (files[shard_of_file[shard]].tensors().contains(tensor)) continue;
    std::string found_in;
    for (const auto& [other, position] : shard_of_file) {
      if (files[position].tensors().contains(tensor))
        found_in = absl::StrCat(" (it is in `", other, "`)");
    }
    return bad_index(absl::StrCat("lists `", tensor, "` in shard `", shard,
                                  "`, which does not hold it", found_in));
  }
  for (const auto& [shard, position] : shard_of_file) {
    for (const auto& [tensor, entry] : files[position].tensors()) {
      auto it = listed.find(tensor);
      if (it == listed.end()) {
        return bad_index(absl::StrCat("shard `", shard, "` holds `", tensor,
                                      "`, which the index does not list"));
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<SafetensorsFile>> OpenFiles(const fs::path& folder) {
  std::vector<SafetensorsFile> files;
  std::error_code error;
  if (fs::exists(folder / kIndexFile, error)) {
    RETURN_IF_ERROR(OpenShards(folder, files));
    return files;
  }
  if (!fs::exists(folder / kSingleFile, error)) {
    return absl::NotFoundError(
        absl::StrCat("no `", kSingleFile, "` or `", kIndexFile, "` in `", folder.string(), "`"));
  }
  absl::StatusOr<SafetensorsFile> file = SafetensorsFile::Open((folder / kSingleFile).string());
  if (!file.ok()) return file.status();
  files.push_back(*std::move(file));
  return files;
}

// The layer index of `model.layers.{L}.…`, if the name has one.
std::optional<int> LayerOf(const std::string& name) {
  constexpr std::string_view prefix = "model.layers.";
  if (!name.starts_with(prefix)) return std::nullopt;
  const size_t end = name.find('.', prefix.size());
  int layer = 0;
  if (end == std::string::npos ||
      !absl::SimpleAtoi(name.substr(prefix.size(), end - prefix.size()), &layer)) {
    return std::nullopt;
  }
  return layer;
}

// Mixtral spells the MoE block `block_sparse_moe` and its experts' matrices w1 (gate), w3 (up)
// and w2 (down).
std::string CanonicalName(const std::string& name, const ModelConfig& config) {
  if (!ArchitectureOf(config).mixtral_tensor_names) return name;
  std::string out = absl::StrReplaceAll(name, {{".block_sparse_moe.", ".mlp."}});
  if (out.find(".mlp.experts.") == std::string::npos) return out;
  for (auto [from, to] :
       {std::pair{".w1.weight", ".gate_proj.weight"}, std::pair{".w3.weight", ".up_proj.weight"},
        std::pair{".w2.weight", ".down_proj.weight"}}) {
    if (out.ends_with(from)) return out.substr(0, out.size() - std::string_view(from).size()) + to;
  }
  return out;
}

bool IsFusedExperts(const std::string& name, absl::string_view which) {
  for (absl::string_view suffix : {absl::string_view(""), absl::string_view(".weight")}) {
    if (name.ends_with(absl::StrCat(".mlp.experts.", which, suffix))) return true;
  }
  return false;
}

// The fp32 value of a stored tensor, dequantizing FP8 with its block scales.
absl::StatusOr<Tensor> Dequantize(const std::string& name, const StoredTensor& stored,
                                  const std::map<std::string, StoredTensor>& all, int block_rows,
                                  int block_cols) {
  Tensor tensor{stored.entry->shape, ToFloat32(*stored.entry)};
  if (stored.entry->dtype != DType::kF8E4M3) return tensor;
  auto scale_it = all.find(name + std::string(kScaleSuffix));
  if (scale_it == all.end()) {
    return absl::InvalidArgumentError(absl::StrCat("FP8 tensor `", name, "` in `", *stored.file,
                                                   "` has no `", name, kScaleSuffix,
                                                   "` block scales"));
  }
  if (tensor.shape.size() != 2) {
    return absl::InvalidArgumentError(absl::StrCat("FP8 tensor `", name,
                                                   "` must be 2-D for block scales, has shape [",
                                                   absl::StrJoin(tensor.shape, ", "), "]"));
  }
  const int64_t rows = tensor.shape[0];
  const int64_t cols = tensor.shape[1];
  const int64_t scale_rows = (rows + block_rows - 1) / block_rows;
  const int64_t scale_cols = (cols + block_cols - 1) / block_cols;
  const TensorEntry& scale_entry = *scale_it->second.entry;
  if (scale_entry.shape != std::vector<int64_t>{scale_rows, scale_cols} ||
      scale_entry.dtype == DType::kF8E4M3) {
    return absl::InvalidArgumentError(absl::StrCat(
        "`", name, kScaleSuffix, "` has shape [", absl::StrJoin(scale_entry.shape, ", "),
        "] and dtype ", DTypeName(scale_entry.dtype), "; expected [", scale_rows, ", ", scale_cols,
        "] floats (", block_rows, "x", block_cols, " blocks of a [", rows, ", ", cols,
        "] weight)"));
  }
  const std::vector<float> scales = ToFloat32(scale_entry);
  for (int64_t r = 0; r < rows; ++r) {
    const float* scale_row = &scales[(r / block_rows) * scale_cols];
    float* row = &tensor.data[r * cols];
    for (int64_t c = 0; c < cols; ++c) row[c] *= scale_row[c / block_cols];
  }
  return tensor;
}

// Weights holding NaN or infinities would load silently and stream garbage. Checking costs one
// pass over values the loader has just converted.
absl::Status CheckFinite(const std::string& name, const StoredTensor& stored,
                         const Tensor& tensor) {
  for (size_t i = 0; i < tensor.data.size(); ++i) {
    if (!std::isfinite(tensor.data[i])) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor `", name, "` in `", *stored.file, "` holds a value that is not finite (",
          tensor.data[i], " at element ", i, "); the checkpoint is corrupt"));
    }
  }
  return absl::OkStatus();
}

absl::Status Insert(std::map<std::string, Tensor>& out, std::map<std::string, std::string>& source,
                    const std::string& name, const std::string& stored_name, Tensor tensor) {
  auto [it, inserted] = out.emplace(name, std::move(tensor));
  if (!inserted) {
    return absl::InvalidArgumentError(absl::StrCat("tensor `", name, "` is stored twice (as `",
                                                   source[name], "` and `", stored_name, "`)"));
  }
  source[name] = stored_name;
  return absl::OkStatus();
}

// Splits a fused [experts, rows, cols] tensor into per-expert matrices. `gate_up` fuses the gate
// projection (first half of the rows) with the up projection (second half).
absl::Status SplitFusedExperts(const std::string& stored_name, Tensor fused, bool gate_up,
                               const ModelConfig& config, std::map<std::string, Tensor>& out,
                               std::map<std::string, std::string>& source) {
  const int64_t experts = config.n_routed_experts;
  const int64_t hidden = config.hidden_size;
  const int64_t inter = config.moe_intermediate_size;
  const std::vector<int64_t> expected = gate_up ? std::vector<int64_t>{experts, 2 * inter, hidden}
                                                : std::vector<int64_t>{experts, hidden, inter};
  if (fused.shape != expected) {
    return absl::InvalidArgumentError(absl::StrCat(
        "fused expert tensor `", stored_name, "` has shape [", absl::StrJoin(fused.shape, ", "),
        "], expected [", absl::StrJoin(expected, ", "), "]"));
  }
  const std::string prefix =
      stored_name.substr(0, stored_name.find(".experts.") + 9);  // "….experts."
  const int64_t matrix = hidden * inter;
  for (int64_t e = 0; e < experts; ++e) {
    const float* base = fused.data.data() + e * (gate_up ? 2 : 1) * matrix;
    const std::string expert = absl::StrCat(prefix, e, ".");
    if (gate_up) {
      Tensor gate{{inter, hidden}, std::vector<float>(base, base + matrix)};
      Tensor up{{inter, hidden}, std::vector<float>(base + matrix, base + 2 * matrix)};
      RETURN_IF_ERROR(
          Insert(out, source, expert + "gate_proj.weight", stored_name, std::move(gate)));
      RETURN_IF_ERROR(Insert(out, source, expert + "up_proj.weight", stored_name, std::move(up)));
    } else {
      Tensor down{{hidden, inter}, std::vector<float>(base, base + matrix)};
      RETURN_IF_ERROR(
          Insert(out, source, expert + "down_proj.weight", stored_name, std::move(down)));
    }
  }
  return absl::OkStatus();
}

absl::Status ReadBlockSize(const nlohmann::json& config_json, int* rows, int* cols) {
  *rows = 128;
  *cols = 128;
  auto quantization = config_json.find("quantization_config");
  if (quantization == config_json.end() || !quantization->is_object()) return absl::OkStatus();
  auto block = quantization->find("weight_block_size");
  if (block == quantization->end() || block->is_null()) return absl::OkStatus();
  if (!block->is_array() || block->size() != 2 || !(*block)[0].is_number_integer() ||
      !(*block)[1].is_number_integer() || (*block)[0].get<int64_t>() <= 0 ||
      (*block)[1].get<int64_t>() <= 0 || (*block)[0].get<int64_t>() > (1 << 20) ||
      (*block)[1].get<int64_t>() > (1 << 20)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "config: `quantization_config.weight_block_size` must be two positive integers, got ",
        block->dump()));
  }
  *rows = (*block)[0].get<int>();
  *cols = (*block)[1].get<int>();
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::map<std::string, Tensor>> ReadCheckpointTensors(
    const std::string& folder, const ModelConfig& config, const nlohmann::json& config_json) {
  int block_rows = 0, block_cols = 0;
  RETURN_IF_ERROR(ReadBlockSize(config_json, &block_rows, &block_cols));
  int prediction_layers = 0;  // DeepSeek-V3's multi-token prediction modules follow the layers
  if (auto it = config_json.find("num_nextn_predict_layers");
      it != config_json.end() && it->is_number_integer()) {
    prediction_layers = static_cast<int>(std::clamp<int64_t>(it->get<int64_t>(), 0, 1 << 16));
  }
  absl::StatusOr<std::vector<SafetensorsFile>> files = OpenFiles(folder);
  if (!files.ok()) return files.status();

  std::map<std::string, StoredTensor> stored;
  for (const SafetensorsFile& file : *files) {
    for (const auto& [name, entry] : file.tensors()) {
      if (stored.contains(name)) {
        return absl::InvalidArgumentError(absl::StrCat("tensor `", name, "` is stored in both `",
                                                       *stored[name].file, "` and `", file.path(),
                                                       "`"));
      }
      stored[name] = {&entry, &file.path()};
    }
  }

  // Which stored tensors become weights; the rest are scales (read with their weight), rotary
  // caches, a tied head or the multi-token-prediction module.
  std::vector<const std::pair<const std::string, StoredTensor>*> wanted;
  for (const auto& item : stored) {
    const std::string& name = item.first;
    if (name.ends_with(kScaleSuffix)) continue;
    if (name.ends_with("rotary_emb.inv_freq")) continue;
    if (config.tie_word_embeddings && name == "lm_head.weight") continue;
    if (std::optional<int> layer = LayerOf(name);
        layer && *layer >= config.num_hidden_layers &&
        *layer < config.num_hidden_layers + prediction_layers) {
      continue;
    }
    wanted.push_back(&item);
  }
  uint64_t total_bytes = 0;
  for (const auto* item : wanted) total_bytes += item->second.entry->num_bytes;
  base::LoadProgress& progress = base::LoadProgress::Global();
  progress.Begin(folder, total_bytes);

  // Reading, dequantizing and checking run on several threads: the pages of the shards fault
  // in in parallel and the conversions are independent. The results are taken in name order,
  // so the first error reported does not depend on the threads.
  std::vector<std::optional<absl::StatusOr<Tensor>>> converted(wanted.size());
  {
    std::atomic<size_t> next{0};
    auto convert = [&] {
      for (size_t i = next++; i < wanted.size(); i = next++) {
        const auto& [name, tensor] = *wanted[i];
        absl::StatusOr<Tensor> value = Dequantize(name, tensor, stored, block_rows, block_cols);
        if (value.ok()) {
          if (absl::Status finite = CheckFinite(name, tensor, *value); !finite.ok()) {
            value = finite;
          }
        }
        progress.Advance(tensor.entry->num_bytes);
        converted[i] = std::move(value);
      }
    };
    const size_t threads = std::clamp<size_t>(std::thread::hardware_concurrency(), 1,
                                              std::min<size_t>(kMaxLoadThreads, wanted.size()));
    std::vector<std::thread> workers;
    for (size_t t = 1; t < threads; ++t) workers.emplace_back(convert);
    convert();
    for (std::thread& worker : workers) worker.join();
  }

  std::map<std::string, Tensor> out;
  std::map<std::string, std::string> source;  // canonical name -> stored name
  std::set<std::string> used_scales;
  for (size_t i = 0; i < wanted.size(); ++i) {
    const auto& [name, tensor] = *wanted[i];
    absl::StatusOr<Tensor>& value = *converted[i];
    if (!value.ok()) return value.status();
    if (tensor.entry->dtype == DType::kF8E4M3) used_scales.insert(name + std::string(kScaleSuffix));
    const std::string canonical = CanonicalName(name, config);
    if (IsFusedExperts(canonical, "gate_up_proj") || IsFusedExperts(canonical, "down_proj")) {
      const bool gate_up = IsFusedExperts(canonical, "gate_up_proj");
      RETURN_IF_ERROR(
          SplitFusedExperts(canonical, *std::move(value), gate_up, config, out, source));
      continue;
    }
    RETURN_IF_ERROR(Insert(out, source, canonical, name, *std::move(value)));
  }
  for (const auto& [name, tensor] : stored) {
    if (!name.ends_with(kScaleSuffix) || used_scales.contains(name)) continue;
    const std::string weight = name.substr(0, name.size() - kScaleSuffixLength);
    if (std::optional<int> layer = LayerOf(name);
        layer && *layer >= config.num_hidden_layers &&
        *layer < config.num_hidden_layers + prediction_layers) {
      continue;
    }
    return absl::InvalidArgumentError(absl::StrCat(
        "unexpected tensor `", name, "`: block scales for `", weight,
        stored.contains(weight) ? "`, which is not an FP8 tensor" : "`, which is not stored"));
  }
  progress.Finish();
  return out;
}

}  // namespace moeserve::engine
