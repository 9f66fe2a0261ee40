// The `moeserve node` process: starts the rank processes of one node (one per GPU, or CPU
// ranks) and watches them. It restarts nothing itself: as soon as one of its ranks exits or
// stops answering its health check, it stops the others and exits non-zero, so that the
// orchestrator (a LeaderWorkerSet with RecreateGroupOnPodRestart, or scripts/run-cluster.sh)
// re-forms the group. SIGTERM/SIGINT are passed on to the ranks, which drain; then it exits 0.
//
// Rank r = node index × ranks per node + local index; local rank i listens on port + i (and
// metrics port + i). On Kubernetes the node index and the number of nodes come from
// LWS_WORKER_INDEX and LWS_GROUP_SIZE when the flags are not given.
//
// RunNode is called once from main(); it blocks until the node ends.
#pragma once

#include <string>
#include <vector>

namespace moeserve::server {

struct NodeOptions {
  int ranks_per_node = 1;
  int node_index = -1;  // -1: LWS_WORKER_INDEX
  int num_nodes = -1;   // -1: LWS_GROUP_SIZE
  int port = 50100;
  int metrics_port = -1;  // -1: the ranks serve no metrics; else metrics_port + i
  // How often a rank's health is checked, and how many missed checks in a row mean it is wedged.
  double health_interval_seconds = 1;
  int health_misses = 3;
  double shutdown_grace_seconds = 15;
  // Only check the flags: the node's, then its first rank's (`moeserve --check-flags rank ...`);
  // nothing starts.
  bool check_flags = false;
  // Everything else a rank needs (`moeserve rank` flags: --group, --leader, --model, ...).
  std::vector<std::string> rank_arguments;
};

// Returns the process exit code: 0 after SIGTERM/SIGINT, the failed rank's exit code (or 1)
// when a rank ended or stopped answering (its health `liveness` unanswered or NOT_SERVING), 2
// for rank flags that are the node's to set.
int RunNode(const NodeOptions& options);

}  // namespace moeserve::server
