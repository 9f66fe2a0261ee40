// The GPU backend's MoE layer and exchange: the gate, the dispatch plan shared with the CPU,
// activations to the ranks holding the chosen replicas over NCCL on the communication stream,
// the local slots' experts as grouped GEMMs, the combine and the weighted sum. Decode steps are
// planned on the device instead (kernels/device_moe.h; in a group, kernels/device_exchange.h):
// the same replica rule, no host round trip.
#include <chrono>
#include <cstring>

#include "engine/backend/cuda/rank_state.h"
#include "engine/base/status_macros.h"
#include "kernels/kernels.h"
#include "kernels/mla.h"
#include "spdlog/spdlog.h"

namespace moeserve::engine::cuda {
namespace {

// A layer's slots' weights as the expert MLPs take them: pointers per slot, bf16 or FP8.
struct SlotWeightPointers {
  std::vector<const Bf16*> gate_up, down;
  std::vector<kernels::Fp8Weight> gate_up_fp8, down_fp8;
};
SlotWeightPointers SlotWeights(const std::vector<DeviceMlp>& slots, bool fp8) {
  SlotWeightPointers p;
  for (const DeviceMlp& slot : slots) {
    if (fp8) {
      p.gate_up_fp8.push_back(slot.gate_up.Fp8());
      p.down_fp8.push_back(slot.down.Fp8());
    } else {
      p.gate_up.push_back(slot.gate_up.bf16.data());
      p.down.push_back(slot.down.bf16.data());
    }
  }
  return p;
}

}  // namespace

absl::Status CudaRankBackend::State::SynchronizeCompute(const char* what) {
  for (comm::CollectiveCompletion& completion : awaited) RETURN_IF_ERROR(completion.Wait());
  awaited.clear();
  return CudaStatus(cudaStreamSynchronize(stream), what);
}

absl::Status CudaRankBackend::State::AwaitExchange(MicroBatchState& mb) {
  if (!mb.in_flight.has_value()) return absl::OkStatus();
  RETURN_IF_ERROR(mb.in_flight->MakeStreamWait(stream));
  awaited.push_back(std::move(*mb.in_flight));
  mb.in_flight.reset();
  return absl::OkStatus();
}

absl::Status CudaRankBackend::State::DrainExchanges() {
  if (capturing_step) {
    // Nothing runs while a graph is captured: the compute stream waits for what is still in
    // flight (joining the communication stream into the graph), and the host for the graph.
    absl::Status status;
    for (MicroBatchState& mb : micro_batches) status.Update(AwaitExchange(mb));
    awaited.clear();
    return status;
  }
  absl::Status status;
  for (MicroBatchState& mb : micro_batches) {
    if (mb.in_flight.has_value()) status.Update(mb.in_flight->Wait());
    mb.in_flight.reset();
  }
  for (comm::CollectiveCompletion& completion : awaited) status.Update(completion.Wait());
  awaited.clear();
  return status;
}

absl::Status CudaRankBackend::State::EnqueueExchange(MicroBatchState& mb, const void* send_buffer,
                                                     std::span<const int64_t> send_rows,
                                                     void* receive_buffer,
                                                     std::span<const int64_t> receive_rows,
                                                     int64_t row_bytes, bool dispatch,
                                                     parallel::RankResources& rank) {
  std::vector<int64_t> send_bytes(send_rows.size()), receive_bytes(receive_rows.size());
  int64_t total = 0;
  for (size_t p = 0; p < send_rows.size(); ++p) {
    send_bytes[p] = send_rows[p] * row_bytes;
    receive_bytes[p] = receive_rows[p] * row_bytes;
    total += send_bytes[p];
  }
  if (options.exchange == nullptr) {
    return ExchangeThroughHost(mb, send_buffer, send_bytes, receive_buffer, receive_bytes, dispatch,
                               rank);
  }
  comm::NcclCommunicator& nccl = *options.exchange;
  // A step graph's exchanges are not timed: its launches record no events the host could read.
  const bool timed_exchange = !capturing_step;
  TimedCollective timer;
  if (timed_exchange) {
    if (!spare_timers.empty()) {
      timer = spare_timers.back();
      spare_timers.pop_back();
    } else {
      RETURN_IF_ERROR(CudaStatus(cudaEventCreate(&timer.start), "exchange timer"));
      RETURN_IF_ERROR(CudaStatus(cudaEventCreate(&timer.stop), "exchange timer"));
    }
    timer.bytes = total;
    timer.dispatch = dispatch;
    timed.push_back(timer);
  }
  // The communication stream waits for the rows (while capturing, this brings it into the
  // graph; the compute stream's wait for the completion below joins it back).
  RETURN_IF_ERROR(CudaStatus(cudaEventRecord(produced, stream), "exchange event"));
  RETURN_IF_ERROR(nccl.WaitForEvent(produced));
  if (timed_exchange) {
    RETURN_IF_ERROR(CudaStatus(cudaEventRecord(timer.start, nccl.stream()), "exchange timer"));
  }
  RETURN_IF_ERROR(nccl.EnqueueAllToAllV(send_buffer, send_bytes, receive_buffer, receive_bytes));
  if (timed_exchange) {
    RETURN_IF_ERROR(CudaStatus(cudaEventRecord(timer.stop, nccl.stream()), "exchange timer"));
  }
  absl::StatusOr<comm::CollectiveCompletion> done = nccl.RecordCompletion();
  if (!done.ok()) return done.status();
  mb.in_flight.emplace(std::move(*done));
  return absl::OkStatus();
}

absl::Status CudaRankBackend::State::ExchangeThroughHost(
    MicroBatchState& mb, const void* send_buffer, std::span<const int64_t> send_bytes,
    void* receive_buffer, std::span<const int64_t> receive_bytes, bool dispatch,
    parallel::RankResources& rank) {
  const auto start = std::chrono::steady_clock::now();
  int64_t send_total = 0, receive_total = 0;
  for (int64_t bytes : send_bytes) send_total += bytes;
  for (int64_t bytes : receive_bytes) receive_total += bytes;
  RETURN_IF_ERROR(mb.host_send.Reserve(std::max<int64_t>(send_total, 1)));
  RETURN_IF_ERROR(mb.host_receive.Reserve(std::max<int64_t>(receive_total, 1)));
  RETURN_IF_ERROR(CudaStatus(
      cudaMemcpyAsync(mb.host_send.data(), send_buffer, send_total, cudaMemcpyDeviceToHost, stream),
      "exchange rows to host"));
  RETURN_IF_ERROR(SynchronizeCompute("exchange rows to host"));
  RETURN_IF_ERROR(rank.compute->AllToAllV(mb.host_send.data(), send_bytes, mb.host_receive.data(),
                                          receive_bytes));
  RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(receive_buffer, mb.host_receive.data(), receive_total,
                                             cudaMemcpyHostToDevice, stream),
                             "exchange rows to device"));
  // The pinned buffer is reused by this micro-batch's next exchange.
  RETURN_IF_ERROR(SynchronizeCompute("exchange rows to device"));
  if (rank.metrics != nullptr) {
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (dispatch) {
      rank.metrics->AddDispatch(send_total, seconds);
    } else {
      rank.metrics->AddCombine(send_total, seconds);
    }
  }
  return absl::OkStatus();
}

