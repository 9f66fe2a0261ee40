#include "base/random_id.h"

#include <random>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"

namespace moeserve::base {
namespace {

// One generator for the process: ids are made once per request, not in a hot loop, and a
// thread_local generator would add its 2.5 KB of state to every thread's static TLS.
ABSL_CONST_INIT absl::Mutex mutex(absl::kConstInit);

std::mt19937_64& Generator() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex) {
  static std::mt19937_64 generator{std::random_device{}()};
  return generator;
}

}  // namespace

std::string RandomHexId() {
  absl::MutexLock lock(&mutex);
  return absl::StrCat(absl::Hex(Generator()(), absl::kZeroPad16));
}

}  // namespace moeserve::base
