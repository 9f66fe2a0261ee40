// moeserve: the command-line entry point (serve, logits, export, plan).
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "engine/backend/backend_loader.h"
#include "engine/model/loader.h"
#include "engine/pipeline/plan_command.h"
#include "engine/runtime/block_allocator.h"
#include "engine/tools/group_logits.h"
#include "nlohmann/json.hpp"
#include "server/npy_writer.h"
#include "server/serve.h"

namespace {

// The backend `--device` names. The GPU backend is a plugin, loaded only when asked for.
absl::StatusOr<moeserve::engine::BackendOptions> BackendFor(const std::string& device) {
  moeserve::engine::BackendOptions backend;
  if (device == "cpu") return backend;
  if (device != "cuda") return absl::InvalidArgumentError("--device must be cpu or cuda");
  absl::StatusOr<moeserve::engine::CudaBackend> cuda = moeserve::engine::LoadCudaBackend();
  if (!cuda.ok()) return cuda.status();
  backend.factory = std::move(cuda->factory);
  backend.kv_element_bytes = 2;  // bf16 rows
  backend.name = "cuda";
  return backend;
}

// Built-in models whose routed experts exist on GPUs only are refused on the CPU before their
// (large) host weights are generated.
absl::Status CheckModelRunsOn(const std::string& model_spec, const std::string& device) {
  if (device == "cuda" || !model_spec.starts_with("builtin:")) return absl::OkStatus();
  absl::StatusOr<moeserve::engine::ModelConfig> config =
      moeserve::engine::BuiltinModelConfig(model_spec);
  if (config.ok() && config->routed_experts_on_device) {
    return absl::InvalidArgumentError(absl::StrCat(
        "`", model_spec, "` keeps its routed experts on GPUs only; use --device cuda"));
  }
  return absl::OkStatus();
}

void AddDeviceOption(CLI::App* command, std::string& device) {
  command
      ->add_option("--device", device,
                   "Where ranks compute: cpu (fp32), or cuda (bf16; rank r on GPU r, MLA models)")
      ->capture_default_str()
      ->check(CLI::IsMember({"cpu", "cuda"}));
}

using moeserve::engine::LoadModel;

// --inject-fault GROUP:RANK:STEP[:hang].
absl::StatusOr<moeserve::engine::InjectedFault> ParseInjectedFault(const std::string& text) {
  std::vector<std::string> parts = absl::StrSplit(text, ':');
  moeserve::engine::InjectedFault fault;
  if ((parts.size() != 3 && parts.size() != 4) || !absl::SimpleAtoi(parts[1], &fault.rank) ||
      !absl::SimpleAtoi(parts[2], &fault.step) || fault.rank < 0 || fault.step < 1 ||
      (parts.size() == 4 && parts[3] != "hang")) {
    return absl::InvalidArgumentError(
        absl::StrCat("--inject-fault must be GROUP:RANK:STEP[:hang], got `", text, "`"));
  }
  fault.group = parts[0];
  fault.hang = parts.size() == 4;
  return fault;
}

// Flags shared by `serve` and `logits` that shape the expert-parallel layout.
void AddExpertParallelOptions(CLI::App* command, moeserve::engine::ParallelOptions& parallel) {
  command
      ->add_option("--num-redundant-experts", parallel.num_redundant_experts,
                   "Extra expert slots per MoE layer for replicas of hot experts (routed + "
                   "redundant must divide by the EP size)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  command->add_flag("--two-batch-overlap", parallel.two_batch_overlap,
                    "Split each step into two micro-batches and overlap one's dispatch/combine "
                    "with the other's compute");
  command
      ->add_option("--overlap-min-tokens", parallel.overlap_min_tokens,
                   "Steps with fewer tokens on the busiest rank are not split")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  command->add_option(
      "--placement", parallel.placement_file,
      "Expert placement JSON: {\"version\": N, \"phy2log\": [[...] per MoE layer]}");
}

int RunLogits(const std::string& model_spec, const std::string& tokens_text,
              const std::string& out_path, int ep,
              const moeserve::engine::ParallelOptions& parallel, const std::string& device) {
  if (auto status = CheckModelRunsOn(model_spec, device); !status.ok()) {
    std::cerr << "moeserve logits: " << status.message() << "\n";
    return 2;
  }
  auto backend = BackendFor(device);
  if (!backend.ok()) {
    std::cerr << "moeserve logits: " << backend.status().message() << "\n";
    return 2;
  }
  std::vector<int32_t> tokens;
  for (absl::string_view piece : absl::StrSplit(tokens_text, ',', absl::SkipWhitespace())) {
    int32_t id = 0;
    if (!absl::SimpleAtoi(piece, &id)) {
      std::cerr << "moeserve logits: --tokens must be comma-separated integers, got `" << piece
                << "`\n";
      return 2;
    }
    tokens.push_back(id);
  }
  if (tokens.empty()) {
    std::cerr << "moeserve logits: --tokens is empty\n";
    return 2;
  }
  auto loaded = LoadModel(model_spec);
  if (!loaded.ok()) {
    std::cerr << "moeserve logits: " << loaded.status().message() << "\n";
    return 1;
  }
  const auto& config = loaded->model->config();
  for (int32_t id : tokens) {
    if (id < 0 || id >= config.vocab_size) {
      std::cerr << "moeserve logits: token " << id << " is out of range (vocabulary of "
                << config.vocab_size << ")\n";
      return 2;
    }
  }
  if (static_cast<int>(tokens.size()) > config.max_position_embeddings) {
    std::cerr << "moeserve logits: " << tokens.size() << " tokens exceed the context length "
              << config.max_position_embeddings << "\n";
    return 2;
  }
  std::vector<float> logits;
  if (ep <= 1 && parallel.num_redundant_experts == 0 && parallel.placement_file.empty() &&
      !parallel.two_batch_overlap && !backend->factory) {
    const int block_size = 16;
    moeserve::engine::KvRows cache(config.num_hidden_layers,
                                   (static_cast<int>(tokens.size()) + block_size - 1) / block_size,
                                   block_size, loaded->model->kv_row_dim());
    moeserve::engine::BlockAllocator cache_blocks(cache.num_blocks());
    std::vector<int32_t> blocks = *cache_blocks.Allocate(cache.num_blocks());
    moeserve::engine::BatchSequence sequence{tokens, 0, &blocks, /*all_logits=*/true};
    logits = loaded->model->Forward({&sequence, 1}, cache);
  } else {
    const int num_logical = config.n_routed_experts;
    const int num_physical = num_logical + parallel.num_redundant_experts;
    auto placement =
        parallel.placement_file.empty()
            ? absl::StatusOr<moeserve::engine::ExpertPlacement>(
                  moeserve::engine::ExpertPlacement::Default(config.num_moe_layers(), num_logical,
                                                             num_physical))
            : moeserve::engine::ExpertPlacement::LoadJsonFile(
                  parallel.placement_file, config.num_moe_layers(), num_logical, num_physical);
    if (!placement.ok()) {
      std::cerr << "moeserve logits: " << placement.status().message() << "\n";
      return 2;
    }
    moeserve::engine::parallel::GroupOptions options;
    options.name = "logits";
    options.size = ep;
    options.two_batch_overlap = parallel.two_batch_overlap;
    options.overlap_min_tokens = parallel.overlap_min_tokens;
    auto result = moeserve::engine::parallel::ComputeGroupLogits(
        *loaded->model, tokens, options, std::move(*placement), nullptr, backend->factory);
    if (!result.ok()) {
      std::cerr << "moeserve logits: " << result.status().message() << "\n";
      return result.status().code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
    }
    logits = std::move(result->logits);
    std::cerr << "moeserve logits: EP" << ep << ", max difference between ranks' copies "
              << result->max_rank_difference << "\n";
  }
  auto status = moeserve::server::WriteNpyFloat32(
      out_path, {static_cast<int64_t>(tokens.size()), config.vocab_size}, logits);
  if (!status.ok()) {
    std::cerr << "moeserve logits: " << status.message() << "\n";
    return 1;
  }
  std::cout << "wrote " << tokens.size() << " x " << config.vocab_size << " float32 logits to "
            << out_path << "\n";
  return 0;
}

int RunExport(const std::string& model_spec, const std::string& out_dir) {
  if (auto status = CheckModelRunsOn(model_spec, "cpu"); !status.ok()) {
    std::cerr << "moeserve export: " << status.message() << " (it has no checkpoint to export)\n";
    return 2;
  }
  auto loaded = LoadModel(model_spec);
  if (!loaded.ok()) {
    std::cerr << "moeserve export: " << loaded.status().message() << "\n";
    return 1;
  }
  std::error_code error;
  std::filesystem::create_directories(out_dir, error);
  if (error) {
    std::cerr << "moeserve export: cannot create " << out_dir << ": " << error.message() << "\n";
    return 1;
  }
  const auto& weights = loaded->model->weights();
  std::ofstream(out_dir + "/config.json")
      << moeserve::engine::ModelConfigToJson(weights.config()).dump(2) << "\n";
  auto status =
      moeserve::engine::WriteSafetensors(out_dir + "/model.safetensors", weights.tensors());
  if (!status.ok()) {
    std::cerr << "moeserve export: " << status.message() << "\n";
    return 1;
  }
  std::cout << "wrote " << out_dir << "/config.json and model.safetensors ("
            << weights.tensors().size() << " tensors)\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "moeserve: serves DeepSeek-style Mixture-of-Experts models over gRPC with expert "
      "parallelism"};
  app.require_subcommand(1);
  int exit_code = 0;

