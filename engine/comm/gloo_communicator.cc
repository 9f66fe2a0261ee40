#include "engine/comm/gloo_communicator.h"

#include <gloo/allgather.h>
#include <gloo/allreduce.h>
#include <gloo/alltoallv.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/prefix_store.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/tcp/device.h>
#include <signal.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <mutex>

#include "absl/strings/str_cat.h"

namespace moeserve::engine::comm {
namespace {

template <typename T>
gloo::AllreduceOptions::Func ReduceFunction(ReduceOp op) {
  return [op](void* out, const void* a, const void* b, size_t n) {
    T* c = static_cast<T*>(out);
    const T* x = static_cast<const T*>(a);
    const T* y = static_cast<const T*>(b);
    for (size_t i = 0; i < n; ++i) {
      switch (op) {
        case ReduceOp::kSum:
          c[i] = x[i] + y[i];
          break;
        case ReduceOp::kMax:
          c[i] = std::max(x[i], y[i]);
          break;
        case ReduceOp::kMin:
          c[i] = std::min(x[i], y[i]);
          break;
      }
    }
  };
}

}  // namespace

// One channel of the group: a Gloo context of this process's rank, and its communicator.
class GlooCommunicatorGroup::Channel : public Communicator {
 public:
  Channel(std::shared_ptr<gloo::rendezvous::Context> context, const GlooGroupOptions& options,
          std::shared_ptr<std::atomic<bool>> aborted)
      : context_(std::move(context)), options_(options), aborted_(std::move(aborted)) {}

  int rank() const override { return options_.rank; }
  int size() const override { return options_.size; }

  absl::Status AllToAllV(const void* send, std::span<const int64_t> send_bytes, void* recv,
                         std::span<const int64_t> recv_bytes) override {
    if (static_cast<int>(send_bytes.size()) != size() ||
        static_cast<int>(recv_bytes.size()) != size()) {
      return absl::InvalidArgumentError("AllToAllV: count vectors must have one entry per rank");
    }
    // Gloo wants buffers even where nothing moves.
    char dummy_in = 0, dummy_out = 0;
    const char* in = send != nullptr ? static_cast<const char*>(send) : &dummy_in;
    char* out = recv != nullptr ? static_cast<char*>(recv) : &dummy_out;
    return Run("all-to-all", [&] {
      gloo::AlltoallvOptions opts(context_);
      opts.setTag(NextTag());
      opts.setTimeout(options_.timeout);
      opts.setInput(const_cast<char*>(in),
                    std::vector<int64_t>(send_bytes.begin(), send_bytes.end()));
      opts.setOutput(out, std::vector<int64_t>(recv_bytes.begin(), recv_bytes.end()));
      gloo::alltoallv(opts);
    });
  }

  absl::Status AllReduce(int64_t* values, int count, ReduceOp op) override {
    return Reduce(values, count, op);
  }
  absl::Status AllReduce(float* values, int count, ReduceOp op) override {
    return Reduce(values, count, op);
  }

  absl::Status AllGather(const void* send, int64_t bytes, void* recv) override {
    if (bytes == 0) return Barrier();
    return Run("all-gather", [&] {
      gloo::AllgatherOptions opts(context_);
      opts.setTag(NextTag());
      opts.setTimeout(options_.timeout);
      opts.setInput(const_cast<char*>(static_cast<const char*>(send)), static_cast<size_t>(bytes));
      opts.setOutput(static_cast<char*>(recv), static_cast<size_t>(bytes) * size());
      gloo::allgather(opts);
    });
  }

  absl::Status Broadcast(void* data, int64_t bytes, int root) override {
    if (root < 0 || root >= size()) return absl::InvalidArgumentError("Broadcast: bad root");
    if (bytes == 0) return Barrier();
    return Run("broadcast", [&] {
      gloo::BroadcastOptions opts(context_);
      opts.setTag(NextTag());
      opts.setTimeout(options_.timeout);
      opts.setRoot(root);
      opts.setOutput(static_cast<char*>(data), static_cast<size_t>(bytes));
      gloo::broadcast(opts);
    });
  }

  absl::Status Barrier() override {
    return Run("barrier", [&] {
      gloo::BarrierOptions opts(context_);
      opts.setTag(NextTag());
      opts.setTimeout(options_.timeout);
      gloo::barrier(opts);
    });
  }