void CudaRankBackend::State::PublishExchangeTimes(parallel::RankResources& rank) {
  for (TimedCollective& t : timed) {
    float milliseconds = 0;
    if (rank.metrics != nullptr &&
        cudaEventElapsedTime(&milliseconds, t.start, t.stop) == cudaSuccess) {
      if (t.dispatch) {
        rank.metrics->AddDispatch(t.bytes, milliseconds / 1e3);
      } else {
        rank.metrics->AddCombine(t.bytes, milliseconds / 1e3);
      }
    }
    spare_timers.push_back(t);
  }
  timed.clear();
}

absl::Status CudaRankBackend::State::GateAndDispatch(int layer, MicroBatchState& mb,
                                                     const ExpertPlacement& placement,
                                                     parallel::RankResources& rank) {
  const ModelConfig& c = config();
  const DeviceLayer& w = layers[layer];
  const int hidden = c.hidden_size;
  const int top_k = c.num_experts_per_tok;
  const int tokens = mb.tokens;
  const int size = options.group_size;
  const int assignments = tokens * top_k;

  // The shared experts need only the normed rows: bf16 ones run on the side lane (shared_mlp's
  // stream), beside the routing and the routed experts, and FinishMoe joins them; FP8 ones go
  // through fp8_linear on the compute stream.
  if (w.has_shared) {
    if (w.shared.bf16()) RETURN_IF_ERROR(side->Fork());
    RETURN_IF_ERROR(RunMlp(w.shared, *shared_mlp, mb.normed.data(), tokens,
                           c.moe_intermediate_size * c.n_shared_experts, mb.shared_out.data()));
  }
  // Gate: fp32 logits, then scores, group limit and top-k in one kernel.
  RETURN_IF_ERROR(Linear(mb.normed.data(), w.gate.data(), mb.gate_logits.data(), CUDA_R_32F, tokens,
                         hidden, c.n_routed_experts));
  if (tokens > 0) {
    RETURN_IF_ERROR(kernels::GateTopK(
        mb.gate_logits.data(), w.has_correction_bias ? w.correction_bias.data() : nullptr, tokens,
        gate_options, mb.routing_experts.data(), mb.routing_weights.data(), stream));
  }
  mb.device_planned = UsesDevicePlan(mb);
  // fp8_dispatch holds for groups of several GPUs only; alone, the experts read `normed`.
  mb.received_fp8 = fp8_dispatch && !mb.device_planned;
  if (mb.device_planned && size > 1) return DispatchOnDevice(layer, mb, rank);
  if (mb.device_planned) {
    const int moe_layer = model->moe_index(layer);
    const int slots = static_cast<int>(w.slots.size());
    const DevicePlanTables& t = device_plan_tables[moe_layer];
    RETURN_IF_ERROR(kernels::PlanSlots(
        mb.routing_experts.data(), tokens, top_k,
        {t.replica_begin.data(), t.replica_slots.data(), c.n_routed_experts}, slots,
        mb.plan_offsets.data(), mb.plan_source_rows.data(), mb.plan_positions.data(),
        rank.load != nullptr ? slot_rows.data() + static_cast<int64_t>(moe_layer) * slots : nullptr,
        stream));
    slot_rows_written |= rank.load != nullptr;
    mb.received_count = assignments;
    return absl::OkStatus();
  }
  std::vector<int32_t> experts(assignments);
  if (assignments > 0) {
    PinnedBuffer& host = mb.routing_host;
    RETURN_IF_ERROR(host.Reserve(sizeof(int32_t) * assignments));
    RETURN_IF_ERROR(
        CudaStatus(cudaMemcpyAsync(host.data(), mb.routing_experts.data(),
                                   sizeof(int32_t) * assignments, cudaMemcpyDeviceToHost, stream),
                   "routing to host"));
    {
      ScopedTraceEvent event(rank.trace, rank.trace_pid, kHostLane,
                             EventName("routing wait", layer, mb), "gpu wait");
      RETURN_IF_ERROR(SynchronizeCompute("routing to host"));
    }
    std::memcpy(experts.data(), host.data(), sizeof(int32_t) * assignments);
  }

  // Dispatch: the same replica choice and send order as the CPU backend; a token's activations
  // go once to each rank that runs one of its experts.
  mb.plan = parallel::PlanDispatch(experts, top_k, model->moe_index(layer), placement, options.rank,
                                   size);
  const int slots = static_cast<int>(w.slots.size());
  // Alone, what a rank sends is what it receives: every token is one row to itself, in token
  // order, so the normed activations are the received rows as they are.
  mb.receive_entries = mb.plan.send_entries;
  std::span<const parallel::DispatchEntry> entries = mb.plan.entries;
  std::vector<parallel::DispatchEntry> received_entries;
  if (size > 1) {
    const int sent_rows = static_cast<int>(mb.plan.sent_token.size());
    RETURN_IF_ERROR(mb.send_source.Upload(mb.plan.sent_token, stream));
    // The rows in send order: bf16, or quantized for FP8 experts in the same pass (packed rows
    // are at most a bf16 row's bytes, so `send` and `received` hold them).
    if (mb.received_fp8) {
      RETURN_IF_ERROR(kernels::QuantizeRowsToPackedFp8(
          mb.normed.data(), mb.send_source.device.data(), sent_rows, hidden,
          reinterpret_cast<uint8_t*>(mb.send.data()), stream));
    } else {
      RETURN_IF_ERROR(kernels::PermuteRows(mb.normed.data(), mb.send_source.device.data(),
                                           mb.send.data(), sent_rows, hidden, stream));
    }
    // Entry counts and entries are small and go through the host communicator; the activations
    // go GPU to GPU.
    ScopedTraceEvent event(rank.trace, rank.trace_pid, kHostLane,
                           EventName("counts exchange", layer, mb), "communication");
    RETURN_IF_ERROR(rank.compute->AllToAllCounts(mb.plan.send_entries, mb.receive_entries));
    int64_t total = 0;
    for (int64_t count : mb.receive_entries) total += count;
    if (total > max_received) {
      return absl::InternalError(
          absl::StrCat("rank received ", total, " entries, above ", max_received));
    }
    received_entries.resize(total);
    constexpr int64_t kEntryBytes = sizeof(parallel::DispatchEntry);
    std::vector<int64_t> send_bytes(size), receive_bytes(size);
    for (int p = 0; p < size; ++p) {
      send_bytes[p] = mb.plan.send_entries[p] * kEntryBytes;
      receive_bytes[p] = mb.receive_entries[p] * kEntryBytes;
    }
    RETURN_IF_ERROR(rank.compute->AllToAllV(mb.plan.entries.data(), send_bytes,
                                            received_entries.data(), receive_bytes));
    entries = received_entries;
  }
  ASSIGN_OR_RETURN(parallel::ReceivedEntries read,
                   parallel::ReadReceivedEntries(entries, mb.receive_entries, slots));
  const std::vector<int32_t>& entry_slot = read.slot;
  const std::vector<int32_t>& entry_row = read.row;  // into the received rows
  if (size > 1) {
    const int64_t row_bytes = mb.received_fp8 ? kernels::Fp8PackedRowBytes(hidden) : Bf16RowBytes();
    RETURN_IF_ERROR(EnqueueExchange(mb, mb.send.data(), mb.plan.send_rows, mb.received.data(),
                                    read.rows_per_source, row_bytes, /*dispatch=*/true, rank));
    mb.received_rows = mb.received.data();
  } else {
    mb.received_rows = mb.normed.data();
  }

  // Order the received entries by local slot (the experts' GEMM groups); each reads its row.
  mb.received_count = static_cast<int64_t>(entry_slot.size());
  mb.slot_offsets.assign(slots + 1, 0);
  for (int32_t slot : entry_slot) ++mb.slot_offsets[slot + 1];
  for (int s = 0; s < slots; ++s) mb.slot_offsets[s + 1] += mb.slot_offsets[s];
  std::vector<int32_t> row_by_slot(mb.received_count), back_to_received(mb.received_count);
  std::vector<int64_t> cursor(mb.slot_offsets.begin(), mb.slot_offsets.end() - 1);
  for (int64_t entry = 0; entry < mb.received_count; ++entry) {
    const int64_t at = cursor[entry_slot[entry]]++;
    row_by_slot[at] = entry_row[entry];
    back_to_received[entry] = static_cast<int32_t>(at);
  }
  RETURN_IF_ERROR(mb.slot_order.Upload(row_by_slot, stream));
  RETURN_IF_ERROR(mb.received_order.Upload(back_to_received, stream));
  std::vector<int32_t> position(assignments);
  for (int entry = 0; entry < assignments; ++entry)
    position[mb.plan.sent_assignment[entry]] = entry;
  return mb.assignment_rows.Upload(position, stream);
}