  moeserve::server::ServeOptions serve;
  int64_t kv_cache_mib = serve.engine.kv_cache_bytes >> 20;  // per rank
  auto* serve_command = app.add_subcommand("serve", "Serve a model over gRPC");
  serve_command
      ->add_option("--model", serve.model,
                   "Model to serve: builtin:tiny, builtin:tiny-nolora, builtin:tiny-v2")
      ->capture_default_str();
  serve_command->add_option("--host", serve.host, "Address to listen on")->capture_default_str();
  serve_command->add_option("--port", serve.port, "gRPC port (0: pick a free one)")
      ->capture_default_str()
      ->check(CLI::Range(0, 65535));
  serve_command
      ->add_option("--metrics-port", serve.metrics_port,
                   "Prometheus /metrics port (0: pick a free one, -1: off)")
      ->capture_default_str()
      ->check(CLI::Range(-1, 65535));
  serve_command
      ->add_option("--max-batch-tokens", serve.engine.max_batch_tokens,
                   "Tokens per forward step; longer prompts prefill in chunks")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  serve_command
      ->add_option("--max-running-requests", serve.engine.max_running_requests,
                   "Requests decoded together in one batch")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  serve_command
      ->add_option("--max-queue", serve.engine.max_queue,
                   "Waiting requests before new ones get RESOURCE_EXHAUSTED")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  serve_command->add_option("--kv-cache-mib", kv_cache_mib, "KV cache size per rank in MiB")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  double min_step_ms = 0;
  serve_command
      ->add_option("--min-step-ms", min_step_ms,
                   "Pace the engine to at least this many ms per step (demos, cancellation tests)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  serve_command
      ->add_option("--shutdown-grace-seconds", serve.shutdown_grace_seconds,
                   "On SIGTERM, how long in-flight streams may take to finish")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  serve_command
      ->add_option("--ep", serve.engine.parallel.decode_ep,
                   "Ranks of the one mixed expert-parallel group (without --prefill-ep)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  serve_command
      ->add_option("--prefill-ep", serve.engine.parallel.prefill_ep,
                   "Ranks of a separate prefill group (0: prefill and decode share one group)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  serve_command
      ->add_option("--decode-ep", serve.engine.parallel.decode_ep,
                   "Ranks of the decode group (same as --ep)")
      ->check(CLI::PositiveNumber);
  AddExpertParallelOptions(serve_command, serve.engine.parallel);
  serve_command
      ->add_option("--collective-timeout-seconds", serve.engine.parallel.collective_timeout_seconds,
                   "How long a rank waits for its slowest peer at a collective before the group "
                   "fails (health NOT_SERVING, its requests UNAVAILABLE)")
      ->capture_default_str()
      ->check(CLI::Range(0.001, 86400.0));
  std::string injected_fault;
  // Hidden: for tests of failure handling only.
  serve_command
      ->add_option("--inject-fault", injected_fault,
                   "GROUP:RANK:STEP[:hang] — fail (or hang) that rank at its STEP-th working step")
      ->group("");
  serve_command->add_flag("!--no-expert-metrics", serve.engine.parallel.expert_load_metrics,
                          "Do not export the per (layer, expert) token counters");
  serve_command
      ->add_option("--admin-token-file", serve.admin_token_file,
                   "Serve the Admin API (placements, expert load), authenticated with the bearer "
                   "token in this file; without it the Admin API is off")
      ->check(CLI::ExistingFile);
  serve_command->add_option("--trace-dir", serve.engine.parallel.trace_dir,
                            "Write a Chrome trace (Perfetto) of working steps here (--trace-steps "
                            "of them, after --trace-skip-steps)");
  serve_command
      ->add_option("--trace-steps", serve.engine.parallel.trace_steps,
                   "Working steps per group to record with --trace-dir")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  serve_command
      ->add_option("--trace-skip-steps", serve.engine.parallel.trace_skip_steps,
                   "Working steps per group to let pass before recording (e.g. to trace decode "
                   "under load rather than the first prefills)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  std::string serve_device = "cpu";
  AddDeviceOption(serve_command, serve_device);
  serve_command->callback([&] {
    if (auto status = CheckModelRunsOn(serve.model, serve_device); !status.ok()) {
      std::cerr << "moeserve serve: " << status.message() << "\n";
      exit_code = 2;
      return;
    }
    auto backend = BackendFor(serve_device);
    if (!backend.ok()) {
      std::cerr << "moeserve serve: " << backend.status().message() << "\n";
      exit_code = 2;
      return;
    }
    serve.engine.backend = *backend;
    if (!injected_fault.empty()) {
      auto fault = ParseInjectedFault(injected_fault);
      if (!fault.ok()) {
        std::cerr << "moeserve serve: " << fault.status().message() << "\n";
        exit_code = 2;
        return;
      }
      serve.engine.injected_fault = *fault;
    }
    serve.engine.kv_cache_bytes = kv_cache_mib << 20;
    serve.engine.min_step_seconds = min_step_ms / 1000.0;
    exit_code = moeserve::server::RunServe(serve);
  });

  std::string logits_model = "builtin:tiny", logits_tokens, logits_out;
  auto* logits_command = app.add_subcommand(
      "logits", "Write the float32 [num_tokens, vocab] logits of one forward pass as .npy");
  logits_command->add_option("--model", logits_model, "Model (as for serve)")
      ->capture_default_str();
  logits_command->add_option("--tokens", logits_tokens, "Comma-separated token ids, e.g. 1,2,3")
      ->required();
  logits_command->add_option("--out", logits_out, "Output .npy file")->required();
  int logits_ep = 1;
  moeserve::engine::ParallelOptions logits_parallel;
  logits_parallel.overlap_min_tokens = 1;
  logits_command->add_option("--ep", logits_ep, "Expert-parallel ranks (threads)")
      ->capture_default_str()
      ->check(CLI::Range(1, 1024));
  AddExpertParallelOptions(logits_command, logits_parallel);
  std::string logits_device = "cpu";
  AddDeviceOption(logits_command, logits_device);
  logits_command->callback([&] {
    exit_code = RunLogits(logits_model, logits_tokens, logits_out, logits_ep, logits_parallel,
                          logits_device);
  });

  std::string export_model = "builtin:tiny", export_dir;
  auto* export_command = app.add_subcommand(
      "export", "Write a model's config.json and float32 model.safetensors (Hugging Face layout)");
  export_command->add_option("--model", export_model, "Model (as for serve)")
      ->capture_default_str();
  export_command->add_option("--out", export_dir, "Output folder")->required();
  export_command->callback([&] { exit_code = RunExport(export_model, export_dir); });

  auto* plan_command = app.add_subcommand("plan", "Plan parallel layouts (pipeline schedules)");
  plan_command->require_subcommand(1);
  moeserve::engine::pipeline::RegisterPlanPipelineCommand(*plan_command, exit_code);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  return exit_code;
}
