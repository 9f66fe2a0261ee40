#include "engine/tools/plan_memory.h"

#include <cmath>
#include <filesystem>
#include <iostream>
#include <memory>
#include <sstream>

#include "CLI/CLI.hpp"
#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "base/bounded_json.h"
#include "base/regular_file.h"
#include "engine/base/status_macros.h"
#include "engine/engine.h"
#include "engine/model/builtin_models.h"
#include "engine/model/hf_config.h"
#include "engine/model/model_size.h"
#include "nlohmann/json.hpp"

namespace moeserve::engine {
namespace {

namespace fs = std::filesystem;

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
constexpr uint64_t kMaxConfigBytes = 16ull << 20;  // as the loader allows

std::string Gib(int64_t bytes) { return absl::StrFormat("%.2f GiB", bytes / kGiB); }

std::string WithCommas(int64_t value) {
  std::string digits = absl::StrCat(value < 0 ? -value : value);
  for (int at = static_cast<int>(digits.size()) - 3; at > 0; at -= 3) digits.insert(at, ",");
  return value < 0 ? "-" + digits : digits;
}

std::string Billions(int64_t parameters) { return absl::StrFormat("%.2f B", parameters / 1e9); }

// The config.json of a folder, or the file itself.
absl::StatusOr<std::pair<nlohmann::json, std::string>> ReadConfig(const std::string& model) {
  std::error_code error;
  fs::path path(model);
  std::string name;
  if (fs::is_directory(path, error)) {
    name =
        path.filename().empty() ? path.parent_path().filename().string() : path.filename().string();
    path /= "config.json";
  } else {
    // A bare config.json is named after its folder, any other file after itself.
    name = path.stem().string();
    if (name == "config" && !path.parent_path().filename().empty()) {
      name = path.parent_path().filename().string();
    }
  }
  if (!fs::exists(path, error)) {
    return absl::NotFoundError(absl::StrCat("--model: no config.json at `", path.string(), "`"));
  }
  ASSIGN_OR_RETURN(const std::string text, base::ReadRegularFile(path.string(), kMaxConfigBytes));
  absl::StatusOr<nlohmann::json> json = base::ParseBoundedJson(text);
  if (!json.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("`", path.string(), "` is not valid JSON: ", json.status().message()));
  }
  return std::make_pair(*std::move(json), name);
}

// The format the checkpoint stores: DeepSeek's FP8 when its quantization_config says so.
WeightFormat CheckpointFormat(const nlohmann::json& config_json, std::string* name) {
  WeightFormat format;
  *name = "bf16";
  auto quantization = config_json.find("quantization_config");
  if (quantization == config_json.end() || !quantization->is_object()) return format;
  auto method = quantization->find("quant_method");
  if (method == quantization->end() || !method->is_string() || method->get<std::string>() != "fp8")
    return format;
  format.kind = WeightFormat::Kind::kFp8BlockScaled;
  *name = "fp8";
  auto block = quantization->find("weight_block_size");
  if (block != quantization->end() && block->is_array() && block->size() == 2 &&
      (*block)[0].is_number_integer() && (*block)[1].is_number_integer() &&
      (*block)[0].get<int64_t>() > 0 && (*block)[1].get<int64_t>() > 0 &&
      (*block)[0].get<int64_t>() <= (1 << 20) && (*block)[1].get<int64_t>() <= (1 << 20)) {
    format.block_rows = (*block)[0].get<int>();
    format.block_cols = (*block)[1].get<int>();
  }
  return format;
}

// Parses the config; a refusal for a reason that does not change the model's size (activation,
// rope type, routing rule) is retried without those fields and noted in `serving_note`.
absl::StatusOr<ModelConfig> ParseForSizing(const nlohmann::json& json, const std::string& name,
                                           std::string* serving_note) {
  absl::StatusOr<ModelConfig> config = ParseModelConfig(json, name);
  if (config.ok()) return config;
  nlohmann::json relaxed = json;
  for (const char* key :
       {"hidden_act", "rope_scaling", "rope_parameters", "scoring_func", "topk_method"}) {
    relaxed.erase(key);
  }
  absl::StatusOr<ModelConfig> retry = ParseModelConfig(relaxed, name);
  if (!retry.ok()) return config.status();
  *serving_note = absl::StrCat("moeserve would refuse to serve this config (",
                               config.status().message(), "); its size does not depend on that");
  return retry;
}

// Fills the per-GPU figures of `plan` for its ep and checks them.
void Evaluate(MemoryPlan& plan) {
  const int physical = plan.config.n_routed_experts + plan.num_redundant_experts;
  plan.expert_slots_per_gpu = physical / plan.ep;
  plan.expert_bytes = static_cast<int64_t>(plan.expert_slots_per_gpu) * plan.size.num_moe_layers *
                      plan.size.routed_expert_bytes;
  const int64_t weights = plan.dense_bytes + plan.expert_bytes;
  plan.kv_bytes = plan.gpu_bytes - weights - plan.reserve_bytes;
  plan.tokens_per_gpu = plan.kv_bytes > 0 ? plan.kv_bytes / plan.kv_bytes_per_token : 0;
  plan.fits = false;
  if (plan.kv_bytes < 0) {
    plan.does_not_fit = absl::StrCat(
        "the weights do not fit: ", Gib(weights), " per GPU (dense ", Gib(plan.dense_bytes),
        " + routed experts ", Gib(plan.expert_bytes), ") and the ", Gib(plan.reserve_bytes),
        " reserve exceed the ", Gib(plan.gpu_bytes), " of a GPU by ", Gib(-plan.kv_bytes));
    return;
  }
  if (plan.tokens_per_gpu < plan.required_tokens_per_gpu) {
    plan.does_not_fit =
        absl::StrCat("the KV cache does not fit: the ", Gib(plan.kv_bytes), " left per GPU hold ",
                     WithCommas(plan.tokens_per_gpu), " tokens, fewer than the ",
                     WithCommas(plan.required_tokens_per_gpu), " required");
    return;
  }
  plan.fits = true;
  plan.does_not_fit.clear();
}

}  // namespace

