// engine::Engine — the serving engine behind every front door, and the one engine header the
// server includes: an interface with two implementations. Engine::Create makes the local one:
// it loads the model, builds the expert-parallel worker groups (one mixed group, or a prefill
// group that hands its prompts' KV cache to a decode group), validates and routes requests to
// the least-loaded rank of the entry group, reports per-group health, and applies live expert
// placements; with RankProcessOptions it runs just one rank of a group whose ranks are
// processes (`moeserve rank`). The cluster front end (`moeserve frontend`, server/) implements
// the same interface over the rank processes, so every front door serves either way. Requests,
// their streams and sampling options are the public types of engine/api/; nothing here exposes
// model, parallel or runtime internals.
//
// Also the engine-level functions behind `moeserve logits` and `moeserve export`, and the
// `moeserve plan memory` command (engine/tools/plan_memory.h).
//
// No protobuf here. All methods of an Engine are thread-safe.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/api/handoff.h"
#include "engine/api/key_value_store.h"
#include "engine/api/request.h"
#include "engine/runtime/injected_fault.h"

namespace prometheus {
class Registry;
}
namespace CLI {
class App;
}

namespace moeserve::engine {

class Model;
class Tokenizer;

struct ParallelOptions {
  int prefill_ep = 0;  // 0: one mixed group of decode_ep ranks
  int decode_ep = 1;
  int num_redundant_experts = 0;
  bool two_batch_overlap = false;
  int overlap_min_tokens = 32;
  // How long a rank's collective waits for the slowest peer before the group fails.
  double collective_timeout_seconds = 30;
  std::string placement_file;       // JSON; empty: the default placement
  bool expert_load_metrics = true;  // per (layer, expert) series
  std::string trace_dir;            // empty: no trace
  int trace_steps = 16;             // working steps recorded per group
  int trace_skip_steps = 0;         // working steps to let pass first (e.g. to reach decode)
  // GPU ranks stage a new placement's changed expert slots into spare device memory in the
  // background and swap them in at the commit (false: written in place during the committing
  // step, which then stalls, but needs no spare memory).
  bool background_placement_staging = true;
};

// One rank of a group whose ranks are processes (`moeserve rank`): the engine runs only this
// rank, and the group's collectives go over Gloo (CPU) or NCCL (GPU) between the processes,
// which meet through `rendezvous` (the group leader's key-value service).
struct RankProcessOptions {
  std::string group = "mixed";  // the group's name (mixed, prefill or decode)
  int group_size = 1;
  int rank = 0;
  std::shared_ptr<KeyValueStore> rendezvous;
  std::string rendezvous_prefix;       // unique per formation of the group (name and epoch)
  std::string hostname = "127.0.0.1";  // this rank's address for its peers
  int cuda_device = -1;                // --device cuda: the GPU (-1: rank modulo visible)
  // How long forming the group may wait for the other ranks (which may be loading models).
  double form_timeout_seconds = 300;
  // A prefill group's way to its decode ranks (the decode rank each request names).
  std::shared_ptr<HandoffSender> handoff;
};

// NCCL's channel limit (a collective runs on at most one CTA per channel); the communicator
// checks the same bound (comm::kMaxCollectiveCtas).
inline constexpr int kMaxGpuExchangeCtas = 64;

struct EngineOptions {
  // builtin:NAME or a Hugging Face checkpoint folder (engine/model/loader.h).
  std::string model = "builtin:tiny";
  // Where ranks compute: "cpu" (fp32) or "cuda" (bf16, rank r on GPU r; the GPU backend plugin
  // is loaded on demand).
  std::string device = "cpu";
  int max_batch_tokens = 256;           // tokens per rank per step; long prompts prefill in chunks
  int max_running_requests = 64;        // sequences per rank
  int max_queue = 256;                  // queued requests (all ranks) before RESOURCE_EXHAUSTED
  int kv_block_size = 16;               // tokens per KV cache block
  int64_t kv_cache_bytes = 64ll << 20;  // per rank
  int max_stop_strings = 16;
  int max_stop_string_bytes = 256;
  int max_request_id_bytes = 256;
  // Paces every rank to at least this long per step (0 = as fast as possible). For demos and
  // for tests that need requests to stay in flight long enough to cancel them.
  double min_step_seconds = 0;
  ParallelOptions parallel;
  // --device cuda: an FP8 checkpoint's routed experts stay FP8 on the GPUs (block-scaled FP8
  // GEMMs on Hopper; half the bytes of bf16); false: dequantized to bf16.
  bool gpu_fp8_experts = true;
  // --device cuda, with FP8 experts: the checkpoint's dense projections stay FP8 too
  // (RankBackendRequest::keep_fp8_dense); false: bf16.
  bool gpu_fp8_dense = false;
  // --device cuda, a group of several GPUs with FP8 experts: the dispatch carries each row in
  // FP8, quantized once by its sender per 1 x 128 tile (RankBackendRequest::fp8_dispatch): half
  // the bytes of bf16 rows, the same results; false: bf16 rows.
  bool gpu_fp8_dispatch = true;
  // --device cuda, a GPU alone in its group: a decode step's experts are routed, grouped and run
  // on the GPU (kernels/device_moe.h), no host round trip per MoE layer; false: the host groups
  // the rows of every MoE layer, as for prefill steps and larger groups.
  bool gpu_device_planned_moe = true;
  // --device cuda: those device-planned decode steps run as CUDA graphs, one per step shape
  // (engine/backend/cuda/step_graphs.h); false: kernel by kernel.
  bool gpu_cuda_graphs = true;
  // --device cuda, a group of several GPUs: with gpu_device_planned_moe, a decode step's
  // exchange is planned on the GPUs too (kernels/device_exchange.h); false: on the host.
  bool gpu_device_planned_exchange = false;
  // --device cuda, a group of several GPUs: at most this many thread blocks (CTAs) for each of
  // the exchange's NCCL collectives, so that an overlapped exchange leaves the other SMs to the
  // compute stream; 0: NCCL's own choice. At most kMaxGpuExchangeCtas.
  int gpu_exchange_max_ctas = 0;
  std::optional<InjectedFault> injected_fault;
  // Set: run one rank of a group of processes (parallel.prefill_ep/decode_ep are then unused).
  std::optional<RankProcessOptions> rank_process;
};

struct EngineStats {
  int running = 0;
  int waiting = 0;
  int kv_blocks_total = 0;
  int kv_blocks_free = 0;
  // The entry group's first local rank: collective steps so far, its placement's version and
  // the step at which that placement committed (-1: the initial one). The same on every rank
  // of a group, so a rank process's numbers show that its group committed together.
  int64_t steps = 0;
  int64_t placement_version = 0;
  int64_t placement_commit_step = -1;
  // The longest any local rank's loop has gone without coming round (0 without rank loops):
  // growing past a few seconds while a group is healthy means a wedged process.
  double seconds_since_progress = 0;
};

// The health of one expert-parallel group: OK while it serves; once it failed, UNAVAILABLE
// naming the group and the reason. In one process a failed group stays failed (recovery is a
// restart); a cluster front end sees a group serve again once it re-formed.
struct GroupHealth {
  std::string group;
  absl::Status status;
};

// What the model is, for clients (GetModelInfo, /v1/models).
struct ModelInfo {
  std::string name;
  std::string architecture;  // the config's model_type
  int vocab_size = 0;
  int context_length = 0;
  int num_layers = 0;
  int num_dense_layers = 0;
  int hidden_size = 0;
  int num_routed_experts = 0;
  int num_shared_experts = 0;
  int num_experts_per_token = 0;
  int num_expert_groups = 0;
  int num_groups_per_token = 0;
  bool has_tokenizer = false;
  int eos_token_id = -1;
};

// How the engine runs the model.
struct LayoutInfo {
  int prefill_ep = 0;
  int decode_ep = 1;
  int num_redundant_experts = 0;
  bool two_batch_overlap = false;
  std::string device = "cpu";
  int kv_block_size = 16;
  int kv_blocks_per_rank = 0;
  std::vector<std::string> groups;  // entry group first
};

// A group's committed expert placement: phy2log[moe layer][slot] is the logical expert slot
// `slot` holds; slot s lives on rank s / (num_physical_experts / ep_size).
struct PlacementInfo {
  std::string group;
  int64_t version = 0;
  int ep_size = 1;
  int num_logical_experts = 0;
  int num_physical_experts = 0;
  int num_expert_groups = 1;
  std::vector<std::vector<int32_t>> phy2log;
};

// A new placement for a group, applied live: staged while the group serves, committed by all
// its ranks at one step boundary.
struct PlacementUpdate {
  std::string group;  // empty: the entry group
  int64_t version = 0;
  std::vector<std::vector<int32_t>> phy2log;
  double timeout_seconds = 60;  // how long to wait for the commit
};

struct PlacementUpdateResult {
  int64_t committed_version = 0;
  double seconds = 0;  // from the call to the commit
};

// Tokens each logical expert processed in a window: tokens[moe layer][expert].
struct ExpertLoadWindow {
  std::string group;
  double from_unix_seconds = 0;  // 0: since start
  double to_unix_seconds = 0;
  std::vector<std::vector<int64_t>> tokens;
};

class Engine {
 public:
  // Loads options.model, loads the device's backend and starts the groups. `registry` may be
  // null (no Prometheus series). Errors name what to change (INVALID_ARGUMENT for a bad option
  // or model, NOT_FOUND for a missing model, FAILED_PRECONDITION for a missing GPU backend,
  // DEADLINE_EXCEEDED when a rank process's peers do not come).
  static absl::StatusOr<std::unique_ptr<Engine>> Create(EngineOptions options,
                                                        prometheus::Registry* registry = nullptr);
  // The same over a model already loaded (tests that start many engines; options.model is
  // ignored). `tokenizer` may be null.
  static absl::StatusOr<std::unique_ptr<Engine>> CreateWithModel(
      std::shared_ptr<const Model> model, std::shared_ptr<const Tokenizer> tokenizer,
      EngineOptions options, prometheus::Registry* registry = nullptr);
  virtual ~Engine() = default;

