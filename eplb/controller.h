// EPLB controller: closes the expert-load-balancing loop from outside the serving engine.
// Each cycle it reads the group's current placement from the servers (Admin API), queries
// Prometheus for the expert load over a window, runs RebalanceExperts, predicts balancedness
// (mean/max GPU load) before and after, and pushes the new placement only when it improves by
// more than a threshold. It never pushes a placement built from missing or partial data, and
// retries transient failures with back-off.
//
// The load source and the placement targets are interfaces, so the controller is testable
// alone; the real ones speak Prometheus' HTTP API (libcurl) and moeserve's Admin gRPC API.
// Not thread-safe: one controller runs its cycles on one thread.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "eplb/rebalance.h"
#include "grpcpp/channel.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/registry.h"

namespace moeserve::eplb {

// Tokens per [MoE layer][logical expert] over the window.
using LoadMatrix = std::vector<std::vector<float>>;

class LoadSource {
 public:
  virtual ~LoadSource() = default;
  // Load of `group` over the last `window_seconds`; FAILED_PRECONDITION when any
  // (layer, expert) series is missing (partial data), UNAVAILABLE when the source is down.
  virtual absl::StatusOr<LoadMatrix> Query(const std::string& group, double window_seconds,
                                           int num_layers, int num_experts) = 0;
};

struct GroupPlacement {
  int64_t version = 0;
  int ep_size = 0;
  int num_logical = 0;
  int num_physical = 0;
  int num_expert_groups = 1;
  std::vector<std::vector<int>> phy2log;  // [layer][slot]
};

class PlacementTarget {
 public:
  virtual ~PlacementTarget() = default;
  virtual std::string name() const = 0;
  virtual absl::StatusOr<GroupPlacement> Get(const std::string& group) = 0;
  virtual absl::Status Update(const std::string& group, int64_t version,
                              const std::vector<std::vector<int>>& phy2log) = 0;
};

// How the controller reaches Prometheus over HTTPS (curl's options); empty fields: the system's
// CA roots and no client certificate.
struct PrometheusTls {
  std::string ca;    // PEM CA bundle that signed Prometheus' certificate
  std::string cert;  // PEM client certificate, for a Prometheus that requires one
  std::string key;   // its private key
};

// Queries `<url>/api/v1/query` with
// sum by (layer, expert) (increase(<metric>{group="<group>"}[<window>s])).
std::unique_ptr<LoadSource> MakePrometheusLoadSource(
    std::string base_url, PrometheusTls tls = {},
    std::string metric = "moeserve_expert_tokens_total");

// The load matrix in a Prometheus instant-query answer (`body`, JSON) to the query above.
// Strict: every series must carry `layer` and `expert` labels that are plain decimal integers
// inside the model's shape, a finite non-negative value, and appear once; all num_layers x
// num_experts series must be there. FAILED_PRECONDITION for partial or out-of-shape data,
// INVALID_ARGUMENT for an answer that is not what the query returns.
absl::StatusOr<LoadMatrix> ParsePrometheusLoad(std::string_view body, const std::string& group,
                                               int num_layers, int num_experts);

// The Admin API of one moeserve server over `channel`, with a bearer token (empty: none, for a
// port that authenticates by client certificate).
std::unique_ptr<PlacementTarget> MakeAdminPlacementTarget(const std::string& address,
                                                          std::shared_ptr<grpc::Channel> channel,
                                                          std::string token);

struct ControllerOptions {
  std::string group = "mixed";
  double window_seconds = 300;
  int num_nodes = 1;
  int num_gpus = 0;               // 0: the group's EP size
  int num_replicas = 0;           // 0: the group's physical slots
  double min_improvement = 0.05;  // balancedness gain (absolute, in [0, 1]) needed to push
  bool dry_run = false;
  int max_attempts = 4;  // per operation, with exponential back-off
  std::chrono::milliseconds first_backoff{500};
};

struct CycleReport {
  bool pushed = false;
  std::string reason;  // why it pushed or not
  double balancedness_before = 0;
  double balancedness_after = 0;
  int64_t version = 0;  // the version now committed (or that would be, for a dry run)
  std::vector<std::vector<int>> phy2log;  // the computed placement
};

class Controller {
 public:
  // `registry` may be null. Exports moeserve_eplb_balancedness{when="before|after"},
  // moeserve_eplb_pushes_total, moeserve_eplb_failures_total{stage},
  // moeserve_eplb_last_success_timestamp_seconds.
  Controller(ControllerOptions options, LoadSource& load_source,
             std::vector<PlacementTarget*> targets, prometheus::Registry* registry);

  // One cycle. Errors are returned (and counted); nothing is pushed on any error.
  absl::StatusOr<CycleReport> RunCycle();

 private:
  template <typename T>
  absl::StatusOr<T> WithRetries(const char* stage, const std::function<absl::StatusOr<T>()>& op);
  absl::Status Fail(const char* stage, absl::Status status);

  ControllerOptions options_;
  LoadSource& load_source_;
  std::vector<PlacementTarget*> targets_;
  prometheus::Gauge* before_ = nullptr;
  prometheus::Gauge* after_ = nullptr;
  prometheus::Counter* pushes_ = nullptr;
  prometheus::Family<prometheus::Counter>* failures_ = nullptr;
  prometheus::Gauge* last_success_ = nullptr;
};

}  // namespace moeserve::eplb
