// The expert exchange between the GPUs of a group, planned on the device (decode steps): the
// routing never goes to the host, and every byte count is fixed by an ExchangeShape
// (exchange_shape.h), so one all-to-all of whole blocks moves the headers and the rows.
//   PlanDestinations  sender: which replica serves each (token, expert) pair (replica
//                     `(token + rank) % count`, parallel::PlanDispatch's rule), and per
//                     destination GPU its block's header and the tokens of its rows (one row
//                     per token with an expert there, whatever the number), plus each pair's row
//                     in the combine's buffer (for WeightedUnpermute). A plan that overflows a
//                     capacity marks every header it sends; the rows and entries past a
//                     capacity are not sent.
//   PlanReceived      receiver: the entries of every source's block grouped by local slot, as
//                     DeviceSlotPlan reads them (source rows into the received blocks), the
//                     grouped row of every entry (what the combine sends back), load[s] +=
//                     rows of slot s, and *overflow |= 1 where any source marked its header,
//                     sent past a capacity, or sent an entry that is not a plan's. Every rank
//                     receives every rank's header each layer, so every rank of the group sees
//                     the same overflow: the group can redo the step together.
// kernels::GatherRows (kernels.h) fills the dispatch blocks' rows from dispatch_index, and the
// combine's rows from the experts' grouped output through grouped_rows.
// Raw device pointers and a stream; thread-safe as far as CUDA streams are. CPU twins:
// PlanDestinationsTwin and PlanReceivedTwin (cpu_twins.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/device_moe.h"
#include "kernels/exchange_shape.h"

namespace moeserve::kernels {

// experts [tokens * top_k]; table: the layer's replicas as global slots (a GPU holds slots
// [rank * slots_per_rank, (rank + 1) * slots_per_rank)). Writes every header and dispatch_index
// [shape.dispatch_rows()] (the token of each dispatch row, -1 for header and unused rows),
// positions [tokens * top_k] (row p * shape.entries + e of the combine's buffer for entry e of
// destination p; 0 for a pair past a capacity) and peer_overflow [shape.ranks] (scratch).
// `dispatch` is the send buffer whose header rows are written.
absl::Status PlanDestinations(const int32_t* experts, int tokens, int top_k,
                              const DeviceReplicaTable& table, int slots_per_rank, int rank,
                              const ExchangeShape& shape, __nv_bfloat16* dispatch,
                              int32_t* dispatch_index, int32_t* positions, int32_t* peer_overflow,
                              cudaStream_t stream);

// received: the dispatch blocks of every source (shape.dispatch_rows() rows). Writes offsets
// [slots + 1], source_rows [shape.combine_rows()] (rows of `received`), grouped_rows
// [shape.combine_rows()] (the grouped row of entry e of source p at p * shape.entries + e, -1
// where unused); `load` may be null. shape.combine_rows() <= kMaxPlannedPairs.
absl::Status PlanReceived(const __nv_bfloat16* received, const ExchangeShape& shape, int slots,
                          int32_t* offsets, int32_t* source_rows, int32_t* grouped_rows,
                          int32_t* load, int32_t* overflow, cudaStream_t stream);

}  // namespace moeserve::kernels
