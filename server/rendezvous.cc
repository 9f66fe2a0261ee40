#include "server/rendezvous.h"

#include <unistd.h>

#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "server/status_conversion.h"

namespace moeserve::server {
namespace {

// The longest a Get waits on the leader per call (a rank waits longer by calling again).
constexpr int kMaxGetWaitMs = 60000;

}  // namespace

std::string NewEpoch() {
  std::random_device random;
  return absl::StrCat(absl::ToUnixMillis(absl::Now()), "-", getpid(), "-", random() % 100000);
}

RendezvousService::RendezvousService(std::string group, int group_size, std::string epoch)
    : group_(std::move(group)), group_size_(group_size), epoch_(std::move(epoch)) {}

grpc::Status RendezvousService::Join(grpc::ServerContext*, const moeserve::v1::JoinRequest* request,
                                     moeserve::v1::JoinResponse* response) {
  if (request->group() != group_ || static_cast<int>(request->group_size()) != group_size_) {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                        absl::StrCat("this leader runs group `", group_, "` of ", group_size_,
                                     " ranks; a rank of group `", request->group().substr(0, 64),
                                     "` of ", request->group_size(), " asked to join"));
  }
  if (static_cast<int>(request->rank()) >= group_size_) {
    return grpc::Status(
        grpc::StatusCode::INVALID_ARGUMENT,
        absl::StrCat("rank ", request->rank(), " is outside a group of ", group_size_));
  }
  absl::MutexLock lock(&mutex_);
  members_[static_cast<int>(request->rank())] = {request->worker_address(), false};
  changed_.SignalAll();
  response->set_epoch(epoch_);
  return grpc::Status::OK;
}

grpc::Status RendezvousService::Ready(grpc::ServerContext*,
                                      const moeserve::v1::ReadyRequest* request,
                                      moeserve::v1::ReadyResponse*) {
  if (request->epoch() != epoch_) {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                        "the group has re-formed since this rank joined (another epoch)");
  }
  absl::MutexLock lock(&mutex_);
  auto it = members_.find(static_cast<int>(request->rank()));
  if (it == members_.end()) {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "the rank has not joined");
  }
  it->second.ready = true;
  return grpc::Status::OK;
}

grpc::Status RendezvousService::Set(grpc::ServerContext*, const moeserve::v1::SetRequest* request,
                                    moeserve::v1::SetResponse*) {
  absl::MutexLock lock(&mutex_);
  values_[request->key()] = request->value();
  changed_.SignalAll();
  return grpc::Status::OK;
}

grpc::Status RendezvousService::Get(grpc::ServerContext* context,
                                    const moeserve::v1::GetRequest* request,
                                    moeserve::v1::GetResponse* response) {
  const int wait_ms = std::min<int>(static_cast<int>(request->timeout_ms()), kMaxGetWaitMs);
  const absl::Time deadline = absl::Now() + absl::Milliseconds(wait_ms);
  absl::MutexLock lock(&mutex_);
  while (values_.count(request->key()) == 0) {
    if (context->IsCancelled() || changed_.WaitWithDeadline(&mutex_, deadline)) break;
  }
  auto it = values_.find(request->key());
  if (it == values_.end()) {
    return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                        absl::StrCat("no `", request->key().substr(0, 128), "` within ", wait_ms,
                                     " ms: a rank of group `", group_, "` is missing"));
  }
  response->set_value(it->second);
  return grpc::Status::OK;
}

grpc::Status RendezvousService::Members(grpc::ServerContext*, const moeserve::v1::MembersRequest*,
                                        moeserve::v1::GroupMembers* response) {
  response->set_group(group_);
  response->set_epoch(epoch_);
  response->set_group_size(static_cast<uint32_t>(group_size_));
  absl::MutexLock lock(&mutex_);
  for (const auto& [rank, member] : members_) {
    auto* out = response->add_members();
    out->set_rank(static_cast<uint32_t>(rank));
    out->set_worker_address(member.worker_address);
    out->set_ready(member.ready);
  }
  return grpc::Status::OK;
}

RendezvousClient::RendezvousClient(const std::string& leader_address)
    : leader_address_(leader_address),
      stub_(moeserve::v1::Rendezvous::NewStub(
          grpc::CreateChannel(leader_address, grpc::InsecureChannelCredentials()))) {}

absl::StatusOr<std::string> RendezvousClient::Join(const std::string& group, int group_size,
                                                   int rank, const std::string& worker_address,
                                                   std::chrono::milliseconds timeout) {
  moeserve::v1::JoinRequest request;
  request.set_group(group);
  request.set_group_size(static_cast<uint32_t>(group_size));
  request.set_rank(static_cast<uint32_t>(rank));
  request.set_worker_address(worker_address);
  const auto give_up = std::chrono::steady_clock::now() + timeout;
  grpc::Status last;
  while (std::chrono::steady_clock::now() < give_up) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
    context.set_wait_for_ready(true);
    moeserve::v1::JoinResponse response;
    last = stub_->Join(&context, request, &response);
    if (last.ok()) return response.epoch();
    if (last.error_code() != grpc::StatusCode::UNAVAILABLE &&
        last.error_code() != grpc::StatusCode::DEADLINE_EXCEEDED) {
      return FromGrpcStatus(last);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  return absl::DeadlineExceededError(
      absl::StrCat("rank ", rank, " of group `", group, "`: the leader at ", leader_address_,
                   " did not answer within ", timeout.count(), " ms (", last.error_message(), ")"));
}

absl::Status RendezvousClient::Ready(const std::string& epoch, int rank) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  moeserve::v1::ReadyRequest request;
  request.set_epoch(epoch);
  request.set_rank(static_cast<uint32_t>(rank));
  moeserve::v1::ReadyResponse response;
  return FromGrpcStatus(stub_->Ready(&context, request, &response));
}

absl::StatusOr<moeserve::v1::GroupMembers> RendezvousClient::Members(
    std::chrono::milliseconds timeout) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + timeout);
  moeserve::v1::GroupMembers members;
  grpc::Status status = stub_->Members(&context, {}, &members);
  if (!status.ok()) return FromGrpcStatus(status);
  return members;
}

absl::Status RendezvousClient::Set(const std::string& key, const std::string& value) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  moeserve::v1::SetRequest request;
  request.set_key(key);
  request.set_value(value);
  moeserve::v1::SetResponse response;
  return FromGrpcStatus(stub_->Set(&context, request, &response));
}

absl::StatusOr<std::string> RendezvousClient::Get(const std::string& key,
                                                  std::chrono::milliseconds timeout) {
  const auto give_up = std::chrono::steady_clock::now() + timeout;
  while (true) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        give_up - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      return absl::DeadlineExceededError(absl::StrCat("no `", key, "` within ", timeout.count(),
                                                      " ms: a rank of the group is missing"));
    }
    const int wait_ms = static_cast<int>(std::min<int64_t>(left.count(), kMaxGetWaitMs));
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::milliseconds(wait_ms + 5000));
    moeserve::v1::GetRequest request;
    request.set_key(key);
    request.set_timeout_ms(static_cast<uint32_t>(wait_ms));
    moeserve::v1::GetResponse response;
    grpc::Status status = stub_->Get(&context, request, &response);
    if (status.ok()) return response.value();
    if (status.error_code() != grpc::StatusCode::DEADLINE_EXCEEDED) return FromGrpcStatus(status);
  }
}

}  // namespace moeserve::server
