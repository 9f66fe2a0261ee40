// EngineMetrics: the engine's Prometheus series (prefix `moeserve_`, base units), registered
// in a prometheus-cpp registry that the server exposes on --metrics-port.
//
// Thread-safe (prometheus-cpp metrics are atomic). A default-constructed EngineMetrics records
// nothing, for tools and tests that run without a registry.
#pragma once

#include <string>

#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace moeserve::engine {

class EngineMetrics {
 public:
  EngineMetrics() = default;
  explicit EngineMetrics(prometheus::Registry& registry);

  // `status`: stop, length, context_length, cancelled, aborted, invalid_argument, queue_full,
  // unavailable.
  void RequestFinished(const std::string& status);
  void AddPromptTokens(int count);
  void AddGeneratedTokens(int count);
  void ObserveTimeToFirstToken(double seconds);
  void ObserveInterTokenLatency(double seconds);
  void ObserveEndToEndLatency(double seconds);
  void ObserveQueueTime(double seconds);
  // A finished request (stop, length or context_length): its prompt and output lengths and,
  // with two or more output tokens, its time per output token after the first.
  void ObserveFinishedRequest(int prompt_tokens, int output_tokens,
                              double time_per_output_token_seconds);
  // One forward step of `group`; `phase` is prefill (every row prefills), decode (every row
  // decodes) or mixed.
  void ObserveStep(double seconds, int tokens, const std::string& group, const std::string& phase);
  void SetQueueState(int running, int waiting, double kv_cache_usage_ratio);

 private:
  prometheus::Family<prometheus::Counter>* requests_ = nullptr;
  prometheus::Counter* prompt_tokens_ = nullptr;
  prometheus::Counter* generated_tokens_ = nullptr;
  prometheus::Histogram* time_to_first_token_ = nullptr;
  prometheus::Histogram* inter_token_latency_ = nullptr;
  prometheus::Histogram* end_to_end_latency_ = nullptr;
  prometheus::Histogram* queue_time_ = nullptr;
  prometheus::Histogram* time_per_output_token_ = nullptr;
  prometheus::Histogram* prompt_length_ = nullptr;
  prometheus::Histogram* output_length_ = nullptr;
  prometheus::Family<prometheus::Histogram>* step_time_ = nullptr;
  prometheus::Counter* step_tokens_ = nullptr;
  prometheus::Gauge* running_ = nullptr;
  prometheus::Gauge* waiting_ = nullptr;
  prometheus::Gauge* kv_cache_usage_ = nullptr;
};

}  // namespace moeserve::engine
