#include "engine/model/checkpoint.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
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

// Whether a stored tensor is one the engine does not run: scales (read with their weight),
// rotary caches, a tied head, the multi-token-prediction module.
bool IsLeftOut(const std::string& name, const ModelConfig& config, int prediction_layers) {
  if (name.ends_with("rotary_emb.inv_freq")) return true;
  if (config.tie_word_embeddings && name == "lm_head.weight") return true;
  std::optional<int> layer = LayerOf(name);
  return layer && *layer >= config.num_hidden_layers &&
         *layer < config.num_hidden_layers + prediction_layers;
}

}  // namespace

absl::StatusOr<std::shared_ptr<const Checkpoint>> Checkpoint::Open(
    const std::string& folder, const ModelConfig& config, const nlohmann::json& config_json) {
  auto checkpoint = std::shared_ptr<Checkpoint>(new Checkpoint());
  checkpoint->folder_ = folder;
  RETURN_IF_ERROR(ReadBlockSize(config_json, &checkpoint->block_rows_, &checkpoint->block_cols_));
  const int block_rows = checkpoint->block_rows_, block_cols = checkpoint->block_cols_;
  int prediction_layers = 0;  // DeepSeek-V3's multi-token prediction modules follow the layers
  if (auto it = config_json.find("num_nextn_predict_layers");
      it != config_json.end() && it->is_number_integer()) {
    prediction_layers = static_cast<int>(std::clamp<int64_t>(it->get<int64_t>(), 0, 1 << 16));
  }
  absl::StatusOr<std::vector<SafetensorsFile>> files = OpenFiles(folder);
  if (!files.ok()) return files.status();
  checkpoint->files_ = *std::move(files);

  std::map<std::string, StoredTensor> stored;
  for (const SafetensorsFile& file : checkpoint->files_) {
    for (const auto& [name, entry] : file.tensors()) {
      if (stored.contains(name)) {
        return absl::InvalidArgumentError(absl::StrCat("tensor `", name, "` is stored in both `",
                                                       *stored[name].file, "` and `", file.path(),
                                                       "`"));
      }
      stored[name] = {&entry, &file.path()};
    }
  }

  std::map<std::string, Entry>& entries = checkpoint->entries_;
  auto insert = [&](const std::string& name, Entry entry) -> absl::Status {
    auto [it, inserted] = entries.emplace(name, entry);
    if (!inserted) {
      return absl::InvalidArgumentError(absl::StrCat("tensor `", name, "` is stored twice (as `",
                                                     it->second.stored_name, "` and `",
                                                     entry.stored_name, "`)"));
    }
    return absl::OkStatus();
  };
  std::set<std::string> used_scales;
  for (const auto& [name, tensor] : stored) {
    if (name.ends_with(kScaleSuffix) || IsLeftOut(name, config, prediction_layers)) continue;
    Entry entry{tensor.entry->shape, name, tensor.entry, tensor.file};
    if (tensor.entry->dtype == DType::kF8E4M3) {
      const std::string scale_name = name + std::string(kScaleSuffix);
      auto scale_it = stored.find(scale_name);
      if (scale_it == stored.end()) {
        return absl::InvalidArgumentError(absl::StrCat("FP8 tensor `", name, "` in `", *tensor.file,
                                                       "` has no `", scale_name, "` block scales"));
      }
      const std::vector<int64_t>& shape = tensor.entry->shape;
      if (shape.size() != 2) {
        return absl::InvalidArgumentError(
            absl::StrCat("FP8 tensor `", name, "` must be 2-D for block scales, has shape [",
                         absl::StrJoin(shape, ", "), "]"));
      }
      const int64_t scale_rows = (shape[0] + block_rows - 1) / block_rows;
      const int64_t scale_cols = (shape[1] + block_cols - 1) / block_cols;
      const TensorEntry& scales = *scale_it->second.entry;
      if (scales.shape != std::vector<int64_t>{scale_rows, scale_cols} ||
          scales.dtype == DType::kF8E4M3) {
        return absl::InvalidArgumentError(absl::StrCat(
            "`", scale_name, "` has shape [", absl::StrJoin(scales.shape, ", "), "] and dtype ",
            DTypeName(scales.dtype), "; expected [", scale_rows, ", ", scale_cols, "] floats (",
            block_rows, "x", block_cols, " blocks of a [", shape[0], ", ", shape[1], "] weight)"));
      }
      entry.scales = &scales;
      used_scales.insert(scale_name);
    }
    const std::string canonical = CanonicalName(name, config);
    const bool gate_up = IsFusedExperts(canonical, "gate_up_proj");
    if (!gate_up && !IsFusedExperts(canonical, "down_proj")) {
      RETURN_IF_ERROR(insert(canonical, std::move(entry)));
      continue;
    }
    // A fused [experts, rows, cols] tensor holds every expert's matrix; `gate_up` fuses the
    // gate projection (first half of the rows) with the up projection (second half).
    const int64_t experts = config.n_routed_experts;
    const int64_t hidden = config.hidden_size;
    const int64_t inter = config.moe_intermediate_size;
    const std::vector<int64_t> expected = gate_up ? std::vector<int64_t>{experts, 2 * inter, hidden}
                                                  : std::vector<int64_t>{experts, hidden, inter};
    if (entry.shape != expected) {
      return absl::InvalidArgumentError(absl::StrCat(
          "fused expert tensor `", canonical, "` has shape [", absl::StrJoin(entry.shape, ", "),
          "], expected [", absl::StrJoin(expected, ", "), "]"));
    }
    const std::string prefix = canonical.substr(0, canonical.find(".experts.") + 9);
    const int64_t matrix = hidden * inter;
    for (int64_t e = 0; e < experts; ++e) {
      const std::string expert = absl::StrCat(prefix, e, ".");
      Entry part = entry;
      part.first = e * (gate_up ? 2 : 1) * matrix;
      if (gate_up) {
        part.shape = {inter, hidden};
        RETURN_IF_ERROR(insert(expert + "gate_proj.weight", part));
        part.first += matrix;
        RETURN_IF_ERROR(insert(expert + "up_proj.weight", part));
      } else {
        part.shape = {hidden, inter};
        RETURN_IF_ERROR(insert(expert + "down_proj.weight", part));
      }
    }
  }
  for (const auto& [name, tensor] : stored) {
    if (!name.ends_with(kScaleSuffix) || used_scales.contains(name)) continue;
    if (IsLeftOut(name, config, prediction_layers)) continue;
    const std::string weight = name.substr(0, name.size() - kScaleSuffixLength);
    return absl::InvalidArgumentError(absl::StrCat(
        "unexpected tensor `", name, "`: block scales for `", weight,
        stored.contains(weight) ? "`, which is not an FP8 tensor" : "`, which is not stored"));
  }
  for (const auto& [name, entry] : entries) {
    checkpoint->total_stored_bytes_ += checkpoint->StoredBytes(name);
  }
  return std::shared_ptr<const Checkpoint>(std::move(checkpoint));
}