absl::Status CudaRankBackend::State::ExpertsAndCombine(int layer, MicroBatchState& mb,
                                                       parallel::RankResources& rank) {
  const DeviceLayer& w = layers[layer];
  const int hidden = config().hidden_size;
  const int received = static_cast<int>(mb.received_count);
  if (mb.device_planned && options.group_size > 1) return ExpertsOnDevice(layer, mb, rank);
  if (mb.device_planned) {
    const DevicePlanTables& t = device_plan_tables[model->moe_index(layer)];
    const kernels::DeviceSlotPlan plan{mb.plan_offsets.data(), mb.plan_source_rows.data(),
                                       static_cast<int>(w.slots.size())};
    RETURN_IF_ERROR(device_mlp->Run(mb.normed.data(), plan, received, t.GateUp(fp8_experts),
                                    t.Down(fp8_experts), mb.expert_out.data()));
    mb.returned_rows = mb.expert_out.data();
    return absl::OkStatus();
  }
  RETURN_IF_ERROR(AwaitExchange(mb));  // the dispatched rows
  // The experts read the received rows in slot order: permuted into expert_in, or, for FP8's
  // GEMMs, read in place by the activation quantization (one pass, no bf16 copy).
  auto permute_to_slot_order = [&] {
    return kernels::PermuteRows(static_cast<const Bf16*>(mb.received_rows),
                                mb.slot_order.device.data(), mb.expert_in.data(), received, hidden,
                                stream);
  };
  // Many slots with few rows each (decode) fill the GPU best as one grouped GEMM (FP8: GEMMs
  // spread over side streams); slots with many rows each (prefill) run faster as one large GEMM
  // apiece (docs/PERFORMANCE.md).
  const int slots = static_cast<int>(w.slots.size());
  int busy_slots = 0;
  for (int s = 0; s < slots; ++s) busy_slots += mb.slot_offsets[s + 1] > mb.slot_offsets[s];
  const bool small_groups = busy_slots > 0 && received / busy_slots < 512;
  if (fp8_experts) {
    const SlotWeightPointers weights = SlotWeights(w.slots, /*fp8=*/true);
    // On Hopper, up to 128 rows per slot (decode) run the recipe's grouped GEMM: one launch per
    // projection for every slot, with the products the device-planned path computes. Beyond,
    // each slot's rows make a GEMM of their own, which cuBLASLt runs faster (on an H100 the
    // grouped GEMM wins by 1.2-1.5x at 64 and 128 rows per slot and loses from 256:
    // moeserve-expert-bench's crossover table, docs/PERFORMANCE.md), spread over side streams.
    // While slots are small (a decode step's hundreds of rows), a few of them (an EP GPU's) run
    // pipelined, each slot's kernels in order on a side stream, so that one slot's activation
    // quantization overlaps another's GEMMs: at EP128 decode's 3 x 340 rows 2-10% faster than
    // the side streams' phases in four runs of four. More slots keep the phases (a pipelined
    // slot launches four kernels rather than two, which costs more than it gains over hundreds
    // of slots: 256 experts on one GPU, 7.9-10.4 ms against 6.4-7.0), and so do prefill's slots
    // of thousands of rows (pipelined, EP32 prefill's 9 x 14.5K was 5% faster in two runs of
    // four and up to 2% slower in two; the phases on side streams were 1-2% faster than one GEMM
    // after another in all four). Without the grouped GEMM, slots of at most 2 rows take the
    // weight-only kernel instead (with bf16 rows: an FP8 dispatch needs the grouped GEMM).
    int64_t largest = 0;
    for (int s = 0; s < slots; ++s) {
      largest = std::max(largest, mb.slot_offsets[s + 1] - mb.slot_offsets[s]);
    }
    constexpr int64_t kGroupedGemmMaxRows = 128, kWeightOnlyMaxRows = 2;
    constexpr int kPipelinedMaxSlots = 16;
    using Fp8Strategy = kernels::Fp8ExpertMlp::Strategy;
    const bool grouped = routed_fp8_mlp->grouped_gemm_supported();
    const auto strategy = grouped && largest <= kGroupedGemmMaxRows   ? Fp8Strategy::kGroupedGemm
                          : !grouped && largest <= kWeightOnlyMaxRows ? Fp8Strategy::kWeightOnly
                          : small_groups && busy_slots <= kPipelinedMaxSlots
                              ? Fp8Strategy::kPipelinedGemm
                              : Fp8Strategy::kConcurrentGemm;
    if (strategy == Fp8Strategy::kWeightOnly) {
      RETURN_IF_ERROR(permute_to_slot_order());
      RETURN_IF_ERROR(routed_fp8_mlp->Run(mb.expert_in.data(), mb.slot_offsets, weights.gate_up_fp8,
                                          weights.down_fp8, mb.expert_out.data(), strategy));
    } else {
      // Rows quantized by their senders move into place where bf16 ones would be quantized.
      kernels::Fp8InputRows rows{.rows = mb.slot_order.device.data()};
      if (mb.received_fp8) {
        rows.packed = static_cast<const uint8_t*>(mb.received_rows);
      } else {
        rows.bf16 = static_cast<const Bf16*>(mb.received_rows);
      }
      RETURN_IF_ERROR(routed_fp8_mlp->Run(rows, mb.slot_offsets, weights.gate_up_fp8,
                                          weights.down_fp8, mb.expert_out.data(), strategy));
    }
  } else {
    RETURN_IF_ERROR(permute_to_slot_order());
    const SlotWeightPointers weights = SlotWeights(w.slots, /*fp8=*/false);
    RETURN_IF_ERROR(routed_mlp->Run(mb.expert_in.data(), mb.slot_offsets, weights.gate_up,
                                    weights.down, mb.expert_out.data(),
                                    small_groups ? kernels::ExpertMlp::Strategy::kGroupedGemm
                                                 : kernels::ExpertMlp::Strategy::kPerExpertGemm));
  }
  RETURN_IF_ERROR(kernels::PermuteRows(mb.expert_out.data(), mb.received_order.device.data(),
                                       mb.results.data(), received, hidden, stream));
  if (rank.load != nullptr) {
    const int moe_layer = model->moe_index(layer);
    for (int s = 0; s < slots; ++s) {
      if (mb.slot_offsets[s + 1] > mb.slot_offsets[s]) {
        rank.load->Record(moe_layer, w.slot_expert[s], mb.slot_offsets[s + 1] - mb.slot_offsets[s]);
      }
    }
  }
  // Combine: each entry's result goes back to the rank that sent the entry.
  if (options.group_size > 1) {
    RETURN_IF_ERROR(EnqueueExchange(mb, mb.results.data(), mb.receive_entries, mb.returned.data(),
                                    mb.plan.send_entries, Bf16RowBytes(), /*dispatch=*/false,
                                    rank));
    mb.returned_rows = mb.returned.data();
  } else {
    mb.returned_rows = mb.results.data();
  }
  return absl::OkStatus();
}

