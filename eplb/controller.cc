#include "eplb/controller.h"

#include <curl/curl.h>

#include <chrono>
#include <cmath>
#include <functional>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "base/bounded_json.h"
#include "eplb/balancedness.h"
#include "grpcpp/grpcpp.h"
#include "moeserve/v1/admin.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "prometheus/family.h"

namespace moeserve::eplb {
namespace {

// Prometheus answers a few kilobytes per (layer, expert) series at most; anything larger is not
// an answer to our query, and is not buffered.
constexpr size_t kMaxPrometheusAnswerBytes = 64 << 20;

size_t AppendBody(char* data, size_t size, size_t count, void* out) {
  auto* body = static_cast<std::string*>(out);
  if (body->size() + size * count > kMaxPrometheusAnswerBytes) return 0;  // curl aborts
  body->append(data, size * count);
  return size * count;
}

// A label value that is a plain decimal integer ("12"; not "1abc", "+1", " 1" or "1e0").
bool StrictIndex(const nlohmann::json& labels, const char* name, int* index) {
  auto it = labels.find(name);
  if (it == labels.end() || !it->is_string()) return false;
  const std::string& text = it->get_ref<const std::string&>();
  if (text.empty() || text.size() > 9) return false;
  int result = 0;
  for (char c : text) {
    if (c < '0' || c > '9') return false;
    result = result * 10 + (c - '0');
  }
  *index = result;
  return true;
}

bool IsTransient(const absl::Status& status) {
  return absl::IsUnavailable(status) || absl::IsDeadlineExceeded(status) ||
         absl::IsResourceExhausted(status) || absl::IsAborted(status);
}

class PrometheusLoadSource : public LoadSource {
 public:
  PrometheusLoadSource(std::string base_url, PrometheusTls tls, std::string metric)
      : base_url_(std::move(base_url)), tls_(std::move(tls)), metric_(std::move(metric)) {
    while (!base_url_.empty() && base_url_.back() == '/') base_url_.pop_back();
  }

  absl::StatusOr<LoadMatrix> Query(const std::string& group, double window_seconds, int num_layers,
                                   int num_experts) override {
    const std::string query =
        absl::StrCat("sum by (layer, expert) (increase(", metric_, "{group=\"", group, "\"}[",
                     static_cast<int64_t>(std::ceil(window_seconds)), "s]))");
    CURL* curl = curl_easy_init();
    if (curl == nullptr) return absl::InternalError("libcurl initialisation failed");
    char* escaped = curl_easy_escape(curl, query.c_str(), static_cast<int>(query.size()));
    const std::string url = absl::StrCat(base_url_, "/api/v1/query?query=", escaped);
    curl_free(escaped);
    std::string body;
    curl_easy_setopt(curl, CURLOPT_URL, url.c_str());
    curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, AppendBody);
    curl_easy_setopt(curl, CURLOPT_WRITEDATA, &body);
    curl_easy_setopt(curl, CURLOPT_TIMEOUT, 30L);
    curl_easy_setopt(curl, CURLOPT_PROTOCOLS_STR, "http,https");
    if (!tls_.ca.empty()) curl_easy_setopt(curl, CURLOPT_CAINFO, tls_.ca.c_str());
    if (!tls_.cert.empty()) curl_easy_setopt(curl, CURLOPT_SSLCERT, tls_.cert.c_str());
    if (!tls_.key.empty()) curl_easy_setopt(curl, CURLOPT_SSLKEY, tls_.key.c_str());
    const CURLcode code = curl_easy_perform(curl);
    long http_status = 0;
    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &http_status);
    curl_easy_cleanup(curl);
    if (code != CURLE_OK) {
      return absl::UnavailableError(
          absl::StrCat("Prometheus at ", base_url_, ": ", curl_easy_strerror(code)));
    }
    if (http_status >= 500) {
      return absl::UnavailableError(absl::StrCat("Prometheus answered HTTP ", http_status));
    }
    if (http_status != 200) {
      return absl::InvalidArgumentError(
          absl::StrCat("Prometheus query failed (HTTP ", http_status, "): ", body.substr(0, 300)));
    }
    return ParsePrometheusLoad(body, group, num_layers, num_experts);
  }

 private:
  std::string base_url_;
  PrometheusTls tls_;
  std::string metric_;
};

