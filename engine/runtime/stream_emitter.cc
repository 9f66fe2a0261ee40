#include "engine/runtime/stream_emitter.h"

#include <algorithm>
#include <string>
#include <vector>

#include "spdlog/spdlog.h"

namespace moeserve::engine {
namespace {

using Clock = Sequence::Clock;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

const char* StatusLabel(FinishReason reason) {
  switch (reason) {
    case FinishReason::kLength:
      return "length";
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kContextLength:
      return "context_length";
    case FinishReason::kCancelled:
      return "cancelled";
    case FinishReason::kAborted:
      return "aborted";
    case FinishReason::kNone:
      break;
  }
  return "unknown";
}

// Length of the longest suffix of `text` that is a proper prefix of one of `stops`.
size_t StopPrefixSuffix(const std::string& text, const std::vector<std::string>& stops) {
  size_t best = 0;
  for (const std::string& stop : stops) {
    for (size_t k = std::min(text.size(), stop.size() - 1); k > best; --k) {
      if (text.compare(text.size() - k, k, stop, 0, k) == 0) {
        best = k;
        break;
      }
    }
  }
  return best;
}

}  // namespace

StreamEmitter::Emitted StreamEmitter::Emit(Sequence& seq, int32_t token) const {
  const auto now = Clock::now();
  if (seq.generated == 0) {
    seq.first_token = now;
    metrics_.ObserveTimeToFirstToken(Seconds(now - seq.arrival));
  } else {
    metrics_.ObserveInterTokenLatency(Seconds(now - seq.last_token));
  }
  seq.last_token = now;
  seq.tokens.push_back(token);
  ++seq.generated;
  metrics_.AddGeneratedTokens(1);

  Emitted emitted;
  GenerationOutput& output = emitted.last;
  output.token_ids.push_back(token);
  bool stopped_by_string = false;
  const bool is_eos = token == eos_token_id_ && !seq.input.ignore_eos;
  const bool is_stop_token =
      std::find(seq.input.stop_token_ids.begin(), seq.input.stop_token_ids.end(), token) !=
      seq.input.stop_token_ids.end();
  if (tokenizer_ != nullptr) {
    seq.held_text += seq.decoder.Push(tokenizer_->TokenBytes(token));
    // Stop strings: cut before the first match; otherwise hold back a suffix that could still
    // grow into one.
    size_t cut = std::string::npos;
    for (const std::string& stop : seq.input.stop) cut = std::min(cut, seq.held_text.find(stop));
    if (cut != std::string::npos) {
      output.text = seq.held_text.substr(0, cut);
      seq.held_text.clear();
      emitted.reason = FinishReason::kStop;
      stopped_by_string = true;
    } else {
      const size_t keep = StopPrefixSuffix(seq.held_text, seq.input.stop);
      output.text = seq.held_text.substr(0, seq.held_text.size() - keep);
      seq.held_text.erase(0, seq.held_text.size() - keep);
    }
  }
  if (emitted.reason == FinishReason::kNone) {
    if (is_eos || is_stop_token) {
      emitted.reason = FinishReason::kStop;
    } else if (seq.generated >= seq.input.max_tokens) {
      emitted.reason = FinishReason::kLength;
    } else if (static_cast<int>(seq.tokens.size()) >= context_length_) {
      emitted.reason = FinishReason::kContextLength;
    }
  }
  if (emitted.reason == FinishReason::kNone) {
    seq.stream->Push(std::move(output));
    emitted.last = {};
    return emitted;
  }
  if (!stopped_by_string && tokenizer_ != nullptr) {
    output.text += seq.held_text + seq.decoder.Flush();
  }
  return emitted;
}

void StreamEmitter::Finish(Sequence& seq, FinishReason reason, GenerationOutput output) const {
  if (seq.finished()) return;
  const auto now = Clock::now();
  output.finish_reason = reason;
  output.usage.prompt_tokens = seq.prompt_length;
  output.usage.completion_tokens = seq.generated;
  if (seq.generated > 0) {
    output.usage.time_to_first_token_seconds = Seconds(seq.first_token - seq.arrival);
  }
  output.usage.total_seconds = Seconds(now - seq.arrival);
  if (seq.prefill_start != Clock::time_point{}) {
    output.usage.queue_seconds = Seconds(seq.prefill_start - seq.arrival);
  }
  metrics_.RequestFinished(StatusLabel(reason));
  if (reason != FinishReason::kCancelled && reason != FinishReason::kAborted) {
    metrics_.ObserveEndToEndLatency(output.usage.total_seconds);
    const double time_per_output_token =
        seq.generated >= 2 ? Seconds(seq.last_token - seq.first_token) / (seq.generated - 1) : 0;
    metrics_.ObserveFinishedRequest(seq.prompt_length, seq.generated, time_per_output_token);
  }
  if (spdlog::should_log(spdlog::level::debug)) {
    spdlog::debug(
        "request {} finished: {}, prompt {} tokens, output {} tokens, queue {:.1f} ms, first "
        "token {:.1f} ms, total {:.1f} ms",
        seq.input.request_id, StatusLabel(reason), seq.prompt_length, seq.generated,
        output.usage.queue_seconds * 1e3, output.usage.time_to_first_token_seconds * 1e3,
        output.usage.total_seconds * 1e3);
  }
  seq.stream->Push(std::move(output));
  seq.stream.reset();
}

void StreamEmitter::Fail(Sequence& seq, const absl::Status& failure) const {
  if (seq.finished()) return;
  GenerationOutput output;
  output.status = failure;
  metrics_.RequestFinished("unavailable");
  spdlog::debug("request {} failed: {}", seq.input.request_id, std::string(failure.message()));
  seq.stream->Push(std::move(output));
  seq.stream.reset();
}

void StreamEmitter::HandedOff(Sequence& seq) const {
  if (seq.finished()) return;
  GenerationOutput output;
  output.handed_off = true;
  metrics_.RequestFinished("handed_off");
  seq.stream->Push(std::move(output));
  seq.stream.reset();
}

}  // namespace moeserve::engine
