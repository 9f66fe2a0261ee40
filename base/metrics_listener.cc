#include "base/metrics_listener.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "base/http_listener.h"
#include "base/process_metrics.h"
#include "prometheus/text_serializer.h"

namespace moeserve::base {
namespace {

class HttpMetricsListener : public MetricsListener {
 public:
  explicit HttpMetricsListener(std::vector<std::pair<std::string, std::string>> constant_labels)
      : constant_labels_(std::move(constant_labels)) {
    // Scrapes are rare and small: two threads serve them (a second scraper, or a slow one,
    // does not stall the first).
    server_.new_task_queue = [] { return new httplib::ThreadPool(2); };
    server_.set_read_timeout(10, 0);
    server_.set_write_timeout(10, 0);
    server_.Get("/metrics", [this](const httplib::Request&, httplib::Response& response) {
      response.set_content(Serialize(), "text/plain; version=0.0.4; charset=utf-8");
    });
    server_.Get("/", [](const httplib::Request&, httplib::Response& response) {
      response.set_content("moeserve metrics: GET /metrics\n", "text/plain");
    });
  }

  absl::Status Listen(const std::string& host, int port) {
    absl::StatusOr<int> bound = listener_.Bind(host, port, "cannot serve metrics");
    if (!bound.ok()) return bound.status();
    port_ = *bound;
    listener_.Start();
    return absl::OkStatus();
  }

  void RegisterCollectable(const std::weak_ptr<prometheus::Collectable>& collectable) override {
    absl::MutexLock lock(&mutex_);
    collectables_.push_back(collectable);
  }

  int port() const override { return port_; }

 private:
  std::string Serialize() {
    std::vector<std::shared_ptr<prometheus::Collectable>> live;
    {
      absl::MutexLock lock(&mutex_);
      std::erase_if(collectables_, [](const auto& weak) { return weak.expired(); });
      for (const auto& weak : collectables_) {
        if (std::shared_ptr<prometheus::Collectable> collectable = weak.lock()) {
          live.push_back(std::move(collectable));
        }
      }
    }
    std::vector<prometheus::MetricFamily> families;
    for (const auto& collectable : live) {
      std::vector<prometheus::MetricFamily> collected = collectable->Collect();
      families.insert(families.end(), std::make_move_iterator(collected.begin()),
                      std::make_move_iterator(collected.end()));
    }
    std::vector<prometheus::MetricFamily> process = process_metrics_->Collect();
    families.insert(families.end(), std::make_move_iterator(process.begin()),
                    std::make_move_iterator(process.end()));
    AddConstantLabels(families);
    return prometheus::TextSerializer().Serialize(families);
  }

  // Adds the listener's constant labels to every series that does not have them already.
  void AddConstantLabels(std::vector<prometheus::MetricFamily>& families) const {
    if (constant_labels_.empty()) return;
    for (prometheus::MetricFamily& family : families) {
      for (prometheus::ClientMetric& metric : family.metric) {
        for (const auto& [name, value] : constant_labels_) {
          const bool present = std::any_of(metric.label.begin(), metric.label.end(),
                                           [&](const auto& label) { return label.name == name; });
          if (!present) metric.label.push_back({name, value});
        }
      }
    }
  }

  httplib::Server server_;
  HttpListener listener_{server_};  // after server_: stops it before it goes
  int port_ = -1;
  const std::vector<std::pair<std::string, std::string>> constant_labels_;
  const std::shared_ptr<prometheus::Collectable> process_metrics_ = NewProcessMetrics();
  absl::Mutex mutex_;
  std::vector<std::weak_ptr<prometheus::Collectable>> collectables_ ABSL_GUARDED_BY(mutex_);
};

}  // namespace

absl::StatusOr<std::unique_ptr<MetricsListener>> MetricsListener::Start(
    const std::string& host, int port,
    std::vector<std::pair<std::string, std::string>> constant_labels) {
  auto listener = std::make_unique<HttpMetricsListener>(std::move(constant_labels));
  if (absl::Status status = listener->Listen(host, port); !status.ok()) return status;
  return listener;
}

}  // namespace moeserve::base
