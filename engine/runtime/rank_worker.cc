#include "engine/runtime/rank_worker.h"

#include "absl/strings/str_cat.h"
#include "engine/ops/cpu_ops.h"

namespace moeserve::engine {
namespace {

using Clock = Sequence::Clock;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

}  // namespace

RankWorker::RankWorker(const WorkerContext& context, parallel::ExpertParallelGroup& group, int rank,
                       GroupRole role, int kv_blocks, int kv_block_size,
                       std::unique_ptr<RankBackend> backend)
    : context_(context),
      group_(group),
      rank_(rank),
      role_(role),
      backend_(std::move(backend)),
      scheduler_({.max_batch_tokens = context.max_batch_tokens,
                  .max_running = context.max_running_requests,
                  .kv_block_size = kv_block_size,
                  .kv_blocks = kv_blocks}),
      emitter_(context.tokenizer, context.model->config().eos_token_id,
               context.model->config().max_position_embeddings, *context.metrics) {}

RankWorker::~RankWorker() { Join(); }

void RankWorker::Start() {
  thread_ = std::thread([this] { Loop(); });
}

void RankWorker::Join() {
  if (thread_.joinable()) thread_.join();
}

void RankWorker::Enqueue(std::unique_ptr<Sequence> sequence) {
  std::unique_ptr<Sequence> refused = scheduler_.Enqueue(std::move(sequence));
  if (refused == nullptr) {
    group_.NotifyWork();
    return;
  }
  // The rank's loop has ended; nothing would ever admit the sequence.
  if (absl::Status failure = group_.health(); !failure.ok()) {
    emitter_.Fail(*refused, failure);
  } else {
    emitter_.Finish(*refused, FinishReason::kAborted);
  }
}

void RankWorker::AbortQueued() {
  for (auto& seq : scheduler_.Stop()) emitter_.Finish(*seq, FinishReason::kAborted);
}

void RankWorker::PublishState() const {
  if (context_.publish_state) context_.publish_state();
}

namespace {

// "prefill" when every row of the step prefills, "decode" when every row decodes, else "mixed".
const char* StepPhase(const StepPlan& plan) {
  bool prefills = false, decodes = false;
  for (size_t i = 0; i < plan.batch.size(); ++i) {
    if (plan.batch[i].start_position >= plan.members[i]->prompt_length) {
      decodes = true;
    } else {
      prefills = true;
    }
  }
  if (prefills && decodes) return "mixed";
  return prefills ? "prefill" : "decode";
}

}  // namespace

double RankWorker::seconds_since_progress() const {
  const int64_t last = last_round_nanos_.load(std::memory_order_relaxed);
  if (last == 0) return 0;
  const int64_t now = Clock::now().time_since_epoch() / std::chrono::nanoseconds(1);
  return static_cast<double>(now - last) / 1e9;
}

void RankWorker::Loop() {
  cpu::ConfigureBlasThreads(1);
  auto mark_round = [this] {
    last_round_nanos_.store(Clock::now().time_since_epoch() / std::chrono::nanoseconds(1),
                            std::memory_order_relaxed);
  };
  mark_round();
  while (Step()) mark_round();
  last_round_nanos_.store(0, std::memory_order_relaxed);
  // Stopped (or failed, in which case nothing is left): whatever remains is aborted.
  for (auto& seq : scheduler_.Stop()) emitter_.Finish(*seq, FinishReason::kAborted);
  for (auto& seq : scheduler_.ReleaseAll()) emitter_.Finish(*seq, FinishReason::kAborted);
  PublishState();
}

void RankWorker::Admit() {
  std::vector<std::unique_ptr<Sequence>> cancelled;
  const std::vector<Sequence*> admitted = scheduler_.Admit(cancelled);
  for (auto& seq : cancelled) emitter_.Finish(*seq, FinishReason::kCancelled);
  for (Sequence* seq : admitted) {
    if (!seq->handoff_kv.empty()) {
      // Decode rank: write the prefill rank's KV rows into our blocks.
      absl::Status imported = backend_->ImportKv(seq->blocks, seq->num_cached, seq->handoff_kv);
      if (!imported.ok()) {
        std::unique_ptr<Sequence> owned = scheduler_.Release(seq);
        emitter_.Fail(*seq, imported);
        continue;
      }
      seq->handoff_kv = {};
    } else {
      seq->prefill_start = Clock::now();
      context_.metrics->ObserveQueueTime(Seconds(seq->prefill_start - seq->arrival));
      context_.metrics->AddPromptTokens(seq->prompt_length);
    }
  }
}

bool RankWorker::Step() {
  Admit();
  PublishState();
  const StepPlan plan = scheduler_.Plan();

  absl::StatusOr<parallel::StepAgreement> agreement =
      group_.Agree(rank_, plan.tokens, context_.stop_requested->load());
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
    forward = backend_->Forward(plan.batch, group_.placement(rank_), resources, *agreement);
  }
  resources.trace = trace;
  if (!forward.ok()) {
    FailGroup(forward);
    return false;
  }
  // Rows whose known tokens are now all cached get their next token; a prefill that continues
  // gets none.
  std::vector<Sampler*> samplers(plan.members.size(), nullptr);
  for (size_t i = 0; i < plan.members.size(); ++i) {
    if (plan.samples[i]) samplers[i] = plan.members[i]->sampler.get();
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
  if (plan.tokens > 0) {
    context_.metrics->ObserveStep(Seconds(Clock::now() - step_start), static_cast<int>(plan.tokens),
                                  group_.name(), StepPhase(plan));
  }
  if (context_.min_step_seconds > 0) {
    std::this_thread::sleep_until(step_start +
                                  std::chrono::duration_cast<Clock::duration>(
                                      std::chrono::duration<double>(context_.min_step_seconds)));
  }
  {
    ScopedTraceEvent event(step_trace, resources.trace_pid, parallel::kTraceStepLane, "emit",
                           "step");
    AfterForward(plan, *next_tokens);
  }
  if (tracing && ++traced_steps_ == context_.trace_steps && rank_ == 0 && context_.trace_complete) {
    context_.trace_complete();
  }
  return true;
}

void RankWorker::AfterForward(const StepPlan& plan, std::span<const int32_t> next_tokens) {
  scheduler_.Advance(plan);
  for (size_t i = 0; i < plan.members.size(); ++i) {
    if (next_tokens[i] < 0) continue;  // prefill continues
    Sequence& seq = *plan.members[i];
    StreamEmitter::Emitted emitted = emitter_.Emit(seq, next_tokens[i]);
    if (emitted.reason != FinishReason::kNone) {
      Finish(seq, emitted.reason, std::move(emitted.last));
    } else if (role_ == GroupRole::kPrefill) {
      HandOff(seq);
    }
  }
  PublishState();
}

void RankWorker::Finish(Sequence& seq, FinishReason reason, GenerationOutput output) {
  // The KV gauges show the blocks free before the client sees the last message.
  std::unique_ptr<Sequence> owned = scheduler_.Release(&seq);
  PublishState();
  emitter_.Finish(seq, reason, std::move(output));
}

void RankWorker::HandOff(Sequence& seq) {
  // Copy the prompt's KV rows out, free our blocks, and pass the sequence on.
  std::vector<std::byte> rows;
  absl::Status exported = backend_->ExportKv(seq.blocks, seq.num_cached, rows);
  std::unique_ptr<Sequence> owned = scheduler_.Release(&seq);
  if (!exported.ok()) {
    emitter_.Fail(seq, exported);
    return;
  }
  if (absl::Status sent = context_.kv_transport->Send(owned, std::move(rows)); !sent.ok()) {
    emitter_.Fail(seq, sent);
    return;
  }
  if (owned != nullptr) emitter_.HandedOff(*owned);  // it went on in another process
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

void RankWorker::FailGroup(const absl::Status& status) {
  const absl::Status failure = group_.Fail(rank_, status);
  for (auto& seq : scheduler_.ReleaseAll()) emitter_.Fail(*seq, failure);
  for (auto& seq : scheduler_.Stop()) emitter_.Fail(*seq, failure);
  PublishState();
}

}  // namespace moeserve::engine
