#include "engine/parallel/ep_forward.h"

#include <chrono>
#include <future>

#include "absl/strings/str_cat.h"
#include "engine/base/status_macros.h"
#include "engine/model/moe.h"
#include "engine/parallel/overlap_schedule.h"

namespace moeserve::engine::parallel {
namespace {

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

std::string EventName(const char* what, int layer, int micro_batch) {
  return absl::StrCat(what, " L", layer, " mb", micro_batch);
}

constexpr int kComputeLane = kTraceComputeLane;
constexpr int kCommunicationLane = kTraceCommunicationLane;

}  // namespace

struct ExpertParallelForward::MicroBatch {
  int index = 0;
  std::vector<BatchSequence> sequences;
  std::vector<bool> emits_logits;
  std::vector<SequenceSpan> spans;
  int num_tokens = 0;
  std::vector<float> residual, normed;
  Routing routing;
  // Dispatch/combine state of the current layer (DispatchPlan's rows and entries).
  std::vector<int32_t> sent_assignment;  // (token * top_k + k) of each sent entry, in send order
  std::vector<int64_t> send_entries,
      recv_entries;                      // entries per peer (results come back per entry)
  std::vector<int32_t> recv_slots;       // local slot of each received entry
  std::vector<int32_t> recv_entry_rows;  // its row in recv_activations
  std::vector<float> recv_activations;   // [received rows, hidden]
  std::vector<float> expert_results;     // [received entries, hidden]
  std::vector<float> expert_outputs;     // [assignments, hidden] in (token, k) order
};

std::vector<std::vector<BatchPiece>> SplitIntoMicroBatches(std::span<const BatchSequence> batch,
                                                           int parts) {
  std::vector<std::vector<BatchPiece>> result(parts);
  int64_t total = 0;
  for (const auto& seq : batch) total += static_cast<int64_t>(seq.tokens.size());
  int part = 0;
  int64_t filled = 0;  // tokens placed in parts before `part`, plus those in `part`
  for (const BatchSequence& seq : batch) {
    int offset = 0;
    const int length = static_cast<int>(seq.tokens.size());
    while (offset < length || (length == 0 && offset == 0)) {
      // Tokens part `part` may still take to reach its share of the total.
      const int64_t share_end = (total * (part + 1) + parts - 1) / parts;
      int64_t room = share_end - filled;
      if (part == parts - 1) room = length - offset;
      if (room <= 0 && part < parts - 1) {
        ++part;
        continue;
      }
      const int take = static_cast<int>(std::min<int64_t>(room, length - offset));
      BatchSequence piece = seq;
      piece.tokens = seq.tokens.subspan(offset, take);
      piece.start_position = seq.start_position + offset;
      const bool is_last_piece = offset + take == length;
      result[part].push_back({piece, seq.all_logits || is_last_piece});
      offset += take;
      filled += take;
      if (length == 0) break;
    }
  }
  return result;
}

std::vector<int> MicroBatchLogitRows(std::span<const BatchSequence> sequences,
                                     std::span<const SequenceSpan> spans,
                                     const std::vector<bool>& emits_logits) {
  std::vector<int> rows;
  for (size_t s = 0; s < sequences.size(); ++s) {
    const SequenceSpan& span = spans[s];
    if (!emits_logits[s] || span.num_tokens == 0) continue;
    if (sequences[s].all_logits) {
      for (int i = 0; i < span.num_tokens; ++i) rows.push_back(span.token_offset + i);
    } else {
      rows.push_back(span.token_offset + span.num_tokens - 1);
    }
  }
  return rows;
}

DispatchPlan PlanDispatch(std::span<const int32_t> experts, int top_k, int moe_layer,
                          const ExpertPlacement& placement, int rank, int size) {
  const int assignments = static_cast<int>(experts.size());
  const int slots_per_rank = placement.num_physical() / size;
  std::vector<int32_t> slot_of(assignments), row_of(assignments);  // row: within its destination
  DispatchPlan plan;
  plan.send_rows.assign(size, 0);
  plan.send_entries.assign(size, 0);
  // The last token counted for each destination: a token's assignments are consecutive, so a
  // destination gets a new row exactly when the token changes.
  std::vector<int32_t> last_token(size, -1);
  for (int a = 0; a < assignments; ++a) {
    const int token = a / top_k;
    // Spread a hot expert's tokens over its replicas: consecutive tokens take consecutive
    // replicas (the token index, not the assignment index, whose residue modulo a replica count
    // that divides top_k would repeat), and ranks start at different replicas.
    const uint64_t key = static_cast<uint64_t>(token) + static_cast<uint64_t>(rank);
    slot_of[a] = placement.ChooseSlot(moe_layer, experts[a], key);
    const int dest = slot_of[a] / slots_per_rank;
    ++plan.send_entries[dest];
    if (last_token[dest] != token) {
      last_token[dest] = token;
      ++plan.send_rows[dest];
    }
    row_of[a] = static_cast<int32_t>(plan.send_rows[dest] - 1);
  }
  std::vector<int64_t> next_entry(size, 0), first_row(size, 0);
  for (int p = 1; p < size; ++p) {
    next_entry[p] = next_entry[p - 1] + plan.send_entries[p - 1];
    first_row[p] = first_row[p - 1] + plan.send_rows[p - 1];
  }
  plan.sent_assignment.assign(assignments, 0);
  plan.entries.assign(assignments, {});
  plan.sent_token.assign(first_row[size - 1] + plan.send_rows[size - 1], 0);
  for (int a = 0; a < assignments; ++a) {
    const int dest = slot_of[a] / slots_per_rank;
    plan.sent_token[first_row[dest] + row_of[a]] = a / top_k;
    const int64_t entry = next_entry[dest]++;
    plan.sent_assignment[entry] = a;
    plan.entries[entry] = {slot_of[a] % slots_per_rank, row_of[a]};
  }
  return plan;
}

absl::StatusOr<ReceivedEntries> ReadReceivedEntries(std::span<const DispatchEntry> entries,
                                                    std::span<const int64_t> entries_per_source,
                                                    int slots_per_rank) {
  ReceivedEntries received;
  received.rows_per_source.assign(entries_per_source.size(), 0);
  received.slot.resize(entries.size());
  received.row.resize(entries.size());
  int64_t entry = 0, rows_before = 0;
  for (size_t source = 0; source < entries_per_source.size(); ++source) {
    int64_t rows = 0;  // rows of this source seen so far
    for (int64_t i = 0; i < entries_per_source[source]; ++i, ++entry) {
      if (entry >= static_cast<int64_t>(entries.size())) {
        return absl::InternalError("dispatch: fewer entries received than counted");
      }
      const DispatchEntry& e = entries[entry];
      // A source numbers its rows 0, 1, ...: an entry reuses the current row or opens the next.
      if (e.slot < 0 || e.slot >= slots_per_rank || e.row < rows - 1 || e.row > rows ||
          (rows == 0 && e.row != 0)) {
        return absl::InternalError(absl::StrCat("dispatch: malformed entry (slot ", e.slot,
                                                ", row ", e.row, ") from rank ", source, " with ",
                                                slots_per_rank, " slots per rank"));
      }
      if (e.row == rows) ++rows;
      received.slot[entry] = e.slot;
      received.row[entry] = static_cast<int32_t>(rows_before + e.row);
    }
    received.rows_per_source[source] = rows;
    rows_before += rows;
  }
  if (entry != static_cast<int64_t>(entries.size())) {
    return absl::InternalError("dispatch: more entries received than counted");
  }
  return received;
}

absl::Status ExpertParallelForward::Dispatch(int layer, MicroBatch& mb,
                                             const ExpertPlacement& placement,
                                             comm::Communicator& comm, RankResources& rank) const {
  ScopedTraceEvent event(rank.trace, rank.trace_pid, kCommunicationLane,
                         EventName("dispatch", layer, mb.index), "communication");
  const auto start = Clock::now();
  const int size = comm.size();
  const int hidden = model_.config().hidden_size;
  const int moe_layer = model_.moe_index(layer);
  const Routing& routing = mb.routing;
  const int assignments = routing.num_tokens * routing.top_k;

  DispatchPlan plan =
      PlanDispatch(routing.experts, routing.top_k, moe_layer, placement, comm.rank(), size);
  mb.send_entries = std::move(plan.send_entries);
  mb.sent_assignment = std::move(plan.sent_assignment);
  const int64_t sent_rows = static_cast<int64_t>(plan.sent_token.size());
  std::vector<float> send_activations(static_cast<size_t>(sent_rows) * hidden);
  for (int64_t row = 0; row < sent_rows; ++row) {
    std::copy_n(&mb.normed[static_cast<size_t>(plan.sent_token[row]) * hidden], hidden,
                &send_activations[static_cast<size_t>(row) * hidden]);
  }

  mb.recv_entries.assign(size, 0);
  RETURN_IF_ERROR(comm.AllToAllCounts(mb.send_entries, mb.recv_entries));
  int64_t received = 0;
  for (int64_t entries : mb.recv_entries) received += entries;
  constexpr int64_t kEntryBytes = sizeof(DispatchEntry);
  std::vector<int64_t> send_bytes(size), recv_bytes(size);
  for (int p = 0; p < size; ++p) {
    send_bytes[p] = mb.send_entries[p] * kEntryBytes;
    recv_bytes[p] = mb.recv_entries[p] * kEntryBytes;
  }
  std::vector<DispatchEntry> entries(received);
  RETURN_IF_ERROR(comm.AllToAllV(plan.entries.data(), send_bytes, entries.data(), recv_bytes));
  const int slots_per_rank = placement.num_physical() / size;
  ASSIGN_OR_RETURN(ReceivedEntries read,
                   ReadReceivedEntries(entries, mb.recv_entries, slots_per_rank));
  mb.recv_slots = std::move(read.slot);
  mb.recv_entry_rows = std::move(read.row);
  const int64_t row_bytes = static_cast<int64_t>(hidden) * sizeof(float);
  int64_t received_rows = 0;
  for (int p = 0; p < size; ++p) {
    send_bytes[p] = plan.send_rows[p] * row_bytes;
    recv_bytes[p] = read.rows_per_source[p] * row_bytes;
    received_rows += read.rows_per_source[p];
  }
  mb.recv_activations.assign(static_cast<size_t>(received_rows) * hidden, 0.0f);
  RETURN_IF_ERROR(
      comm.AllToAllV(send_activations.data(), send_bytes, mb.recv_activations.data(), recv_bytes));
  if (rank.metrics != nullptr) {
    rank.metrics->AddDispatch(sent_rows * row_bytes + assignments * kEntryBytes,
                              SecondsSince(start));
  }
  return absl::OkStatus();
}

void ExpertParallelForward::RunLocalExperts(int layer, MicroBatch& mb,
                                            const ExpertPlacement& placement,
                                            RankResources& rank) const {
  ScopedTraceEvent event(rank.trace, rank.trace_pid, kComputeLane,
                         EventName("experts", layer, mb.index), "compute");
  const int hidden = model_.config().hidden_size;
  const int moe_layer = model_.moe_index(layer);
  const int size = rank.compute->size();
  const int slots_per_rank = placement.num_physical() / size;
  const int first_slot = rank.compute->rank() * slots_per_rank;
  const MoeWeights& weights = model_.weights().layer(layer).moe;
  const size_t received = mb.recv_slots.size();
  mb.expert_results.assign(received * hidden, 0.0f);
  std::vector<std::vector<int64_t>> rows_of_slot(slots_per_rank);
  for (size_t row = 0; row < received; ++row) rows_of_slot[mb.recv_slots[row]].push_back(row);
  std::vector<float> gathered, result;
  for (int slot = 0; slot < slots_per_rank; ++slot) {
    const auto& rows = rows_of_slot[slot];
    if (rows.empty()) continue;
    const int expert = placement.phy2log(moe_layer)[first_slot + slot];
    const MlpWeights& mlp = rank.expert_weights != nullptr
                                ? rank.expert_weights->slot(moe_layer, slot)
                                : weights.experts[expert];
    gathered.resize(rows.size() * hidden);
    result.resize(rows.size() * hidden);
    for (size_t i = 0; i < rows.size(); ++i) {
      std::copy_n(&mb.recv_activations[static_cast<size_t>(mb.recv_entry_rows[rows[i]]) * hidden],
                  hidden, &gathered[i * hidden]);
    }
    RunMlp(mlp, gathered.data(), static_cast<int64_t>(rows.size()), hidden, result.data());
    for (size_t i = 0; i < rows.size(); ++i) {
      std::copy_n(&result[i * hidden], hidden, &mb.expert_results[rows[i] * hidden]);
    }
    if (rank.load != nullptr)
      rank.load->Record(moe_layer, expert, static_cast<int64_t>(rows.size()));
  }
}

absl::Status ExpertParallelForward::Combine(int layer, MicroBatch& mb, comm::Communicator& comm,
                                            RankResources& rank) const {
  ScopedTraceEvent event(rank.trace, rank.trace_pid, kCommunicationLane,
                         EventName("combine", layer, mb.index), "communication");
  const auto start = Clock::now();
  const int size = comm.size();
  const int hidden = model_.config().hidden_size;
  const int64_t row_bytes = static_cast<int64_t>(hidden) * sizeof(float);
  // Results travel back along the reverse of the dispatch: what we received, we return.
  std::vector<int64_t> send_bytes(size), recv_bytes(size);
  for (int p = 0; p < size; ++p) {
    send_bytes[p] = mb.recv_entries[p] * row_bytes;
    recv_bytes[p] = mb.send_entries[p] * row_bytes;
  }
  std::vector<float> returned(mb.sent_assignment.size() * hidden);
  RETURN_IF_ERROR(
      comm.AllToAllV(mb.expert_results.data(), send_bytes, returned.data(), recv_bytes));
  mb.expert_outputs.assign(returned.size(), 0.0f);
  for (size_t row = 0; row < mb.sent_assignment.size(); ++row) {
    std::copy_n(&returned[row * hidden], hidden,
                &mb.expert_outputs[static_cast<size_t>(mb.sent_assignment[row]) * hidden]);
  }
  if (rank.metrics != nullptr) {
    rank.metrics->AddCombine(static_cast<int64_t>(mb.expert_results.size() * sizeof(float)),
                             SecondsSince(start));
  }
  return absl::OkStatus();
}

absl::Status PublishBalancedness(std::span<const int64_t> received_per_layer, RankResources& rank) {
  const int size = rank.compute->size();
  const int layers = static_cast<int>(received_per_layer.size());
  std::vector<int64_t> all(static_cast<size_t>(size) * layers);
  if (auto s =
          rank.compute->AllGather(received_per_layer.data(), layers * sizeof(int64_t), all.data());
      !s.ok()) {
    return s;
  }
  if (rank.compute->rank() != 0 || rank.metrics == nullptr) return absl::OkStatus();
  for (int layer = 0; layer < layers; ++layer) {
    int64_t sum = 0, max = 0;
    for (int r = 0; r < size; ++r) {
      sum += all[static_cast<size_t>(r) * layers + layer];
      max = std::max(max, all[static_cast<size_t>(r) * layers + layer]);
    }
    if (max > 0) rank.metrics->SetBalancedness(layer, static_cast<double>(sum) / size / max);
  }
  return absl::OkStatus();
}

// The CPU's stages of the overlap schedule (overlap_schedule.h): exchanges run on the rank's
// communication thread when overlapping, inline otherwise; the shared experts run while the
// combine is in flight.
class ExpertParallelForward::Stages : public MicroBatchStages {
 public:
  Stages(const ExpertParallelForward& forward, std::vector<MicroBatch>& micro_batches, KvRows& rows,
         const ExpertPlacement& placement, RankResources& rank, bool overlap)
      : forward_(forward),
        model_(forward.model_),
        rows_(rows),
        micro_batches_(micro_batches),
        placement_(placement),
        rank_(rank),
        overlap_(overlap),
        dispatched_(micro_batches.size()),
        combined_(micro_batches.size()),
        received_per_layer_(forward.model_.config().num_moe_layers(), 0) {}