absl::Status CudaRankBackend::State::FinishMoe(MicroBatchState& mb) {
  const ModelConfig& c = config();
  const int hidden = c.hidden_size;
  RETURN_IF_ERROR(AwaitExchange(mb));  // the combined rows
  RETURN_IF_ERROR(side->Join());       // the shared experts' rows
  RETURN_IF_ERROR(kernels::WeightedUnpermute(
      mb.returned_rows,
      mb.device_planned ? mb.plan_positions.data() : mb.assignment_rows.device.data(),
      mb.routing_weights.data(), c.n_shared_experts > 0 ? mb.shared_out.data() : nullptr,
      mb.moe_out.data(), mb.tokens, c.num_experts_per_tok, hidden, stream));
  return kernels::AddInPlace(mb.residual.data(), mb.moe_out.data(),
                             static_cast<int64_t>(mb.tokens) * hidden, stream);
}

bool CudaRankBackend::State::FitsDevicePlan(int64_t tokens) const {
  return device_plan_possible && tokens > 0 &&
         tokens * config().num_experts_per_tok <= device_plan_max_pairs;
}

bool CudaRankBackend::State::UsesDevicePlan(const MicroBatchState& mb) const {
  if (options.group_size > 1) return step_exchange_on_device;
  return FitsDevicePlan(mb.tokens);
}

