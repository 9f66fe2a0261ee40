#include "server/admin_service.h"

#include <chrono>

#include "absl/strings/str_cat.h"
#include "server/status_conversion.h"

namespace moeserve::server {
namespace {

// Compares in time independent of where the strings differ.
bool ConstantTimeEquals(const std::string& a, const std::string& b) {
  unsigned char difference = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < b.size(); ++i) difference |= (i < a.size() ? a[i] : 0) ^ b[i];
  return difference == 0;
}

}  // namespace

grpc::Status AdminService::Authorize(const grpc::ServerContext& context,
                                     engine::Engine** engine) const {
  if (token_.has_value()) {
    const auto& metadata = context.client_metadata();
    auto it = metadata.find("authorization");
    if (it == metadata.end()) {
      return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                          "missing `authorization: Bearer <token>` metadata");
    }
    const std::string value(it->second.data(), it->second.size());
    constexpr std::string_view kPrefix = "Bearer ";
    if (!value.starts_with(kPrefix) || !ConstantTimeEquals(value.substr(kPrefix.size()), *token_)) {
      return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "invalid admin token");
    }
  }
  *engine = engine_.load();
  if (*engine == nullptr) {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, "the model is still loading");
  }
  return grpc::Status::OK;
}

grpc::Status AdminService::GetExpertPlacement(
    grpc::ServerContext* context, const moeserve::v1::GetExpertPlacementRequest* request,
    moeserve::v1::ExpertPlacement* response) {
  engine::Engine* engine = nullptr;
  if (auto s = Authorize(*context, &engine); !s.ok()) return s;
  absl::StatusOr<engine::PlacementInfo> placement = engine->GetPlacement(request->group());
  if (!placement.ok()) return ToGrpcStatus(placement.status());
  response->set_group(placement->group);
  response->set_version(placement->version);
  response->set_ep_size(placement->ep_size);
  response->set_num_logical_experts(placement->num_logical_experts);
  response->set_num_physical_experts(placement->num_physical_experts);
  response->set_num_expert_groups(placement->num_expert_groups);
  for (const std::vector<int32_t>& layer : placement->phy2log) {
    auto* out = response->add_layers();
    for (int32_t expert : layer) out->add_phy2log(expert);
  }
  return grpc::Status::OK;
}

grpc::Status AdminService::UpdateExpertPlacement(
    grpc::ServerContext* context, const moeserve::v1::UpdateExpertPlacementRequest* request,
    moeserve::v1::UpdateExpertPlacementResponse* response) {
  engine::Engine* engine = nullptr;
  if (auto s = Authorize(*context, &engine); !s.ok()) return s;
  engine::PlacementUpdate update;
  update.group = request->group();
  update.version = request->version();
  // The engine validates the placement (shape, expert ids, replicas, version, timeout).
  for (const auto& layer : request->layers()) {
    update.phy2log.emplace_back(layer.phy2log().begin(), layer.phy2log().end());
  }
  update.timeout_seconds = request->timeout_seconds() != 0 ? request->timeout_seconds() : 60.0;
  absl::StatusOr<engine::PlacementUpdateResult> result = engine->UpdatePlacement(update);
  if (!result.ok()) return ToGrpcStatus(result.status());
  response->set_committed_version(result->committed_version);
  response->set_seconds(result->seconds);
  return grpc::Status::OK;
}

grpc::Status AdminService::GetExpertLoad(grpc::ServerContext* context,
                                         const moeserve::v1::GetExpertLoadRequest* request,
                                         moeserve::v1::ExpertLoad* response) {
  engine::Engine* engine = nullptr;
  if (auto s = Authorize(*context, &engine); !s.ok()) return s;
  absl::StatusOr<engine::ExpertLoadWindow> window =
      engine->ExpertLoad(request->group(), request->since_unix_seconds());
  if (!window.ok()) return ToGrpcStatus(window.status());
  response->set_group(window->group);
  response->set_from_unix_seconds(window->from_unix_seconds);
  response->set_to_unix_seconds(window->to_unix_seconds);
  for (const std::vector<int64_t>& layer : window->tokens) {
    auto* out = response->add_layers();
    for (int64_t tokens : layer) out->add_tokens(tokens);
  }
  return grpc::Status::OK;
}

}  // namespace moeserve::server