absl::Status FromGrpc(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

class AdminPlacementTarget : public PlacementTarget {
 public:
  AdminPlacementTarget(const std::string& address, std::shared_ptr<grpc::Channel> channel,
                       std::string token)
      : address_(address),
        token_(std::move(token)),
        stub_(moeserve::v1::Admin::NewStub(std::move(channel))) {}

  std::string name() const override { return address_; }

  absl::StatusOr<GroupPlacement> Get(const std::string& group) override {
    grpc::ClientContext context;
    Prepare(context, 30);
    moeserve::v1::GetExpertPlacementRequest request;
    request.set_group(group);
    moeserve::v1::ExpertPlacement response;
    if (auto s = FromGrpc(stub_->GetExpertPlacement(&context, request, &response)); !s.ok()) {
      return absl::Status(s.code(), absl::StrCat(address_, ": ", s.message()));
    }
    GroupPlacement placement;
    placement.version = response.version();
    placement.ep_size = static_cast<int>(response.ep_size());
    placement.num_logical = static_cast<int>(response.num_logical_experts());
    placement.num_physical = static_cast<int>(response.num_physical_experts());
    placement.num_expert_groups = std::max(1, static_cast<int>(response.num_expert_groups()));
    for (const auto& layer : response.layers()) {
      placement.phy2log.emplace_back(layer.phy2log().begin(), layer.phy2log().end());
    }
    return placement;
  }

  absl::Status Update(const std::string& group, int64_t version,
                      const std::vector<std::vector<int>>& phy2log) override {
    grpc::ClientContext context;
    Prepare(context, 120);
    moeserve::v1::UpdateExpertPlacementRequest request;
    request.set_group(group);
    request.set_version(version);
    request.set_timeout_seconds(90);
    for (const auto& layer : phy2log) {
      auto* out = request.add_layers();
      for (int expert : layer) out->add_phy2log(expert);
    }
    moeserve::v1::UpdateExpertPlacementResponse response;
    absl::Status status = FromGrpc(stub_->UpdateExpertPlacement(&context, request, &response));
    if (!status.ok())
      return absl::Status(status.code(), absl::StrCat(address_, ": ", status.message()));
    return absl::OkStatus();
  }

 private:
  void Prepare(grpc::ClientContext& context, int deadline_seconds) {
    if (!token_.empty()) context.AddMetadata("authorization", "Bearer " + token_);
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(deadline_seconds));
  }
  std::string address_;
  std::string token_;
  std::unique_ptr<moeserve::v1::Admin::Stub> stub_;
};

double UnixNow() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

}  // namespace

std::unique_ptr<LoadSource> MakePrometheusLoadSource(std::string base_url, PrometheusTls tls,
                                                     std::string metric) {
  return std::make_unique<PrometheusLoadSource>(std::move(base_url), std::move(tls),
                                                std::move(metric));
}