  absl::Status Attention(int layer, int index) override {
    MicroBatch& mb = micro_batches_[index];
    {
      ScopedTraceEvent event(rank_.trace, rank_.trace_pid, kComputeLane,
                             EventName("attention", layer, mb.index), "compute");
      model_.AttentionBlock(layer, mb.spans, mb.num_tokens, rows_, mb.residual.data(),
                            mb.normed.data());
    }
    if (model_.moe_index(layer) >= 0) {
      ScopedTraceEvent event(rank_.trace, rank_.trace_pid, kComputeLane,
                             EventName("gate", layer, mb.index), "compute");
      mb.routing = model_.Route(layer, mb.normed.data(), mb.num_tokens);
    }
    return absl::OkStatus();
  }
  absl::Status DenseMlp(int layer, int index) override {
    MicroBatch& mb = micro_batches_[index];
    model_.DenseBlock(layer, mb.normed.data(), mb.num_tokens, mb.residual.data());
    return absl::OkStatus();
  }
  absl::Status StartDispatch(int layer, int index) override {
    MicroBatch& mb = micro_batches_[index];
    return Exchange(dispatched_[index], [this, layer, &mb](comm::Communicator& comm) {
      return forward_.Dispatch(layer, mb, placement_, comm, rank_);
    });
  }
  absl::Status Experts(int layer, int index) override {
    MicroBatch& mb = micro_batches_[index];
    if (auto s = Wait(dispatched_[index]); !s.ok()) return s;
    forward_.RunLocalExperts(layer, mb, placement_, rank_);
    received_per_layer_[model_.moe_index(layer)] += static_cast<int64_t>(mb.recv_slots.size());
    return Exchange(combined_[index], [this, layer, &mb](comm::Communicator& comm) {
      return forward_.Combine(layer, mb, comm, rank_);
    });
  }
  absl::Status FinishMoe(int layer, int index) override {
    MicroBatch& mb = micro_batches_[index];
    std::vector<float> shared;
    {
      ScopedTraceEvent event(rank_.trace, rank_.trace_pid, kComputeLane,
                             EventName("shared experts", layer, mb.index), "compute");
      shared = model_.SharedExperts(layer, mb.normed.data(), mb.num_tokens);
    }
    if (auto s = Wait(combined_[index]); !s.ok()) return s;
    model_.FinishMoe(mb.routing, mb.expert_outputs.data(), shared.empty() ? nullptr : shared.data(),
                     mb.num_tokens, mb.residual.data());
    return absl::OkStatus();
  }
  absl::Status DrainExchanges() override {
    // Exchanges use micro-batch memory: every one still queued is joined, even after an error.
    absl::Status status;
    for (auto* futures : {&dispatched_, &combined_}) {
      for (auto& future : *futures) {
        if (future.valid()) status.Update(future.get());
      }
    }
    return status;
  }