absl::StatusOr<MemoryPlan> PlanMemory(const PlanMemoryOptions& options) {
  if (options.model.empty()) {
    return absl::InvalidArgumentError(
        "--model is required: a checkpoint folder, a config.json or a built-in model");
  }
  if (options.ep < 1) return absl::InvalidArgumentError("--ep must be a positive integer");
  if (!(options.gpu_memory_gib > 0) || !std::isfinite(options.gpu_memory_gib) ||
      options.gpu_memory_gib > 1e6) {
    return absl::InvalidArgumentError("--gpu-memory-gib must be a positive number of GiB");
  }
  if (!(options.reserve_gib >= 0) || !std::isfinite(options.reserve_gib) ||
      options.reserve_gib > 1e6) {
    return absl::InvalidArgumentError("--reserve-gib must be a number of GiB >= 0");
  }
  if (options.num_redundant_experts < 0) {
    return absl::InvalidArgumentError("--num-redundant-experts must be >= 0");
  }
  if (options.max_tokens_per_gpu < 0) {
    return absl::InvalidArgumentError("--max-tokens-per-gpu must be >= 0");
  }
  MemoryPlan plan;
  plan.kv_dtype = options.kv_dtype;
  int kv_value_bytes = 0;
  if (options.kv_dtype == "bf16") {
    kv_value_bytes = 2;
  } else if (options.kv_dtype == "fp32") {
    kv_value_bytes = 4;
  } else if (options.kv_dtype == "fp8") {
    kv_value_bytes = 1;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--kv-dtype must be bf16, fp32 or fp8, got `", options.kv_dtype, "`"));
  }

  if (absl::StartsWith(options.model, "builtin:")) {
    // A built-in model: its experts are stored as the GPU holds them (FP8 for the -fp8 ones).
    ASSIGN_OR_RETURN(plan.config, BuiltinModelConfig(options.model));
    plan.weight_dtype = "bf16";
    if (plan.config.routed_experts_fp8) {
      plan.format.kind = WeightFormat::Kind::kFp8BlockScaled;
      plan.weight_dtype = "fp8";
    }
  } else {
    ASSIGN_OR_RETURN(const auto config_and_name, ReadConfig(options.model));
    const auto& [json, name] = config_and_name;
    ASSIGN_OR_RETURN(plan.config, ParseForSizing(json, name, &plan.serving_note));
    plan.format = CheckpointFormat(json, &plan.weight_dtype);
  }
  if (plan.config.n_routed_experts <= 0) {
    return absl::InvalidArgumentError("the config has no routed experts to place");
  }
  if (options.dtype == "bf16") {
    plan.format = WeightFormat{};
    plan.weight_dtype = "bf16";
  } else if (options.dtype == "fp8") {
    // A checkpoint stored in bf16 is sized as DeepSeek's FP8 format would store it.
    if (plan.format.kind != WeightFormat::Kind::kFp8BlockScaled) {
      plan.format = WeightFormat{};
      plan.format.kind = WeightFormat::Kind::kFp8BlockScaled;
    }
    plan.weight_dtype = "fp8";
  } else if (!options.dtype.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--dtype must be fp8 or bf16, got `", options.dtype, "`"));
  }
  const int physical = plan.config.n_routed_experts + options.num_redundant_experts;
  if (physical % options.ep != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the ", physical, " expert slots (", plan.config.n_routed_experts, " routed + ",
        options.num_redundant_experts, " redundant) do not divide over --ep ", options.ep,
        " GPUs; every GPU holds the same number of slots"));
  }
  plan.size = ComputeModelSize(plan.config, plan.format);
  if (options.gpu_dense_weights != "bf16" && options.gpu_dense_weights != "as-stored") {
    return absl::InvalidArgumentError(absl::StrCat(
        "--gpu-dense-weights must be bf16 or as-stored, got `", options.gpu_dense_weights, "`"));
  }
  plan.dense_bytes =
      GpuDenseBytes(plan.config, plan.format, options.gpu_dense_weights == "as-stored");
  plan.ep = options.ep;
  plan.num_redundant_experts = options.num_redundant_experts;
  plan.gpu_bytes = static_cast<int64_t>(options.gpu_memory_gib * kGiB);
  plan.reserve_bytes = static_cast<int64_t>(options.reserve_gib * kGiB);
  plan.kv_bytes_per_token = KvCacheBytesPerToken(plan.config, kv_value_bytes);
  plan.required_tokens_per_gpu = options.max_tokens_per_gpu > 0
                                     ? options.max_tokens_per_gpu
                                     : plan.config.max_position_embeddings;
  for (int ep = 1; ep <= physical; ++ep) {
    if (physical % ep != 0) continue;
    MemoryPlan trial = plan;
    trial.ep = ep;
    Evaluate(trial);
    if (trial.fits) {
      plan.smallest_fitting_ep = ep;
      break;
    }
  }
  Evaluate(plan);
  return plan;
}

