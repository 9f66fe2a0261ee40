// Communicator: the collectives an expert-parallel group needs — all-to-all-v, all-reduce,
// all-gather, broadcast, barrier — behind one interface, so model code never knows whether the
// ranks are threads of one process (InProcessCommunicator) or processes on GPUs (NCCL).
//
// One Communicator object belongs to one rank and one channel. Collectives on a communicator
// must be called in the same order on every rank of its group; a rank that does not arrive
// within the group's timeout makes the others fail with UNAVAILABLE instead of hanging.
// Not thread-safe: each (rank, channel) communicator is used by one thread at a time. Use
// separate channels for separate threads (e.g. the compute thread and the communication
// thread of two-batch overlap).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"

namespace moeserve::engine::comm {

enum class ReduceOp { kSum, kMax, kMin };

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;

  // Sends send_bytes[p] bytes (packed in rank order in `send`) to each peer p and receives
  // recv_bytes[p] bytes from each peer p (packed in rank order into `recv`). Both count vectors
  // have size() entries; the caller knows recv_bytes (e.g. from a counts exchange).
  virtual absl::Status AllToAllV(const void* send, std::span<const int64_t> send_bytes, void* recv,
                                 std::span<const int64_t> recv_bytes) = 0;
  // Element-wise reduction of `count` values across ranks, in place.
  virtual absl::Status AllReduce(int64_t* values, int count, ReduceOp op) = 0;
  virtual absl::Status AllReduce(float* values, int count, ReduceOp op) = 0;
  // Every rank contributes `bytes` bytes; `recv` receives size() * bytes, in rank order.
  virtual absl::Status AllGather(const void* send, int64_t bytes, void* recv) = 0;
  // Copies root's `bytes` bytes to every rank's `data`.
  virtual absl::Status Broadcast(void* data, int64_t bytes, int root) = 0;
  virtual absl::Status Barrier() = 0;

  // Exchanges one int64 per peer: send[p] goes to peer p; recv[p] comes from peer p.
  absl::Status AllToAllCounts(std::span<const int64_t> send, std::span<int64_t> recv);
};

}  // namespace moeserve::engine::comm