absl::Status CudaRankBackend::State::BuildDevicePlanTables(const ExpertPlacement& placement) {
  const ModelConfig& c = config();
  device_plan_tables.resize(c.num_moe_layers());
  for (int layer = 0; layer < c.num_hidden_layers; ++layer) {
    const int moe_layer = model->moe_index(layer);
    if (moe_layer < 0) continue;
    DevicePlanTables& t = device_plan_tables[moe_layer];
    // The placement's slot ids: a group of one's own, or the group's (PlanDestinations finds
    // the GPU of each); the weights are this rank's slots'.
    std::vector<int32_t> begin(c.n_routed_experts + 1, 0), replica_slots;
    for (int e = 0; e < c.n_routed_experts; ++e) {
      for (int32_t slot : placement.replicas(moe_layer, e)) replica_slots.push_back(slot);
      begin[e + 1] = static_cast<int32_t>(replica_slots.size());
    }
    RETURN_IF_ERROR(t.replica_begin.Upload(begin.data(), begin.size(), stream));
    RETURN_IF_ERROR(t.replica_slots.Upload(replica_slots.data(), replica_slots.size(), stream));
    const SlotWeightPointers w = SlotWeights(layers[layer].slots, fp8_experts);
    if (fp8_experts) {
      RETURN_IF_ERROR(t.gate_up_fp8.Upload(w.gate_up_fp8.data(), w.gate_up_fp8.size(), stream));
      RETURN_IF_ERROR(t.down_fp8.Upload(w.down_fp8.data(), w.down_fp8.size(), stream));
    } else {
      RETURN_IF_ERROR(t.gate_up.Upload(w.gate_up.data(), w.gate_up.size(), stream));
      RETURN_IF_ERROR(t.down.Upload(w.down.data(), w.down.size(), stream));
    }
  }
  device_plan_tables_version = placement.version();
  return absl::OkStatus();
}

