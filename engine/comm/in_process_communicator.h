// InProcessCommunicator: the Communicator for ranks that are threads of one process (the CPU
// engine, tests). Collectives are shared-memory copies between the ranks' buffers, ordered by a
// reusable barrier with a timeout.
//
// InProcessGroup owns the shared state of one group and hands out one communicator per
// (rank, channel). Each communicator is used by one thread; different channels are independent.
#pragma once

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <vector>

#include "engine/comm/communicator.h"

namespace moeserve::engine::comm {

class InProcessGroup {
 public:
  // `timeout`: how long a collective waits for the slowest rank before failing.
  InProcessGroup(int size, int num_channels,
                 std::chrono::milliseconds timeout = std::chrono::seconds(120));
  ~InProcessGroup();

  int size() const { return size_; }
  Communicator& communicator(int rank, int channel = 0);

  // Makes every pending and future collective fail with UNAVAILABLE (a rank died).
  void Abort();

 private:
  class Channel;
  class RankCommunicator;
  int size_;
  std::vector<std::unique_ptr<Channel>> channels_;
  std::vector<std::unique_ptr<RankCommunicator>> communicators_;  // [channel * size + rank]
};

}  // namespace moeserve::engine::comm
