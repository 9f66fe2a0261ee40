// The rendezvous of a group of rank processes, hosted by its leader (rank 0):
//
// - RendezvousService, the leader's side: who joined (each rank's worker address), who is
//   ready, a key-value store for forming the communicators, and the group's epoch — the
//   leader process's identity, new at every formation, so that ranks of an old formation and
//   a new one never mix;
// - RendezvousClient, every rank's side (the leader's too): joins (retrying while the leader
//   is not up yet), reports ready, and is the engine's KeyValueStore (engine/api/).
//
// Both are thread-safe.
#pragma once

#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "engine/api/key_value_store.h"
#include "grpcpp/grpcpp.h"
#include "moeserve/v1/worker.grpc.pb.h"

namespace moeserve::server {

class RendezvousService final : public moeserve::v1::Rendezvous::Service {
 public:
  RendezvousService(std::string group, int group_size, std::string epoch);
  const std::string& epoch() const { return epoch_; }

  grpc::Status Join(grpc::ServerContext* context, const moeserve::v1::JoinRequest* request,
                    moeserve::v1::JoinResponse* response) override;
  grpc::Status Ready(grpc::ServerContext* context, const moeserve::v1::ReadyRequest* request,
                     moeserve::v1::ReadyResponse* response) override;
  grpc::Status Set(grpc::ServerContext* context, const moeserve::v1::SetRequest* request,
                   moeserve::v1::SetResponse* response) override;
  grpc::Status Get(grpc::ServerContext* context, const moeserve::v1::GetRequest* request,
                   moeserve::v1::GetResponse* response) override;
  grpc::Status Members(grpc::ServerContext* context, const moeserve::v1::MembersRequest* request,
                       moeserve::v1::GroupMembers* response) override;

 private:
  struct Member {
    std::string worker_address;
    bool ready = false;
  };
  const std::string group_;
  const int group_size_;
  const std::string epoch_;
  absl::Mutex mutex_;
  absl::CondVar changed_;
  std::map<int, Member> members_ ABSL_GUARDED_BY(mutex_);
  std::map<std::string, std::string> values_ ABSL_GUARDED_BY(mutex_);
};

// A fresh epoch: the time, the process id and randomness.
std::string NewEpoch();

class RendezvousClient : public engine::KeyValueStore {
 public:
  explicit RendezvousClient(const std::string& leader_address);

  // Announces this rank and returns the group's epoch. Retries until `timeout` while the
  // leader is not reachable yet; refuses a rank or size the leader does not share.
  absl::StatusOr<std::string> Join(const std::string& group, int group_size, int rank,
                                   const std::string& worker_address,
                                   std::chrono::milliseconds timeout);
  absl::Status Ready(const std::string& epoch, int rank);
  absl::StatusOr<moeserve::v1::GroupMembers> Members(std::chrono::milliseconds timeout);

  absl::Status Set(const std::string& key, const std::string& value) override;
  absl::StatusOr<std::string> Get(const std::string& key,
                                  std::chrono::milliseconds timeout) override;

 private:
  std::string leader_address_;
  std::unique_ptr<moeserve::v1::Rendezvous::Stub> stub_;
};

}  // namespace moeserve::server
