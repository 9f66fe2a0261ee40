// moeserve: the command-line entry point (serve; rank, node and frontend for groups of rank
// processes; logits, export, plan).
#include <iostream>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "base/build_info.h"
#include "base/logging.h"
#include "base/tls_files.h"
#include "engine/engine.h"
#include "engine/pipeline/plan_command.h"
#include "server/admin_service.h"
#include "server/admin_token.h"
#include "server/cluster_engine.h"
#include "server/node_supervisor.h"
#include "server/npy_writer.h"
#include "server/rank_process.h"
#include "server/serve.h"
#include "spdlog/spdlog.h"

namespace {

void AddDeviceOption(CLI::App* command, std::string& device) {
  command
      ->add_option("--device", device,
                   "Where ranks compute: cpu (fp32), or cuda (bf16; rank r on GPU r)")
      ->capture_default_str()
      ->check(CLI::IsMember({"cpu", "cuda"}));
}

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

// --gpu-expert-weights (serve, rank, logits).
void AddGpuExpertWeightsOption(CLI::App* command, std::string& value) {
  command
      ->add_option("--gpu-expert-weights", value,
                   "How GPU ranks hold the routed experts of an FP8 checkpoint (DeepSeek-V3): "
                   "as-stored (e4m3 with 128x128 block scales, FP8 GEMMs on Hopper GPUs; half "
                   "the memory and bytes of bf16) or bf16 (dequantized)")
      ->capture_default_str()
      ->check(CLI::IsMember({"as-stored", "bf16"}));
}

// --gpu-dense-weights (serve, rank, logits).
void AddGpuDenseWeightsOption(CLI::App* command, std::string& value) {
  command
      ->add_option("--gpu-dense-weights", value,
                   "How GPU ranks hold the dense projections of an FP8 checkpoint whose experts "
                   "stay FP8: bf16 (dequantized) or as-stored (e4m3 with DeepSeek-V3's "
                   "activation quantization: the MLPs', shared experts', o and q-LoRA "
                   "projections; about 13 GiB less per GPU for DeepSeek-V3, a larger error "
                   "against bf16: docs/gpu-backend.md)")
      ->capture_default_str()
      ->check(CLI::IsMember({"as-stored", "bf16"}));
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

// The engine flags `serve` and `rank` share (the model, batching, KV cache, expert parallelism).
struct EngineFlags {
  moeserve::engine::EngineOptions engine;
  int64_t kv_cache_mib = engine.kv_cache_bytes >> 20;
  double min_step_ms = 0;
  std::string injected_fault;
  std::string placement_staging = "background";
  std::string gpu_expert_weights = "as-stored";
  std::string gpu_dense_weights = "bf16";
  std::string gpu_dispatch_rows = "fp8";
  std::string gpu_moe_plan = "device";
  std::string gpu_cuda_graphs = "on";
  std::string gpu_exchange_plan = "host";
  int gpu_exchange_max_ctas = 0;
};

void AddEngineOptions(CLI::App* command, EngineFlags& flags) {
  moeserve::engine::EngineOptions& engine = flags.engine;
  command
      ->add_option(
          "--model", engine.model,
          "Model to serve: builtin:tiny, builtin:tiny-nolora, builtin:tiny-v2, builtin:tiny-e256, "
          "builtin:v3-bench, builtin:v3-bench-fp8, builtin:v3-bench-fp8-deep or "
          "builtin:qwen3-30b-bench (GPU only), or a Hugging Face checkpoint folder")
      ->capture_default_str();
  AddDeviceOption(command, engine.device);
  command
      ->add_option("--max-batch-tokens", engine.max_batch_tokens,
                   "Tokens per forward step; longer prompts prefill in chunks")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  command
      ->add_option("--max-running-requests", engine.max_running_requests,
                   "Requests decoded together in one batch")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  command
      ->add_option("--max-queue", engine.max_queue,
                   "Waiting requests before new ones get RESOURCE_EXHAUSTED")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  command->add_option("--kv-cache-mib", flags.kv_cache_mib, "KV cache size per rank in MiB")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  command
      ->add_option("--min-step-ms", flags.min_step_ms,
                   "Pace the engine to at least this many ms per step (demos, cancellation tests)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  AddExpertParallelOptions(command, engine.parallel);
  command
      ->add_option("--collective-timeout-seconds", engine.parallel.collective_timeout_seconds,
                   "How long a rank waits for its slowest peer at a collective before the group "
                   "fails (health NOT_SERVING, its requests UNAVAILABLE)")
      ->capture_default_str()
      ->check(CLI::Range(0.001, 86400.0));
  // Hidden: for tests of failure handling only.
  command
      ->add_option("--inject-fault", flags.injected_fault,
                   "GROUP:RANK:STEP[:hang] — fail (or hang) that rank at its STEP-th working step")
      ->group("");
  command
      ->add_option("--gpu-placement-staging", flags.placement_staging,
                   "How GPU ranks apply a new expert placement: background (stage the changed "
                   "slots in spare GPU memory while serving, swap at the commit) or in-step "
                   "(write them during the committing step: no spare memory, one slow step)")
      ->capture_default_str()
      ->check(CLI::IsMember({"background", "in-step"}));
  AddGpuExpertWeightsOption(command, flags.gpu_expert_weights);
  AddGpuDenseWeightsOption(command, flags.gpu_dense_weights);
  command
      ->add_option("--gpu-moe-plan", flags.gpu_moe_plan,
                   "Where a GPU alone in its group (EP1) plans a decode step's experts: device "
                   "(routing, grouping and grouped GEMMs on the GPU, no host round trip per MoE "
                   "layer) or host (the routing goes to the host, which groups the rows for "
                   "cuBLAS, as for prefill steps and larger groups)")
      ->capture_default_str()
      ->check(CLI::IsMember({"device", "host"}));
  command
      ->add_option("--gpu-exchange-plan", flags.gpu_exchange_plan,
                   "Where a group of several GPUs plans a decode step's exchange: host (the "
                   "routing, counts and entries go through the host at every MoE layer) or "
                   "device (blocks of a fixed size planned and grouped on the GPUs, no host "
                   "round trip; with --gpu-moe-plan device; every rank of a group the same)")
      ->capture_default_str()
      ->check(CLI::IsMember({"device", "host"}));
  command
      ->add_option("--gpu-dispatch-rows", flags.gpu_dispatch_rows,
                   "How a group of several GPUs dispatches rows to FP8 experts (host-planned "
                   "exchange, Hopper): fp8 (each sender quantizes its rows per 1x128 tile, as "
                   "the experts would: half the bytes, the same results) or bf16 (the receivers "
                   "quantize); every rank of a group the same")
      ->capture_default_str()
      ->check(CLI::IsMember({"fp8", "bf16"}));
  command
      ->add_option("--gpu-exchange-max-ctas", flags.gpu_exchange_max_ctas,
                   "At most this many thread blocks for each NCCL collective of a GPU group's "
                   "exchange, so that an exchange overlapped with the other micro-batch's compute "
                   "(--two-batch-overlap) leaves it the other SMs; 0: NCCL's own choice")
      ->capture_default_str()
      ->check(CLI::Range(0, moeserve::engine::kMaxGpuExchangeCtas));
  command
      ->add_option("--gpu-cuda-graphs", flags.gpu_cuda_graphs,
                   "Whether a GPU runs its device-planned decode steps as CUDA graphs (alone in "
                   "its group, or in a group with --gpu-exchange-plan device over NCCL): on (one "
                   "graph captured per step shape, then one launch a step) or off (kernel by "
                   "kernel)")
      ->capture_default_str()
      ->check(CLI::IsMember({"on", "off"}));
  command->add_flag("!--no-expert-metrics", engine.parallel.expert_load_metrics,
                    "Do not export the per (layer, expert) token counters");
  command->add_option("--trace-dir", engine.parallel.trace_dir,
                      "Write a Chrome trace (Perfetto) of working steps here (--trace-steps "
                      "of them, after --trace-skip-steps)");
  command
      ->add_option("--trace-steps", engine.parallel.trace_steps,
                   "Working steps per group to record with --trace-dir")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  command
      ->add_option("--trace-skip-steps", engine.parallel.trace_skip_steps,
                   "Working steps per group to let pass before recording (e.g. to trace decode "
                   "under load rather than the first prefills)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
}

// Completes `out` (whose group sizes the command set) from the flags; false (and exit code 2)
// with a message for a combination that cannot run.
bool ApplyEngineFlags(const std::string& command, const EngineFlags& flags,
                      moeserve::engine::EngineOptions& out, int& exit_code) {
  const moeserve::engine::ParallelOptions sizes = out.parallel;
  out = flags.engine;
  out.parallel.prefill_ep = sizes.prefill_ep;
  out.parallel.decode_ep = sizes.decode_ep;
  if (auto status = moeserve::engine::CheckModelRunsOn(out.model, out.device); !status.ok()) {
    std::cerr << "moeserve " << command << ": " << status.message() << "\n";
    exit_code = 2;
    return false;
  }
  if (!flags.injected_fault.empty()) {
    auto fault = ParseInjectedFault(flags.injected_fault);
    if (!fault.ok()) {
      std::cerr << "moeserve " << command << ": " << fault.status().message() << "\n";
      exit_code = 2;
      return false;
    }
    out.injected_fault = *fault;
  }
  if (flags.gpu_exchange_plan == "device" && flags.gpu_moe_plan != "device") {
    std::cerr << "moeserve " << command
              << ": --gpu-exchange-plan device needs --gpu-moe-plan device (the exchange is "
                 "planned with the experts)\n";
    exit_code = 2;
    return false;
  }
  out.kv_cache_bytes = flags.kv_cache_mib << 20;
  out.parallel.background_placement_staging = flags.placement_staging == "background";
  out.gpu_fp8_experts = flags.gpu_expert_weights == "as-stored";
  out.gpu_fp8_dense = flags.gpu_dense_weights == "as-stored";
  out.gpu_fp8_dispatch = flags.gpu_dispatch_rows == "fp8";
  out.gpu_device_planned_moe = flags.gpu_moe_plan == "device";
  out.gpu_cuda_graphs = flags.gpu_cuda_graphs == "on";
  out.gpu_device_planned_exchange = flags.gpu_exchange_plan == "device";
  out.gpu_exchange_max_ctas = flags.gpu_exchange_max_ctas;
  out.min_step_seconds = flags.min_step_ms / 1000.0;
  return true;
}

// --[prefix]tls-cert, --[prefix]tls-key and --[prefix]tls-client-ca of one listener.
void AddTlsServerOptions(CLI::App* command, const std::string& prefix, const std::string& what,
                         moeserve::base::TlsServerFiles& files) {
  command->add_option(
      "--" + prefix + "tls-cert", files.cert,
      "PEM certificate chain: serve " + what + " over TLS (with --" + prefix + "tls-key)");
  command->add_option("--" + prefix + "tls-key", files.key,
                      "PEM private key of --" + prefix + "tls-cert");
  command->add_option("--" + prefix + "tls-client-ca", files.client_ca,
                      "PEM CA bundle: " + what + " requires client certificates it signed");
}

// The front doors `serve` and `frontend` share: ports, HTTP, chat template, drain, Admin.
void AddFrontDoorOptions(CLI::App* command, moeserve::server::ServeOptions& serve,
                         int default_metrics_port) {
  serve.metrics_port = default_metrics_port;
  command->add_option("--host", serve.host, "Address the gRPC port binds")->capture_default_str();
  command
      ->add_option("--port", serve.port,
                   "gRPC port: moeserve.v1.Generation and the KServe v2 inference service (0: "
                   "pick a free one)")
      ->capture_default_str()
      ->check(CLI::Range(0, 65535));
  AddTlsServerOptions(command, "", "the gRPC port", serve.tls);
  command->add_option("--metrics-host", serve.metrics_host,
                      "Address the /metrics port (plain HTTP) binds (default: --host)");
  command
      ->add_option("--metrics-port", serve.metrics_port,
                   "Prometheus /metrics port (0: pick a free one, -1: off)")
      ->capture_default_str()
      ->check(CLI::Range(-1, 65535));
  command
      ->add_option("--http-port", serve.http_port,
                   "OpenAI-compatible HTTP port: /v1/completions, /v1/chat/completions, "
                   "/v1/models, /health (0: pick a free one, -1: off)")
      ->capture_default_str()
      ->check(CLI::Range(-1, 65535));
  command->add_option("--http-host", serve.http_host,
                      "Address the OpenAI HTTP port (plain HTTP) binds (default: --host)");
  command
      ->add_option("--chat-template", serve.chat_template_file,
                   "Jinja chat template for /v1/chat/completions, instead of the model's own "
                   "(tokenizer_config.json's chat_template)")
      ->check(CLI::ExistingFile);
  command
      ->add_option("--http-max-connections", serve.http_max_connections,
                   "HTTP connections served at once (each holds a worker thread); more wait")
      ->capture_default_str()
      ->check(CLI::Range(1, 100000));
  command
      ->add_option("--shutdown-grace-seconds", serve.shutdown_grace_seconds,
                   "On SIGTERM, SIGINT or SIGHUP, how long in-flight streams may take to finish "
                   "(a second signal stops at once)")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 86400.0));
  command
      ->add_option("--admin-token-file", serve.admin_token_file,
                   "Serve the Admin API (placements, expert load), authenticated with the bearer "
                   "token in this file (at least 32 varied characters, not a placeholder: e.g. "
                   "`openssl rand -hex 32`); without it or --admin-tls-client-ca the Admin API is "
                   "off")
      ->check(CLI::ExistingFile);
  command->add_option("--admin-host", serve.admin_host,
                      "Address the Admin API's own port binds (default: --host)");
  command
      ->add_option("--admin-port", serve.admin_port,
                   "Serve the Admin API on this port of its own, over TLS only (--admin-tls-cert/"
                   "--admin-tls-key, default --tls-cert/--tls-key); clients authenticate with the "
                   "token, a client certificate (--admin-tls-client-ca) or both (0: pick a free "
                   "port; -1: on the gRPC port)")
      ->capture_default_str()
      ->check(CLI::Range(-1, 65535));
  AddTlsServerOptions(command, "admin-", "the Admin API's own port", serve.admin_tls);
  // Hidden: for tests of signals during start-up only.
  command
      ->add_option("--inject-load-delay-seconds", serve.inject_load_delay_seconds,
                   "Wait this long before loading the model")
      ->group("");
  command->footer(
      "Signals: SIGTERM, SIGINT or SIGHUP while the model loads (or the groups are awaited) stop "
      "before serving (exit 0). Once serving, the first drains: health turns NOT_SERVING, new "
      "requests get UNAVAILABLE, running streams get --shutdown-grace-seconds to finish, then "
      "the rest end with UNAVAILABLE (exit 0). A second signal during the drain stops at once: "
      "running streams end with UNAVAILABLE (exit 1). SIGUSR1 and SIGUSR2 are ignored. Exit 1 "
      "also when start-up fails (a port in use, a bad file or model).");
}

int RunLogits(moeserve::engine::LogitsRequest request, const std::string& tokens_text,
              const std::string& out_path) {
  for (absl::string_view piece : absl::StrSplit(tokens_text, ',', absl::SkipWhitespace())) {
    int32_t id = 0;
    if (!absl::SimpleAtoi(piece, &id)) {
      std::cerr << "moeserve logits: --tokens must be comma-separated integers, got `" << piece
                << "`\n";
      return 2;
    }
    request.tokens.push_back(id);
  }
  absl::StatusOr<moeserve::engine::LogitsResult> result = moeserve::engine::ComputeLogits(request);
  if (!result.ok()) {
    std::cerr << "moeserve logits: " << result.status().message() << "\n";
    return result.status().code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  if (result->ep > 1) {
    std::cerr << "moeserve logits: EP" << result->ep << ", max difference between ranks' copies "
              << result->max_rank_difference << "\n";
  }
  auto status = moeserve::server::WriteNpyFloat32(
      out_path, {result->num_tokens, result->vocab_size}, result->logits);
  if (!status.ok()) {
    std::cerr << "moeserve logits: " << status.message() << "\n";
    return 1;
  }
  std::cout << "wrote " << result->num_tokens << " x " << result->vocab_size
            << " float32 logits to " << out_path << "\n";
  return 0;
}

int RunExport(const std::string& model_spec, const std::string& out_dir) {
  absl::StatusOr<int> tensors = moeserve::engine::ExportModel(model_spec, out_dir);
  if (!tensors.ok()) {
    std::cerr << "moeserve export: " << tensors.status().message() << "\n";
    return tensors.status().code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  std::cout << "wrote " << out_dir << "/config.json and model.safetensors (" << *tensors
            << " tensors)\n";
  return 0;
}

// --liveness-stall-seconds of `serve` and `rank`.
void AddLivenessOption(CLI::App* command, double& stall_seconds) {
  command
      ->add_option("--liveness-stall-seconds", stall_seconds,
                   "Health `liveness` turns NOT_SERVING (so that a liveness probe restarts the "
                   "process) when a rank loop has not come round for this long; must exceed "
                   "--collective-timeout-seconds")
      ->capture_default_str()
      ->check(CLI::Range(1.0, 86400.0));
}

// The liveness stall must outlast a collective's timeout: a rank waiting for a slow peer is
// not wedged, and its group fails (visibly) at the timeout.
bool CheckLivenessStall(const std::string& command, double stall_seconds,
                        const moeserve::engine::EngineOptions& engine, int& exit_code) {
  if (stall_seconds > engine.parallel.collective_timeout_seconds) return true;
  std::cerr << "moeserve " << command << ": --liveness-stall-seconds (" << stall_seconds
            << ") must exceed --collective-timeout-seconds ("
            << engine.parallel.collective_timeout_seconds << ")\n";
  exit_code = 2;
  return false;
}

// With --check-flags a command stops once its flags have parsed and validated.
bool StopAfterFlagCheck(bool check_flags, const std::string& command) {
  if (check_flags) std::cout << "moeserve " << command << ": flags accepted\n";
  return check_flags;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "moeserve: serves DeepSeek-style Mixture-of-Experts models over gRPC with expert "
      "parallelism"};
  app.set_version_flag("--version", moeserve::base::Version());
  app.require_subcommand(1);
  // The top-level options may also follow the subcommand (`moeserve serve --log-level debug`).
  app.fallthrough();
  int exit_code = 0;
  moeserve::base::LogOptions log_options;
  moeserve::base::AddLoggingOptions(app, log_options);
  bool check_flags = false;
  app.add_flag("--check-flags", check_flags,
               "Parse and validate the command's flags, print `flags accepted` and exit 0 "
               "without starting anything (non-zero with the reason otherwise); `node` checks its "
               "ranks' flags too. For deployment checks.");
  app.parse_complete_callback([&] {
    const std::string component = app.get_subcommands().empty()
                                      ? std::string("moeserve")
                                      : app.get_subcommands().front()->get_name();
    if (absl::Status status = moeserve::base::ConfigureLogging(log_options, component);
        !status.ok()) {
      throw CLI::ValidationError("--log-level/--log-format", std::string(status.message()));
    }
  });

  // serve
  moeserve::server::ServeOptions serve;
  auto* serve_command = app.add_subcommand(
      "serve",
      "Serve a model: gRPC (moeserve.v1.Generation and the KServe v2 / Triton inference "
      "protocol on --port) and the OpenAI API over HTTP (--http-port)");
  AddFrontDoorOptions(serve_command, serve, /*default_metrics_port=*/9400);
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
  EngineFlags serve_engine;
  AddEngineOptions(serve_command, serve_engine);
  AddLivenessOption(serve_command, serve.liveness_stall_seconds);
  serve_command->callback([&] {
    if (!ApplyEngineFlags("serve", serve_engine, serve.engine, exit_code)) return;
    if (!CheckLivenessStall("serve", serve.liveness_stall_seconds, serve.engine, exit_code)) return;
    if (StopAfterFlagCheck(check_flags, "serve")) return;
    exit_code = moeserve::server::RunServe(serve);
  });

  // rank
  moeserve::server::RankOptions rank;
  auto* rank_command = app.add_subcommand(
      "rank",
      "Run one rank of an expert-parallel group whose ranks are processes (one per GPU, or CPU "
      "ranks), for `moeserve frontend`; rank 0 is the group's leader");
  rank_command
      ->add_option("--group", rank.group,
                   "The group: mixed (prefill and decode), prefill or decode")
      ->capture_default_str()
      ->check(CLI::IsMember({"mixed", "prefill", "decode"}));
  rank_command->add_option("--group-size", rank.group_size, "Ranks in the group")
      ->required()
      ->check(CLI::Range(1, 1024));
  rank_command->add_option("--rank", rank.rank, "This process's rank in the group")
      ->required()
      ->check(CLI::Range(0, 1023));
  rank_command->add_option("--leader", rank.leader,
                           "The leader's (rank 0's) worker address HOST:PORT (default: "
                           "$LWS_LEADER_ADDRESS:--leader-port, or itself for rank 0)");
  rank_command
      ->add_option("--leader-port", rank.leader_port,
                   "The leader's worker port, with $LWS_LEADER_ADDRESS")
      ->capture_default_str()
      ->check(CLI::Range(1, 65535));
  rank_command->add_option("--host", rank.host, "Address to listen on")->capture_default_str();
  rank_command->add_option("--advertise-host", rank.advertise_host,
                           "Address the front end and the other ranks reach this rank at "
                           "(default: --host)");
  rank_command->add_option("--port", rank.port, "Worker API port (0: pick a free one)")
      ->capture_default_str()
      ->check(CLI::Range(0, 65535));
  rank_command
      ->add_option("--metrics-port", rank.metrics_port,
                   "Prometheus /metrics port (0: pick a free one, -1: off)")
      ->capture_default_str()
      ->check(CLI::Range(-1, 65535));
  rank_command
      ->add_option("--join-timeout-seconds", rank.join_timeout_seconds,
                   "How long to wait for the leader and for the whole group to form (other "
                   "ranks may still be loading their models)")
      ->capture_default_str()
      ->check(CLI::Range(1.0, 86400.0));
  rank_command
      ->add_option("--shutdown-grace-seconds", rank.shutdown_grace_seconds,
                   "On SIGTERM, how long in-flight streams may take to finish")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  rank_command
      ->add_option("--admin-token-file", rank.admin_token_file,
                   "Serve the Admin API (placements, expert load) with the bearer token in this "
                   "file; the front end needs it to apply placements")
      ->check(CLI::ExistingFile);
  rank_command
      ->add_option("--supervisor-pid", rank.supervisor_pid,
                   "Set by `moeserve node` for the ranks it starts: the rank ends (SIGTERM) when "
                   "that process does, however it ends")
      ->check(CLI::NonNegativeNumber);
  rank_command
      ->add_option("--cuda-device", rank.cuda_device,
                   "With --device cuda: the GPU (-1: the rank modulo the visible GPUs)")
      ->capture_default_str()
      ->check(CLI::Range(-1, 1023));
  EngineFlags rank_engine;
  AddEngineOptions(rank_command, rank_engine);
  AddLivenessOption(rank_command, rank.liveness_stall_seconds);
  rank_command->callback([&] {
    if (!ApplyEngineFlags("rank", rank_engine, rank.engine, exit_code)) return;
    if (!CheckLivenessStall("rank", rank.liveness_stall_seconds, rank.engine, exit_code)) return;
    if (StopAfterFlagCheck(check_flags, "rank")) return;
    exit_code = moeserve::server::RunRank(rank);
  });

  // node
  moeserve::server::NodeOptions node;
  auto* node_command = app.add_subcommand(
      "node",
      "Start and watch the rank processes of one node: `moeserve node --ranks-per-node 8 -- "
      "--group decode --leader HOST:PORT --model ...` (the flags after -- go to every rank)");
  node_command->add_option("--ranks-per-node", node.ranks_per_node, "Rank processes on this node")
      ->capture_default_str()
      ->check(CLI::Range(1, 64));
  node_command
      ->add_option("--node-index", node.node_index,
                   "This node's index in the group (default: $LWS_WORKER_INDEX, else 0)")
      ->check(CLI::Range(0, 1023));
  node_command
      ->add_option("--num-nodes", node.num_nodes,
                   "Nodes in the group (default: $LWS_GROUP_SIZE, else 1)")
      ->check(CLI::Range(1, 1024));
  node_command->add_option("--port", node.port, "Local rank i's worker port is --port + i")
      ->capture_default_str()
      ->check(CLI::Range(1, 65535));
  node_command
      ->add_option("--metrics-port", node.metrics_port,
                   "Local rank i's /metrics port is --metrics-port + i (-1: no metrics)")
      ->capture_default_str()
      ->check(CLI::Range(-1, 65535));
  node_command
      ->add_option("--health-interval-seconds", node.health_interval_seconds,
                   "How often each rank's health is checked")
      ->capture_default_str()
      ->check(CLI::Range(0.05, 60.0));
  node_command
      ->add_option("--health-misses", node.health_misses,
                   "Missed health checks in a row after which a rank counts as wedged")
      ->capture_default_str()
      ->check(CLI::Range(1, 1000));
  node_command
      ->add_option("--shutdown-grace-seconds", node.shutdown_grace_seconds,
                   "On SIGTERM, how long the ranks may drain before they are killed")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  node_command->add_option("rank-arguments", node.rank_arguments,
                           "Flags for every rank (after --): --group, --leader, --model, ...");
  node_command->callback([&] {
    node.check_flags = check_flags;
    exit_code = moeserve::server::RunNode(node);
  });

  // frontend
  moeserve::server::ServeOptions frontend;
  moeserve::server::ClusterOptions cluster;
  std::vector<std::string> frontend_groups;
  std::string frontend_admin_token_file;
  auto* frontend_command = app.add_subcommand(
      "frontend",
      "Serve the front doors (as serve does) over groups of rank processes: `--group "
      "mixed=LEADER`, or `--group prefill=LEADER --group decode=LEADER`");
  AddFrontDoorOptions(frontend_command, frontend, /*default_metrics_port=*/9400);
  frontend_command
      ->add_option("--group", frontend_groups,
                   "NAME=HOST:PORT: a group and its leader's worker address")
      ->required();
  frontend_command
      ->add_option("--poll-interval-seconds", cluster.poll_interval_seconds,
                   "How often the groups' membership and load are read")
      ->capture_default_str()
      ->check(CLI::Range(0.01, 60.0));
  frontend_command
      ->add_option("--wait-for-groups-seconds", cluster.wait_for_groups_seconds,
                   "How long to wait at start for the groups to answer and form")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 86400.0));
  frontend_command
      ->add_option("--rank-admin-token-file", frontend_admin_token_file,
                   "The ranks' Admin token, for placements and expert load (default: the "
                   "--admin-token-file)")
      ->check(CLI::ExistingFile);
  frontend_command->callback([&] {
    for (const std::string& text : frontend_groups) {
      std::vector<std::string> parts = absl::StrSplit(text, absl::MaxSplits('=', 1));
      if (parts.size() != 2 || parts[0].empty() || parts[1].empty()) {
        std::cerr << "moeserve frontend: --group must be NAME=HOST:PORT, got `" << text << "`\n";
        exit_code = 2;
        return;
      }
      cluster.groups.emplace_back(parts[0], parts[1]);
      frontend.groups.push_back(parts[0]);
    }
    if (StopAfterFlagCheck(check_flags, "frontend")) return;
    const std::string& token_file =
        !frontend_admin_token_file.empty() ? frontend_admin_token_file : frontend.admin_token_file;
    if (!token_file.empty()) {
      absl::StatusOr<std::string> token = moeserve::server::ReadAdminToken(token_file);
      if (!token.ok()) {
        std::cerr << "moeserve frontend: " << token.status().message() << "\n";
        exit_code = 2;
        return;
      }
      cluster.admin_token = *token;
    }
    frontend.create_engine = [&cluster](prometheus::Registry* registry) {
      return moeserve::server::CreateClusterEngine(cluster, registry);
    };
    exit_code = moeserve::server::RunServe(frontend);
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
  std::string logits_expert_weights = "as-stored";
  AddGpuExpertWeightsOption(logits_command, logits_expert_weights);
  std::string logits_dense_weights = "bf16";
  AddGpuDenseWeightsOption(logits_command, logits_dense_weights);
  logits_command->callback([&] {
    exit_code = RunLogits({.model = logits_model,
                           .device = logits_device,
                           .tokens = {},
                           .ep = logits_ep,
                           .parallel = logits_parallel,
                           .gpu_fp8_experts = logits_expert_weights == "as-stored",
                           .gpu_fp8_dense = logits_dense_weights == "as-stored"},
                          logits_tokens, logits_out);
  });

  std::string export_model = "builtin:tiny", export_dir;
  auto* export_command = app.add_subcommand(
      "export", "Write a model's config.json and float32 model.safetensors (Hugging Face layout)");
  export_command->add_option("--model", export_model, "Model (as for serve)")
      ->capture_default_str();
  export_command->add_option("--out", export_dir, "Output folder")->required();
  export_command->callback([&] { exit_code = RunExport(export_model, export_dir); });

  auto* plan_command = app.add_subcommand(
      "plan", "Plan deployments: memory per GPU of an expert-parallel layout, pipeline schedules");
  plan_command->require_subcommand(1);
  moeserve::engine::pipeline::RegisterPlanPipelineCommand(*plan_command, exit_code);
  moeserve::engine::RegisterPlanMemoryCommand(*plan_command, exit_code);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  return exit_code;
}
