// ClusterEngine: the engine of the cluster front end (`moeserve frontend`) — the engine::Engine
// interface implemented over the rank processes of one mixed group, or of a prefill group and
// a decode group, so that every front door (native gRPC, KServe, OpenAI, Admin) serves a
// cluster exactly as it serves one process.
//
// - Membership and health: a poller asks each group's leader for its members and epoch and
//   each rank for its load, every poll interval. A group serves while its leader answers, all
//   its ranks joined the current epoch and are ready, and every rank reports itself healthy;
//   the health listener hears every change (a group that fails, and one that re-formed).
// - Routing: a request goes to the least-loaded rank of the entry group (reported running and
//   waiting sequences plus this front end's own requests in flight there). With a decode group,
//   the prefill rank is told the least-loaded decode rank to hand the sequence to, and the
//   stream continues from that rank.
// - Failure: requests in flight on a group that fails end with UNAVAILABLE naming the group
//   (they are not re-run elsewhere: their tokens so far were already streamed); new requests get
//   UNAVAILABLE until the group has re-formed.
// - Placements and expert load go to every rank's Admin API (the front end holds the token):
//   an update is applied by every rank of the group, which commit it at the same step.
//
// Stateless apart from in-flight streams; several front ends may serve the same groups.
// Thread-safe.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/engine.h"
#include "server/serve.h"

namespace moeserve::server {

struct ClusterOptions {
  // (group name, its leader's worker address): one "mixed" group, or "prefill" and "decode".
  std::vector<std::pair<std::string, std::string>> groups;
  double poll_interval_seconds = 0.2;
  // How long to wait at start for the entry group to answer with its model.
  double wait_for_groups_seconds = 600;
  // The ranks' Admin token, for placements and expert load (empty: those calls are refused).
  std::string admin_token;
};

// Waits (up to options.wait_for_groups_seconds) for the entry group to answer with its model;
// the engine comes with the model's chat template as the ranks report it. `registry` may be null.
absl::StatusOr<ServedEngine> CreateClusterEngine(ClusterOptions options,
                                                 prometheus::Registry* registry);

}  // namespace moeserve::server
