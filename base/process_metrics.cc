#include "base/process_metrics.h"

#include <dirent.h>
#include <sys/resource.h>
#include <unistd.h>

#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "prometheus/metric_family.h"

namespace moeserve::base {
namespace {

prometheus::MetricFamily Family(const std::string& name, const std::string& help,
                                prometheus::MetricType type, double value) {
  prometheus::MetricFamily family;
  family.name = name;
  family.help = help;
  family.type = type;
  prometheus::ClientMetric metric;
  if (type == prometheus::MetricType::Counter) {
    metric.counter.value = value;
  } else {
    metric.gauge.value = value;
  }
  family.metric.push_back(std::move(metric));
  return family;
}

int CountOpenFiles() {
  DIR* directory = opendir("/proc/self/fd");
  if (directory == nullptr) return -1;
  int count = 0;
  while (const dirent* entry = readdir(directory)) {
    if (entry->d_name[0] != '.') ++count;
  }
  closedir(directory);
  return count - 1;  // the descriptor opendir itself holds
}

// Seconds since the epoch at which the machine booted (/proc/stat's btime).
double BootTime() {
  std::ifstream stat("/proc/stat");
  std::string key;
  double value = 0;
  while (stat >> key) {
    if (key == "btime") {
      stat >> value;
      return value;
    }
    stat.ignore(1 << 20, '\n');
  }
  return 0;
}

class ProcessMetrics final : public prometheus::Collectable {
 public:
  std::vector<prometheus::MetricFamily> Collect() const override {
    std::vector<prometheus::MetricFamily> families;
    std::ifstream stat_file("/proc/self/stat");
    std::string stat((std::istreambuf_iterator<char>(stat_file)), std::istreambuf_iterator<char>());
    // Fields after the command name (which may hold spaces) start at state, field 3.
    const size_t after_name = stat.rfind(')');
    if (after_name == std::string::npos) return families;
    std::istringstream fields(stat.substr(after_name + 2));
    std::vector<std::string> values;
    for (std::string value; fields >> value;) values.push_back(value);
    // values[i] is field i + 3 of proc(5): utime 14, stime 15, num_threads 20, starttime 22,
    // vsize 23, rss 24 (pages).
    if (values.size() < 22) return families;
    const double ticks = static_cast<double>(sysconf(_SC_CLK_TCK));
    const double page = static_cast<double>(sysconf(_SC_PAGESIZE));
    const double cpu = (std::stod(values[11]) + std::stod(values[12])) / ticks;
    families.push_back(Family("process_cpu_seconds_total", "User and system CPU time in seconds",
                              prometheus::MetricType::Counter, cpu));
    families.push_back(Family("process_resident_memory_bytes", "Resident memory in bytes",
                              prometheus::MetricType::Gauge, std::stod(values[21]) * page));
    families.push_back(Family("process_virtual_memory_bytes", "Virtual memory in bytes",
                              prometheus::MetricType::Gauge, std::stod(values[20])));
    families.push_back(Family("process_threads", "Threads of the process",
                              prometheus::MetricType::Gauge, std::stod(values[17])));
    families.push_back(Family(
        "process_start_time_seconds", "Start time of the process since the Unix epoch in seconds",
        prometheus::MetricType::Gauge, BootTime() + std::stod(values[19]) / ticks));
    families.push_back(Family("process_open_fds", "Open file descriptors",
                              prometheus::MetricType::Gauge, CountOpenFiles()));
    rlimit limit{};
    if (getrlimit(RLIMIT_NOFILE, &limit) == 0) {
      families.push_back(Family("process_max_fds", "Maximum number of open file descriptors",
                                prometheus::MetricType::Gauge,
                                static_cast<double>(limit.rlim_cur)));
    }
    return families;
  }
};

}  // namespace

std::shared_ptr<prometheus::Collectable> NewProcessMetrics() {
  return std::make_shared<ProcessMetrics>();
}

}  // namespace moeserve::base
