// ExpertParallelForward: one rank's part of a forward step of an expert-parallel group. The
// rank runs attention for its own sequences (DP attention) and the experts in its slots
// [rank*S, (rank+1)*S) for everyone: after the gate, each token's activations are dispatched
// once to every rank holding one of its chosen replicas (entry counts, entries, then activations
// through all-to-all-v; see DispatchPlan), experts run grouped by slot, results come back (combine)
// and are summed in each token's own top-k order — so outputs do not depend on the EP size or the
// placement.
//
// With two micro-batches, one micro-batch's dispatch/combine runs on the rank's communication
// thread while the other computes. Every rank of the group must call Run() for every step, with
// the same `two_micro_batches` and placement (an empty batch is fine). Stateless; Run() is
// called by the rank's own thread.
#pragma once

#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/comm/communicator.h"
#include "engine/model/model.h"
#include "engine/parallel/communication_thread.h"
#include "engine/parallel/parallel_metrics.h"
#include "engine/placement/expert_load.h"
#include "engine/placement/expert_placement.h"
#include "engine/placement/expert_weights.h"
#include "engine/trace/trace_recorder.h"

namespace moeserve::engine::parallel {

// A rank's lanes (threads) in the trace: its compute, its exchanges (on their own thread with
// two-batch overlap), and the step around them (forward, picking tokens, emitting them).
inline constexpr int kTraceComputeLane = 0;
inline constexpr int kTraceCommunicationLane = 1;
inline constexpr int kTraceStepLane = 2;

// What one rank brings to a step. The pointers outlive the step; optional ones may be null.
struct RankResources {
  comm::Communicator* compute = nullptr;  // channel used by the rank's compute thread
  comm::Communicator* overlap = nullptr;  // channel used by its communication thread (overlap only)
  CommunicationThread* communication_thread = nullptr;  // overlap only
  // The rank's own copies of its slots' expert weights, matching the placement passed to Run();
  // null reads the experts straight from the model's weights.
  const RankExpertWeights* expert_weights = nullptr;
  ExpertLoadRecorder* load = nullptr;
  ParallelMetrics* metrics = nullptr;
  TraceRecorder* trace = nullptr;
  int trace_pid = 0;
};

class ExpertParallelForward {
 public:
  explicit ExpertParallelForward(const Model& model) : model_(model) {}

  // Returns logits as Model::Forward does, for this rank's batch.
  absl::StatusOr<std::vector<float>> Run(std::span<const BatchSequence> batch, KvRows& cache,
                                         const ExpertPlacement& placement, RankResources& rank,
                                         bool two_micro_batches) const;

 private:
  struct MicroBatch;
  class Stages;
  absl::Status Dispatch(int layer, MicroBatch& mb, const ExpertPlacement& placement,
                        comm::Communicator& comm, RankResources& rank) const;
  void RunLocalExperts(int layer, MicroBatch& mb, const ExpertPlacement& placement,
                       RankResources& rank) const;
  absl::Status Combine(int layer, MicroBatch& mb, comm::Communicator& comm,
                       RankResources& rank) const;

  const Model& model_;
};

// One (token, expert) assignment as its destination rank reads it: the destination-local slot
// whose expert runs it, and which of the rows the sender sent to that destination holds the
// token's activations. Sent as raw bytes between ranks.
struct DispatchEntry {
  int32_t slot = 0;
  int32_t row = 0;
};

// Where a rank's batch goes in one MoE layer. A token's activations travel once to each rank
// that holds one of its chosen replicas (one row per destination, however many of its experts
// are there); every (token, expert) assignment travels as an entry naming its row, and its result
// comes back as a row of its own, so the token's top-k sum is still taken by its own rank, in
// top-k order. Shared by the CPU and GPU forward passes so that both choose the same replicas.
// Send order: grouped by destination; tokens in order within a destination, and a token's
// entries in top-k order. `experts` holds each token's top_k chosen experts (tokens x top_k).
struct DispatchPlan {
  std::vector<int64_t> send_rows;        // activation rows per destination rank
  std::vector<int64_t> send_entries;     // entries (assignments) per destination rank
  std::vector<int32_t> sent_token;       // token of each sent activation row, in send order
  std::vector<int32_t> sent_assignment;  // (token * top_k + k) of each entry, in send order
  std::vector<DispatchEntry> entries;    // each entry, in send order
};
DispatchPlan PlanDispatch(std::span<const int32_t> experts, int top_k, int moe_layer,
                          const ExpertPlacement& placement, int rank, int size);

// What a rank received in a dispatch, read from the entries every source sent (concatenated in
// source order, entries_per_source of each): per entry its local slot and the index of its row
// among all received rows, and how many rows each source sent. INTERNAL when the entries are
// not a plan's (a slot outside [0, slots_per_rank), rows not numbered 0, 1, ... in order), so a
// corrupt exchange fails the step instead of reading out of bounds.
struct ReceivedEntries {
  std::vector<int64_t> rows_per_source;
  std::vector<int32_t> slot;  // per entry
  std::vector<int32_t> row;   // per entry, into all received rows
};
absl::StatusOr<ReceivedEntries> ReadReceivedEntries(std::span<const DispatchEntry> entries,
                                                    std::span<const int64_t> entries_per_source,
                                                    int slots_per_rank);

// Publishes each MoE layer's rank balancedness (mean over max of the rows every rank's experts
// processed this step) into rank.metrics: an all-gather on rank.compute that every rank of the
// group must call, with one entry per MoE layer.
absl::Status PublishBalancedness(std::span<const int64_t> received_per_layer, RankResources& rank);

// Splits a batch into two runs of near-equal token counts; a sequence that straddles the middle
// is cut into two chunks (the first chunk's logits are not needed).
struct BatchPiece {
  BatchSequence sequence;
  bool emits_logits = true;
};
std::vector<std::vector<BatchPiece>> SplitIntoMicroBatches(std::span<const BatchSequence> batch,
                                                           int parts);
// The rows of a micro-batch that need logits (see Model::LogitRows), skipping pieces that do
// not emit them (the first piece of a sequence split between micro-batches).
std::vector<int> MicroBatchLogitRows(std::span<const BatchSequence> sequences,
                                     std::span<const SequenceSpan> spans,
                                     const std::vector<bool>& emits_logits);

}  // namespace moeserve::engine::parallel