  // Validates the request (INVALID_ARGUMENT with an actionable message), queues it on a rank
  // (RESOURCE_EXHAUSTED when the queue is full; UNAVAILABLE once stopped, or when a group the
  // request needs has failed) and returns its stream. If the group fails while the request is
  // in flight, its stream ends with UNAVAILABLE and the group's failure.
  virtual absl::StatusOr<std::shared_ptr<RequestStream>> Submit(GenerationInput input) = 0;
  // A decode rank process: continues a sequence a prefill rank process prefilled
  // (engine/api/handoff.h). UNIMPLEMENTED elsewhere.
  virtual absl::StatusOr<std::shared_ptr<RequestStream>> AcceptHandoff(
      const SequenceHandoff& handoff) {
    (void)handoff;
    return absl::UnimplementedError("this engine takes no handoffs (not a decode rank process)");
  }

  virtual EngineStats Stats() const = 0;
  // Every group's health, entry group first.
  virtual std::vector<GroupHealth> Health() const = 0;
  // Called on every change of a group's health (it failed, or serves again), from the thread
  // that saw it, after Health() shows it. Replaces any earlier listener.
  virtual void SetHealthListener(std::function<void(const GroupHealth&)> listener) = 0;

  virtual const ModelInfo& model_info() const = 0;
  virtual const LayoutInfo& layout() const = 0;

