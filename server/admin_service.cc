#include "server/admin_service.h"

#include <chrono>
#include <fstream>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "server/status_conversion.h"

namespace moeserve::server {
namespace {

constexpr size_t kMaxSnapshots = 15 * 60;

double UnixNow() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// Compares in time independent of where the strings differ.
bool ConstantTimeEquals(const std::string& a, const std::string& b) {
  unsigned char difference = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < b.size(); ++i) difference |= (i < a.size() ? a[i] : 0) ^ b[i];
  return difference == 0;
}

}  // namespace

absl::StatusOr<std::string> ReadAdminToken(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read the admin token file ", path));
  std::string token;
  std::getline(in, token);
  token = std::string(absl::StripAsciiWhitespace(token));
  if (token.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("the admin token file ", path, " is empty"));
  }
  return token;
}

AdminService::AdminService(std::string token) : token_(std::move(token)) {}

AdminService::~AdminService() {
  stopping_ = true;
  if (snapshot_thread_.joinable()) snapshot_thread_.join();
}

void AdminService::AttachEngine(engine::Engine* engine) {
  engine_.store(engine);
  snapshot_thread_ = std::thread([this] { SnapshotLoop(); });
}

void AdminService::SnapshotLoop() {
  while (!stopping_) {
    LoadSnapshot snapshot{UnixNow(), {}};
    for (auto* group : engine_.load()->groups())
      snapshot.per_group.push_back(group->load().Snapshot());
    {
      std::lock_guard lock(snapshots_mutex_);
      snapshots_.push_back(std::move(snapshot));
      if (snapshots_.size() > kMaxSnapshots) snapshots_.pop_front();
    }
    for (int i = 0; i < 10 && !stopping_; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

grpc::Status AdminService::Authorize(const grpc::ServerContext& context) const {
  const auto& metadata = context.client_metadata();
  auto it = metadata.find("authorization");
  if (it == metadata.end()) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "missing `authorization: Bearer <token>` metadata");
  }
  const std::string value(it->second.data(), it->second.size());
  constexpr std::string_view kPrefix = "Bearer ";
  if (!value.starts_with(kPrefix) || !ConstantTimeEquals(value.substr(kPrefix.size()), token_)) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "invalid admin token");
  }
  return grpc::Status::OK;
}

grpc::Status AdminService::FindGroup(const std::string& name,
                                     engine::parallel::ExpertParallelGroup** group,
                                     int* index) const {
  engine::Engine* engine = engine_.load();
  if (engine == nullptr) {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, "the model is still loading");
  }
  const auto groups = engine->groups();
  std::string known;
  for (size_t i = 0; i < groups.size(); ++i) {
    if (name.empty() || groups[i]->name() == name) {
      *group = groups[i];
      *index = static_cast<int>(i);
      return grpc::Status::OK;
    }
    absl::StrAppend(&known, known.empty() ? "" : ", ", groups[i]->name());
  }
  return grpc::Status(grpc::StatusCode::NOT_FOUND,
                      absl::StrCat("no group `", name, "` (groups: ", known, ")"));
}

grpc::Status AdminService::GetExpertPlacement(
    grpc::ServerContext* context, const moeserve::v1::GetExpertPlacementRequest* request,
    moeserve::v1::ExpertPlacement* response) {
  if (auto s = Authorize(*context); !s.ok()) return s;
  engine::parallel::ExpertParallelGroup* group = nullptr;
  int index = 0;
  if (auto s = FindGroup(request->group(), &group, &index); !s.ok()) return s;
  const auto placement = group->committed_placement();
  response->set_group(group->name());
  response->set_version(placement->version());
  response->set_ep_size(group->size());
  response->set_num_logical_experts(placement->num_logical());
  response->set_num_physical_experts(placement->num_physical());
  response->set_num_expert_groups(engine_.load()->config().n_group);
  for (int layer = 0; layer < placement->num_layers(); ++layer) {
    auto* out = response->add_layers();
    for (int32_t expert : placement->phy2log(layer)) out->add_phy2log(expert);
  }
  return grpc::Status::OK;
}

grpc::Status AdminService::UpdateExpertPlacement(
    grpc::ServerContext* context, const moeserve::v1::UpdateExpertPlacementRequest* request,
    moeserve::v1::UpdateExpertPlacementResponse* response) {
  if (auto s = Authorize(*context); !s.ok()) return s;
  engine::parallel::ExpertParallelGroup* group = nullptr;
  int index = 0;
  if (auto s = FindGroup(request->group(), &group, &index); !s.ok()) return s;
  const auto current = group->committed_placement();
  if (request->layers_size() != current->num_layers()) {
    return grpc::Status(
        grpc::StatusCode::INVALID_ARGUMENT,
        absl::StrCat("placement has ", request->layers_size(), " layers; the model has ",
                     current->num_layers(), " MoE layers"));
  }
  std::vector<std::vector<int32_t>> phy2log;
  for (const auto& layer : request->layers()) {
    if (layer.phy2log_size() != current->num_physical()) {
      return grpc::Status(
          grpc::StatusCode::INVALID_ARGUMENT,
          absl::StrCat("every layer needs ", current->num_physical(),
                       " slots (routed + redundant experts), got ", layer.phy2log_size()));
    }
    phy2log.emplace_back(layer.phy2log().begin(), layer.phy2log().end());
  }
  absl::StatusOr<engine::ExpertPlacement> placement = engine::ExpertPlacement::FromPhy2Log(
      std::move(phy2log), current->num_logical(), request->version());
  if (!placement.ok()) return ToGrpcStatus(placement.status());
  const double timeout = request->timeout_seconds() > 0 ? request->timeout_seconds() : 60.0;
  const auto start = std::chrono::steady_clock::now();
  absl::Status status = group->UpdatePlacement(
      std::move(*placement), std::chrono::milliseconds(static_cast<int64_t>(timeout * 1000)));
  if (!status.ok()) return ToGrpcStatus(status);
  response->set_committed_version(group->committed_placement()->version());
  response->set_seconds(
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  return grpc::Status::OK;
}

grpc::Status AdminService::GetExpertLoad(grpc::ServerContext* context,
                                         const moeserve::v1::GetExpertLoadRequest* request,
                                         moeserve::v1::ExpertLoad* response) {
  if (auto s = Authorize(*context); !s.ok()) return s;
  engine::parallel::ExpertParallelGroup* group = nullptr;
  int index = 0;
  if (auto s = FindGroup(request->group(), &group, &index); !s.ok()) return s;
  const auto now = group->load().Snapshot();
  std::vector<std::vector<int64_t>> base(now.size(),
                                         std::vector<int64_t>(now.empty() ? 0 : now[0].size(), 0));
  double from = 0;
  if (request->since_unix_seconds() > 0) {
    std::lock_guard lock(snapshots_mutex_);
    // The latest snapshot taken at or before `since` (or the oldest one kept).
    for (const LoadSnapshot& snapshot : snapshots_) {
      if (snapshot.unix_seconds > request->since_unix_seconds() && from != 0) break;
      base = snapshot.per_group[index];
      from = snapshot.unix_seconds;
    }
  }
  response->set_group(group->name());
  response->set_from_unix_seconds(from);
  response->set_to_unix_seconds(UnixNow());
  for (size_t layer = 0; layer < now.size(); ++layer) {
    auto* out = response->add_layers();
    for (size_t expert = 0; expert < now[layer].size(); ++expert) {
      out->add_tokens(now[layer][expert] - base[layer][expert]);
    }
  }
  return grpc::Status::OK;
}

}  // namespace moeserve::server