absl::StatusOr<LoadMatrix> ParsePrometheusLoad(std::string_view body, const std::string& group,
                                               int num_layers, int num_experts) {
  absl::StatusOr<nlohmann::json> parsed = base::ParseBoundedJson(body);
  if (!parsed.ok() || !parsed->is_object() || parsed->value("status", "") != "success") {
    return absl::InvalidArgumentError(
        absl::StrCat("Prometheus query failed: ",
                     std::string(body.substr(0, std::min<size_t>(300, body.size())))));
  }
  const nlohmann::json& response = *parsed;
  auto data = response.find("data");
  if (data == response.end() || !data->is_object() || !data->contains("result") ||
      !(*data)["result"].is_array()) {
    return absl::InvalidArgumentError("unexpected Prometheus answer: no `data.result` array");
  }
  LoadMatrix load(num_layers, std::vector<float>(num_experts, 0.0f));
  std::vector<std::vector<bool>> seen(num_layers, std::vector<bool>(num_experts, false));
  int series = 0;
  for (const nlohmann::json& sample : (*data)["result"]) {
    if (!sample.is_object() || !sample.contains("metric") || !sample["metric"].is_object() ||
        !sample.contains("value") || !sample["value"].is_array() || sample["value"].size() != 2 ||
        !sample["value"][1].is_string()) {
      return absl::InvalidArgumentError(
          "unexpected Prometheus answer: a series without `metric` labels or a [time, value]");
    }
    const nlohmann::json& labels = sample["metric"];
    int layer = 0, expert = 0;
    if (!StrictIndex(labels, "layer", &layer) || !StrictIndex(labels, "expert", &expert)) {
      return absl::InvalidArgumentError(
          absl::StrCat("unexpected Prometheus answer: series labels ", labels.dump().substr(0, 200),
                       " need `layer` and `expert` as plain decimal integers"));
    }
    const std::string& text = sample["value"][1].get_ref<const std::string&>();
    double value = 0;
    if (!absl::SimpleAtod(text, &value) || !std::isfinite(value) || value < 0) {
      return absl::FailedPreconditionError(absl::StrCat("load `", text.substr(0, 40),
                                                        "` for layer ", layer, " expert ", expert,
                                                        " is not a finite count >= 0"));
    }
    if (layer >= num_layers || expert >= num_experts) {
      return absl::FailedPreconditionError(
          absl::StrCat("Prometheus has series for layer ", layer, " expert ", expert,
                       ", outside the model's ", num_layers, " x ", num_experts));
    }
    if (seen[layer][expert]) {
      return absl::FailedPreconditionError(absl::StrCat(
          "Prometheus has two series for layer ", layer, " expert ", expert, " of group `", group,
          "` (are two targets exporting the same group under different labels?)"));
    }
    load[layer][expert] = static_cast<float>(value);
    seen[layer][expert] = true;
    ++series;
  }
  if (series != num_layers * num_experts) {
    return absl::FailedPreconditionError(absl::StrCat(
        "partial data: Prometheus has ", series, " of ", num_layers * num_experts,
        " (layer, expert) series for group `", group, "` over the window; not rebalancing on it"));
  }
  return load;
}

std::unique_ptr<PlacementTarget> MakeAdminPlacementTarget(const std::string& address,
                                                          std::shared_ptr<grpc::Channel> channel,
                                                          std::string token) {
  return std::make_unique<AdminPlacementTarget>(address, std::move(channel), std::move(token));
}

Controller::Controller(ControllerOptions options, LoadSource& load_source,
                       std::vector<PlacementTarget*> targets, prometheus::Registry* registry)
    : options_(std::move(options)), load_source_(load_source), targets_(std::move(targets)) {
  if (registry == nullptr) return;
  auto& balance = prometheus::BuildGauge()
                      .Name("moeserve_eplb_balancedness")
                      .Help(
                          "Predicted mean/max GPU load of the last cycle's load, averaged over "
                          "layers, with the placement before and after")
                      .Register(*registry);
  before_ = &balance.Add({{"group", options_.group}, {"when", "before"}});
  after_ = &balance.Add({{"group", options_.group}, {"when", "after"}});
  pushes_ = &prometheus::BuildCounter()
                 .Name("moeserve_eplb_pushes_total")
                 .Help("Placements pushed and committed")
                 .Register(*registry)
                 .Add({{"group", options_.group}});
  failures_ = &prometheus::BuildCounter()
                   .Name("moeserve_eplb_failures_total")
                   .Help("Failed cycles by stage")
                   .Register(*registry);
  last_success_ = &prometheus::BuildGauge()
                       .Name("moeserve_eplb_last_success_timestamp_seconds")
                       .Help("Unix time of the last cycle that completed without error")
                       .Register(*registry)
                       .Add({{"group", options_.group}});
}

absl::Status Controller::Fail(const char* stage, absl::Status status) {
  if (failures_ != nullptr)
    failures_->Add({{"group", options_.group}, {"stage", stage}}).Increment();
  return absl::Status(status.code(), absl::StrCat(stage, ": ", status.message()));
}

template <typename T>
absl::StatusOr<T> Controller::WithRetries(const char* stage,
                                          const std::function<absl::StatusOr<T>()>& op) {
  auto backoff = options_.first_backoff;
  absl::StatusOr<T> result = op();
  for (int attempt = 1;
       attempt < options_.max_attempts && !result.ok() && IsTransient(result.status()); ++attempt) {
    std::this_thread::sleep_for(backoff);
    backoff *= 2;
    result = op();
  }
  if (!result.ok()) return Fail(stage, result.status());
  return result;
}