std::string FormatMemoryPlan(const MemoryPlan& plan) {
  const ModelConfig& c = plan.config;
  const ModelSize& s = plan.size;
  std::ostringstream out;
  out << "model    " << c.name << " (" << c.model_type << "): " << Billions(s.total_parameters)
      << " parameters, " << Billions(s.active_parameters) << " active per token\n";
  out << "         " << c.num_hidden_layers << " layers (" << s.num_moe_layers << " MoE), "
      << c.n_routed_experts << " routed experts (" << c.num_experts_per_tok << " per token)";
  if (c.n_shared_experts > 0) out << ", " << c.n_shared_experts << " shared";
  out << "\n";
  if (!plan.serving_note.empty()) out << "note     " << plan.serving_note << "\n";
  const int64_t all_weights =
      s.dense_bytes + s.routed_expert_bytes * s.num_moe_layers * c.n_routed_experts;
  if (plan.format.kind == WeightFormat::Kind::kFp8BlockScaled) {
    out << "weights  fp8, " << Gib(all_weights) << " in all: e4m3 projection matrices with an fp32 "
        << "scale per " << plan.format.block_rows << "x" << plan.format.block_cols << " block;\n"
        << "         embeddings, LM head, routers and norms in bf16; served with the routed\n"
        << "         experts in fp8 and the dense weights in "
        << (plan.dense_bytes < 2 * s.dense_parameters ? "fp8 where the GPU runs them so" : "bf16")
        << "\n";
  } else {
    out << "weights  bf16, " << Gib(all_weights) << " in all\n";
  }
  out << "layout   EP" << plan.ep << ", " << plan.num_redundant_experts
      << " redundant experts: " << plan.expert_slots_per_gpu
      << (plan.expert_slots_per_gpu == 1 ? " expert slot" : " expert slots")
      << " per GPU in each MoE layer ((" << c.n_routed_experts << " + "
      << plan.num_redundant_experts << ") / " << plan.ep << ")\n";
  out << "per GPU  " << Gib(plan.gpu_bytes) << "\n";
  auto row = [&](const std::string& what, const std::string& value, const std::string& note) {
    out << absl::StrFormat("  %-34s %12s   %s\n", what, value, note);
  };
  row("dense weights (on every GPU)", Gib(plan.dense_bytes),
      s.dense_bytes != plan.dense_bytes
          ? absl::StrCat("as served (", Gib(s.dense_bytes),
                         " as stored): embeddings, attention, dense MLPs, shared experts, "
                         "routers, norms")
          : "embeddings, attention, dense MLPs, shared experts, routers, norms");
  row(absl::StrCat("routed experts (", plan.expert_slots_per_gpu, " x ", s.num_moe_layers,
                   " layers)"),
      Gib(plan.expert_bytes),
      absl::StrFormat("%.2f MiB per expert and layer", s.routed_expert_bytes / 1048576.0));
  row("reserve", Gib(plan.reserve_bytes),
      "--reserve-gib: activations, workspaces, NCCL buffers, staging");
  const std::string kv_shape =
      c.uses_mla() ? absl::StrCat("MLA, (", c.kv_lora_rank, " + ", c.qk_rope_head_dim,
                                  ") values x ", c.num_hidden_layers, " layers")
                   : absl::StrCat("GQA, 2 x ", c.num_key_value_heads, " heads x ", c.head_dim,
                                  " values x ", c.num_hidden_layers, " layers");
  const std::string per_token = absl::StrFormat(
      "%s bytes per token in %s: %s", WithCommas(plan.kv_bytes_per_token), plan.kv_dtype, kv_shape);
  row("KV cache", plan.kv_bytes >= 0 ? Gib(plan.kv_bytes) : "none",
      plan.kv_bytes >= 0 ? per_token : absl::StrCat("over by ", Gib(-plan.kv_bytes)));
  row("tokens that fit", WithCommas(plan.tokens_per_gpu),
      absl::StrCat("per GPU; ", WithCommas(plan.tokens_per_gpu * plan.ep), " over the ", plan.ep,
                   plan.ep == 1 ? " GPU" : " GPUs"));
  if (plan.fits) {
    out << "fits     " << WithCommas(plan.tokens_per_gpu)
        << " tokens per GPU >= " << WithCommas(plan.required_tokens_per_gpu) << " required\n";
  } else {
    out << "DOES NOT FIT: " << plan.does_not_fit << "\n";
  }
  if (plan.smallest_fitting_ep > 0) {
    out << "fewest GPUs that fit with these settings: EP" << plan.smallest_fitting_ep << "\n";
  } else {
    out << "no EP size up to " << c.n_routed_experts + plan.num_redundant_experts
        << " fits with these settings\n";
  }
  return out.str();
}

