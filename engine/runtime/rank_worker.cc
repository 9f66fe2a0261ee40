#include "engine/runtime/rank_worker.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "engine/ops/cpu_ops.h"

namespace moeserve::engine {
namespace {

using Clock = Sequence::Clock;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

const char* StatusLabel(FinishReason reason) {
  switch (reason) {
    case FinishReason::kLength:
      return "length";
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kContextLength:
      return "context_length";
    case FinishReason::kCancelled:
      return "cancelled";
    case FinishReason::kAborted:
      return "aborted";
    case FinishReason::kNone:
      break;
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

RankWorker::RankWorker(const WorkerContext& context, parallel::ExpertParallelGroup& group, int rank,
                       GroupRole role, int kv_blocks, int kv_block_size,
                       std::unique_ptr<RankBackend> backend)
    : context_(context),
      group_(group),
      rank_(rank),
      role_(role),
      backend_(std::move(backend)),
      allocator_(kv_blocks),
      kv_block_size_(kv_block_size),
      kv_blocks_total_(kv_blocks) {
  kv_blocks_free_ = kv_blocks;
}

RankWorker::~RankWorker() { Join(); }

void RankWorker::Start() {
  thread_ = std::thread([this] { Loop(); });
}

void RankWorker::Join() {
  if (thread_.joinable()) thread_.join();
}

void RankWorker::Enqueue(std::unique_ptr<Sequence> sequence) {
  {
    std::lock_guard lock(queue_mutex_);
    if (!stopped_) {
      queue_.push_back(std::move(sequence));
      queued_count_ = static_cast<int>(queue_.size());
    }
  }
  if (sequence == nullptr) {
    group_.NotifyWork();
    return;
  }
  // The rank's loop has ended; nothing would ever admit the sequence.
  if (absl::Status failure = group_.health(); !failure.ok()) {
    FailSequence(*sequence, failure);
  } else {
    Finish(*sequence, FinishReason::kAborted, {});
  }
}

void RankWorker::AbortQueued() {
  std::deque<std::unique_ptr<Sequence>> queued;
  {
    std::lock_guard lock(queue_mutex_);
    queued.swap(queue_);
    queued_count_ = 0;
  }
  for (auto& seq : queued) Finish(*seq, FinishReason::kAborted, {});
}

void RankWorker::Loop() {
  cpu::ConfigureBlasThreads(1);
  while (Step()) {
  }
  {
    std::lock_guard lock(queue_mutex_);
    stopped_ = true;
  }
  for (auto& seq : running_) Finish(*seq, FinishReason::kAborted, {});
  running_.clear();
  RefreshCounts();
  if (context_.publish_state) context_.publish_state();
}

void RankWorker::RefreshCounts() {
  running_count_ = static_cast<int>(running_.size());
  kv_blocks_free_ = allocator_.num_free();
}

void RankWorker::Admit() {
  std::lock_guard lock(queue_mutex_);
  for (auto it = queue_.begin(); it != queue_.end();) {
    if ((*it)->stream->cancelled()) {
      Finish(**it, FinishReason::kCancelled, {});
      it = queue_.erase(it);
    } else {
      ++it;
    }
  }
  // First come, first served: a sequence that does not fit blocks those behind it.
  while (!queue_.empty() && running_.size() < static_cast<size_t>(context_.max_running_requests)) {
    Sequence& next = *queue_.front();
    const int needed = BlocksFor(next.prompt_length + next.input.max_tokens, kv_block_size_);
    std::optional<std::vector<int32_t>> blocks = allocator_.Allocate(needed);
    if (!blocks.has_value()) break;
    next.blocks = std::move(*blocks);
    if (!next.handoff_kv.empty()) {
      // Decode rank: write the prefill rank's KV rows into our blocks.
      if (absl::Status imported = backend_->ImportKv(next.blocks, next.num_cached, next.handoff_kv);
          !imported.ok()) {
        FailSequence(next, imported);
        queue_.pop_front();
        continue;
      }
      next.handoff_kv = {};
    } else {
      next.prefill_start = Clock::now();
      context_.metrics->ObserveQueueTime(Seconds(next.prefill_start - next.arrival));
      context_.metrics->AddPromptTokens(next.prompt_length);
    }
    running_.push_back(std::move(queue_.front()));
    queue_.pop_front();
  }
  queued_count_ = static_cast<int>(queue_.size());
}

void RankWorker::DropCancelled() {
  for (auto& seq : running_) {
    if (seq->stream->cancelled()) {
      Finish(*seq, FinishReason::kCancelled, {});
      seq.reset();
    }
  }
  std::erase(running_, nullptr);
}

bool RankWorker::Step() {
  Admit();
  DropCancelled();
  RefreshCounts();
  if (context_.publish_state) context_.publish_state();

  // Decoding sequences take one token each; prefilling ones share what is left of the budget.
  std::vector<BatchSequence> batch;
  std::vector<Sequence*> members;
  int budget = context_.max_batch_tokens;
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
  int64_t local_tokens = 0;
  for (const auto& b : batch) local_tokens += static_cast<int64_t>(b.tokens.size());

  absl::StatusOr<parallel::StepAgreement> agreement =
      group_.Agree(rank_, local_tokens, context_.stop_requested->load());
  if (!agreement.ok()) {
    FailGroup(agreement.status());
    return false;
  }
  if (agreement->stop) return false;
  if (!agreement->any_work) {
    group_.WaitForWork(std::chrono::milliseconds(50));
    return true;
  }

  ++working_steps_;
  if (!InjectFault()) return false;
  parallel::RankResources& resources = group_.resources(rank_);
  TraceRecorder* trace = resources.trace;
  const bool tracing = trace != nullptr && traced_candidates_++ >= context_.trace_skip_steps &&
                       traced_steps_ < context_.trace_steps;
  TraceRecorder* step_trace = tracing ? trace : nullptr;
  resources.trace = step_trace;
  const auto step_start = Clock::now();
  absl::Status forward;
  {
    ScopedTraceEvent event(step_trace, resources.trace_pid, parallel::kTraceStepLane, "forward",
                           "step");
    forward = backend_->Forward(batch, group_.placement(rank_), resources, agreement->split);
  }
  resources.trace = trace;
  if (!forward.ok()) {
    FailGroup(forward);
    return false;
  }
  // Rows whose prompt is now complete get their next token; a prefill that continues gets none.
  std::vector<Sampler*> samplers(members.size(), nullptr);
  for (size_t i = 0; i < members.size(); ++i) {
    Sequence& seq = *members[i];
    if (seq.num_cached + static_cast<int>(batch[i].tokens.size()) >=
        static_cast<int>(seq.tokens.size())) {
      samplers[i] = seq.sampler.get();
    }
  }
  absl::StatusOr<std::vector<int32_t>> next_tokens;
  {
    ScopedTraceEvent event(step_trace, resources.trace_pid, parallel::kTraceStepLane, "next tokens",
                           "step");
    next_tokens = backend_->NextTokens(samplers);
  }
  if (!next_tokens.ok()) {
    FailGroup(next_tokens.status());
    return false;
  }
  if (local_tokens > 0) {
    context_.metrics->ObserveStep(Seconds(Clock::now() - step_start),
                                  static_cast<int>(local_tokens));
  }
  if (context_.min_step_seconds > 0) {
    std::this_thread::sleep_until(step_start +
                                  std::chrono::duration_cast<Clock::duration>(
                                      std::chrono::duration<double>(context_.min_step_seconds)));
  }
  {
    ScopedTraceEvent event(step_trace, resources.trace_pid, parallel::kTraceStepLane, "emit",
                           "step");
    AfterForward(batch, members, *next_tokens);
  }
  if (tracing && ++traced_steps_ == context_.trace_steps && rank_ == 0 && context_.trace_complete) {
    context_.trace_complete();
  }
  return true;
}

void RankWorker::AfterForward(std::vector<BatchSequence>& batch, std::vector<Sequence*>& members,
                              std::span<const int32_t> next_tokens) {
  for (size_t i = 0; i < members.size(); ++i) {
    Sequence& seq = *members[i];
    seq.num_cached += static_cast<int>(batch[i].tokens.size());
    if (next_tokens[i] < 0) continue;  // prefill continues
    Emit(seq, next_tokens[i]);
    if (role_ == GroupRole::kPrefill && !seq.finished()) HandOff(seq);
  }
  // Finished sequences left with Finish(); handed-off ones were moved to the decode group.
  for (auto& seq : running_) {
    if (seq != nullptr && seq->finished()) seq.reset();
  }
  std::erase(running_, nullptr);
  RefreshCounts();
}

void RankWorker::HandOff(Sequence& seq) {
  // Copy the prompt's KV rows out, free our blocks, and pass the sequence on.
  if (absl::Status exported = backend_->ExportKv(seq.blocks, seq.num_cached, seq.handoff_kv);
      !exported.ok()) {
    FailSequence(seq, exported);
    return;
  }
  allocator_.Free(seq.blocks);
  seq.blocks.clear();
  for (auto& owned : running_) {
    if (owned.get() == &seq) {
      context_.hand_off(std::move(owned));  // leaves a null slot that AfterForward drops
      break;
    }
  }
}

void RankWorker::Emit(Sequence& seq, int32_t token) {
  const auto now = Clock::now();
  if (seq.generated == 0) {
    seq.first_token = now;
    context_.metrics->ObserveTimeToFirstToken(Seconds(now - seq.arrival));
  } else {
    context_.metrics->ObserveInterTokenLatency(Seconds(now - seq.last_token));
  }
  seq.last_token = now;
  seq.tokens.push_back(token);
  ++seq.generated;
  context_.metrics->AddGeneratedTokens(1);

  const ModelConfig& config = context_.model->config();
  GenerationOutput output;
  output.token_ids.push_back(token);
  FinishReason reason = FinishReason::kNone;
  bool stopped_by_string = false;
  const bool is_eos = token == config.eos_token_id && !seq.input.ignore_eos;
  const bool is_stop_token =
      std::find(seq.input.stop_token_ids.begin(), seq.input.stop_token_ids.end(), token) !=
      seq.input.stop_token_ids.end();
  if (context_.tokenizer != nullptr) {
    seq.held_text += seq.decoder.Push(context_.tokenizer->TokenBytes(token));
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
    } else if (static_cast<int>(seq.tokens.size()) >= config.max_position_embeddings) {
      reason = FinishReason::kContextLength;
    }
  }
  if (reason == FinishReason::kNone) {
    seq.stream->Push(std::move(output));
    return;
  }
  if (!stopped_by_string && context_.tokenizer != nullptr) {
    output.text += seq.held_text + seq.decoder.Flush();
  }
  Finish(seq, reason, std::move(output));
}

void RankWorker::Finish(Sequence& seq, FinishReason reason, GenerationOutput output) {
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
  allocator_.Free(seq.blocks);
  seq.blocks.clear();
  // Stats and gauges show the blocks free before the client sees the last message.
  kv_blocks_free_ = allocator_.num_free();
  if (context_.publish_state) context_.publish_state();
  context_.metrics->RequestFinished(StatusLabel(reason));
  if (reason != FinishReason::kCancelled && reason != FinishReason::kAborted) {
    context_.metrics->ObserveEndToEndLatency(output.usage.total_seconds);
  }
  seq.stream->Push(std::move(output));
  seq.stream.reset();
}

bool RankWorker::InjectFault() {
  const std::optional<InjectedFault>& fault = context_.injected_fault;
  if (!fault.has_value() || fault->group != group_.name() || fault->rank != rank_ ||
      fault->step != working_steps_) {
    return true;
  }
  if (!fault->hang) {
    FailGroup(absl::InternalError(absl::StrCat("injected fault at step ", working_steps_)));
    return false;
  }
  // Stop arriving at collectives: the peers time out and fail the group.
  while (group_.healthy() && !context_.stop_requested->load()) {
    group_.WaitForWork(std::chrono::milliseconds(50));
  }
  FailGroup(absl::UnavailableError(absl::StrCat("injected hang at step ", working_steps_)));
  return false;
}

void RankWorker::FailSequence(Sequence& seq, const absl::Status& failure) {
  if (seq.finished()) return;
  allocator_.Free(seq.blocks);
  seq.blocks.clear();
  GenerationOutput output;
  output.status = failure;
  context_.metrics->RequestFinished("unavailable");
  seq.stream->Push(std::move(output));
  seq.stream.reset();
}

void RankWorker::FailGroup(const absl::Status& status) {
  const absl::Status failure = group_.Fail(rank_, status);
  for (auto& seq : running_) FailSequence(*seq, failure);
  running_.clear();
  std::deque<std::unique_ptr<Sequence>> queued;
  {
    std::lock_guard lock(queue_mutex_);
    stopped_ = true;
    queued.swap(queue_);
    queued_count_ = 0;
  }
  for (auto& seq : queued) FailSequence(*seq, failure);
  RefreshCounts();
  if (context_.publish_state) context_.publish_state();
}

}  // namespace moeserve::engine
