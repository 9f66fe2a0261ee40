// CommunicatorGroup: the communicators of one expert-parallel group that live in this process,
// one per (local rank, channel). In-process groups (ranks as threads) hold every rank; a group
// spanning processes holds only the ranks of this process, and its peers are elsewhere. Channels
// are independent collective streams of the same ranks (compute, and the communication thread
// of two-batch overlap).
//
// communicator(rank, channel) is fixed after construction; each communicator is used by one
// thread at a time. Abort() may be called from any thread.
#pragma once

#include <vector>

#include "engine/comm/communicator.h"

namespace moeserve::engine::comm {

class CommunicatorGroup {
 public:
  virtual ~CommunicatorGroup() = default;
  // Ranks in the whole group (in every process).
  virtual int size() const = 0;
  // The ranks whose communicators are here, ascending.
  virtual std::vector<int> local_ranks() const = 0;
  virtual int num_channels() const = 0;
  // `rank` must be local and `channel` < num_channels().
  virtual Communicator& communicator(int rank, int channel) = 0;
  // Makes every pending and future collective of the local communicators fail with UNAVAILABLE
  // (a rank failed), so that no rank of this process waits for a peer that will not come.
  virtual void Abort() = 0;
};

}  // namespace moeserve::engine::comm
