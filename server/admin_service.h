// AdminService: the `moeserve.v1.Admin` gRPC service — read and replace a group's expert
// placement (live: staged while serving, committed by all ranks at one step boundary) and read
// its expert load. Every call must carry `authorization: Bearer <token>`; the token is read
// once from --admin-token-file. Thread-safe.
#pragma once

#include <atomic>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "engine/engine.h"
#include "moeserve/v1/admin.grpc.pb.h"

namespace moeserve::server {

class AdminService final : public moeserve::v1::Admin::Service {
 public:
  explicit AdminService(std::string token);
  ~AdminService() override;

  // Makes the service live and starts keeping per-second expert-load snapshots for
  // GetExpertLoad; `engine` must outlive the service.
  void AttachEngine(engine::Engine* engine);

  grpc::Status GetExpertPlacement(grpc::ServerContext* context,
                                  const moeserve::v1::GetExpertPlacementRequest* request,
                                  moeserve::v1::ExpertPlacement* response) override;
  grpc::Status UpdateExpertPlacement(
      grpc::ServerContext* context, const moeserve::v1::UpdateExpertPlacementRequest* request,
      moeserve::v1::UpdateExpertPlacementResponse* response) override;
  grpc::Status GetExpertLoad(grpc::ServerContext* context,
                             const moeserve::v1::GetExpertLoadRequest* request,
                             moeserve::v1::ExpertLoad* response) override;

 private:
  struct LoadSnapshot {
    double unix_seconds;
    std::vector<std::vector<std::vector<int64_t>>> per_group;  // [group][layer][expert]
  };
  grpc::Status Authorize(const grpc::ServerContext& context) const;
  grpc::Status FindGroup(const std::string& name, engine::parallel::ExpertParallelGroup** group,
                         int* index) const;
  void SnapshotLoop();

  std::string token_;
  std::atomic<engine::Engine*> engine_{nullptr};
  std::mutex snapshots_mutex_;
  std::deque<LoadSnapshot> snapshots_;  // one per second, oldest first, at most 15 minutes
  std::atomic<bool> stopping_{false};
  std::thread snapshot_thread_;
};

// Reads the admin token (first line, surrounding whitespace trimmed); an empty token is an error.
absl::StatusOr<std::string> ReadAdminToken(const std::string& path);

}  // namespace moeserve::server