  // The committed placement of `group` (empty: the entry group); NOT_FOUND naming the groups
  // there are.
  virtual absl::StatusOr<PlacementInfo> GetPlacement(const std::string& group) const = 0;
  // Validates the update (shape, expert ids, a replica of every expert, slots dividing over the
  // ranks, version, timeout) and applies it. INVALID_ARGUMENT for a malformed update,
  // FAILED_PRECONDITION for a stale version or while another update is being applied,
  // DEADLINE_EXCEEDED when it did not commit in time (it then never commits: an update that
  // did not answer OK changed nothing).
  virtual absl::StatusOr<PlacementUpdateResult> UpdatePlacement(const PlacementUpdate& update) = 0;
  // Tokens per (MoE layer, logical expert) that `group` processed since `since_unix_seconds`
  // (0: since start), from per-second snapshots kept for 15 minutes.
  virtual absl::StatusOr<ExpertLoadWindow> ExpertLoad(const std::string& group,
                                                      double since_unix_seconds) const = 0;

  // New submissions get UNAVAILABLE; queued and running requests continue.
  virtual void StopAccepting() = 0;
  // Stops every rank at the same step; unfinished requests end with FinishReason::kAborted.
  virtual void Shutdown() = 0;
  // Writes the trace (if a trace folder was given) now.
  virtual absl::Status WriteTrace() const = 0;
};

// Whether `model` can run on `device` without loading it: built-in models whose routed
// experts exist on GPUs only are refused on the CPU (INVALID_ARGUMENT).
absl::Status CheckModelRunsOn(const std::string& model, const std::string& device);

// `moeserve logits`: one forward pass of `tokens`, with every token's logits.
struct LogitsRequest {
  std::string model = "builtin:tiny";
  std::string device = "cpu";
  std::vector<int32_t> tokens;
  int ep = 1;  // ranks of the expert-parallel group (threads, or GPUs)
  ParallelOptions parallel;
  bool gpu_fp8_experts = true;  // as EngineOptions::gpu_fp8_experts
  bool gpu_fp8_dense = false;   // as EngineOptions::gpu_fp8_dense
};
struct LogitsResult {
  std::vector<float> logits;  // [tokens, vocab]
  int num_tokens = 0;
  int vocab_size = 0;
  int ep = 1;
  double max_rank_difference = 0;  // largest difference between ranks' copies (EP > 1)
};
// INVALID_ARGUMENT for a token out of the vocabulary, too many tokens or a bad layout.
absl::StatusOr<LogitsResult> ComputeLogits(const LogitsRequest& request);

// `moeserve export`: the model's config.json and model.safetensors (Hugging Face names) in
// `out_dir`. Returns the number of tensors written.
absl::StatusOr<int> ExportModel(const std::string& model, const std::string& out_dir);

// Adds `memory` to the `plan` subcommand: the per-GPU weights, KV cache and tokens of an
// expert-parallel layout, from a config.json (engine/tools/plan_memory.h). Its callback prints
// the plan and sets `exit_code` to 1 when the layout does not fit, 2 for bad arguments; it
// leaves `exit_code` alone when it fits. `exit_code` must outlive the parse.
void RegisterPlanMemoryCommand(CLI::App& plan_command, int& exit_code);

}  // namespace moeserve::engine
