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

#include "engine/comm/communicator_group.h"

namespace moeserve::engine::comm {

class InProcessGroup : public CommunicatorGroup {
 public:
  // `timeout`: how long a collective waits for the slowest rank before failing.
  InProcessGroup(int size, int num_channels,
                 std::chrono::milliseconds timeout = std::chrono::seconds(120));
  ~InProcessGroup() override;

  int size() const override { return size_; }
  std::vector<int> local_ranks() const override;
  int num_channels() const override { return static_cast<int>(channels_.size()); }
  Communicator& communicator(int rank, int channel = 0) override;

  // Makes every pending and future collective fail with UNAVAILABLE (a rank died).
  void Abort() override;

 private:
  class Channel;
  class RankCommunicator;
  int size_;
  std::vector<std::unique_ptr<Channel>> channels_;
  std::vector<std::unique_ptr<RankCommunicator>> communicators_;  // [channel * size + rank]
};

}  // namespace moeserve::engine::comm