kernels::ExchangeShape CudaRankBackend::State::ExchangeShapeFor(int64_t max_tokens) const {
  const ModelConfig& c = config();
  return kernels::ExchangeShape::ForBatch(options.group_size, max_tokens, c.num_experts_per_tok,
                                          device_slots_per_rank, c.hidden_size, exchange_headroom,
                                          exchange_fixed_entries);
}

absl::Status CudaRankBackend::State::PlanStepExchange(const parallel::StepAgreement& step) {
  step_exchange_on_device = false;
  step_max_tokens = step.max_tokens;
  if (options.group_size == 1 || !FitsDevicePlan(step.max_tokens)) return absl::OkStatus();
  const kernels::ExchangeShape shape = ExchangeShapeFor(step.max_tokens);
  if (shape.combine_rows() > kernels::kMaxPlannedPairs) return absl::OkStatus();
  step_exchange_on_device = true;
  if (shape == exchange_shape) return absl::OkStatus();
  exchange_shape = shape;
  const size_t hidden = config().hidden_size;
  const size_t dispatch_rows = shape.dispatch_rows(), combine_rows = shape.combine_rows();
  for (MicroBatchState& mb : micro_batches) {
    RETURN_IF_ERROR(mb.send.Reserve(dispatch_rows * hidden));
    RETURN_IF_ERROR(mb.received.Reserve(dispatch_rows * hidden));
    RETURN_IF_ERROR(mb.expert_out.Reserve(combine_rows * hidden));
    RETURN_IF_ERROR(mb.results.Reserve(combine_rows * hidden));
    RETURN_IF_ERROR(mb.returned.Reserve(combine_rows * hidden));
    RETURN_IF_ERROR(mb.dispatch_index.Reserve(dispatch_rows));
    RETURN_IF_ERROR(mb.grouped_rows.Reserve(combine_rows));
    RETURN_IF_ERROR(mb.plan_source_rows.Reserve(combine_rows));
    RETURN_IF_ERROR(mb.peer_overflow.Reserve(shape.ranks));
  }
  return absl::OkStatus();
}

