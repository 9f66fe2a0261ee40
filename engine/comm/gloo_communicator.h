// GlooCommunicatorGroup: the communicators of the one rank of an expert-parallel group that
// runs in this process, when the group's ranks are processes (on one host or many) computing on
// the CPU. Collectives go over Gloo's TCP transport; each channel (compute, and the
// communication thread of two-batch overlap) is a Gloo context of its own, so the two threads'
// collectives never interleave.
//
// The ranks meet through a key-value store that every rank can reach (the group leader's
// rendezvous service in a deployment; an in-memory store in tests): each publishes its
// addresses there and connects to every other rank. A rank that does not come within the
// timeout fails Create with DEADLINE_EXCEEDED naming the group; a peer that dies later surfaces
// at once as a connection error (UNAVAILABLE), and a peer that hangs as a timeout of the
// collective. After any failure every later collective fails too: the group is done and its
// processes exit (the orchestrator re-forms it). Forming a group ignores SIGPIPE in this process
// (unless a handler is installed) so that a peer's death is a status, not the end of the process.
//
// Thread rules: each (rank, channel) communicator is used by one thread at a time; Abort() may
// be called from any thread.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/comm/communicator_group.h"

namespace gloo::rendezvous {
class Store;
}

namespace moeserve::engine::comm {

struct GlooGroupOptions {
  int size = 1;
  int rank = 0;
  int num_channels = 2;
  // How long any collective may take before the group fails.
  std::chrono::milliseconds timeout = std::chrono::seconds(30);
  // How long forming the group may take (ranks may still be loading their models); 0: timeout.
  std::chrono::milliseconds form_timeout = std::chrono::milliseconds(0);
  // The address this rank listens on for its peers (an IP or host name of this machine).
  std::string hostname = "127.0.0.1";
  // Prefix of this group's keys in the store (e.g. the group's name and epoch), so that groups
  // and re-formations sharing a store never see each other's keys.
  std::string key_prefix = "group";
};

class GlooCommunicatorGroup : public CommunicatorGroup {
 public:
  // Forms the group: connects to every other rank through `store`. Blocks until all ranks came,
  // or fails after options.timeout.
  static absl::StatusOr<std::unique_ptr<GlooCommunicatorGroup>> Create(
      std::shared_ptr<gloo::rendezvous::Store> store, const GlooGroupOptions& options);
  ~GlooCommunicatorGroup() override;

  int size() const override { return options_.size; }
  std::vector<int> local_ranks() const override { return {options_.rank}; }
  int num_channels() const override { return options_.num_channels; }
  Communicator& communicator(int rank, int channel) override;
  // Fails every later collective of this process's communicators at once. A collective already
  // waiting for a peer ends when that peer's connection closes (its process exits) or at the
  // timeout.
  void Abort() override;

 private:
  class Channel;
  explicit GlooCommunicatorGroup(GlooGroupOptions options);

  GlooGroupOptions options_;
  std::shared_ptr<std::atomic<bool>> aborted_;
  std::vector<std::unique_ptr<Channel>> channels_;
};

}  // namespace moeserve::engine::comm
