// moeserve: the command-line entry point (serve, logits, export, plan).
#include <iostream>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "engine/engine.h"
#include "engine/pipeline/plan_command.h"
#include "server/npy_writer.h"
#include "server/serve.h"

namespace {

void AddDeviceOption(CLI::App* command, std::string& device) {
  command
      ->add_option("--device", device,
                   "Where ranks compute: cpu (fp32), or cuda (bf16; rank r on GPU r, MLA models)")
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

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "moeserve: serves DeepSeek-style Mixture-of-Experts models over gRPC with expert "
      "parallelism"};
  app.require_subcommand(1);
  int exit_code = 0;

  moeserve::server::ServeOptions serve;
  int64_t kv_cache_mib = serve.engine.kv_cache_bytes >> 20;  // per rank
  auto* serve_command = app.add_subcommand(
      "serve",
      "Serve a model: gRPC (moeserve.v1.Generation and the KServe v2 / Triton inference "
      "protocol on --port) and the OpenAI API over HTTP (--http-port)");
  serve_command
      ->add_option(
          "--model", serve.engine.model,
          "Model to serve: builtin:tiny, builtin:tiny-nolora, builtin:tiny-v2, builtin:tiny-e256, "
          "builtin:v3-bench (GPU only), or a Hugging Face checkpoint folder")
      ->capture_default_str();
  serve_command->add_option("--host", serve.host, "Address the gRPC port binds")
      ->capture_default_str();
  serve_command
      ->add_option("--port", serve.port,
                   "gRPC port: moeserve.v1.Generation and the KServe v2 inference service (0: "
                   "pick a free one)")
      ->capture_default_str()
      ->check(CLI::Range(0, 65535));
  AddTlsServerOptions(serve_command, "", "the gRPC port", serve.tls);
  serve_command->add_option("--metrics-host", serve.metrics_host,
                            "Address the /metrics port (plain HTTP) binds (default: --host)");
  serve_command
      ->add_option("--metrics-port", serve.metrics_port,
                   "Prometheus /metrics port (0: pick a free one, -1: off)")
      ->capture_default_str()
      ->check(CLI::Range(-1, 65535));
  serve_command
      ->add_option("--http-port", serve.http_port,
                   "OpenAI-compatible HTTP port: /v1/completions, /v1/chat/completions, "
                   "/v1/models, /health (0: pick a free one, -1: off)")
      ->capture_default_str()
      ->check(CLI::Range(-1, 65535));
  serve_command->add_option("--http-host", serve.http_host,
                            "Address the OpenAI HTTP port (plain HTTP) binds (default: --host)");
  serve_command
      ->add_option("--chat-template", serve.chat_template_file,
                   "Jinja chat template for /v1/chat/completions, instead of the model's own "
                   "(tokenizer_config.json's chat_template)")
      ->check(CLI::ExistingFile);
  serve_command
      ->add_option("--http-max-connections", serve.http_max_connections,
                   "HTTP connections served at once (each holds a worker thread); more wait")
      ->capture_default_str()
      ->check(CLI::Range(1, 100000));
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
                   "On SIGTERM, SIGINT or SIGHUP, how long in-flight streams may take to finish "
                   "(a second signal stops at once)")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 86400.0));
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
  std::string placement_staging = "background";
  serve_command
      ->add_option("--gpu-placement-staging", placement_staging,
                   "How GPU ranks apply a new expert placement: background (stage the changed "
                   "slots in spare GPU memory while serving, swap at the commit) or in-step "
                   "(write them during the committing step: no spare memory, one slow step)")
      ->capture_default_str()
      ->check(CLI::IsMember({"background", "in-step"}));
  serve_command->add_flag("!--no-expert-metrics", serve.engine.parallel.expert_load_metrics,
                          "Do not export the per (layer, expert) token counters");
  serve_command
      ->add_option("--admin-token-file", serve.admin_token_file,
                   "Serve the Admin API (placements, expert load), authenticated with the bearer "
                   "token in this file (at least 32 varied characters, not a placeholder: e.g. "
                   "`openssl rand -hex 32`); without it or --admin-tls-client-ca the Admin API is "
                   "off")
      ->check(CLI::ExistingFile);
  serve_command->add_option("--admin-host", serve.admin_host,
                            "Address the Admin API's own port binds (default: --host)");
  serve_command
      ->add_option("--admin-port", serve.admin_port,
                   "Serve the Admin API on this port of its own, over TLS only (--admin-tls-cert/"
                   "--admin-tls-key, default --tls-cert/--tls-key); clients authenticate with the "
                   "token, a client certificate (--admin-tls-client-ca) or both (0: pick a free "
                   "port; -1: on the gRPC port)")
      ->capture_default_str()
      ->check(CLI::Range(-1, 65535));
  AddTlsServerOptions(serve_command, "admin-", "the Admin API's own port", serve.admin_tls);
  // Hidden: for tests of signals during start-up only.
  serve_command
      ->add_option("--inject-load-delay-seconds", serve.inject_load_delay_seconds,
                   "Wait this long before loading the model")
      ->group("");
  serve_command->footer(
      "Signals: SIGTERM, SIGINT or SIGHUP while the model loads stop before serving (exit 0). "
      "Once serving, the first drains: health turns NOT_SERVING, new requests get UNAVAILABLE, "
      "running streams get --shutdown-grace-seconds to finish, then the rest end with "
      "UNAVAILABLE (exit 0). A second signal during the drain stops at once: running streams "
      "end with UNAVAILABLE (exit 1). SIGUSR1 and SIGUSR2 are ignored. Exit 1 also when "
      "start-up fails (a port in use, a bad file or model).");
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
    serve.engine.device = serve_device;
    if (auto status = moeserve::engine::CheckModelRunsOn(serve.engine.model, serve_device);
        !status.ok()) {
      std::cerr << "moeserve serve: " << status.message() << "\n";
      exit_code = 2;
      return;
    }
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
    serve.engine.parallel.background_placement_staging = placement_staging == "background";
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
    exit_code = RunLogits({.model = logits_model,
                           .device = logits_device,
                           .tokens = {},
                           .ep = logits_ep,
                           .parallel = logits_parallel},
                          logits_tokens, logits_out);
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