absl::Status CudaRankBackend::State::DispatchOnDevice(int layer, MicroBatchState& mb,
                                                      parallel::RankResources& rank) {
  const ModelConfig& c = config();
  const kernels::ExchangeShape& shape = exchange_shape;
  if (mb.tokens > step_max_tokens) {
    // The shape was sized from the agreement's largest batch; a larger one is a bug.
    return absl::InternalError(absl::StrCat("rank has ", mb.tokens,
                                            " tokens, above the group's agreed ", step_max_tokens));
  }
  const DevicePlanTables& t = device_plan_tables[model->moe_index(layer)];
  RETURN_IF_ERROR(kernels::PlanDestinations(
      mb.routing_experts.data(), mb.tokens, c.num_experts_per_tok,
      {t.replica_begin.data(), t.replica_slots.data(), c.n_routed_experts}, device_slots_per_rank,
      options.rank, shape, mb.send.data(), mb.dispatch_index.data(), mb.plan_positions.data(),
      mb.peer_overflow.data(), stream));
  RETURN_IF_ERROR(kernels::GatherRows(mb.normed.data(), mb.dispatch_index.data(), mb.send.data(),
                                      shape.dispatch_rows(), c.hidden_size, stream));
  const std::vector<int64_t> blocks(shape.ranks, shape.block_rows());
  RETURN_IF_ERROR(EnqueueExchange(mb, mb.send.data(), blocks, mb.received.data(), blocks,
                                  Bf16RowBytes(), /*dispatch=*/true, rank));
  mb.received_rows = mb.received.data();
  // What each slot received is counted on the device (slot_rows), read after the step.
  mb.received_count = 0;
  return absl::OkStatus();
}

absl::Status CudaRankBackend::State::ExpertsOnDevice(int layer, MicroBatchState& mb,
                                                     parallel::RankResources& rank) {
  const kernels::ExchangeShape& shape = exchange_shape;
  const int moe_layer = model->moe_index(layer);
  const DeviceLayer& w = layers[layer];
  const int slots = static_cast<int>(w.slots.size());
  const DevicePlanTables& t = device_plan_tables[moe_layer];
  RETURN_IF_ERROR(AwaitExchange(mb));  // the dispatched blocks
  RETURN_IF_ERROR(kernels::PlanReceived(mb.received.data(), shape, slots, mb.plan_offsets.data(),
                                        mb.plan_source_rows.data(), mb.grouped_rows.data(),
                                        slot_rows.data() + static_cast<int64_t>(moe_layer) * slots,
                                        exchange_overflow.data(), stream));
  slot_rows_written = true;
  const kernels::DeviceSlotPlan plan{mb.plan_offsets.data(), mb.plan_source_rows.data(), slots};
  // The received entries' count is on the device: the MLP runs for the capacity's worth of
  // rows, its blocks only for the slots with rows.
  const int rows = static_cast<int>(shape.combine_rows());
  RETURN_IF_ERROR(device_mlp->Run(mb.received.data(), plan, rows, t.GateUp(fp8_experts),
                                  t.Down(fp8_experts), mb.expert_out.data()));
  RETURN_IF_ERROR(kernels::GatherRows(mb.expert_out.data(), mb.grouped_rows.data(),
                                      mb.results.data(), rows, config().hidden_size, stream));
  const std::vector<int64_t> entries(shape.ranks, shape.entries);
  RETURN_IF_ERROR(EnqueueExchange(mb, mb.results.data(), entries, mb.returned.data(), entries,
                                  Bf16RowBytes(), /*dispatch=*/false, rank));
  mb.returned_rows = mb.returned.data();
  return absl::OkStatus();
}

