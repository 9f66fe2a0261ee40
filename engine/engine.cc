#include "engine/engine.h"

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace moeserve::engine {

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(std::shared_ptr<const Model> model,
                                                       std::shared_ptr<const Tokenizer> tokenizer,
                                                       EngineOptions options,
                                                       prometheus::Registry* registry) {
  if (options.max_batch_tokens < 1 || options.max_running_requests < 1 || options.max_queue < 0 ||
      options.kv_block_size < 1) {
    return absl::InvalidArgumentError(
        "engine: max-batch-tokens, max-running-requests and the KV block size must be >= 1 and "
        "max-queue >= 0");
  }
  const ParallelOptions& p = options.parallel;
  if (p.decode_ep < 1 || p.prefill_ep < 0 || p.num_redundant_experts < 0) {
    return absl::InvalidArgumentError(
        "engine: --ep/--decode-ep must be >= 1, --prefill-ep >= 0, --num-redundant-experts >= 0");
  }
  if (options.backend.factory && p.prefill_ep > 0) {
    // The prefill-to-decode KV handoff copies host rows; a GPU backend keeps its rows on the
    // device.
    return absl::InvalidArgumentError(absl::StrCat(
        "engine: --prefill-ep/--decode-ep disaggregation runs on the CPU only; use --ep N with "
        "--device ",
        options.backend.name));
  }
  if (!(p.collective_timeout_seconds > 0) || p.collective_timeout_seconds > 86400) {
    return absl::InvalidArgumentError(
        "engine: the collective timeout must be more than 0 and at most 86400 seconds");
  }
  if (model->config().n_routed_experts == 0 && p.num_redundant_experts > 0) {
    return absl::InvalidArgumentError("engine: the model has no routed experts to replicate");
  }
  // Every running request decodes one token per step, so they must fit in one step.
  options.max_running_requests = std::min(options.max_running_requests, options.max_batch_tokens);
  auto engine = std::unique_ptr<Engine>(
      new Engine(std::move(model), std::move(tokenizer), std::move(options), registry));
  if (auto status = engine->Start(); !status.ok()) return status;
  return engine;
}

Engine::Engine(std::shared_ptr<const Model> model, std::shared_ptr<const Tokenizer> tokenizer,
               EngineOptions options, prometheus::Registry* registry)
    : model_(std::move(model)),
      tokenizer_(std::move(tokenizer)),
      options_(std::move(options)),
      metrics_(registry != nullptr ? EngineMetrics(*registry) : EngineMetrics()),
      registry_(registry) {
  context_.model = model_.get();
  context_.tokenizer = tokenizer_.get();
  context_.metrics = &metrics_;
  context_.max_batch_tokens = options_.max_batch_tokens;
  context_.max_running_requests = options_.max_running_requests;
  context_.min_step_seconds = options_.min_step_seconds;
  context_.stop_requested = &stop_requested_;
  context_.hand_off = [this](std::unique_ptr<Sequence> sequence) { HandOff(std::move(sequence)); };
  context_.publish_state = [this] { PublishState(); };
  context_.injected_fault = options_.injected_fault;
  if (!options_.parallel.trace_dir.empty()) {
    trace_ = std::make_unique<TraceRecorder>();
    context_.trace_steps = options_.parallel.trace_steps;
    context_.trace_skip_steps = options_.parallel.trace_skip_steps;
    context_.trace_complete = [this] { (void)WriteTrace(); };
  }
}

absl::StatusOr<Engine::WorkerGroup> Engine::BuildGroup(const std::string& name, int size,
                                                       GroupRole role, int trace_pid_offset,
                                                       prometheus::Registry* registry) {
  const ModelConfig& c = model_->config();
  const ParallelOptions& p = options_.parallel;
  const int num_logical = std::max(c.n_routed_experts, 1);
  const int num_physical = num_logical + p.num_redundant_experts;
  absl::StatusOr<ExpertPlacement> placement =
      p.placement_file.empty() ? absl::StatusOr<ExpertPlacement>(ExpertPlacement::Default(
                                     c.num_moe_layers(), num_logical, num_physical))
                               : ExpertPlacement::LoadJsonFile(p.placement_file, c.num_moe_layers(),
                                                               num_logical, num_physical);
  if (!placement.ok()) return placement.status();
  parallel::GroupOptions group_options;
  group_options.name = name;
  group_options.size = size;
  group_options.two_batch_overlap = p.two_batch_overlap;
  group_options.overlap_min_tokens = p.overlap_min_tokens;
  group_options.expert_load_metrics = p.expert_load_metrics;
  group_options.stage_host_expert_weights = !options_.backend.factory;
  group_options.collective_timeout = std::chrono::milliseconds(
      static_cast<int64_t>(std::ceil(p.collective_timeout_seconds * 1000)));
  auto group = parallel::ExpertParallelGroup::Create(*model_, group_options, std::move(*placement),
                                                     registry, trace_.get(), trace_pid_offset);
  if (!group.ok()) return group.status();
  (*group)->SetFailureListener([this, name](const absl::Status& failure) {
    std::function<void(const GroupHealth&)> listener;
    {
      std::lock_guard lock(listener_mutex_);
      listener = failure_listener_;
    }
    if (listener) listener({name, failure});
    PublishState();
  });
  const int64_t bytes_per_block = static_cast<int64_t>(c.num_hidden_layers) *
                                  options_.kv_block_size * model_->kv_row_dim() *
                                  options_.backend.kv_element_bytes;
  const int64_t kv_blocks = options_.kv_cache_bytes / bytes_per_block;
  if (kv_blocks < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "engine: the KV cache budget of ", options_.kv_cache_bytes,
        " bytes per rank holds no block (one block needs ", bytes_per_block, " bytes)"));
  }
  WorkerGroup result;
  result.group = std::move(*group);
  for (int rank = 0; rank < size; ++rank) {
    absl::StatusOr<std::unique_ptr<RankBackend>> backend =
        MakeRankBackend(options_.backend.factory, {.model = model_.get(),
                                                   .group = result.group.get(),
                                                   .rank = rank,
                                                   .kv_blocks = static_cast<int>(kv_blocks),
                                                   .kv_block_size = options_.kv_block_size,
                                                   .max_batch_tokens = options_.max_batch_tokens});
    if (!backend.ok()) return backend.status();
    result.workers.push_back(std::make_unique<RankWorker>(
        context_, *result.group, rank, role, static_cast<int>(kv_blocks), options_.kv_block_size,
        std::move(*backend)));
  }
  return result;
}