 private:
  template <typename T>
  absl::Status Reduce(T* values, int count, ReduceOp op) {
    if (count <= 0) return absl::OkStatus();
    return Run("all-reduce", [&] {
      gloo::AllreduceOptions opts(context_);
      opts.setTag(NextTag());
      opts.setTimeout(options_.timeout);
      opts.setOutput(values, static_cast<size_t>(count));
      opts.setReduceFunction(ReduceFunction<T>(op));
      // The group's all-reduces are a few values (the per-step agreement, counts): their cost is
      // the number of sequential message rounds, 2(n-1) for the ring and about log n for bcube.
      // Measured (docs/PERFORMANCE.md): bcube is faster from 4 ranks on, the ring at 2.
      opts.setAlgorithm(context_->size > 2 ? gloo::AllreduceOptions::Algorithm::BCUBE
                                           : gloo::AllreduceOptions::Algorithm::RING);
      gloo::allreduce(opts);
    });
  }

  uint32_t NextTag() { return next_tag_++; }

  // Runs one collective; any failure fails this channel for good.
  template <typename Collective>
  absl::Status Run(const char* what, Collective collective) {
    if (!failure_.ok()) return failure_;
    if (aborted_->load()) {
      failure_ = absl::UnavailableError("the expert-parallel group failed (aborted)");
      return failure_;
    }
    try {
      collective();
      return absl::OkStatus();
    } catch (const std::exception& e) {
      // Gloo reports a dead peer as an I/O error and a hung one as a timeout, both as
      // exceptions; no collective of this group can succeed after either.
      failure_ = absl::UnavailableError(absl::StrCat(
          what, " of rank ", rank(), " failed (", e.what(),
          "): a rank of the expert-parallel group died or did not reach the collective within ",
          options_.timeout.count(), " ms"));
      return failure_;
    }
  }

  std::shared_ptr<gloo::rendezvous::Context> context_;
  const GlooGroupOptions& options_;
  std::shared_ptr<std::atomic<bool>> aborted_;
  uint32_t next_tag_ = 1;
  absl::Status failure_;
};

namespace {

// Gloo's TCP transport writes to its peers' sockets without MSG_NOSIGNAL, so a write to a peer
// that just died raises SIGPIPE, whose default action ends this process before the failed write
// can become the UNAVAILABLE status the group promises. Ignoring it (only where nobody installed
// a handler) turns the broken pipe into EPIPE, which Gloo reports as an exception.
void IgnoreBrokenPipes() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction current {};
    if (sigaction(SIGPIPE, nullptr, &current) == 0 && current.sa_handler == SIG_DFL) {
      signal(SIGPIPE, SIG_IGN);
    }
  });
}

}  // namespace

GlooCommunicatorGroup::GlooCommunicatorGroup(GlooGroupOptions options)
    : options_(std::move(options)), aborted_(std::make_shared<std::atomic<bool>>(false)) {}

GlooCommunicatorGroup::~GlooCommunicatorGroup() = default;

absl::StatusOr<std::unique_ptr<GlooCommunicatorGroup>> GlooCommunicatorGroup::Create(
    std::shared_ptr<gloo::rendezvous::Store> store, const GlooGroupOptions& options) {
  if (options.size < 1 || options.rank < 0 || options.rank >= options.size ||
      options.num_channels < 1) {
    return absl::InvalidArgumentError(absl::StrCat("rank ", options.rank, " is outside a group of ",
                                                   options.size, " (or no channels)"));
  }
  IgnoreBrokenPipes();
  auto group = std::unique_ptr<GlooCommunicatorGroup>(new GlooCommunicatorGroup(options));
  try {
    gloo::transport::tcp::attr attr;
    attr.hostname = options.hostname;
    std::shared_ptr<gloo::transport::Device> device = gloo::transport::tcp::CreateDevice(attr);
    for (int channel = 0; channel < options.num_channels; ++channel) {
      auto context = std::make_shared<gloo::rendezvous::Context>(options.rank, options.size);
      // Forming waits for the slowest rank's model to load; collectives set their own timeout.
      context->setTimeout(options.form_timeout.count() > 0 ? options.form_timeout
                                                           : options.timeout);
      gloo::rendezvous::PrefixStore prefixed(absl::StrCat(options.key_prefix, "/channel", channel),
                                             *store);
      context->connectFullMesh(prefixed, device);
      group->channels_.push_back(
          std::make_unique<Channel>(std::move(context), group->options_, group->aborted_));
    }
  } catch (const std::exception& e) {
    return absl::DeadlineExceededError(absl::StrCat(
        "rank ", options.rank, " of ", options.size, " (", options.key_prefix,
        "): the group did not form within ",
        (options.form_timeout.count() > 0 ? options.form_timeout : options.timeout).count(),
        " ms — are all its ranks running and reachable? (", e.what(), ")"));
  }
  return group;
}

Communicator& GlooCommunicatorGroup::communicator(int rank, int channel) {
  (void)rank;  // the one local rank
  return *channels_[channel];
}

void GlooCommunicatorGroup::Abort() { aborted_->store(true); }

}  // namespace moeserve::engine::comm
