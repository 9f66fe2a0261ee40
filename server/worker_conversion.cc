#include "server/worker_conversion.h"

namespace moeserve::server {
namespace {

engine::FinishReason FromFinishReasonProto(moeserve::v1::FinishReason reason) {
  switch (reason) {
    case moeserve::v1::FINISH_REASON_LENGTH:
      return engine::FinishReason::kLength;
    case moeserve::v1::FINISH_REASON_STOP:
      return engine::FinishReason::kStop;
    case moeserve::v1::FINISH_REASON_CONTEXT_LENGTH:
      return engine::FinishReason::kContextLength;
    default:
      return engine::FinishReason::kNone;
  }
}

}  // namespace

moeserve::v1::FinishReason ToFinishReasonProto(engine::FinishReason reason) {
  switch (reason) {
    case engine::FinishReason::kLength:
      return moeserve::v1::FINISH_REASON_LENGTH;
    case engine::FinishReason::kStop:
      return moeserve::v1::FINISH_REASON_STOP;
    case engine::FinishReason::kContextLength:
      return moeserve::v1::FINISH_REASON_CONTEXT_LENGTH;
    default:
      return moeserve::v1::FINISH_REASON_UNSPECIFIED;
  }
}

moeserve::v1::WorkerGenerateRequest ToWorkerRequest(const engine::GenerationInput& in) {
  moeserve::v1::WorkerGenerateRequest out;
  out.set_request_id(in.request_id);
  if (in.text.has_value()) {
    out.set_text(*in.text);
  } else {
    for (int32_t id : in.prompt_tokens) out.mutable_token_ids()->add_ids(static_cast<uint32_t>(id));
  }
  auto* sampling = out.mutable_sampling();
  sampling->set_temperature(in.sampling.temperature);
  sampling->set_top_p(in.sampling.top_p);
  sampling->set_top_k(static_cast<uint32_t>(in.sampling.top_k));
  if (in.sampling.seed.has_value()) sampling->set_seed(*in.sampling.seed);
  out.set_max_tokens(static_cast<uint32_t>(in.max_tokens));
  for (const std::string& stop : in.stop) out.add_stop(stop);
  for (int32_t id : in.stop_token_ids) out.add_stop_token_ids(static_cast<uint32_t>(id));
  out.set_ignore_eos(in.ignore_eos);
  out.set_add_special_tokens(in.add_special_tokens);
  if (in.handoff.has_value()) {
    out.mutable_handoff()->set_target(in.handoff->target);
    out.mutable_handoff()->set_id(in.handoff->id);
  }
  return out;
}

engine::GenerationInput FromWorkerRequest(const moeserve::v1::WorkerGenerateRequest& request) {
  engine::GenerationInput in;
  in.request_id = request.request_id();
  if (request.input_case() == moeserve::v1::WorkerGenerateRequest::kText) {
    in.text = request.text();
  } else {
    for (uint32_t id : request.token_ids().ids()) {
      in.prompt_tokens.push_back(id > 0x7fffffffu ? -1 : static_cast<int32_t>(id));
    }
  }
  in.sampling.temperature = request.sampling().temperature();
  in.sampling.top_p = request.sampling().top_p();
  in.sampling.top_k = static_cast<int>(std::min<uint32_t>(request.sampling().top_k(), 0x7fffffff));
  if (request.sampling().has_seed()) in.sampling.seed = request.sampling().seed();
  in.max_tokens = static_cast<int>(std::min<uint32_t>(request.max_tokens(), 0x7fffffff));
  in.stop.assign(request.stop().begin(), request.stop().end());
  for (uint32_t id : request.stop_token_ids()) {
    in.stop_token_ids.push_back(id > 0x7fffffffu ? -1 : static_cast<int32_t>(id));
  }
  in.ignore_eos = request.ignore_eos();
  in.add_special_tokens = request.add_special_tokens();
  if (request.has_handoff()) {
    in.handoff = engine::HandoffRoute{request.handoff().target(), request.handoff().id()};
  }
  return in;
}

moeserve::v1::WorkerGenerateResponse ToWorkerResponse(const engine::GenerationOutput& output) {
  moeserve::v1::WorkerGenerateResponse out;
  for (int32_t id : output.token_ids) out.add_token_ids(static_cast<uint32_t>(id));
  out.set_text(output.text);
  out.set_finish_reason(ToFinishReasonProto(output.finish_reason));
  out.set_handed_off(output.handed_off);
  if (output.finish_reason != engine::FinishReason::kNone) {
    auto* usage = out.mutable_usage();
    usage->set_prompt_tokens(output.usage.prompt_tokens);
    usage->set_completion_tokens(output.usage.completion_tokens);
    usage->set_time_to_first_token_seconds(output.usage.time_to_first_token_seconds);
    usage->set_total_seconds(output.usage.total_seconds);
    usage->set_queue_seconds(output.usage.queue_seconds);
  }
  return out;
}

engine::GenerationOutput FromWorkerResponse(const moeserve::v1::WorkerGenerateResponse& response) {
  engine::GenerationOutput out;
  for (uint32_t id : response.token_ids()) out.token_ids.push_back(static_cast<int32_t>(id));
  out.text = response.text();
  out.finish_reason = FromFinishReasonProto(response.finish_reason());
  out.handed_off = response.handed_off();
  if (response.has_usage()) {
    out.usage.prompt_tokens = static_cast<int>(response.usage().prompt_tokens());
    out.usage.completion_tokens = static_cast<int>(response.usage().completion_tokens());
    out.usage.time_to_first_token_seconds = response.usage().time_to_first_token_seconds();
    out.usage.total_seconds = response.usage().total_seconds();
    out.usage.queue_seconds = response.usage().queue_seconds();
  }
  return out;
}

moeserve::v1::HandoffMessage ToHandoffMessage(const engine::SequenceHandoff& h) {
  moeserve::v1::HandoffMessage m;
  m.set_handoff_id(h.handoff_id);
  *m.mutable_input() = ToWorkerRequest(h.input);
  m.mutable_input()->clear_handoff();
  for (int32_t token : h.tokens) m.add_tokens(token);
  m.set_prompt_length(static_cast<uint32_t>(h.prompt_length));
  m.set_num_cached(static_cast<uint32_t>(h.num_cached));
  m.set_generated(static_cast<uint32_t>(h.generated));
  m.set_sampler_state(h.sampler_state);
  m.set_decoder_pending(h.decoder_pending);
  m.set_held_text(h.held_text);
  m.set_seconds_since_arrival(h.seconds_since_arrival);
  m.set_seconds_since_first_token(h.seconds_since_first_token);
  m.set_seconds_since_last_token(h.seconds_since_last_token);
  m.set_queue_seconds(h.queue_seconds);
  m.set_kv_rows(h.kv_rows);
  return m;
}

engine::SequenceHandoff FromHandoffMessage(const moeserve::v1::HandoffMessage& m) {
  engine::SequenceHandoff h;
  h.handoff_id = m.handoff_id();
  h.input = FromWorkerRequest(m.input());
  h.tokens.assign(m.tokens().begin(), m.tokens().end());
  h.prompt_length = static_cast<int>(m.prompt_length());
  h.num_cached = static_cast<int>(m.num_cached());
  h.generated = static_cast<int>(m.generated());
  h.sampler_state = m.sampler_state();
  h.decoder_pending = m.decoder_pending();
  h.held_text = m.held_text();
  h.seconds_since_arrival = m.seconds_since_arrival();
  h.seconds_since_first_token = m.seconds_since_first_token();
  h.seconds_since_last_token = m.seconds_since_last_token();
  h.queue_seconds = m.queue_seconds();
  h.kv_rows = m.kv_rows();
  return h;
}

void ToModelInfoProto(const engine::ModelInfo& m, moeserve::v1::ModelInfo* info) {
  info->set_name(m.name);
  info->set_architecture(m.architecture);
  info->set_vocab_size(m.vocab_size);
  info->set_context_length(m.context_length);
  info->set_num_layers(m.num_layers);
  info->set_num_dense_layers(m.num_dense_layers);
  info->set_hidden_size(m.hidden_size);
  info->set_num_routed_experts(m.num_routed_experts);
  info->set_num_shared_experts(m.num_shared_experts);
  info->set_num_experts_per_token(m.num_experts_per_token);
  info->set_num_expert_groups(m.num_expert_groups);
  info->set_num_groups_per_token(m.num_groups_per_token);
  info->set_has_tokenizer(m.has_tokenizer);
  info->set_eos_token_id(m.eos_token_id);
  info->set_max_request_tokens(m.context_length);
}

engine::ModelInfo FromModelInfoProto(const moeserve::v1::ModelInfo& info) {
  engine::ModelInfo m;
  m.name = info.name();
  m.architecture = info.architecture();
  m.vocab_size = static_cast<int>(info.vocab_size());
  m.context_length = static_cast<int>(info.context_length());
  m.num_layers = static_cast<int>(info.num_layers());
  m.num_dense_layers = static_cast<int>(info.num_dense_layers());
  m.hidden_size = static_cast<int>(info.hidden_size());
  m.num_routed_experts = static_cast<int>(info.num_routed_experts());
  m.num_shared_experts = static_cast<int>(info.num_shared_experts());
  m.num_experts_per_token = static_cast<int>(info.num_experts_per_token());
  m.num_expert_groups = static_cast<int>(info.num_expert_groups());
  m.num_groups_per_token = static_cast<int>(info.num_groups_per_token());
  m.has_tokenizer = info.has_tokenizer();
  m.eos_token_id = static_cast<int>(info.eos_token_id());
  return m;
}

void ToChatTemplateProto(const std::optional<ChatTemplateSource>& source,
                         moeserve::v1::ChatTemplateInfo* out) {
  out->set_present(source.has_value());
  if (!source.has_value()) return;
  out->set_text(source->text);
  out->set_origin(source->origin);
  out->set_special_tokens_json(source->special_tokens.dump());
  out->set_add_special_tokens(source->add_special_tokens);
}

absl::StatusOr<std::optional<ChatTemplateSource>> FromChatTemplateProto(
    const moeserve::v1::ChatTemplateInfo& info) {
  if (!info.present()) return std::nullopt;
  ChatTemplateSource source;
  source.text = info.text();
  source.origin = info.origin();
  source.add_special_tokens = info.add_special_tokens();
  source.special_tokens = nlohmann::ordered_json::parse(info.special_tokens_json(), nullptr,
                                                        /*allow_exceptions=*/false);
  if (!source.special_tokens.is_object()) {
    return absl::InvalidArgumentError("the rank's chat template has malformed special tokens");
  }
  return source;
}

}  // namespace moeserve::server