absl::Status Engine::Start() {
  const ParallelOptions& p = options_.parallel;
  if (p.prefill_ep > 0) {
    auto prefill = BuildGroup("prefill", p.prefill_ep, GroupRole::kPrefill, 0, registry_);
    if (!prefill.ok()) return prefill.status();
    auto decode = BuildGroup("decode", p.decode_ep, GroupRole::kDecode, 1000, registry_);
    if (!decode.ok()) return decode.status();
    groups_.push_back(std::move(*prefill));
    groups_.push_back(std::move(*decode));
  } else {
    auto mixed = BuildGroup("mixed", p.decode_ep, GroupRole::kMixed, 0, registry_);
    if (!mixed.ok()) return mixed.status();
    groups_.push_back(std::move(*mixed));
  }
  if (options_.injected_fault.has_value() && group(options_.injected_fault->group) == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("--inject-fault names group `",
                                                   options_.injected_fault->group,
                                                   "`, which this layout does not have"));
  }
  for (auto& group : groups_) {
    for (auto& worker : group.workers) worker->Start();
  }
  PublishState();
  return absl::OkStatus();
}

Engine::~Engine() { Shutdown(); }

std::vector<parallel::ExpertParallelGroup*> Engine::groups() const {
  std::vector<parallel::ExpertParallelGroup*> result;
  for (const auto& g : groups_) result.push_back(g.group.get());
  return result;
}

parallel::ExpertParallelGroup* Engine::group(const std::string& name) const {
  for (const auto& g : groups_) {
    if (g.group->name() == name) return g.group.get();
  }
  return nullptr;
}

void Engine::StopAccepting() {
  std::lock_guard lock(submit_mutex_);
  accepting_ = false;
}

