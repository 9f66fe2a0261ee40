// Pipeline-parallel training schedules: the exact operation order each rank runs for DualPipe,
// DualPipeV, 1F1B and ZB1P, in training or forward-only (inference) mode.
//
// Owns the schedule generators and the text form of an operation (`F0.7`, `B1.6`, `B0.6i`,
// `W0.6`, `[F0.7|B1.3]`). Callers: the pipeline simulator (simulator.h), the
// `moeserve plan pipeline` command (plan_command.h) and tests. Generators validate their
// arguments and return InvalidArgument with a message a user can act on.
//
// Thread-safety: pure functions; a PipelineSchedule is a plain value, safe to share once built.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace moeserve::engine::pipeline {

enum class PipelineAlgorithm {
  kDualPipe,
  kDualPipeV,
  kOneForwardOneBackward,
  kZeroBubbleOneP,
};

// "dualpipe", "dualpipev", "1f1b" or "zb1p".
const char* PipelineAlgorithmName(PipelineAlgorithm algorithm);
absl::StatusOr<PipelineAlgorithm> ParsePipelineAlgorithm(std::string_view name);

enum class OperationKind {
  kForward,          // F: forward of one chunk
  kBackward,         // B: full backward (input and weight gradients) of one chunk
  kBackwardInput,    // Bi: input gradient only; the weight part is queued for a later W
  kWeight,           // W: weight gradient of the oldest queued Bi (FIFO)
  kForwardBackward,  // F&B: a forward of one direction overlapped with a full backward of the other
};

// One micro-batch at one pipeline stage. `direction` names the pipeline copy the micro-batch
// travels through: DualPipe has two (0 enters at rank 0, 1 enters at the last rank); DualPipeV
// and 1F1B have one (always 0). `microbatch` counts from 0 within its direction.
struct ChunkRef {
  int direction = 0;
  int microbatch = 0;
  int stage = 0;

  friend bool operator==(const ChunkRef&, const ChunkRef&) = default;
};

// One entry of a rank's schedule. `forward` is meaningful for kForward and kForwardBackward;
// `backward` for kBackward, kBackwardInput, kForwardBackward and kWeight (the chunk whose weight
// gradient the W computes).
struct Operation {
  OperationKind kind = OperationKind::kForward;
  ChunkRef forward;
  ChunkRef backward;

  bool HasForward() const {
    return kind == OperationKind::kForward || kind == OperationKind::kForwardBackward;
  }
  // True when the operation produces the chunk's input gradient (B, Bi, or the B of an F&B).
  bool HasInputBackward() const {
    return kind == OperationKind::kBackward || kind == OperationKind::kBackwardInput ||
           kind == OperationKind::kForwardBackward;
  }
  friend bool operator==(const Operation&, const Operation&) = default;
};

struct PipelineSchedule {
  PipelineAlgorithm algorithm = PipelineAlgorithm::kDualPipe;
  int num_ranks = 0;
  int num_stages = 0;
  // Total micro-batches over all directions (the --chunks argument).
  int num_microbatches = 0;
  int num_directions = 1;
  bool forward_only = false;
  // rank_operations[r] is rank r's operations in execution order.
  std::vector<std::vector<Operation>> rank_operations;

  int MicrobatchesPerDirection() const { return num_microbatches / num_directions; }
  // The rank that runs `stage` of the pipeline copy `direction`.
  int RankOfStage(int direction, int stage) const;
};

// DualPipe: `num_ranks` ranks (even), `num_microbatches` micro-batches (even, at least
// 2 * num_ranks), half entering at each end. Rank r holds stage r of direction 0 and stage
// num_ranks-1-r of direction 1 (the same model layers, so parameters are held twice).
absl::StatusOr<PipelineSchedule> MakeDualPipeSchedule(int num_ranks, int num_microbatches,
                                                      bool forward_only);

// DualPipeV ("cut-in-half" DualPipe): `num_ranks` ranks run 2 * num_ranks stages; all
// micro-batches (at least 2 * num_ranks) enter at rank 0, go down through stages 0..R-1, turn
// around on the last rank and come back through stages R..2R-1. Rank r holds stages r and 2R-1-r.
absl::StatusOr<PipelineSchedule> MakeDualPipeVSchedule(int num_ranks, int num_microbatches,
                                                       bool forward_only);

// Classic 1F1B (PipeDream-flush): rank r runs min(R-1-r, N) warm-up forwards, then alternates
// one forward and one full backward, then drains the remaining backwards.
absl::StatusOr<PipelineSchedule> MakeOneForwardOneBackwardSchedule(int num_ranks,
                                                                   int num_microbatches,
                                                                   bool forward_only);

// ZB1P, the zero-bubble schedule ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism"): 1F1B
// with every backward split into Bi and W, where rank r defers its first r weight gradients so
// every rank keeps R micro-batches in flight (1F1B's peak memory) and the deferred W's fill the
// cool-down bubbles. Steady state: F, Bi, then W once r of them are pending; cool-down: Bi, W;
// then the deferred W's.
absl::StatusOr<PipelineSchedule> MakeZeroBubbleOnePSchedule(int num_ranks, int num_microbatches,
                                                            bool forward_only);

absl::StatusOr<PipelineSchedule> MakePipelineSchedule(PipelineAlgorithm algorithm, int num_ranks,
                                                      int num_microbatches, bool forward_only);

// Text form of one operation, e.g. `F0.7`, `B1.6`, `B0.6i`, `W0.6`, `[F0.7|B1.3]`: the first
// number is the direction (for DualPipeV the leg: 0 going down the ranks, 1 coming back), the
// second the micro-batch, `i` marks an input-only backward.
std::string FormatOperation(const PipelineSchedule& schedule, const Operation& operation);

// `rank 3: F0.0 F0.1 ...` for one rank.
std::string FormatRankSchedule(const PipelineSchedule& schedule, int rank);

}  // namespace moeserve::engine::pipeline