void RegisterPlanMemoryCommand(CLI::App& plan_command, int& exit_code) {
  // The callback runs after parsing, so the options must outlive this function.
  auto options = std::make_shared<PlanMemoryOptions>();
  CLI::App* memory = plan_command.add_subcommand(
      "memory",
      "Size an expert-parallel layout from config.json: per GPU the dense weights, the routed "
      "experts, the KV cache and the tokens that fit; exits 0 when it fits, 1 when not");
  memory
      ->add_option("--model", options->model,
                   "A checkpoint folder, its config.json, or a built-in model (builtin:NAME)")
      ->type_name("DIR|CONFIG_JSON|builtin:NAME");
  memory->add_option("--ep", options->ep, "GPUs in the expert-parallel group")->type_name("N");
  memory
      ->add_option("--gpu-memory-gib", options->gpu_memory_gib,
                   "Memory one GPU can allocate, in GiB (e.g. 78 for an H100 80GB, 139 for "
                   "an H200)")
      ->type_name("G");
  memory
      ->add_option("--dtype", options->dtype,
                   "Weights: fp8 (DeepSeek-V3's e4m3 with 128x128 block scales) or bf16 "
                   "(default: the checkpoint's); dense weights count as GPUs hold them "
                   "(--gpu-dense-weights)")
      ->type_name("fp8|bf16");
  memory
      ->add_option("--gpu-dense-weights", options->gpu_dense_weights,
                   "How GPUs hold an FP8 model's dense projections, as serve's option: bf16 "
                   "(default) or as-stored (FP8 where the GPU backend runs them in FP8)")
      ->type_name("bf16|as-stored");
  memory
      ->add_option("--num-redundant-experts", options->num_redundant_experts,
                   "Extra expert slots per MoE layer (EPLB replicas)")
      ->type_name("R");
  memory->add_option("--kv-dtype", options->kv_dtype, "KV cache values: bf16, fp32 or fp8")
      ->type_name("bf16|fp32|fp8");
  memory
      ->add_option("--max-tokens-per-gpu", options->max_tokens_per_gpu,
                   "KV cache tokens each GPU must hold (default: one request of the model's "
                   "full context)")
      ->type_name("T");
  memory
      ->add_option("--reserve-gib", options->reserve_gib,
                   "GiB kept free per GPU for activations and workspaces (default 4)")
      ->type_name("GIB");
  memory->callback([options, &exit_code] {
    absl::StatusOr<MemoryPlan> plan = PlanMemory(*options);
    if (!plan.ok()) {
      std::cerr << "moeserve plan memory: " << plan.status().message() << "\n"
                << "run 'moeserve plan memory --help' for the options\n";
      exit_code = 2;
      return;
    }
    std::cout << FormatMemoryPlan(*plan) << std::flush;
    if (!plan->fits) {
      std::cerr << "moeserve plan memory: " << plan->does_not_fit << "\n";
      exit_code = 1;
    }
  });
}

}  // namespace moeserve::engine
