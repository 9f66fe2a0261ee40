// PeerWaker: wakes the idle ranks of a group whose ranks are processes. An idle rank sleeps
// between step agreements (up to 50 ms) so that an idle group costs nothing; when a request
// reaches one rank, the others must join the next agreement at once, not when their sleep
// ends. Ranks of one process wake each other through the group's condition variable; across
// processes, each rank binds a UDP socket, publishes its address in the group's rendezvous
// store, and a wake is one datagram to every peer. A lost datagram costs only the rest of the
// sleep it would have cut short, so nothing is retried or acknowledged.
//
// Thread-safe: WakePeers from any thread; the wake handler runs on the waker's receive thread.
#pragma once

#include <netinet/in.h>
#include <sys/socket.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/api/key_value_store.h"

namespace moeserve::engine::comm {

class PeerWaker {
 public:
  // Binds this rank's socket on `hostname`, publishes it under `key_prefix` and reads every
  // peer's address (waiting up to `timeout` for them: DEADLINE_EXCEEDED naming the ranks
  // missing).
  static absl::StatusOr<std::unique_ptr<PeerWaker>> Create(KeyValueStore& store,
                                                           const std::string& key_prefix, int rank,
                                                           int size, const std::string& hostname,
                                                           std::chrono::milliseconds timeout);
  ~PeerWaker();
  PeerWaker(const PeerWaker&) = delete;
  PeerWaker& operator=(const PeerWaker&) = delete;

  // Starts receiving: `on_wake` runs for every wake from a peer. Once.
  void Start(std::function<void()> on_wake);
  // Sends one wake to every other rank; never blocks.
  void WakePeers();

 private:
  PeerWaker(int socket, int rank, std::vector<sockaddr_storage> peers,
            std::vector<socklen_t> peer_lengths);
  void Receive(const std::function<void()>& on_wake);

  const int socket_;
  const int rank_;
  std::vector<sockaddr_storage> peers_;  // [rank]; this rank's entry unused
  std::vector<socklen_t> peer_lengths_;
  std::atomic<bool> stopping_{false};
  std::thread receiver_;
};

}  // namespace moeserve::engine::comm
