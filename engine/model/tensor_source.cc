#include "engine/model/tensor_source.h"

#include <algorithm>
#include <system_error>
#include <thread>

#include "absl/strings/str_cat.h"

namespace moeserve::engine {
namespace {

// Below this many elements per thread, starting a thread costs more than it saves.
constexpr int64_t kMinElementsPerThread = int64_t{1} << 20;
constexpr int64_t kMaxReadThreads = 16;

}  // namespace

namespace {

absl::Status NotStoredAsFp8(const std::string& name) {
  return absl::FailedPreconditionError(
      absl::StrCat("tensor `", name, "` is not stored as FP8 with 128x128 block scales"));
}

}  // namespace

absl::Status TensorSource::ReadFp8Codes(const std::string& name, int64_t,
                                        std::span<uint8_t>) const {
  return NotStoredAsFp8(name);
}

absl::Status TensorSource::ReadFp8Scales(const std::string& name, std::span<float>) const {
  return NotStoredAsFp8(name);
}

int64_t NumElements(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

absl::Status ReadInParallel(int64_t count,
                            const std::function<absl::Status(int64_t begin, int64_t end)>& read) {
  const int64_t threads =
      std::clamp<int64_t>(std::min<int64_t>(std::thread::hardware_concurrency(), kMaxReadThreads),
                          1, std::max<int64_t>(1, count / kMinElementsPerThread));
  if (threads == 1) return read(0, count);
  const int64_t share = (count + threads - 1) / threads;
  std::vector<absl::Status> results(threads);
  auto run = [&](int64_t t) {
    const int64_t begin = std::min(count, t * share);
    results[t] = read(begin, std::min(count, begin + share));
  };
  std::vector<std::thread> helpers;
  int64_t started = 1;
  for (; started < threads; ++started) {
    try {
      helpers.emplace_back(run, started);
    } catch (const std::system_error&) {
      break;  // no more threads (a pids limit): the caller's thread reads the rest
    }
  }
  run(0);
  for (int64_t t = started; t < threads; ++t) run(t);
  for (std::thread& helper : helpers) helper.join();
  for (const absl::Status& status : results) {
    if (!status.ok()) return status;
  }
  return absl::OkStatus();
}

absl::Status ReadBf16InParallel(const TensorSource& source, const std::string& name, int64_t first,
                                std::span<uint16_t> out) {
  return ReadInParallel(static_cast<int64_t>(out.size()), [&](int64_t begin, int64_t end) {
    return source.ReadBf16(name, first + begin, out.subspan(begin, end - begin));
  });
}

}  // namespace moeserve::engine
