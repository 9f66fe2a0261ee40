// `moeserve plan memory`: how a model fits on a group of GPUs with expert parallelism, from its
// config.json alone. Per GPU: the dense weights every rank holds (DP attention replicates them),
// the routed experts of its (n_routed + redundant) / EP slots in every MoE layer, a reserve for
// activations and workspaces, and what is left for the KV cache, in bytes and in tokens.
// Weights are counted as moeserve's GPU backend holds them: routed experts in the checkpoint's
// format (FP8 stays FP8), dense weights in bf16 even when the checkpoint stores them in FP8.
//
// Owns the command's options, their validation, the arithmetic over ModelSize
// (engine/model/model_size.h), the report and the exit codes: 0 when the layout fits, 1 when it
// does not (the message names what does not fit), 2 for bad arguments or an unreadable config.
// Callers: the `moeserve` main binary (RegisterPlanMemoryCommand, declared in engine/engine.h)
// and tests (PlanMemory, FormatMemoryPlan).
//
// Thread-safety: stateless functions; the registered callback runs on the parsing thread.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "engine/model/model_config.h"
#include "engine/model/model_size.h"

namespace moeserve::engine {

struct PlanMemoryOptions {
  std::string model;          // a checkpoint folder (its config.json is read) or a config.json file
  int ep = 0;                 // GPUs in the expert-parallel group
  double gpu_memory_gib = 0;  // what one GPU can allocate, in GiB (2^30 bytes)
  std::string dtype;          // fp8 | bf16; empty: the checkpoint's (fp8 when its config.json has
                              // DeepSeek's `quantization_config`, else bf16)
  int num_redundant_experts = 0;
  std::string kv_dtype = "bf16";  // bf16 (moeserve's GPU cache) | fp32 (its CPU cache) | fp8
  // KV cache tokens each GPU must hold; 0: one request of the model's full context length.
  int64_t max_tokens_per_gpu = 0;
  // Kept free per GPU for activations, cuBLAS workspaces, NCCL buffers and placement staging
  // (the CUDA context is outside gpu_memory_gib, which is what a process can allocate).
  double reserve_gib = 4;
  // How GPUs hold an FP8 model's dense projections (serve --gpu-dense-weights): bf16 |
  // as-stored (those the GPU backend runs in FP8 stay so: GpuKeepsDenseInFp8).
  std::string gpu_dense_weights = "bf16";
};

struct MemoryPlan {
  ModelConfig config;
  ModelSize size;
  WeightFormat format;
  std::string weight_dtype;  // "fp8" or "bf16"
  std::string kv_dtype;
  // Set when moeserve would refuse to serve the config for a reason that does not change its
  // size (e.g. an unsupported rope type); the plan is still made.
  std::string serving_note;
  int ep = 0;
  int num_redundant_experts = 0;
  int expert_slots_per_gpu = 0;  // per MoE layer
  int64_t gpu_bytes = 0;
  int64_t reserve_bytes = 0;
  int64_t dense_bytes = 0;   // per GPU, as served (GpuDenseBytes; size.dense_bytes is as stored)
  int64_t expert_bytes = 0;  // per GPU
  int64_t kv_bytes_per_token = 0;
  int64_t kv_bytes = 0;  // per GPU, what is left (negative: over by that much)
  int64_t tokens_per_gpu = 0;
  int64_t required_tokens_per_gpu = 0;
  bool fits = false;
  std::string does_not_fit;     // what does not fit, when !fits
  int smallest_fitting_ep = 0;  // the fewest GPUs with the same settings that fit; 0: none
};

// INVALID_ARGUMENT for bad options, NOT_FOUND / INVALID_ARGUMENT for a missing or unreadable
// config. A layout that does not fit is a plan with `fits` false, not an error.
absl::StatusOr<MemoryPlan> PlanMemory(const PlanMemoryOptions& options);

// The report `moeserve plan memory` prints.
std::string FormatMemoryPlan(const MemoryPlan& plan);

}  // namespace moeserve::engine
