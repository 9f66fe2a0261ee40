#include "engine/engine.h"

#include <algorithm>
#include <cmath>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/backend/cpu_ops.h"
#include "engine/runtime/sampler.h"

namespace moeserve::engine {

// A request inside the engine: its tokens, KV blocks, sampler and output state.
struct Engine::Sequence {
  GenerationInput input;
  std::shared_ptr<RequestStream> stream;
  std::vector<int32_t> tokens;        // prompt, then generated tokens
  int prompt_length = 0;
  int num_cached = 0;                 // tokens whose KV rows are in the cache
  std::vector<int32_t> blocks;        // reserved for prompt + max_tokens at admission
  std::unique_ptr<Sampler> sampler;
  Utf8StreamDecoder decoder;
  std::string held_text;              // text that may be the start of a stop string
  size_t longest_stop = 0;
  int generated = 0;
  Clock::time_point arrival, prefill_start, first_token, last_token;
};

namespace {

double Seconds(std::chrono::steady_clock::duration d) {
  return std::chrono::duration<double>(d).count();
}

const char* StatusLabel(FinishReason reason) {
  switch (reason) {
    case FinishReason::kLength: return "length";
    case FinishReason::kStop: return "stop";
    case FinishReason::kContextLength: return "context_length";
    case FinishReason::kCancelled: return "cancelled";
    case FinishReason::kAborted: return "aborted";
    case FinishReason::kNone: break;
  }
  return "unknown";
}

// Length of the longest suffix of `text` that is a proper prefix of one of `stops`.
size_t StopPrefixSuffix(const std::string& text, const std::vector<std::string>& stops) {
  size_t best = 0;
  for (const std::string& stop : stops) {
    for (size_t k = std::min(text.size(), stop.size() - 1); k > best; --k) {
      if (text.compare(text.size() - k, k, stop, 0, k) == 0) {
        best = k;
        break;
      }
    }
  }
  return best;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(std::shared_ptr<const Model> model,
                                                       std::shared_ptr<const Tokenizer> tokenizer,
                                                       EngineOptions options,
                                                       EngineMetrics metrics) {
  if (options.max_batch_tokens < 1 || options.max_running_requests < 1 || options.max_queue < 0 ||
      options.kv_block_size < 1) {
    return absl::InvalidArgumentError(
        "engine: max-batch-tokens, max-running-requests and the KV block size must be >= 1 and "
        "max-queue >= 0");
  }
  // Every running request decodes one token per step, so they must fit in one step.
  options.max_running_requests = std::min(options.max_running_requests, options.max_batch_tokens);
  const int64_t bytes_per_block = static_cast<int64_t>(model->config().num_hidden_layers) *
                                  options.kv_block_size * model->kv_row_dim() * sizeof(float);
  const int64_t num_blocks = options.kv_cache_bytes / bytes_per_block;
  if (num_blocks < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "engine: the KV cache budget of ", options.kv_cache_bytes, " bytes holds no block (one block needs ",
        bytes_per_block, " bytes)"));
  }
  return std::unique_ptr<Engine>(new Engine(std::move(model), std::move(tokenizer), options,
                                            std::move(metrics), static_cast<int>(num_blocks)));
}

Engine::Engine(std::shared_ptr<const Model> model, std::shared_ptr<const Tokenizer> tokenizer,
               EngineOptions options, EngineMetrics metrics, int num_blocks)
    : model_(std::move(model)),
      tokenizer_(std::move(tokenizer)),
      options_(options),
      metrics_(std::move(metrics)),
      cache_(model_->config().num_hidden_layers, num_blocks, options.kv_block_size,
             model_->kv_row_dim()) {
  free_blocks_ = cache_.allocator().num_free();
  PublishState();
  loop_ = std::thread([this] { Loop(); });
}

Engine::~Engine() { Shutdown(); }

void Engine::StopAccepting() {
  std::lock_guard lock(mutex_);
  accepting_ = false;
}

void Engine::Shutdown() {
  {
    std::lock_guard lock(mutex_);
    accepting_ = false;
    stopping_ = true;
  }
  work_available_.notify_all();
  if (loop_.joinable()) loop_.join();
}

EngineStats Engine::Stats() const {
  EngineStats stats;
  {
    std::lock_guard lock(mutex_);
    stats.waiting = static_cast<int>(waiting_.size());
  }
  stats.running = running_count_.load();
  stats.kv_blocks_total = cache_.allocator().num_total();
  stats.kv_blocks_free = free_blocks_.load();
  stats.finished = finished_.load();
  stats.steps = steps_.load();
  return stats;
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
    // A byte-level tokenizer never produces fewer tokens than bytes/8; refuse absurd sizes
    // before tokenizing them.
    if (in.text->size() > static_cast<size_t>(context) * 8) {
      return absl::InvalidArgumentError(absl::StrCat(
          "text is ", in.text->size(), " bytes, far beyond the context length of ", context,
          " tokens"));
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
  if (in.max_tokens < 1) {
    return absl::InvalidArgumentError("max_tokens must be at least 1");
  }
  if (in.max_tokens > context) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_tokens = ", in.max_tokens, " exceeds the context length of ", context));
  }
  if (prompt + in.max_tokens > context) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt (", prompt, " tokens) + max_tokens (", in.max_tokens, ") = ",
        prompt + in.max_tokens, " exceeds the context length of ", context,
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
      return absl::InvalidArgumentError(absl::StrCat(
          "stop_token_ids has ", static_cast<uint32_t>(id), ", out of range: the vocabulary has ",
          c.vocab_size, " tokens"));
    }
  }
  const int blocks_needed = cache_.BlocksFor(prompt + in.max_tokens);
  if (blocks_needed > cache_.allocator().num_total()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt + max_tokens needs ", blocks_needed, " KV cache blocks but the whole cache has ",
        cache_.allocator().num_total(), "; lower max_tokens or raise --kv-cache-mib"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<RequestStream>> Engine::Submit(GenerationInput input) {
  if (absl::Status status = Validate(input); !status.ok()) {
    metrics_.RequestFinished("invalid_argument");
    return status;
  }
  auto sequence = std::make_unique<Sequence>();
  sequence->arrival = Clock::now();
  if (input.request_id.empty()) {
    input.request_id = absl::StrCat("req-", next_request_number_.fetch_add(1));
  }
  sequence->stream = std::make_shared<RequestStream>(input.request_id);
  sequence->tokens = input.prompt_tokens;
  sequence->prompt_length = static_cast<int>(input.prompt_tokens.size());
  sequence->sampler = std::make_unique<Sampler>(input.sampling);
  for (const auto& stop : input.stop) sequence->longest_stop = std::max(sequence->longest_stop, stop.size());
  sequence->input = std::move(input);
  std::shared_ptr<RequestStream> stream = sequence->stream;
  {
    std::lock_guard lock(mutex_);
    if (!accepting_) {
      metrics_.RequestFinished("unavailable");
      return absl::UnavailableError("the server is shutting down and accepts no new requests");
    }
    if (waiting_.size() >= static_cast<size_t>(options_.max_queue)) {
      metrics_.RequestFinished("queue_full");
      return absl::ResourceExhaustedError(absl::StrCat(
          "the waiting queue is full (", options_.max_queue, " requests); retry later"));
    }
    waiting_.push_back(std::move(sequence));
    metrics_.SetQueueState(running_count_.load(), static_cast<int>(waiting_.size()),
                           1.0 - static_cast<double>(free_blocks_.load()) /
                                     cache_.allocator().num_total());
  }
  work_available_.notify_one();
  return stream;
}

void Engine::Loop() {
  cpu::ConfigureBlasThreads(1);
  while (true) {
    {
      std::unique_lock lock(mutex_);
      if (stopping_) break;
      if (running_.empty()) {
        // Idle: wait for work (with a timeout so cancelled waiting requests are noticed).
        work_available_.wait_for(lock, std::chrono::milliseconds(50));
        if (stopping_) break;
      }
    }
    Step();
  }
  // Abort what is left.
  std::deque<std::unique_ptr<Sequence>> waiting;
  {
    std::lock_guard lock(mutex_);
    waiting.swap(waiting_);
  }
  for (auto& seq : waiting) running_.push_back(std::move(seq));
  for (auto& seq : running_) {
    GenerationOutput output;
    Finish(*seq, FinishReason::kAborted, std::move(output));
  }
  running_.clear();
  running_count_ = 0;
  PublishState();
}

void Engine::AdmitWaiting() {
  std::lock_guard lock(mutex_);
  // Cancelled requests leave the queue at once.
  for (auto it = waiting_.begin(); it != waiting_.end();) {
    if ((*it)->stream->cancelled()) {
      Finish(**it, FinishReason::kCancelled, {});
      it = waiting_.erase(it);
    } else {
      ++it;
    }
  }
  // First come, first served: a request that does not fit blocks the ones behind it, so a long
  // request cannot starve.
  while (!waiting_.empty() &&
         running_.size() < static_cast<size_t>(options_.max_running_requests)) {
    Sequence& next = *waiting_.front();
    const int needed = cache_.BlocksFor(next.prompt_length + next.input.max_tokens);
    std::optional<std::vector<int32_t>> blocks = cache_.allocator().Allocate(needed);
    if (!blocks.has_value()) break;
    next.blocks = std::move(*blocks);
    next.prefill_start = Clock::now();
    metrics_.ObserveQueueTime(Seconds(next.prefill_start - next.arrival));
    metrics_.AddPromptTokens(next.prompt_length);
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
  }
}

bool Engine::Step() {
  AdmitWaiting();
  // Drop cancelled running requests (their blocks return to the pool now).
  for (auto& seq : running_) {
    if (seq->stream->cancelled()) {
      Finish(*seq, FinishReason::kCancelled, {});
      seq.reset();
    }
  }
  std::erase(running_, nullptr);
  running_count_ = static_cast<int>(running_.size());
  // Publish before computing, so admitted requests' KV reservations are visible while their
  // first tokens are produced.
  PublishState();
  if (running_.empty()) return false;

  // Decoding requests take one token each; prefilling ones share what is left of the budget.
  std::vector<BatchSequence> batch;
  std::vector<Sequence*> members;
  int budget = options_.max_batch_tokens;
  for (auto& seq : running_) {
    if (seq->num_cached >= seq->prompt_length) {
      batch.push_back({std::span<const int32_t>(&seq->tokens[seq->num_cached], 1), seq->num_cached,
                       &seq->blocks, false});
      members.push_back(seq.get());
      --budget;
    }
  }
  for (auto& seq : running_) {
    if (seq->num_cached < seq->prompt_length && budget > 0) {
      const int chunk = std::min(seq->prompt_length - seq->num_cached, budget);
      batch.push_back({std::span<const int32_t>(&seq->tokens[seq->num_cached], chunk),
                       seq->num_cached, &seq->blocks, false});
      members.push_back(seq.get());
      budget -= chunk;
    }
  }
  const auto step_start = Clock::now();
  const std::vector<float> logits = model_->Forward(batch, cache_);
  int step_tokens = 0;
  for (const auto& b : batch) step_tokens += static_cast<int>(b.tokens.size());
  metrics_.ObserveStep(Seconds(Clock::now() - step_start), step_tokens);
  if (options_.min_step_seconds > 0) {
    std::this_thread::sleep_until(step_start + std::chrono::duration_cast<Clock::duration>(
                                                   std::chrono::duration<double>(options_.min_step_seconds)));
  }
  steps_.fetch_add(1);

  const int vocab = config().vocab_size;
  for (size_t i = 0; i < members.size(); ++i) {
    Sequence& seq = *members[i];
    seq.num_cached += static_cast<int>(batch[i].tokens.size());
    if (seq.num_cached < static_cast<int>(seq.tokens.size())) continue;  // prefill continues
    const int32_t token =
        seq.sampler->Sample(std::span<const float>(&logits[i * static_cast<size_t>(vocab)], vocab));
    Emit(seq, token);
  }
  for (auto& seq : running_) {
    if (seq->stream == nullptr) seq.reset();  // finished in Emit
  }
  std::erase(running_, nullptr);
  running_count_ = static_cast<int>(running_.size());
  PublishState();
  return true;
}

void Engine::Emit(Sequence& seq, int32_t token) {
  const auto now = Clock::now();
  if (seq.generated == 0) {
    seq.first_token = now;
    metrics_.ObserveTimeToFirstToken(Seconds(now - seq.arrival));
  } else {
    metrics_.ObserveInterTokenLatency(Seconds(now - seq.last_token));
  }
  seq.last_token = now;
  seq.tokens.push_back(token);
  ++seq.generated;
  metrics_.AddGeneratedTokens(1);

  GenerationOutput output;
  output.token_ids.push_back(token);
  FinishReason reason = FinishReason::kNone;
  bool stopped_by_string = false;
  const bool is_eos = token == config().eos_token_id && !seq.input.ignore_eos;
  const bool is_stop_token = std::find(seq.input.stop_token_ids.begin(),
                                       seq.input.stop_token_ids.end(),
                                       token) != seq.input.stop_token_ids.end();
  if (tokenizer_ != nullptr) {
    seq.held_text += seq.decoder.Push(tokenizer_->TokenBytes(token));
    // Stop strings: cut before the first match; otherwise hold back a suffix that could still
    // grow into one.
    size_t cut = std::string::npos;
    for (const std::string& stop : seq.input.stop) cut = std::min(cut, seq.held_text.find(stop));
    if (cut != std::string::npos) {
      output.text = seq.held_text.substr(0, cut);
      seq.held_text.clear();
      reason = FinishReason::kStop;
      stopped_by_string = true;
    } else {
      const size_t keep = StopPrefixSuffix(seq.held_text, seq.input.stop);
      output.text = seq.held_text.substr(0, seq.held_text.size() - keep);
      seq.held_text.erase(0, seq.held_text.size() - keep);
    }
  }
  if (reason == FinishReason::kNone) {
    if (is_eos || is_stop_token) {
      reason = FinishReason::kStop;
    } else if (seq.generated >= seq.input.max_tokens) {
      reason = FinishReason::kLength;
    } else if (static_cast<int>(seq.tokens.size()) >= config().max_position_embeddings) {
      reason = FinishReason::kContextLength;
    }
  }
  if (reason == FinishReason::kNone) {
    seq.stream->Push(std::move(output));
    return;
  }
  if (!stopped_by_string && tokenizer_ != nullptr) output.text += seq.held_text + seq.decoder.Flush();
  Finish(seq, reason, std::move(output));
}

void Engine::Finish(Sequence& seq, FinishReason reason, GenerationOutput output) {
  const auto now = Clock::now();
  output.finish_reason = reason;
  output.usage.prompt_tokens = seq.prompt_length;
  output.usage.completion_tokens = seq.generated;
  if (seq.generated > 0) {
    output.usage.time_to_first_token_seconds = Seconds(seq.first_token - seq.arrival);
  }
  output.usage.total_seconds = Seconds(now - seq.arrival);
  if (seq.prefill_start != Clock::time_point{}) {
    output.usage.queue_seconds = Seconds(seq.prefill_start - seq.arrival);
  }
  cache_.allocator().Free(seq.blocks);
  seq.blocks.clear();
  free_blocks_ = cache_.allocator().num_free();
  metrics_.RequestFinished(StatusLabel(reason));
  if (reason != FinishReason::kCancelled && reason != FinishReason::kAborted) {
    metrics_.ObserveEndToEndLatency(output.usage.total_seconds);
  }
  seq.stream->Push(std::move(output));
  seq.stream.reset();
  finished_.fetch_add(1);
}

void Engine::PublishState() {
  free_blocks_ = cache_.allocator().num_free();
  int waiting;
  {
    std::lock_guard lock(mutex_);
    waiting = static_cast<int>(waiting_.size());
  }
  metrics_.SetQueueState(static_cast<int>(running_.size()), waiting, cache_.usage_ratio());
}

}  // namespace moeserve::engine