absl::StatusOr<CycleReport> Controller::RunCycle() {
  if (targets_.empty()) return Fail("placement", absl::InvalidArgumentError("no --targets"));
  // 1. The current placement; every target of the group must agree on it.
  GroupPlacement current;
  for (size_t i = 0; i < targets_.size(); ++i) {
    PlacementTarget* target = targets_[i];
    auto placement =
        WithRetries<GroupPlacement>("placement", [&] { return target->Get(options_.group); });
    if (!placement.ok()) return placement.status();
    if (i == 0) {
      current = std::move(*placement);
    } else if (placement->version != current.version || placement->phy2log != current.phy2log) {
      return Fail("placement",
                  absl::FailedPreconditionError(absl::StrCat(
                      "targets disagree on the placement (", targets_[0]->name(), " has version ",
                      current.version, ", ", target->name(), " has ", placement->version, ")")));
    }
  }
  const int num_layers = static_cast<int>(current.phy2log.size());
  if (num_layers == 0) {
    return Fail("placement", absl::FailedPreconditionError("the group has no MoE layers"));
  }
  ClusterShape shape;
  shape.num_replicas = options_.num_replicas > 0 ? options_.num_replicas : current.num_physical;
  shape.num_gpus = options_.num_gpus > 0 ? options_.num_gpus : current.ep_size;
  shape.num_nodes = options_.num_nodes;
  shape.num_groups = current.num_expert_groups;
  if (shape.num_replicas != current.num_physical || shape.num_gpus != current.ep_size) {
    return Fail("shape", absl::InvalidArgumentError(absl::StrCat(
                             "--num-replicas ", shape.num_replicas, " / --num-gpus ",
                             shape.num_gpus, " do not match the group's ", current.num_physical,
                             " slots on ", current.ep_size, " ranks")));
  }

  // 2. The load over the window; partial data is never used.
  auto load = WithRetries<LoadMatrix>("load", [&] {
    return load_source_.Query(options_.group, options_.window_seconds, num_layers,
                              current.num_logical);
  });
  if (!load.ok()) return load.status();
  double total = 0;
  for (const auto& layer : *load)
    for (float v : layer) total += v;

  CycleReport report;
  report.version = current.version;
  if (total <= 0) {
    report.reason = "no expert load in the window; nothing to balance";
    if (last_success_ != nullptr) last_success_->Set(UnixNow());
    return report;
  }

  // 3. Rebalance and predict.
  auto plan = RebalanceExperts(*load, shape);
  if (!plan.ok()) return Fail("rebalance", plan.status());
  auto before = MeasureBalance(*load, current.phy2log, shape.num_gpus);
  auto after = MeasureBalance(*load, plan->phy2log, shape.num_gpus);
  if (!before.ok()) return Fail("rebalance", before.status());
  if (!after.ok()) return Fail("rebalance", after.status());
  report.balancedness_before = AverageBalancedness(*before);
  report.balancedness_after = AverageBalancedness(*after);
  report.phy2log = plan->phy2log;
  if (before_ != nullptr) {
    before_->Set(report.balancedness_before);
    after_->Set(report.balancedness_after);
  }
  const double gain = report.balancedness_after - report.balancedness_before;
  if (gain <= options_.min_improvement) {
    report.reason = absl::StrCat("predicted gain ", gain, " is not above --min-improvement ",
                                 options_.min_improvement);
    if (last_success_ != nullptr) last_success_->Set(UnixNow());
    return report;
  }
  report.version = current.version + 1;
  if (options_.dry_run) {
    report.reason = absl::StrCat("dry run: would push version ", report.version);
    return report;
  }

  // 4. Push to every target (each commits at a step boundary of its own group).
  for (PlacementTarget* target : targets_) {
    auto pushed = WithRetries<bool>("push", [&]() -> absl::StatusOr<bool> {
      absl::Status status = target->Update(options_.group, report.version, report.phy2log);
      if (!status.ok()) return status;
      return true;
    });
    if (!pushed.ok()) return pushed.status();
  }
  report.pushed = true;
  report.reason = absl::StrCat("pushed version ", report.version, ": predicted balancedness ",
                               report.balancedness_before, " -> ", report.balancedness_after);
  if (pushes_ != nullptr) pushes_->Increment();
  if (last_success_ != nullptr) last_success_->Set(UnixNow());
  return report;
}

}  // namespace moeserve::eplb
