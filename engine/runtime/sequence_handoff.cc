#include "engine/runtime/sequence_handoff.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "engine/runtime/kv_transport.h"

namespace moeserve::engine {
namespace {

using Clock = Sequence::Clock;

double SecondsSince(Clock::time_point then, Clock::time_point now) {
  return then == Clock::time_point{} ? -1 : std::chrono::duration<double>(now - then).count();
}

Clock::time_point Before(Clock::time_point now, double seconds) {
  if (seconds < 0) return Clock::time_point{};
  return now - std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

}  // namespace

SequenceHandoff ToHandoff(const Sequence& seq, const std::vector<std::byte>& kv_rows) {
  const auto now = Clock::now();
  SequenceHandoff handoff;
  if (seq.input.handoff.has_value()) {
    handoff.handoff_id = seq.input.handoff->id;
    handoff.target = seq.input.handoff->target;
  }
  handoff.input = seq.input;
  handoff.input.text.reset();
  handoff.input.prompt_tokens.assign(seq.tokens.begin(), seq.tokens.begin() + seq.prompt_length);
  handoff.tokens = seq.tokens;
  handoff.prompt_length = seq.prompt_length;
  handoff.num_cached = seq.num_cached;
  handoff.generated = seq.generated;
  if (seq.sampler != nullptr) handoff.sampler_state = seq.sampler->SaveState();
  handoff.decoder_pending = seq.decoder.pending();
  handoff.held_text = seq.held_text;
  handoff.seconds_since_arrival = SecondsSince(seq.arrival, now);
  handoff.seconds_since_first_token = SecondsSince(seq.first_token, now);
  handoff.seconds_since_last_token = SecondsSince(seq.last_token, now);
  handoff.queue_seconds =
      seq.prefill_start == Clock::time_point{}
          ? 0
          : std::chrono::duration<double>(seq.prefill_start - seq.arrival).count();
  handoff.kv_rows.assign(reinterpret_cast<const char*>(kv_rows.data()), kv_rows.size());
  return handoff;
}

absl::StatusOr<std::unique_ptr<Sequence>> FromHandoff(const SequenceHandoff& handoff) {
  const int total = static_cast<int>(handoff.tokens.size());
  if (handoff.prompt_length < 1 || handoff.prompt_length > total || handoff.num_cached < 1 ||
      handoff.num_cached > total || handoff.generated < 0 ||
      handoff.prompt_length + handoff.generated != total || handoff.kv_rows.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "handoff: inconsistent sequence (", total, " tokens, prompt ", handoff.prompt_length,
        ", cached ", handoff.num_cached, ", generated ", handoff.generated, ")"));
  }
  const auto now = Clock::now();
  auto seq = std::make_unique<Sequence>();
  seq->input = handoff.input;
  seq->input.handoff.reset();
  seq->tokens = handoff.tokens;
  seq->prompt_length = handoff.prompt_length;
  seq->num_cached = handoff.num_cached;
  seq->generated = handoff.generated;
  seq->sampler = std::make_unique<Sampler>(seq->input.sampling);
  if (!handoff.sampler_state.empty()) {
    if (absl::Status s = seq->sampler->RestoreState(handoff.sampler_state); !s.ok()) return s;
  }
  seq->decoder.set_pending(handoff.decoder_pending);
  seq->held_text = handoff.held_text;
  seq->arrival = Before(now, handoff.seconds_since_arrival);
  seq->first_token = Before(now, handoff.seconds_since_first_token);
  seq->last_token = Before(now, handoff.seconds_since_last_token);
  if (handoff.queue_seconds > 0)
    seq->prefill_start = seq->arrival + std::chrono::duration_cast<Clock::duration>(
                                            std::chrono::duration<double>(handoff.queue_seconds));
  seq->handoff_kv.resize(handoff.kv_rows.size());
  std::memcpy(seq->handoff_kv.data(), handoff.kv_rows.data(), handoff.kv_rows.size());
  seq->stream = std::make_shared<RequestStream>(seq->input.request_id);
  return seq;
}

absl::Status RemoteKvTransport::Send(std::unique_ptr<Sequence>& sequence,
                                     std::vector<std::byte> rows) {
  if (!sequence->input.handoff.has_value()) {
    return absl::FailedPreconditionError(
        "a prefill rank process got a request without a handoff route (send requests through "
        "the front end)");
  }
  return sender_->Send(ToHandoff(*sequence, rows));
}

}  // namespace moeserve::engine
