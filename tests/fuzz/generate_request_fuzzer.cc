// Fuzzes what a client sends to Generate: the protobuf bytes, their conversion to the engine's
// input, and the engine's validation of it (with a byte tokenizer, so text is tokenized too).
#include <cstddef>
#include <cstdint>
#include <string>

#include "engine/runtime/request_validation.h"
#include "google/protobuf/stubs/logging.h"
#include "server/request_conversion.h"

// Invalid UTF-8 is an expected outcome here, and protobuf logs an error line for each one.
extern "C" int LLVMFuzzerInitialize(int* /*argc*/, char*** /*argv*/) {
  google::protobuf::SetLogHandler(
      [](google::protobuf::LogLevel, const char*, int, const std::string&) {});
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  moeserve::v1::GenerateRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return 0;
  moeserve::engine::GenerationInput input = moeserve::server::ToGenerationInput(request);
  static const moeserve::engine::ByteTokenizer tokenizer(256, 257);
  moeserve::engine::RequestLimits limits;
  limits.vocab_size = 258;
  limits.context_length = 4096;
  limits.kv_blocks_per_rank = 300;
  if (moeserve::engine::ValidateGenerationInput(input, limits, &tokenizer).ok()) {
    // What the engine relies on after validation.
    if (input.prompt_tokens.empty() || input.max_tokens < 1 ||
        static_cast<int64_t>(input.prompt_tokens.size()) + input.max_tokens >
            limits.context_length) {
      __builtin_trap();
    }
    for (int64_t id : input.prompt_tokens) {
      if (id < 0 || id >= limits.vocab_size) __builtin_trap();
    }
  }
  return 0;
}
