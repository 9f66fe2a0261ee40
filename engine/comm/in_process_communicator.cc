#include "engine/comm/in_process_communicator.h"

#include <cstring>
#include <numeric>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "engine/base/status_macros.h"

namespace moeserve::engine::comm {

// Shared state of one channel: what each rank published for the current collective, and a
// reusable barrier.
class InProcessGroup::Channel {
 public:
  struct Slot {
    const void* send = nullptr;
    const int64_t* send_bytes = nullptr;
    int64_t bytes = 0;
  };

  Channel(int size, std::chrono::milliseconds timeout)
      : slots(size), size_(size), timeout_(timeout) {}

  // Waits until every rank arrived; UNAVAILABLE on timeout or abort (and then the channel stays
  // broken, so no rank waits on it again).
  absl::Status Arrive() {
    absl::MutexLock lock(&mutex_);
    if (broken_) return Broken();
    const uint64_t generation = generation_;
    if (++arrived_ == size_) {
      arrived_ = 0;
      ++generation_;
      all_arrived_.SignalAll();
      return absl::OkStatus();
    }
    const absl::Time deadline = absl::Now() + absl::FromChrono(timeout_);
    while (generation_ == generation && !broken_) {
      if (all_arrived_.WaitWithDeadline(&mutex_, deadline) && generation_ == generation &&
          !broken_) {
        broken_ = true;
        all_arrived_.SignalAll();
        return absl::UnavailableError(
            absl::StrCat("a rank of the expert-parallel group did not reach a collective within ",
                         timeout_.count(), " ms; the group is failed"));
      }
    }
    if (generation_ == generation) return Broken();
    return absl::OkStatus();
  }

  void Abort() {
    absl::MutexLock lock(&mutex_);
    broken_ = true;
    all_arrived_.SignalAll();
  }

  std::vector<Slot> slots;

 private:
  static absl::Status Broken() {
    return absl::UnavailableError("the expert-parallel group failed (a rank stopped responding)");
  }
  int size_;
  std::chrono::milliseconds timeout_;
  absl::Mutex mutex_;
  absl::CondVar all_arrived_;
  int arrived_ ABSL_GUARDED_BY(mutex_) = 0;
  uint64_t generation_ ABSL_GUARDED_BY(mutex_) = 0;
  bool broken_ ABSL_GUARDED_BY(mutex_) = false;
};

class InProcessGroup::RankCommunicator : public Communicator {
 public:
  RankCommunicator(Channel& channel, int rank, int size)
      : channel_(channel), rank_(rank), size_(size) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }

  absl::Status AllToAllV(const void* send, std::span<const int64_t> send_bytes, void* recv,
                         std::span<const int64_t> recv_bytes) override {
    if (static_cast<int>(send_bytes.size()) != size_ ||
        static_cast<int>(recv_bytes.size()) != size_) {
      return absl::InvalidArgumentError("AllToAllV: count vectors must have one entry per rank");
    }
    channel_.slots[rank_] = {send, send_bytes.data(), 0};
    RETURN_IF_ERROR(channel_.Arrive());
    absl::Status result;
    int64_t recv_offset = 0;
    for (int peer = 0; peer < size_; ++peer) {
      const Channel::Slot& slot = channel_.slots[peer];
      int64_t send_offset = 0;
      for (int q = 0; q < rank_; ++q) send_offset += slot.send_bytes[q];
      const int64_t bytes = slot.send_bytes[rank_];
      if (bytes != recv_bytes[peer]) {
        result = absl::InternalError(absl::StrCat("AllToAllV: rank ", peer, " sends ", bytes,
                                                  " bytes to rank ", rank_, ", which expects ",
                                                  recv_bytes[peer]));
      } else if (bytes > 0) {
        std::memcpy(static_cast<char*>(recv) + recv_offset,
                    static_cast<const char*>(slot.send) + send_offset, bytes);
      }
      recv_offset += recv_bytes[peer];
    }
    RETURN_IF_ERROR(channel_.Arrive());
    return result;
  }

  absl::Status AllReduce(int64_t* values, int count, ReduceOp op) override {
    return Reduce(values, count, op);
  }
  absl::Status AllReduce(float* values, int count, ReduceOp op) override {
    return Reduce(values, count, op);
  }

  absl::Status AllGather(const void* send, int64_t bytes, void* recv) override {
    channel_.slots[rank_] = {send, nullptr, bytes};
    RETURN_IF_ERROR(channel_.Arrive());
    for (int peer = 0; peer < size_; ++peer) {
      std::memcpy(static_cast<char*>(recv) + peer * bytes, channel_.slots[peer].send, bytes);
    }
    return channel_.Arrive();
  }

  absl::Status Broadcast(void* data, int64_t bytes, int root) override {
    channel_.slots[rank_] = {data, nullptr, bytes};
    RETURN_IF_ERROR(channel_.Arrive());
    if (rank_ != root) std::memcpy(data, channel_.slots[root].send, bytes);
    return channel_.Arrive();
  }

  absl::Status Barrier() override { return channel_.Arrive(); }

 private:
  template <typename T>
  absl::Status Reduce(T* values, int count, ReduceOp op) {
    channel_.slots[rank_] = {values, nullptr, count};
    RETURN_IF_ERROR(channel_.Arrive());
    // Every rank reduces in rank order, so all get bit-identical results.
    std::vector<T> result(static_cast<const T*>(channel_.slots[0].send),
                          static_cast<const T*>(channel_.slots[0].send) + count);
    for (int peer = 1; peer < size_; ++peer) {
      const T* other = static_cast<const T*>(channel_.slots[peer].send);
      for (int i = 0; i < count; ++i) {
        switch (op) {
          case ReduceOp::kSum:
            result[i] += other[i];
            break;
          case ReduceOp::kMax:
            result[i] = std::max(result[i], other[i]);
            break;
          case ReduceOp::kMin:
            result[i] = std::min(result[i], other[i]);
            break;
        }
      }
    }
    // Peers may still be reading `values`: write only after everyone has read.
    RETURN_IF_ERROR(channel_.Arrive());
    std::copy(result.begin(), result.end(), values);
    return absl::OkStatus();
  }

  Channel& channel_;
  int rank_;
  int size_;
};

InProcessGroup::InProcessGroup(int size, int num_channels, std::chrono::milliseconds timeout)
    : size_(size) {
  for (int c = 0; c < num_channels; ++c) {
    channels_.push_back(std::make_unique<Channel>(size, timeout));
    for (int r = 0; r < size; ++r) {
      communicators_.push_back(std::make_unique<RankCommunicator>(*channels_.back(), r, size));
    }
  }
}

InProcessGroup::~InProcessGroup() = default;

Communicator& InProcessGroup::communicator(int rank, int channel) {
  return *communicators_[static_cast<size_t>(channel) * size_ + rank];
}

std::vector<int> InProcessGroup::local_ranks() const {
  std::vector<int> ranks(size_);
  std::iota(ranks.begin(), ranks.end(), 0);
  return ranks;
}

void InProcessGroup::Abort() {
  for (auto& channel : channels_) channel->Abort();
}

}  // namespace moeserve::engine::comm