void Engine::Shutdown() {
  {
    std::lock_guard lock(submit_mutex_);
    accepting_ = false;
    if (shut_down_) return;
    shut_down_ = true;
  }
  stop_requested_ = true;
  for (auto& group : groups_) group.group->NotifyWork();
  for (auto& group : groups_) {
    for (auto& worker : group.workers) worker->Join();
  }
  // Sequences handed to a decode rank after it stopped, or never admitted.
  for (auto& group : groups_) {
    for (auto& worker : group.workers) worker->AbortQueued();
  }
  PublishState();
  if (trace_ != nullptr) (void)WriteTrace();
}

absl::Status Engine::WriteTrace() const {
  if (trace_ == nullptr) return absl::OkStatus();
  std::error_code error;
  std::filesystem::create_directories(options_.parallel.trace_dir, error);
  return trace_->WriteJson(options_.parallel.trace_dir + "/moeserve-trace.json");
}

std::vector<GroupHealth> Engine::Health() const {
  std::vector<GroupHealth> result;
  for (const auto& g : groups_) result.push_back({g.group->name(), g.group->health()});
  return result;
}

void Engine::SetGroupFailureListener(std::function<void(const GroupHealth&)> listener) {
  std::lock_guard lock(listener_mutex_);
  failure_listener_ = std::move(listener);
}

EngineStats Engine::Stats() const {
  EngineStats stats;
  for (const auto& group : groups_) {
    for (const auto& worker : group.workers) {
      stats.running += worker->running();
      stats.waiting += worker->queued();
      stats.kv_blocks_total += worker->kv_blocks_total();
      stats.kv_blocks_free += worker->kv_blocks_free();
    }
  }
  return stats;
}

void Engine::PublishState() {
  const EngineStats stats = Stats();
  metrics_.SetQueueState(
      stats.running, stats.waiting,
      stats.kv_blocks_total > 0
          ? 1.0 - static_cast<double>(stats.kv_blocks_free) / stats.kv_blocks_total
          : 0.0);
}

RankWorker& Engine::LeastLoaded(const WorkerGroup& group) {
  // Fewest running + queued sequences; ties go to the rank with more free KV blocks.
  RankWorker* best = group.workers.front().get();
  for (const auto& worker : group.workers) {
    if (worker->load() < best->load() ||
        (worker->load() == best->load() && worker->kv_blocks_free() > best->kv_blocks_free())) {
      best = worker.get();
    }
  }
  return *best;
}

void Engine::HandOff(std::unique_ptr<Sequence> sequence) {
  LeastLoaded(groups_.back()).Enqueue(std::move(sequence));
}

