// KvTransport: carries a prefilled sequence from a prefill rank to a decode rank — the
// sequence itself (tokens, sampler, stream and stop state) and its prompt's KV rows — so that
// the decode group continues the stream where the prefill group left it.
//
// The in-process implementation (the engine's) hands the sequence, with its rows in host
// memory, to the least-loaded decode rank of the same process, which writes the rows into its
// own cache when it admits the sequence. Between processes, RemoteKvTransport sends it as a
// SequenceHandoff (engine/api/handoff.h) to the decode rank the request's route names.
//
// Send() is called from prefill ranks' threads, concurrently; implementations are thread-safe.
#pragma once

#include <cstddef>
#include <functional>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "engine/api/handoff.h"
#include "engine/runtime/sequence.h"

namespace moeserve::engine {

class KvTransport {
 public:
  virtual ~KvTransport() = default;
  // Sends on a sequence whose prompt is cached and whose first token was emitted, with the
  // prompt's KV rows (RankBackend::ExportKv's layout). OK once a decode rank has it. A
  // transport within the process takes the sequence (its stream goes on there); one to another
  // process leaves it in `sequence`, whose stream here the caller then ends as handed off. On
  // an error the sequence stays with the caller, which fails it.
  virtual absl::Status Send(std::unique_ptr<Sequence>& sequence, std::vector<std::byte> rows) = 0;
};

// Within one process: the rows travel in the sequence (Sequence::handoff_kv) to the decode
// rank `deliver` chooses (the engine's least-loaded decode rank), which enqueues it.
class InProcessKvTransport : public KvTransport {
 public:
  explicit InProcessKvTransport(std::function<void(std::unique_ptr<Sequence>)> deliver)
      : deliver_(std::move(deliver)) {}
  absl::Status Send(std::unique_ptr<Sequence>& sequence, std::vector<std::byte> rows) override {
    sequence->handoff_kv = std::move(rows);
    deliver_(std::move(sequence));
    return absl::OkStatus();
  }

 private:
  std::function<void(std::unique_ptr<Sequence>)> deliver_;
};

// Between processes: the sequence travels as a SequenceHandoff to the decode rank its request's
// HandoffRoute names, through `sender` (gRPC between rank processes).
class RemoteKvTransport : public KvTransport {
 public:
  explicit RemoteKvTransport(std::shared_ptr<HandoffSender> sender) : sender_(std::move(sender)) {}
  absl::Status Send(std::unique_ptr<Sequence>& sequence, std::vector<std::byte> rows) override;

 private:
  std::shared_ptr<HandoffSender> sender_;
};

}  // namespace moeserve::engine