absl::Status CudaRankBackend::State::ClearSlotRows() {
  slot_rows_written = false;
  return CudaStatus(cudaMemsetAsync(slot_rows.data(), 0, slot_rows_count * sizeof(int32_t), stream),
                    "slot rows");
}

absl::Status CudaRankBackend::State::ReadBackSlotRows(parallel::RankResources& rank) {
  slot_rows_read_back = false;
  if (!slot_rows_written || (rank.load == nullptr && !step_exchange_on_device)) {
    return absl::OkStatus();
  }
  const size_t bytes = slot_rows_count * sizeof(int32_t);
  RETURN_IF_ERROR(slot_rows_host.Reserve(bytes));
  RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(slot_rows_host.data(), slot_rows.data(), bytes,
                                             cudaMemcpyDeviceToHost, stream),
                             "slot rows to host"));
  RETURN_IF_ERROR(ClearSlotRows());
  slot_rows_read_back = true;
  return absl::OkStatus();
}

absl::Status CudaRankBackend::State::RecordDevicePlannedLoad(
    parallel::RankResources& rank, std::vector<int64_t>& received_per_layer) {
  if (!slot_rows_read_back) return absl::OkStatus();
  slot_rows_read_back = false;
  const ModelConfig& c = config();
  const auto* rows = static_cast<const int32_t*>(slot_rows_host.data());
  if (step_exchange_on_device) received_per_layer.assign(c.num_moe_layers(), 0);
  for (int layer = 0; layer < c.num_hidden_layers; ++layer) {
    const int moe_layer = model->moe_index(layer);
    if (moe_layer < 0) continue;
    const DeviceLayer& w = layers[layer];
    const int slots = static_cast<int>(w.slots.size());
    for (int s = 0; s < slots; ++s) {
      const int32_t served = rows[static_cast<int64_t>(moe_layer) * slots + s];
      if (served <= 0) continue;
      if (rank.load != nullptr) rank.load->Record(moe_layer, w.slot_expert[s], served);
      if (step_exchange_on_device) received_per_layer[moe_layer] += served;
    }
  }
  return absl::OkStatus();
}

absl::Status CudaRankBackend::State::ClearExchangeOverflow() {
  return CudaStatus(cudaMemsetAsync(exchange_overflow.data(), 0, sizeof(int32_t), stream),
                    "exchange overflow");
}

absl::Status CudaRankBackend::State::ReadBackExchangeOverflow() {
  *static_cast<int32_t*>(exchange_overflow_host.data()) = 0;
  return CudaStatus(cudaMemcpyAsync(exchange_overflow_host.data(), exchange_overflow.data(),
                                    sizeof(int32_t), cudaMemcpyDeviceToHost, stream),
                    "exchange overflow to host");
}

bool CudaRankBackend::State::ExchangeOverflowed() {
  return *static_cast<int32_t*>(exchange_overflow_host.data()) != 0;
}

void CudaRankBackend::State::GrowExchangeAfterOverflow() {
  const kernels::ExchangeShape overflowed = exchange_shape;
  exchange_fixed_entries = 0;
  exchange_headroom *= 2;
  step_exchange_on_device = false;  // the redo plans on the host
  // Logged once per growth: the capacity doubles, so a group logs a handful in its life.
  spdlog::warn(
      "moeserve: GPU {}'s device-planned exchange overflowed its capacity of {} rows and {} "
      "entries per GPU; the step is redone planned on the host, and the capacity's headroom "
      "over an even share is now {}x",
      options.device, overflowed.rows, overflowed.entries, exchange_headroom);
}

}  // namespace moeserve::engine::cuda
