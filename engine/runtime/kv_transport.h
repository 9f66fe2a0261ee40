// KvTransport: carries a prefilled sequence from a prefill rank to a decode rank — the
// sequence itself (tokens, sampler, stream and stop state) and its prompt's KV rows — so that
// the decode group continues the stream where the prefill group left it.
//
// The in-process implementation (the engine's) hands the sequence, with its rows in host
// memory, to the least-loaded decode rank of the same process, which writes the rows into its
// own cache when it admits the sequence. A transport between processes implements the same
// interface.
//
// Send() is called from prefill ranks' threads, concurrently; implementations are thread-safe.
#pragma once

#include <cstddef>
#include <functional>
#include <memory>
#include <vector>

#include "engine/runtime/sequence.h"

namespace moeserve::engine {

class KvTransport {
 public:
  virtual ~KvTransport() = default;
  // Takes a sequence whose prompt is cached and whose first token was emitted, with the
  // prompt's KV rows (RankBackend::ExportKv's layout). If the sequence cannot reach a decode
  // rank, the transport ends its stream (with the reason) itself.
  virtual void Send(std::unique_ptr<Sequence> sequence, std::vector<std::byte> rows) = 0;
};

// Within one process: the rows travel in the sequence (Sequence::handoff_kv) to the decode
// rank `deliver` chooses (the engine's least-loaded decode rank), which enqueues it.
class InProcessKvTransport : public KvTransport {
 public:
  explicit InProcessKvTransport(std::function<void(std::unique_ptr<Sequence>)> deliver)
      : deliver_(std::move(deliver)) {}
  void Send(std::unique_ptr<Sequence> sequence, std::vector<std::byte> rows) override {
    sequence->handoff_kv = std::move(rows);
    deliver_(std::move(sequence));
  }

 private:
  std::function<void(std::unique_ptr<Sequence>)> deliver_;
};

}  // namespace moeserve::engine