absl::Status Engine::Validate(GenerationInput& in) const {
  const ModelConfig& c = config();
  const int context = c.max_position_embeddings;
  if (in.request_id.size() > static_cast<size_t>(options_.max_request_id_bytes)) {
    return absl::InvalidArgumentError(
        absl::StrCat("request_id is longer than ", options_.max_request_id_bytes, " bytes"));
  }
  if (in.text.has_value()) {
    if (in.text->empty()) return absl::InvalidArgumentError("text is empty: give a prompt");
    if (tokenizer_ == nullptr) {
      return absl::InvalidArgumentError(
          "this model has no tokenizer: send token_ids instead of text");
    }
    // No tokenizer produces fewer tokens than bytes/8; refuse absurd sizes before tokenizing.
    if (in.text->size() > static_cast<size_t>(context) * 8) {
      return absl::InvalidArgumentError(absl::StrCat("text is ", in.text->size(),
                                                     " bytes, far beyond the context length of ",
                                                     context, " tokens"));
    }
    in.prompt_tokens = tokenizer_->Encode(*in.text);
  } else if (in.prompt_tokens.empty()) {
    return absl::InvalidArgumentError(
        "the request has no input: set `text` or a non-empty `token_ids`");
  }
  const int prompt = static_cast<int>(in.prompt_tokens.size());
  for (int i = 0; i < prompt; ++i) {
    if (in.prompt_tokens[i] < 0 || in.prompt_tokens[i] >= c.vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("token_ids[", i, "] = ", static_cast<uint32_t>(in.prompt_tokens[i]),
                       " is out of range: the vocabulary has ", c.vocab_size, " tokens"));
    }
  }
  if (prompt >= context) {
    return absl::InvalidArgumentError(absl::StrCat("the prompt has ", prompt,
                                                   " tokens; the context length is ", context,
                                                   " (prompt + max_tokens must fit)"));
  }
  if (in.max_tokens < 1) return absl::InvalidArgumentError("max_tokens must be at least 1");
  if (in.max_tokens > context) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_tokens = ", in.max_tokens, " exceeds the context length of ", context));
  }
  if (prompt + in.max_tokens > context) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt (", prompt, " tokens) + max_tokens (", in.max_tokens,
                     ") = ", prompt + in.max_tokens, " exceeds the context length of ", context,
                     "; lower max_tokens to at most ", context - prompt));
  }
  const SamplingOptions& s = in.sampling;
  if (!std::isfinite(s.temperature) || s.temperature < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampling.temperature must be a finite number >= 0, got ", s.temperature));
  }
  if (!std::isfinite(s.top_p) || s.top_p < 0 || s.top_p > 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampling.top_p must be in [0, 1], got ", s.top_p));
  }
  if (s.top_k < 0) return absl::InvalidArgumentError("sampling.top_k must be >= 0");
  if (in.stop.size() > static_cast<size_t>(options_.max_stop_strings)) {
    return absl::InvalidArgumentError(
        absl::StrCat("at most ", options_.max_stop_strings, " stop strings are allowed"));
  }
  for (const std::string& stop : in.stop) {
    if (stop.empty() || stop.size() > static_cast<size_t>(options_.max_stop_string_bytes)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "stop strings must be 1 to ", options_.max_stop_string_bytes, " bytes long"));
    }
  }
  if (!in.stop.empty() && tokenizer_ == nullptr) {
    return absl::InvalidArgumentError("stop strings need a tokenizer; use stop_token_ids");
  }
  for (int32_t id : in.stop_token_ids) {
    if (id < 0 || id >= c.vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("stop_token_ids has ", static_cast<uint32_t>(id),
                       ", out of range: the vocabulary has ", c.vocab_size, " tokens"));
    }
  }
  int smallest_rank_blocks = 0;
  for (const auto& group : groups_) {
    for (const auto& worker : group.workers) {
      if (smallest_rank_blocks == 0 || worker->kv_blocks_total() < smallest_rank_blocks) {
        smallest_rank_blocks = worker->kv_blocks_total();
      }
    }
  }
  const int blocks_needed =
      (prompt + in.max_tokens + options_.kv_block_size - 1) / options_.kv_block_size;
  if (blocks_needed > smallest_rank_blocks) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt + max_tokens needs ", blocks_needed, " KV cache blocks but a rank's cache has ",
        smallest_rank_blocks, "; lower max_tokens or raise --kv-cache-mib"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<RequestStream>> Engine::Submit(GenerationInput input) {
  if (absl::Status status = Validate(input); !status.ok()) {
    metrics_.RequestFinished("invalid_argument");
    return status;
  }
  auto sequence = std::make_unique<Sequence>();
  sequence->arrival = Sequence::Clock::now();
  if (input.request_id.empty()) {
    input.request_id = absl::StrCat("req-", next_request_number_.fetch_add(1));
  }
  sequence->stream = std::make_shared<RequestStream>(input.request_id);
  sequence->tokens = input.prompt_tokens;
  sequence->prompt_length = static_cast<int>(input.prompt_tokens.size());
  sequence->sampler = std::make_unique<Sampler>(input.sampling);
  sequence->input = std::move(input);
  std::shared_ptr<RequestStream> stream = sequence->stream;
  {
    std::lock_guard lock(submit_mutex_);
    if (!accepting_) {
      metrics_.RequestFinished("unavailable");
      return absl::UnavailableError("the server is shutting down and accepts no new requests");
    }
    // Every group a request passes through must serve (the entry group, and the decode group a
    // prefill group hands it to).
    for (const auto& group : groups_) {
      if (absl::Status health = group.group->health(); !health.ok()) {
        metrics_.RequestFinished("unavailable");
        return health;
      }
    }
    int queued = 0;
    for (const auto& group : groups_) {
      for (const auto& worker : group.workers) queued += worker->queued();
    }
    if (queued >= options_.max_queue) {
      metrics_.RequestFinished("queue_full");
      return absl::ResourceExhaustedError(absl::StrCat(
          "the waiting queue is full (", options_.max_queue, " requests); retry later"));
    }
    LeastLoaded(groups_.front()).Enqueue(std::move(sequence));
  }
  PublishState();
  return stream;
}

}  // namespace moeserve::engine
