// Checkpoint folders in Hugging Face layout: finds the safetensors files (a single
// `model.safetensors`, or the shards that `model.safetensors.index.json` lists), checks the index
// against the shards, and reads the stored tensors as the canonical tensors ModelWeights expects.
//
// On the way it dequantizes FP8 (e4m3) weights with their block scales (`<name>_scale_inv`,
// weight = fp8 * scale_inv per block, DeepSeek-V3's 128x128 blocks unless the config's
// `quantization_config.weight_block_size` says otherwise), maps Mixtral's names
// (`block_sparse_moe`, `w1`/`w3`/`w2`) and fused expert tensors (`mlp.experts.gate_up_proj`
// [experts, 2 * intermediate, hidden], `mlp.experts.down_proj` [experts, hidden, intermediate])
// onto per-expert names, and leaves out what the engine does not run (DeepSeek-V3's multi-token
// prediction layers, rotary `inv_freq` buffers, an lm_head tied to the embedding).
//
// A Checkpoint is the opened folder: shards memory-mapped, every stored tensor mapped to its
// canonical name, FP8 scales and fused experts checked, and no tensor's values read yet. Values
// are read on demand in element ranges (TensorSource): a GPU rank reads only the dense weights
// and its slots' experts, straight into its staging buffer; ReadCheckpointTensors reads them all
// as fp32 for the CPU engine. Pages that have been read are handed back to the kernel, so a
// reader's resident memory follows what it is converting, not the model's size.
//
// Immutable once opened; safe to read from many threads.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model/model_config.h"
#include "engine/model/safetensors.h"
#include "engine/model/tensor_source.h"
#include "engine/model/weights.h"
#include "nlohmann/json_fwd.hpp"

namespace moeserve::engine {

class Checkpoint final : public TensorSource {
 public:
  // Opens the checkpoint in `folder`; `config_json` is the folder's config.json (for the FP8
  // block size and the multi-token prediction layer count). NOT_FOUND: no safetensors file, or
  // a shard the index names is missing. INVALID_ARGUMENT: a corrupt file or index, a tensor
  // listed in the wrong shard, an FP8 weight without its scale (or the other way round), a
  // fused tensor of the wrong shape, a tensor stored twice.
  static absl::StatusOr<std::shared_ptr<const Checkpoint>> Open(const std::string& folder,
                                                                const ModelConfig& config,
                                                                const nlohmann::json& config_json);

  // Entries point into files_: the object stays where Open made it.
  Checkpoint(const Checkpoint&) = delete;
  Checkpoint& operator=(const Checkpoint&) = delete;

  const std::string& folder() const { return folder_; }
  // Every canonical tensor's shape, by name.
  std::map<std::string, std::vector<int64_t>> shapes() const;
  // Bytes stored for a canonical tensor (its share of a fused tensor), and for all of them.
  uint64_t StoredBytes(const std::string& name) const;
  uint64_t total_stored_bytes() const { return total_stored_bytes_; }

  const std::vector<int64_t>* Shape(const std::string& name) const override;
  absl::Status ReadFloat(const std::string& name, int64_t first,
                         std::span<float> out) const override;
  absl::Status ReadBf16(const std::string& name, int64_t first,
                        std::span<uint16_t> out) const override;
  bool StoredAsFp8Blocks(const std::string& name) const override;
  absl::Status ReadFp8Codes(const std::string& name, int64_t first,
                            std::span<uint8_t> out) const override;
  absl::Status ReadFp8Scales(const std::string& name, std::span<float> out) const override;

 private:
  // A canonical tensor: elements [first, first + its size) of a stored tensor (a fused
  // expert tensor holds many), and the stored tensor's block scales when it is FP8.
  struct Entry {
    std::vector<int64_t> shape;
    std::string stored_name;
    const TensorEntry* stored = nullptr;
    const std::string* file = nullptr;
    int64_t first = 0;
    const TensorEntry* scales = nullptr;
  };
  Checkpoint() = default;
  absl::StatusOr<const Entry*> Find(const std::string& name, int64_t first, size_t count) const;
  // Converts the range with `store(index, value)` for each element, checking finiteness.
  template <typename Store>
  absl::Status Read(const std::string& name, int64_t first, size_t count, Store store) const;

  std::string folder_;
  int block_rows_ = 128, block_cols_ = 128;
  std::vector<SafetensorsFile> files_;
  std::map<std::string, Entry> entries_;
  uint64_t total_stored_bytes_ = 0;
};

// Reads every tensor of the checkpoint in `folder` as canonical fp32 tensors, on several
// threads, with loading progress (base/load_progress.h). Errors: Checkpoint::Open's, and
// INVALID_ARGUMENT for a value that is not finite.
absl::StatusOr<std::map<std::string, Tensor>> ReadCheckpointTensors(
    const std::string& folder, const ModelConfig& config, const nlohmann::json& config_json);

}  // namespace moeserve::engine