std::map<std::string, std::vector<int64_t>> Checkpoint::shapes() const {
  std::map<std::string, std::vector<int64_t>> out;
  for (const auto& [name, entry] : entries_) out.emplace(name, entry.shape);
  return out;
}

uint64_t Checkpoint::StoredBytes(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) return 0;
  return static_cast<uint64_t>(NumElements(it->second.shape)) * DTypeSize(it->second.stored->dtype);
}

const std::vector<int64_t>* Checkpoint::Shape(const std::string& name) const {
  auto it = entries_.find(name);
  return it == entries_.end() ? nullptr : &it->second.shape;
}

absl::StatusOr<const Checkpoint::Entry*> Checkpoint::Find(const std::string& name, int64_t first,
                                                          size_t count) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) {
    return absl::NotFoundError(
        absl::StrCat("checkpoint `", folder_, "` holds no tensor `", name, "`"));
  }
  const int64_t size = NumElements(it->second.shape);
  if (first < 0 || first > size || static_cast<int64_t>(count) > size - first) {
    return absl::OutOfRangeError(absl::StrCat("elements [", first, ", ",
                                              first + static_cast<int64_t>(count),
                                              ") are outside tensor `", name, "` of ", size));
  }
  return &it->second;
}

template <typename Store>
absl::Status Checkpoint::Read(const std::string& name, int64_t first, size_t count,
                              Store store) const {
  ASSIGN_OR_RETURN(const Entry* entry, Find(name, first, count));
  const TensorEntry& stored = *entry->stored;
  const int64_t begin = entry->first + first;  // in the stored tensor
  // Converted a run at a time, through a small buffer that stays in the cache.
  constexpr int64_t kRun = 4096;
  float values[kRun];
  std::vector<float> scale_row;
  const int64_t cols = stored.shape.empty() ? 1 : stored.shape.back();
  for (int64_t done = 0; done < static_cast<int64_t>(count);) {
    const int64_t index = begin + done;
    int64_t run = std::min<int64_t>(kRun, static_cast<int64_t>(count) - done);
    if (entry->scales != nullptr) run = std::min(run, cols - index % cols);  // within one row
    ToFloat32(stored, index, std::span<float>(values, run));
    if (entry->scales != nullptr) {
      // weight = fp8 * scale_inv of its (row / block_rows, col / block_cols) block.
      const int64_t scale_cols = entry->scales->shape[1];
      scale_row.resize(scale_cols);
      ToFloat32(*entry->scales, (index / cols) / block_rows_ * scale_cols, scale_row);
      const int64_t col = index % cols;
      for (int64_t i = 0; i < run; ++i) values[i] *= scale_row[(col + i) / block_cols_];
    }
    for (int64_t i = 0; i < run; ++i) {
      // Weights holding NaN or infinities would load silently and stream garbage.
      if (!std::isfinite(values[i])) {
        return absl::InvalidArgumentError(
            absl::StrCat("tensor `", entry->stored_name, "` in `", *entry->file,
                         "` holds a value that is not finite (", values[i], " at element ",
                         index + i, "); the checkpoint is corrupt"));
      }
      store(done + i, values[i]);
    }
    done += run;
  }
  const size_t element_size = DTypeSize(stored.dtype);
  ReleaseMappedPages(stored.data + begin * element_size, count * element_size);
  return absl::OkStatus();
}

