// The `moeserve rank` process: one rank of an expert-parallel group whose ranks are processes
// (one per GPU, or CPU ranks), on any node. It serves the internal Worker API to the cluster
// front end (worker.proto), its /metrics, grpc.health.v1 and (with a token) the Admin API; rank 0
// also hosts the group's rendezvous, where the ranks find each other.
//
// Start-up: listen, join the leader (from --leader, or LWS_LEADER_ADDRESS on Kubernetes) and
// learn the group's epoch, load the model, form the group (Gloo between CPU ranks, NCCL between
// GPU ranks), report ready. The process fails fast: when its group fails (a peer died or hung,
// a step failed) it logs why and exits with code 3, so that the whole group is re-formed by
// whoever runs it (the node supervisor exits too; the orchestrator recreates the group).
// SIGTERM/SIGINT drain in-flight streams and exit 0.
//
// RunRank is called once from main(); it blocks until the process ends.
#pragma once

#include <string>

#include "engine/engine.h"

namespace moeserve::server {

struct RankOptions {
  std::string group = "mixed";  // mixed, prefill or decode
  int group_size = 1;
  int rank = 0;
  // The group leader's (rank 0's) worker address; empty: LWS_LEADER_ADDRESS:leader_port, or
  // this process's own address for rank 0.
  std::string leader;
  int leader_port = 50100;
  std::string host = "127.0.0.1";     // where to listen
  std::string advertise_host;         // the address peers and the front end use (default: host)
  int port = 50100;                   // worker API (0: pick a free one)
  int metrics_port = 0;               // 0 picks a free one, -1: off
  double join_timeout_seconds = 300;  // to reach the leader and form the group
  double shutdown_grace_seconds = 10;
  // Health `liveness` turns NOT_SERVING when the rank's loop stalls this long.
  double liveness_stall_seconds = 120;
  std::string admin_token_file;
  int cuda_device = -1;
  // The node supervisor that started this rank (`moeserve node`), which it must not outlive;
  // 0: none.
  int supervisor_pid = 0;
  engine::EngineOptions engine;
};

// Returns the process exit code: 0 after SIGTERM/SIGINT, 2 when the group did not form, 3 when
// it failed while serving, 1 for other start-up errors.
int RunRank(const RankOptions& options);

}  // namespace moeserve::server
