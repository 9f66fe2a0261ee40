// The two-batch-overlap schedule: the order in which a step's micro-batches run their stages,
// shared by the CPU and GPU backends so that both overlap the same way. Per layer:
//
//   for each micro-batch: Attention (with the gate on an MoE layer), then DenseMlp on a dense
//                         layer, or StartDispatch on an MoE layer;
//   for each micro-batch: Experts (waits for its dispatch, runs the local experts, starts its
//                         combine);
//   for each micro-batch: FinishMoe (waits for its combine, adds the weighted expert outputs and
//                         the shared experts to the residual).
//
// So micro-batch 0's dispatch is in flight while micro-batch 1 computes its attention and gate,
// and 0's combine while 1 runs its experts. Exchanges are asynchronous where the backend
// overlaps them (a communication thread on the CPU, a communication stream on a GPU) and
// complete inline otherwise; where each wait happens, and where the shared experts run, is the
// backend's choice within its stage. With one micro-batch the same order is the plain forward.
//
// A free function over an interface; the stages are called from the rank's thread.
#pragma once

#include <functional>

#include "absl/status/status.h"

namespace moeserve::engine::parallel {

class MicroBatchStages {
 public:
  virtual ~MicroBatchStages() = default;
  virtual absl::Status Attention(int layer, int micro_batch) = 0;
  virtual absl::Status DenseMlp(int layer, int micro_batch) = 0;
  virtual absl::Status StartDispatch(int layer, int micro_batch) = 0;
  virtual absl::Status Experts(int layer, int micro_batch) = 0;
  virtual absl::Status FinishMoe(int layer, int micro_batch) = 0;
  // Called once after the layers, whatever happened: no exchange may still be in flight into
  // the step's buffers when the step returns.
  virtual absl::Status DrainExchanges() = 0;
};

// Runs `num_layers` layers of `num_micro_batches` micro-batches through `stages` in the order
// above; stops at the first error, drains, and returns the first error.
absl::Status RunOverlapSchedule(int num_layers, const std::function<bool(int layer)>& is_moe,
                                int num_micro_batches, MicroBatchStages& stages);

}  // namespace moeserve::engine::parallel
