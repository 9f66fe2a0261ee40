#include "server/request_conversion.h"

namespace moeserve::server {

engine::GenerationInput ToGenerationInput(const moeserve::v1::GenerateRequest& request) {
  engine::GenerationInput input;
  input.request_id = request.request_id();
  if (request.input_case() == moeserve::v1::GenerateRequest::kText) {
    input.text = request.text();
  } else if (request.input_case() == moeserve::v1::GenerateRequest::kTokenIds) {
    input.prompt_tokens.assign(request.token_ids().ids().begin(), request.token_ids().ids().end());
  }
  const auto& sampling = request.sampling();
  input.sampling.temperature = sampling.temperature();
  input.sampling.top_p = sampling.top_p() == 0.0f ? 1.0f : sampling.top_p();
  input.sampling.top_k =
      sampling.top_k() > 0x7fffffffu ? 0x7fffffff : static_cast<int>(sampling.top_k());
  if (sampling.has_seed()) input.sampling.seed = sampling.seed();
  input.max_tokens =
      request.max_tokens() > 0x7fffffffu ? 0x7fffffff : static_cast<int>(request.max_tokens());
  input.stop.assign(request.stop().begin(), request.stop().end());
  input.stop_token_ids.assign(request.stop_token_ids().begin(), request.stop_token_ids().end());
  input.ignore_eos = request.ignore_eos();
  return input;
}

}  // namespace moeserve::server