  const std::vector<int64_t>& received_per_layer() const { return received_per_layer_; }

 private:
  using ExchangeFn = std::function<absl::Status(comm::Communicator&)>;
  // On the communication thread (its result awaited later through `slot`), or inline.
  absl::Status Exchange(std::future<absl::Status>& slot, ExchangeFn exchange) {
    if (overlap_) {
      slot = rank_.communication_thread->Submit(
          [this, exchange = std::move(exchange)] { return exchange(*rank_.overlap); });
      return absl::OkStatus();
    }
    const auto start = Clock::now();
    absl::Status result = exchange(*rank_.compute);
    if (rank_.metrics != nullptr) rank_.metrics->AddExposedWait(SecondsSince(start));
    return result;
  }
  absl::Status Wait(std::future<absl::Status>& slot) {
    if (!slot.valid()) return absl::OkStatus();
    const auto start = Clock::now();
    absl::Status result = slot.get();
    if (rank_.metrics != nullptr) rank_.metrics->AddExposedWait(SecondsSince(start));
    return result;
  }

  const ExpertParallelForward& forward_;
  const Model& model_;
  KvRows& rows_;
  std::vector<MicroBatch>& micro_batches_;
  const ExpertPlacement& placement_;
  RankResources& rank_;
  bool overlap_;
  std::vector<std::future<absl::Status>> dispatched_, combined_;
  std::vector<int64_t> received_per_layer_;
};

absl::StatusOr<std::vector<float>> ExpertParallelForward::Run(std::span<const BatchSequence> batch,
                                                              KvRows& cache,
                                                              const ExpertPlacement& placement,
                                                              RankResources& rank,
                                                              bool two_micro_batches) const {
  const ModelConfig& c = model_.config();
  const bool overlap =
      two_micro_batches && rank.communication_thread != nullptr && rank.overlap != nullptr;
  std::vector<std::vector<BatchPiece>> parts;
  if (two_micro_batches) {
    parts = SplitIntoMicroBatches(batch, 2);
  } else {
    parts.emplace_back();
    for (const auto& seq : batch) parts[0].push_back({seq, true});
  }
  std::vector<MicroBatch> micro_batches(parts.size());
  for (size_t i = 0; i < parts.size(); ++i) {
    MicroBatch& mb = micro_batches[i];
    mb.index = static_cast<int>(i);
    for (const BatchPiece& piece : parts[i]) {
      mb.sequences.push_back(piece.sequence);
      mb.emits_logits.push_back(piece.emits_logits);
    }
    mb.spans = Model::Layout(mb.sequences, &mb.num_tokens);
    mb.residual.assign(static_cast<size_t>(mb.num_tokens) * c.hidden_size, 0.0f);
    mb.normed.assign(mb.residual.size(), 0.0f);
    model_.Embed(mb.sequences, mb.residual.data());
  }

  Stages stages(*this, micro_batches, cache, placement, rank, overlap);
  if (auto s = RunOverlapSchedule(
          c.num_hidden_layers, [&](int layer) { return model_.moe_index(layer) >= 0; },
          static_cast<int>(micro_batches.size()), stages);
      !s.ok()) {
    return s;
  }
  const std::vector<int64_t>& received_per_layer = stages.received_per_layer();

  if (rank.metrics != nullptr && !received_per_layer.empty()) {
    RETURN_IF_ERROR(PublishBalancedness(received_per_layer, rank));
  }

  std::vector<float> logits;
  for (MicroBatch& mb : micro_batches) {
    const std::vector<int> rows = MicroBatchLogitRows(mb.sequences, mb.spans, mb.emits_logits);
    std::vector<float> part = model_.Head(mb.residual.data(), rows);
    logits.insert(logits.end(), part.begin(), part.end());
  }
  return logits;
}

}  // namespace moeserve::engine::parallel
