#include "engine/runtime/metrics.h"

namespace moeserve::engine {
namespace {

prometheus::Histogram::BucketBoundaries LatencyBuckets() {
  return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
}

prometheus::Histogram* NewHistogram(prometheus::Registry& registry, const std::string& name,
                                    const std::string& help) {
  return &prometheus::BuildHistogram().Name(name).Help(help).Register(registry).Add(
      {}, LatencyBuckets());
}

// Token counts: powers of two from 1 to 128 Ki.
prometheus::Histogram::BucketBoundaries LengthBuckets() {
  prometheus::Histogram::BucketBoundaries buckets;
  for (double bound = 1; bound <= 131072; bound *= 2) buckets.push_back(bound);
  return buckets;
}

}  // namespace

EngineMetrics::EngineMetrics(prometheus::Registry& registry) {
  requests_ = &prometheus::BuildCounter()
                   .Name("moeserve_requests_total")
                   .Help("Finished generation requests by final status")
                   .Register(registry);
  prompt_tokens_ = &prometheus::BuildCounter()
                        .Name("moeserve_prompt_tokens_total")
                        .Help("Prompt tokens of admitted requests")
                        .Register(registry)
                        .Add({});
  generated_tokens_ = &prometheus::BuildCounter()
                           .Name("moeserve_generation_tokens_total")
                           .Help("Generated tokens")
                           .Register(registry)
                           .Add({});
  time_to_first_token_ = NewHistogram(registry, "moeserve_time_to_first_token_seconds",
                                      "Time from arrival to the first generated token");
  inter_token_latency_ = NewHistogram(registry, "moeserve_inter_token_latency_seconds",
                                      "Time between consecutive tokens of a request");
  end_to_end_latency_ = NewHistogram(registry, "moeserve_e2e_request_latency_seconds",
                                     "Time from arrival to the last token");
  queue_time_ = NewHistogram(registry, "moeserve_queue_time_seconds",
                             "Time from arrival to the start of prefill");
  time_per_output_token_ =
      NewHistogram(registry, "moeserve_time_per_output_token_seconds",
                   "Per finished request: time from its first to its last token over the tokens "
                   "after the first (TPOT)");
  prompt_length_ = &prometheus::BuildHistogram()
                        .Name("moeserve_prompt_length_tokens")
                        .Help("Prompt length of finished requests, in tokens")
                        .Register(registry)
                        .Add({}, LengthBuckets());
  output_length_ = &prometheus::BuildHistogram()
                        .Name("moeserve_output_length_tokens")
                        .Help("Generated tokens of finished requests")
                        .Register(registry)
                        .Add({}, LengthBuckets());
  step_time_ = &prometheus::BuildHistogram()
                    .Name("moeserve_step_duration_seconds")
                    .Help(
                        "Duration of one forward step of a rank, by group and phase (prefill: "
                        "every row prefills; decode: every row decodes; mixed)")
                    .Register(registry);
  step_tokens_ = &prometheus::BuildCounter()
                      .Name("moeserve_step_tokens_total")
                      .Help("Tokens processed by forward steps (prefill and decode)")
                      .Register(registry)
                      .Add({});
  running_ = &prometheus::BuildGauge()
                  .Name("moeserve_running_requests")
                  .Help("Requests being prefilled or decoded")
                  .Register(registry)
                  .Add({});
  waiting_ = &prometheus::BuildGauge()
                  .Name("moeserve_waiting_requests")
                  .Help("Requests waiting for admission")
                  .Register(registry)
                  .Add({});
  kv_cache_usage_ = &prometheus::BuildGauge()
                         .Name("moeserve_kv_cache_usage_ratio")
                         .Help("Fraction of KV cache blocks in use (0..1)")
                         .Register(registry)
                         .Add({});
}

void EngineMetrics::RequestFinished(const std::string& status) {
  if (requests_ != nullptr) requests_->Add({{"status", status}}).Increment();
}
void EngineMetrics::AddPromptTokens(int count) {
  if (prompt_tokens_ != nullptr) prompt_tokens_->Increment(count);
}
void EngineMetrics::AddGeneratedTokens(int count) {
  if (generated_tokens_ != nullptr) generated_tokens_->Increment(count);
}
void EngineMetrics::ObserveTimeToFirstToken(double s) {
  if (time_to_first_token_ != nullptr) time_to_first_token_->Observe(s);
}
void EngineMetrics::ObserveInterTokenLatency(double s) {
  if (inter_token_latency_ != nullptr) inter_token_latency_->Observe(s);
}
void EngineMetrics::ObserveEndToEndLatency(double s) {
  if (end_to_end_latency_ != nullptr) end_to_end_latency_->Observe(s);
}
void EngineMetrics::ObserveQueueTime(double s) {
  if (queue_time_ != nullptr) queue_time_->Observe(s);
}
void EngineMetrics::ObserveFinishedRequest(int prompt_tokens, int output_tokens,
                                           double time_per_output_token_seconds) {
  if (prompt_length_ == nullptr) return;
  prompt_length_->Observe(prompt_tokens);
  output_length_->Observe(output_tokens);
  if (output_tokens >= 2) time_per_output_token_->Observe(time_per_output_token_seconds);
}
void EngineMetrics::ObserveStep(double seconds, int tokens, const std::string& group,
                                const std::string& phase) {
  if (step_time_ != nullptr) {
    step_time_->Add({{"group", group}, {"phase", phase}}, LatencyBuckets()).Observe(seconds);
  }
  if (step_tokens_ != nullptr) step_tokens_->Increment(tokens);
}
void EngineMetrics::SetQueueState(int running, int waiting, double kv_cache_usage_ratio) {
  if (running_ == nullptr) return;
  running_->Set(running);
  waiting_->Set(waiting);
  kv_cache_usage_->Set(kv_cache_usage_ratio);
}

}  // namespace moeserve::engine
