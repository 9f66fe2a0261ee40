#include "base/load_progress.h"

#include <algorithm>
#include <vector>

#include "absl/strings/str_format.h"
#include "prometheus/metric_family.h"
#include "spdlog/spdlog.h"

namespace moeserve::base {
namespace {

// Progress lines come at most this often (and always for the last one).
constexpr absl::Duration kLineInterval = absl::Seconds(5);

class LoadProgressCollectable final : public prometheus::Collectable {
 public:
  std::vector<prometheus::MetricFamily> Collect() const override {
    prometheus::MetricFamily family;
    family.name = "moeserve_model_load_progress_ratio";
    family.help = "Fraction of the model's weight bytes this process has loaded (1: loaded)";
    family.type = prometheus::MetricType::Gauge;
    prometheus::ClientMetric metric;
    metric.gauge.value = LoadProgress::Global().ratio();
    family.metric.push_back(std::move(metric));
    return {std::move(family)};
  }
};

// "812.3 MB", "12.41 GB" (decimal units, as disk and network rates are quoted).
std::string Bytes(double bytes) {
  if (bytes >= 1e9) return absl::StrFormat("%.2f GB", bytes / 1e9);
  if (bytes >= 1e6) return absl::StrFormat("%.1f MB", bytes / 1e6);
  return absl::StrFormat("%.1f kB", bytes / 1e3);
}

}  // namespace

LoadProgress& LoadProgress::Global() {
  static LoadProgress* const progress = new LoadProgress();
  return *progress;
}

void LoadProgress::Begin(const std::string& what, uint64_t total_bytes) {
  absl::MutexLock lock(&mutex_);
  what_ = what;
  total_bytes_ = total_bytes;
  done_bytes_ = 0;
  finished_ = false;
  started_ = true;
  start_ = absl::Now();
  last_line_ = start_;
  spdlog::info("moeserve: loading {}: {} of weights", what_, Bytes(total_bytes_));
}

void LoadProgress::Advance(uint64_t bytes) {
  absl::MutexLock lock(&mutex_);
  if (finished_) return;  // later reads (a placement's new experts) are not the load
  done_bytes_ = std::min(total_bytes_, done_bytes_ + bytes);
  if (absl::Now() - last_line_ >= kLineInterval) LogLocked(/*last=*/false);
}

void LoadProgress::Finish() {
  absl::MutexLock lock(&mutex_);
  if (finished_) return;
  finished_ = true;
  if (started_) LogLocked(/*last=*/true);
}

double LoadProgress::ratio() const {
  absl::MutexLock lock(&mutex_);
  if (finished_) return 1;
  if (total_bytes_ == 0) return 0;
  return static_cast<double>(done_bytes_) / static_cast<double>(total_bytes_);
}

void LoadProgress::LogLocked(bool last) {
  const absl::Time now = absl::Now();
  last_line_ = now;
  const double seconds = std::max(1e-9, absl::ToDoubleSeconds(now - start_));
  const double rate = static_cast<double>(done_bytes_) / seconds;
  if (last) {
    spdlog::info("moeserve: loaded {}: {} in {:.1f} s ({}/s)", what_, Bytes(done_bytes_), seconds,
                 Bytes(rate));
    return;
  }
  const double left = rate > 0 ? static_cast<double>(total_bytes_ - done_bytes_) / rate : 0;
  spdlog::info("moeserve: loading {}: {} of {} ({:.0f}%), {}/s, ETA {:.0f} s", what_,
               Bytes(done_bytes_), Bytes(total_bytes_),
               100.0 * static_cast<double>(done_bytes_) / std::max<double>(1, total_bytes_),
               Bytes(rate), left);
}

std::shared_ptr<prometheus::Collectable> LoadProgress::NewCollectable() {
  return std::make_shared<LoadProgressCollectable>();
}

}  // namespace moeserve::base