absl::Status Checkpoint::ReadFloat(const std::string& name, int64_t first,
                                   std::span<float> out) const {
  return Read(name, first, out.size(), [&](int64_t i, float value) { out[i] = value; });
}

absl::Status Checkpoint::ReadBf16(const std::string& name, int64_t first,
                                  std::span<uint16_t> out) const {
  return Read(name, first, out.size(),
              [&](int64_t i, float value) { out[i] = FloatToBf16(value); });
}

bool Checkpoint::StoredAsFp8Blocks(const std::string& name) const {
  auto it = entries_.find(name);
  return it != entries_.end() && it->second.scales != nullptr && it->second.first == 0 &&
         block_rows_ == 128 && block_cols_ == 128;
}

absl::Status Checkpoint::ReadFp8Codes(const std::string& name, int64_t first,
                                      std::span<uint8_t> out) const {
  ASSIGN_OR_RETURN(const Entry* entry, Find(name, first, out.size()));
  if (!StoredAsFp8Blocks(name)) return TensorSource::ReadFp8Codes(name, first, out);
  // The codes as stored; the one NaN code (0x7f/0xff) is refused, as ReadFloat would, in the
  // copy (what is used is what is checked).
  const uint8_t* codes = entry->stored->data + first;
  if (!out.empty()) std::memcpy(out.data(), codes, out.size());
  ReleaseMappedPages(codes, out.size());
  for (size_t i = 0; i < out.size(); ++i) {
    if ((out[i] & 0x7f) == 0x7f) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor `", entry->stored_name, "` in `", *entry->file,
                       "` holds a value that is not finite (nan at element ",
                       first + static_cast<int64_t>(i), "); the checkpoint is corrupt"));
    }
  }
  return absl::OkStatus();
}

absl::Status Checkpoint::ReadFp8Scales(const std::string& name, std::span<float> out) const {
  RETURN_IF_ERROR(Find(name, 0, 0).status());
  if (!StoredAsFp8Blocks(name)) return TensorSource::ReadFp8Scales(name, out);
  const TensorEntry& scales = *entries_.at(name).scales;
  const int64_t count = NumElements(scales.shape);
  if (static_cast<int64_t>(out.size()) != count) {
    return absl::OutOfRangeError(
        absl::StrCat("`", name, "` has ", count, " block scales, not ", out.size()));
  }
  ToFloat32(scales, 0, out);
  for (int64_t i = 0; i < count; ++i) {
    if (!std::isfinite(out[i])) {
      return absl::InvalidArgumentError(
          absl::StrCat("the block scales of `", name, "` hold a value that is not finite (", out[i],
                       " at element ", i, "); the checkpoint is corrupt"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::map<std::string, Tensor>> ReadCheckpointTensors(
    const std::string& folder, const ModelConfig& config, const nlohmann::json& config_json) {
  ASSIGN_OR_RETURN(std::shared_ptr<const Checkpoint> checkpoint,
                   Checkpoint::Open(folder, config, config_json));
  std::map<std::string, Tensor> out;
  for (auto& [name, shape] : checkpoint->shapes()) out.emplace(name, Tensor{shape, {}});
  std::vector<std::pair<const std::string*, Tensor*>> jobs;
  for (auto& [name, tensor] : out) jobs.emplace_back(&name, &tensor);
  base::LoadProgress& progress = base::LoadProgress::Global();
  progress.Begin(folder, checkpoint->total_stored_bytes());

  // Reading, dequantizing and checking run on several threads: the pages of the shards fault
  // in in parallel and the conversions are independent. The results are taken in name order,
  // so the first error reported does not depend on the threads.
  std::vector<absl::Status> results(jobs.size());
  std::atomic<size_t> next{0};
  auto convert = [&] {
    for (size_t i = next++; i < jobs.size(); i = next++) {
      auto [name, tensor] = jobs[i];
      tensor->data.resize(tensor->num_elements());
      results[i] = checkpoint->ReadFloat(*name, 0, tensor->data);
      progress.Advance(checkpoint->StoredBytes(*name));
    }
  };
  const size_t threads = std::max<size_t>(
      1, std::min<size_t>({std::thread::hardware_concurrency(), kMaxLoadThreads, jobs.size()}));
  std::vector<std::thread> workers;
  for (size_t t = 1; t < threads; ++t) workers.emplace_back(convert);
  convert();
  for (std::thread& worker : workers) worker.join();
  for (const absl::Status& status : results) RETURN_IF_ERROR(status);
  progress.Finish();
  return out;
}

}  // namespace moeserve::engine
