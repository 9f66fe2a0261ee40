// moeserve-dispatch-bench: MoE dispatch and combine over NCCL on every visible GPU of this
// process (one thread per GPU), at DeepSeek-V3 shapes (hidden 7168 bf16, top-8 of 256 experts
// spread evenly over the GPUs).
//
//  * Bandwidth: dispatch (routing kernel, counts exchange, permutation of token rows by
//    destination, chunked grouped send/recv through NcclCommunicator) and combine (the reverse
//    exchange and the weighted sum back into token order), each against a raw NCCL grouped
//    send/recv — on a separate, plain NCCL communicator — of exactly the same per-peer bytes.
//  * The exchange as serving plans it on the GPUs for decode steps (`--gpu-exchange-plan
//    device`, kernels/device_exchange.h): one row per destination GPU and one per (token,
//    expert) back, in blocks of a fixed shape, no host round trip; against raw NCCL of the rows
//    it actually needs. Only where the shape fits the device plan (decode sizes).
//  * Overlap: one MoE layer of two micro-batches with compute (cuBLAS bf16 GEMMs: attention
//    projections, routed experts, shared expert) on a compute stream and dispatch/combine on the
//    communication stream, run compute-only, communication-only, sequential and overlapped.
//  * A Chrome trace of one overlapped layer (--trace), one process row per GPU.
//
// Prints markdown tables. Times are medians over iterations of the slowest rank's time in each
// iteration (ranks start each iteration together after a barrier), measured with CUDA events.
#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/comm/nccl_communicator.h"
#include "kernels/bench/dispatch_kernels.h"
#include "kernels/bf16.h"
#include "kernels/device_array.h"
#include "kernels/device_exchange.h"
#include "kernels/kernels.h"

namespace moeserve::kernels::dispatch_bench {
namespace {

using engine::comm::NcclCommunicator;
using engine::comm::NcclCommunicatorOptions;

// ----------------------------------------------------------------------------------------------
// Failure: a benchmark has nothing to recover; report and stop the whole process (other rank
// threads may be blocked in collectives).

[[noreturn]] void Fail(const std::string& message) {
  std::fprintf(stderr, "moeserve-dispatch-bench: %s\n", message.c_str());
  std::fflush(nullptr);
  std::_Exit(1);
}
void Check(cudaError_t error, const char* what) {
  if (error != cudaSuccess) Fail(absl::StrCat(what, ": ", cudaGetErrorString(error)));
}
void Check(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS) Fail(absl::StrCat(what, ": cuBLAS status ", status));
}
void Check(ncclResult_t result, const char* what) {
  if (result != ncclSuccess) Fail(absl::StrCat(what, ": ", ncclGetErrorString(result)));
}
void Check(const absl::Status& status, const char* what) {
  if (!status.ok()) Fail(absl::StrCat(what, ": ", status.ToString()));
}

struct Config {
  std::vector<int> tokens_per_rank = {128, 512, 4096};
  int hidden = 7168;
  int num_experts = 256;
  int top_k = 8;
  int expert_intermediate = 2048;
  // MLA projections of one token (q_a, q_b, kv_a, kv_b, o) as one GEMM's output width:
  // about 187M multiply-adds per token / 7168.
  int attention_width = 26112;
  int warmup = 5;
  int iterations = 20;
  int chunks = 0;  // 0: by size (about one chunk per 96 MiB sent per rank)
  int num_gpus = 0;
  int timeout_seconds = 120;
  std::string trace_path;
  int trace_tokens = 0;  // 0: the largest size
  bool skip_overlap = false;
  int exchange_max_ctas = 0;  // 0: NCCL's choice (serving's --gpu-exchange-max-ctas)
};

// ----------------------------------------------------------------------------------------------
// Memory

// Benchmark buffers are byte arrays of the project's one device buffer type; they only grow.
using DeviceMemory = kernels::DeviceArray<std::byte>;
void Resize(DeviceMemory& memory, int64_t bytes) { Check(memory.Reserve(bytes), "cudaMalloc"); }

// ----------------------------------------------------------------------------------------------
// A rank's GPU state

struct Rank {
  int rank = 0;
  int size = 1;
  NcclCommunicator* comm = nullptr;
  ncclComm_t raw_comm = nullptr;
  cudaStream_t compute = nullptr;
  cudaStream_t pack = nullptr;  // permutation and weighted sums of chunks, beside the exchange
  cublasHandle_t cublas = nullptr;
  int num_local_experts = 0;
  DeviceMemory attention_weight, expert_gate_up, expert_down, shared_gate_up, shared_down;
  // Timing events, reused layer after layer.
  std::vector<cudaEvent_t> events;
  size_t next_event = 0;

  cudaStream_t communication() const { return comm->stream(); }
  cudaEvent_t Record(cudaStream_t stream) {
    if (next_event == events.size()) {
      cudaEvent_t event;
      Check(cudaEventCreate(&event), "cudaEventCreate");
      events.push_back(event);
    }
    cudaEvent_t event = events[next_event++];
    Check(cudaEventRecord(event, stream), "cudaEventRecord");
    return event;
  }
  // `waiter` waits on the GPU for everything enqueued so far on `producer`.
  void Order(cudaStream_t producer, cudaStream_t waiter) {
    Check(cudaStreamWaitEvent(waiter, Record(producer), 0), "cudaStreamWaitEvent");
  }
};

// One micro-batch (or the whole batch): routing, buffers and, after the counts exchange, the
// rows per (chunk, peer) in both directions.
struct MicroBatch {
  int num_tokens = 0;
  int num_chunks = 1;
  std::vector<uint16_t> host_tokens;
  std::vector<int32_t> host_expert_ids;
  std::vector<float> host_weights;
  DeviceMemory tokens, expert_ids, weights, pair_rows, send_counts, recv_counts;
  DeviceMemory send_rows, recv_rows, combine_rows, out;
  DeviceMemory attention_out, expert_hidden, expert_out, shared_hidden, shared_out;
  int64_t* host_counts = nullptr;  // pinned: [send counts | recv counts], each [peer][chunk]
  std::vector<std::vector<int64_t>> send_rows_of, recv_rows_of;  // [chunk][peer]
  std::vector<int64_t> send_chunk_base, recv_chunk_base;         // first row of each chunk
  int64_t total_send_rows = 0, total_recv_rows = 0;
  std::vector<cudaEvent_t> chunk_events;  // per chunk, untimed

  ~MicroBatch() {
    if (host_counts != nullptr) cudaFreeHost(host_counts);
    for (cudaEvent_t event : chunk_events) cudaEventDestroy(event);
  }
};

int ChooseChunks(const Config& config, int num_tokens, int num_ranks) {
  int chunks = config.chunks;
  if (chunks <= 0) {
    const int64_t bytes = int64_t{num_tokens} * config.top_k * config.hidden * 2;
    chunks = static_cast<int>(std::clamp<int64_t>(bytes / (int64_t{96} << 20), 1, 8));
  }
  return std::clamp(chunks, 1, std::max(1, kMaxRouteKeys / num_ranks));
}

void InitMicroBatch(const Config& config, Rank& rank, int num_tokens, uint32_t seed,
                    MicroBatch& batch) {
  const int top_k = config.top_k, hidden = config.hidden;
  batch.num_tokens = num_tokens;
  batch.num_chunks = ChooseChunks(config, num_tokens, rank.size);
  std::mt19937 random(seed);
  batch.host_tokens.resize(int64_t{num_tokens} * hidden);
  std::uniform_real_distribution<float> activation(-1.0f, 1.0f);
  for (auto& value : batch.host_tokens) value = FloatToBf16(activation(random));
  // Top-k distinct experts per token, uniformly: load spread evenly over experts and ranks.
  std::vector<int> experts(config.num_experts);
  std::iota(experts.begin(), experts.end(), 0);
  std::uniform_real_distribution<float> weight(0.05f, 1.0f);
  for (int token = 0; token < num_tokens; ++token) {
    for (int k = 0; k < top_k; ++k) {
      std::uniform_int_distribution<int> pick(k, config.num_experts - 1);
      std::swap(experts[k], experts[pick(random)]);
      batch.host_expert_ids.push_back(experts[k]);
      batch.host_weights.push_back(weight(random));
    }
  }
  const int64_t pairs = int64_t{num_tokens} * top_k;
  Resize(batch.tokens, int64_t{num_tokens} * hidden * 2);
  Resize(batch.expert_ids, pairs * 4);
  Resize(batch.weights, pairs * 4);
  Resize(batch.pair_rows, pairs * 4);
  Resize(batch.send_counts, int64_t{rank.size} * batch.num_chunks * 8);
  Resize(batch.recv_counts, int64_t{rank.size} * batch.num_chunks * 8);
  Resize(batch.send_rows, pairs * hidden * 2);
  Resize(batch.combine_rows, pairs * hidden * 2);
  Resize(batch.out, int64_t{num_tokens} * hidden * 2);
  Check(cudaMemcpy(batch.tokens.as<void>(), batch.host_tokens.data(),
                   batch.host_tokens.size() * sizeof(batch.host_tokens[0]), cudaMemcpyHostToDevice),
        "upload tokens");
  Check(cudaMemcpy(batch.expert_ids.as<void>(), batch.host_expert_ids.data(), pairs * 4,
                   cudaMemcpyHostToDevice),
        "upload expert ids");
  Check(cudaMemcpy(batch.weights.as<void>(), batch.host_weights.data(), pairs * 4,
                   cudaMemcpyHostToDevice),
        "upload weights");
  Check(cudaMallocHost(&batch.host_counts, 2 * sizeof(int64_t) * rank.size * batch.num_chunks),
        "cudaMallocHost");
  batch.chunk_events.resize(batch.num_chunks);
  for (auto& event : batch.chunk_events) {
    Check(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreate");
  }
}

// ----------------------------------------------------------------------------------------------
// Dispatch and combine

void Dispatch(const Config& config, Rank& rank, MicroBatch& batch) {
  const int size = rank.size, chunks = batch.num_chunks, hidden = config.hidden;
  const int64_t row_bytes = int64_t{hidden} * 2;
  cudaStream_t stream = rank.communication();
  // 1. Routing and the counts exchange; the host needs the counts to post the receives.
  Check(LaunchRoute(batch.expert_ids.as<int32_t>(), batch.num_tokens, config.top_k,
                    config.num_experts, size, chunks, batch.pair_rows.as<int32_t>(),
                    batch.send_counts.as<int64_t>(), stream),
        "route");
  const std::vector<int64_t> count_bytes(size, int64_t{chunks} * 8);
  Check(rank.comm->EnqueueAllToAllV(batch.send_counts.as<void>(), count_bytes,
                                    batch.recv_counts.as<void>(), count_bytes),
        "counts exchange");
  const int64_t count_block = int64_t{size} * chunks;
  Check(cudaMemcpyAsync(batch.host_counts, batch.send_counts.as<void>(), count_block * 8,
                        cudaMemcpyDeviceToHost, stream),
        "counts to host");
  Check(cudaMemcpyAsync(batch.host_counts + count_block, batch.recv_counts.as<void>(),
                        count_block * 8, cudaMemcpyDeviceToHost, stream),
        "counts to host");
  auto counts_ready = rank.comm->RecordCompletion();
  Check(counts_ready.status(), "record counts");
  Check(counts_ready->Wait(), "counts exchange");
  batch.send_rows_of.assign(chunks, std::vector<int64_t>(size));
  batch.recv_rows_of.assign(chunks, std::vector<int64_t>(size));
  batch.send_chunk_base.assign(chunks, 0);
  batch.recv_chunk_base.assign(chunks, 0);
  int64_t send_total = 0, recv_total = 0;
  for (int chunk = 0; chunk < chunks; ++chunk) {
    batch.send_chunk_base[chunk] = send_total;
    batch.recv_chunk_base[chunk] = recv_total;
    for (int peer = 0; peer < size; ++peer) {
      batch.send_rows_of[chunk][peer] = batch.host_counts[peer * chunks + chunk];
      batch.recv_rows_of[chunk][peer] = batch.host_counts[count_block + peer * chunks + chunk];
      send_total += batch.send_rows_of[chunk][peer];
      recv_total += batch.recv_rows_of[chunk][peer];
    }
  }
  batch.total_send_rows = send_total;
  batch.total_recv_rows = recv_total;
  // Room for the experts' batched GEMMs, which round rows up to a multiple of local experts.
  const int64_t capacity_rows = recv_total + rank.num_local_experts;
  if (static_cast<int64_t>(batch.recv_rows.bytes()) < capacity_rows * row_bytes) {
    Check(cudaStreamSynchronize(stream), "sync before growing buffers");
    Resize(batch.recv_rows, capacity_rows * row_bytes);
  }
  // 2. Permute and send chunk by chunk: chunk c+1 is permuted (pack stream) while chunk c is on
  //    the wire (communication stream).
  const int tokens_per_chunk = TokensPerChunk(batch.num_tokens, chunks);
  for (int chunk = 0; chunk < chunks; ++chunk) {
    const int token_begin = chunk * tokens_per_chunk;
    const int token_end = std::min(batch.num_tokens, token_begin + tokens_per_chunk);
    cudaStream_t permute_stream = chunks == 1 ? stream : rank.pack;
    Check(LaunchPermuteRows(batch.tokens.as<uint16_t>(), hidden, config.top_k, token_begin,
                            token_end, batch.pair_rows.as<int32_t>(),
                            batch.send_rows.as<uint16_t>(), permute_stream),
          "permute");
    if (chunks > 1) {
      Check(cudaEventRecord(batch.chunk_events[chunk], rank.pack), "cudaEventRecord");
      Check(rank.comm->WaitForEvent(batch.chunk_events[chunk]), "wait for permute");
    }
    std::vector<int64_t> send_bytes(size), recv_bytes(size);
    for (int peer = 0; peer < size; ++peer) {
      send_bytes[peer] = batch.send_rows_of[chunk][peer] * row_bytes;
      recv_bytes[peer] = batch.recv_rows_of[chunk][peer] * row_bytes;
    }
    Check(rank.comm->EnqueueAllToAllV(
              batch.send_rows.as<char>() + batch.send_chunk_base[chunk] * row_bytes, send_bytes,
              batch.recv_rows.as<char>() + batch.recv_chunk_base[chunk] * row_bytes, recv_bytes),
          "dispatch exchange");
  }
}

// Sends `expert_rows` (laid out like recv_rows) back and sums each token's rows.
void Combine(const Config& config, Rank& rank, MicroBatch& batch, const DeviceMemory& expert_rows) {
  const int size = rank.size, chunks = batch.num_chunks, hidden = config.hidden;
  const int64_t row_bytes = int64_t{hidden} * 2;
  cudaStream_t stream = rank.communication();
  const int tokens_per_chunk = TokensPerChunk(batch.num_tokens, chunks);
  for (int chunk = 0; chunk < chunks; ++chunk) {
    std::vector<int64_t> send_bytes(size), recv_bytes(size);
    for (int peer = 0; peer < size; ++peer) {
      send_bytes[peer] = batch.recv_rows_of[chunk][peer] * row_bytes;
      recv_bytes[peer] = batch.send_rows_of[chunk][peer] * row_bytes;
    }
    Check(rank.comm->EnqueueAllToAllV(
              expert_rows.as<char>() + batch.recv_chunk_base[chunk] * row_bytes, send_bytes,
              batch.combine_rows.as<char>() + batch.send_chunk_base[chunk] * row_bytes, recv_bytes),
          "combine exchange");
    // A chunk's tokens have all their rows back once its exchange is done: sum them while the
    // next chunk is on the wire.
    const int token_begin = chunk * tokens_per_chunk;
    const int token_end = std::min(batch.num_tokens, token_begin + tokens_per_chunk);
    cudaStream_t sum_stream = stream;
    if (chunks > 1) {
      Check(cudaEventRecord(batch.chunk_events[chunk], stream), "cudaEventRecord");
      Check(cudaStreamWaitEvent(rank.pack, batch.chunk_events[chunk], 0), "cudaStreamWaitEvent");
      sum_stream = rank.pack;
    }
    Check(LaunchWeightedCombine(batch.combine_rows.as<uint16_t>(), hidden, config.top_k,
                                token_begin, token_end, batch.pair_rows.as<int32_t>(),
                                batch.weights.as<float>(), batch.out.as<uint16_t>(), sum_stream),
          "weighted combine");
  }
  if (chunks > 1) rank.Order(rank.pack, stream);
}

// One grouped send/recv of `to_peer` / `from_peer` rows per peer on the plain NCCL
// communicator, from and to contiguous buffers: the baselines.
void RawRows(Rank& rank, const void* send_buffer, const std::vector<int64_t>& to_peer,
             void* recv_buffer, const std::vector<int64_t>& from_peer, int64_t row_bytes) {
  const char* send = static_cast<const char*>(send_buffer);
  char* recv = static_cast<char*>(recv_buffer);
  int64_t send_offset = 0, recv_offset = 0;
  Check(ncclGroupStart(), "ncclGroupStart");
  for (int peer = 0; peer < rank.size; ++peer) {
    if (to_peer[peer] > 0) {
      Check(ncclSend(send + send_offset, to_peer[peer] * row_bytes, ncclInt8, peer, rank.raw_comm,
                     rank.communication()),
            "ncclSend");
    }
    if (from_peer[peer] > 0) {
      Check(ncclRecv(recv + recv_offset, from_peer[peer] * row_bytes, ncclInt8, peer, rank.raw_comm,
                     rank.communication()),
            "ncclRecv");
    }
    send_offset += to_peer[peer] * row_bytes;
    recv_offset += from_peer[peer] * row_bytes;
  }
  Check(ncclGroupEnd(), "ncclGroupEnd");
}

// The baseline: one grouped send/recv of the same per-peer bytes on a plain NCCL communicator,
// from and to contiguous buffers (no counts, no permutation, no sums).
void RawExchange(const Config& config, Rank& rank, MicroBatch& batch, bool combine_direction) {
  const char* send = combine_direction ? batch.recv_rows.as<char>() : batch.send_rows.as<char>();
  char* recv = combine_direction ? batch.combine_rows.as<char>() : batch.recv_rows.as<char>();
  std::vector<int64_t> to_peer(rank.size, 0), from_peer(rank.size, 0);
  for (int peer = 0; peer < rank.size; ++peer) {
    for (int chunk = 0; chunk < batch.num_chunks; ++chunk) {
      to_peer[peer] += batch.send_rows_of[chunk][peer];
      from_peer[peer] += batch.recv_rows_of[chunk][peer];
    }
  }
  if (combine_direction) std::swap(to_peer, from_peer);
  RawRows(rank, send, to_peer, recv, from_peer, int64_t{config.hidden} * 2);
}

// Bytes of `rows_of` ([chunk][peer] row counts) that cross to other GPUs (all of them when the
// rank is alone): what a dispatch (send rows) or a combine (received rows, sent back) moves.
int64_t RemoteBytes(const Config& config, const Rank& rank, const MicroBatch& batch,
                    const std::vector<std::vector<int64_t>>& rows_of) {
  int64_t rows = 0;
  for (int chunk = 0; chunk < batch.num_chunks; ++chunk) {
    for (int peer = 0; peer < rank.size; ++peer) {
      if (peer != rank.rank || rank.size == 1) rows += rows_of[chunk][peer];
    }
  }
  return rows * config.hidden * 2;
}
int64_t DispatchBytes(const Config& config, const Rank& rank, const MicroBatch& batch) {
  return RemoteBytes(config, rank, batch, batch.send_rows_of);
}
int64_t CombineBytes(const Config& config, const Rank& rank, const MicroBatch& batch) {
  return RemoteBytes(config, rank, batch, batch.recv_rows_of);
}

// Every token of `out_device` must be x * sum(weights), summed in top-k order like the kernels
// do (what a dispatch, identity experts and a combine give).
int64_t CountMismatches(const Config& config, const MicroBatch& batch, const void* out_device) {
  std::vector<uint16_t> out(int64_t{batch.num_tokens} * config.hidden);
  Check(cudaMemcpy(out.data(), out_device, out.size() * 2, cudaMemcpyDeviceToHost), "download");
  int64_t mismatches = 0;
  for (int token = 0; token < batch.num_tokens; ++token) {
    for (int column = 0; column < config.hidden; ++column) {
      const float x = Bf16ToFloat(batch.host_tokens[int64_t{token} * config.hidden + column]);
      float sum = 0.0f;
      for (int k = 0; k < config.top_k; ++k) {
        const float product = batch.host_weights[token * config.top_k + k] * x;
        sum += product;
      }
      const float got = Bf16ToFloat(out[int64_t{token} * config.hidden + column]);
      if (std::abs(got - Bf16ToFloat(FloatToBf16(sum))) > 1e-2f * (1.0f + std::abs(sum))) {
        ++mismatches;
      }
    }
  }
  return mismatches;
}

// Dispatch, send the rows straight back (an identity expert), combine.
int64_t VerifyRoundTrip(const Config& config, Rank& rank, MicroBatch& batch) {
  Dispatch(config, rank, batch);
  Combine(config, rank, batch, batch.recv_rows);
  Check(rank.comm->Synchronize(), "round trip");
  return CountMismatches(config, batch, batch.out.as<void>());
}

// ----------------------------------------------------------------------------------------------
// The exchange planned on the GPUs (serving's --gpu-exchange-plan device): experts spread
// evenly, one replica each (slot = expert, as RankOfExpert places them).

struct DevicePlanned {
  ExchangeShape shape;
  int slots_per_rank = 0;
  DeviceArray<int32_t> replica_begin, replica_slots, dispatch_index, positions, peer_overflow,
      offsets, source_rows, grouped_rows, overflow;
  DeviceArray<__nv_bfloat16> send, received, expert_out, results, returned, out;
  // What the exchange actually needs, per peer: activation rows (dispatch) and entries
  // (combine), sent and received; counted on the host by the plan's rule.
  std::vector<int64_t> rows_to, rows_from, entries_to, entries_from;
};

// Sets `d` up for `batch`; false where the device plan does not take the shape (prefill sizes).
bool PrepareDevicePlanned(const Config& config, Rank& rank, const MicroBatch& batch,
                          DevicePlanned& d) {
  const int ranks = rank.size, experts = config.num_experts, hidden = config.hidden;
  if (experts % ranks != 0) return false;
  d.slots_per_rank = experts / ranks;
  d.shape = ExchangeShape::ForBatch(ranks, batch.num_tokens, config.top_k, d.slots_per_rank, hidden,
                                    /*headroom=*/2.0, /*fixed_entries=*/0);
  if (d.shape.combine_rows() > kMaxPlannedPairs || d.slots_per_rank > kMaxPlannedSlots) {
    return false;
  }
  std::vector<int32_t> begin(experts + 1), slots(experts);
  std::iota(begin.begin(), begin.end(), 0);
  std::iota(slots.begin(), slots.end(), 0);
  cudaStream_t stream = rank.communication();
  Check(d.replica_begin.Upload(begin.data(), begin.size(), stream), "upload");
  Check(d.replica_slots.Upload(slots.data(), slots.size(), stream), "upload");
  const int64_t dispatch_rows = d.shape.dispatch_rows(), combine_rows = d.shape.combine_rows();
  for (auto* array : {&d.dispatch_index, &d.source_rows, &d.grouped_rows}) {
    Check(array->Reserve(std::max(dispatch_rows, combine_rows)), "cudaMalloc");
  }
  Check(d.positions.Reserve(int64_t{batch.num_tokens} * config.top_k), "cudaMalloc");
  Check(d.peer_overflow.Reserve(ranks), "cudaMalloc");
  Check(d.offsets.Reserve(d.slots_per_rank + 1), "cudaMalloc");
  Check(d.overflow.Reserve(1), "cudaMalloc");
  // The identity experts read source rows past the plan's total too: valid ones.
  Check(cudaMemsetAsync(d.source_rows.data(), 0, combine_rows * 4, stream), "memset");
  Check(cudaMemsetAsync(d.overflow.data(), 0, 4, stream), "memset");
  for (auto* array : {&d.send, &d.received}) {
    Check(array->Reserve(dispatch_rows * hidden), "cudaMalloc");
  }
  for (auto* array : {&d.expert_out, &d.results, &d.returned}) {
    Check(array->Reserve(combine_rows * hidden), "cudaMalloc");
  }
  Check(d.out.Reserve(int64_t{batch.num_tokens} * hidden), "cudaMalloc");
  // The rows and entries the plan sends each peer, then what each peer sends this rank.
  d.rows_to.assign(ranks, 0);
  d.entries_to.assign(ranks, 0);
  for (int token = 0; token < batch.num_tokens; ++token) {
    std::vector<bool> row(ranks, false);
    for (int k = 0; k < config.top_k; ++k) {
      const int peer =
          RankOfExpert(batch.host_expert_ids[token * config.top_k + k], experts, ranks);
      ++d.entries_to[peer];
      if (!row[peer]) ++d.rows_to[peer];
      row[peer] = true;
    }
  }
  DeviceArray<int64_t> counts_out, counts_in;
  std::vector<int64_t> out(2 * ranks), in(2 * ranks);
  for (int p = 0; p < ranks; ++p) out[2 * p] = d.rows_to[p], out[2 * p + 1] = d.entries_to[p];
  Check(counts_out.Upload(out.data(), out.size(), stream), "upload");
  Check(counts_in.Reserve(in.size()), "cudaMalloc");
  const std::vector<int64_t> pair_bytes(ranks, 16);
  Check(rank.comm->EnqueueAllToAllV(counts_out.data(), pair_bytes, counts_in.data(), pair_bytes),
        "counts");
  Check(rank.comm->Synchronize(), "counts");
  Check(counts_in.Download(in.data(), in.size(), stream), "download");
  d.rows_from.assign(ranks, 0);
  d.entries_from.assign(ranks, 0);
  for (int p = 0; p < ranks; ++p) d.rows_from[p] = in[2 * p], d.entries_from[p] = in[2 * p + 1];
  return true;
}

// Plan, rows into the blocks, the blocks' all-to-all, the receiver's grouping by slot.
void DeviceDispatch(const Config& config, Rank& rank, MicroBatch& batch, DevicePlanned& d) {
  cudaStream_t stream = rank.communication();
  const auto* tokens = reinterpret_cast<const __nv_bfloat16*>(batch.tokens.as<void>());
  Check(
      PlanDestinations(batch.expert_ids.as<int32_t>(), batch.num_tokens, config.top_k,
                       {d.replica_begin.data(), d.replica_slots.data(), config.num_experts},
                       d.slots_per_rank, rank.rank, d.shape, d.send.data(), d.dispatch_index.data(),
                       d.positions.data(), d.peer_overflow.data(), stream),
      "PlanDestinations");
  Check(GatherRows(tokens, d.dispatch_index.data(), d.send.data(), d.shape.dispatch_rows(),
                   config.hidden, stream),
        "GatherRows");
  const std::vector<int64_t> blocks(rank.size, int64_t{d.shape.block_rows()} * config.hidden * 2);
  Check(rank.comm->EnqueueAllToAllV(d.send.data(), blocks, d.received.data(), blocks),
        "dispatch blocks");
  Check(
      PlanReceived(d.received.data(), d.shape, d.slots_per_rank, d.offsets.data(),
                   d.source_rows.data(), d.grouped_rows.data(), nullptr, d.overflow.data(), stream),
      "PlanReceived");
}

// Identity experts: each grouped row is its received row (untimed, between the two halves).
void DeviceIdentityExperts(const Config& config, Rank& rank, DevicePlanned& d) {
  Check(PermuteRows(d.received.data(), d.source_rows.data(), d.expert_out.data(),
                    static_cast<int>(d.shape.combine_rows()), config.hidden, rank.communication()),
        "identity experts");
}

// Results into the combine's blocks, their all-to-all, the weighted sum in top-k order.
void DeviceCombine(const Config& config, Rank& rank, MicroBatch& batch, DevicePlanned& d) {
  cudaStream_t stream = rank.communication();
  Check(GatherRows(d.expert_out.data(), d.grouped_rows.data(), d.results.data(),
                   d.shape.combine_rows(), config.hidden, stream),
        "GatherRows");
  const std::vector<int64_t> blocks(rank.size, int64_t{d.shape.entries} * config.hidden * 2);
  Check(rank.comm->EnqueueAllToAllV(d.results.data(), blocks, d.returned.data(), blocks),
        "combine blocks");
  Check(WeightedUnpermute(d.returned.data(), d.positions.data(), batch.weights.as<float>(), nullptr,
                          d.out.data(), batch.num_tokens, config.top_k, config.hidden, stream),
        "WeightedUnpermute");
}

// The round trip through identity experts, checked; an overflow counts as every value wrong.
int64_t VerifyDeviceRoundTrip(const Config& config, Rank& rank, MicroBatch& batch,
                              DevicePlanned& d) {
  DeviceDispatch(config, rank, batch, d);
  DeviceIdentityExperts(config, rank, d);
  DeviceCombine(config, rank, batch, d);
  Check(rank.comm->Synchronize(), "round trip");
  int32_t overflowed = 0;
  Check(cudaMemcpy(&overflowed, d.overflow.data(), 4, cudaMemcpyDeviceToHost), "download");
  if (overflowed != 0) return int64_t{batch.num_tokens} * config.hidden;
  return CountMismatches(config, batch, d.out.data());
}

// Bytes this rank sends other GPUs (all of them when alone), of `rows` per peer.
int64_t RemoteRowBytes(const Config& config, const Rank& rank, const std::vector<int64_t>& rows) {
  int64_t total = 0;
  for (int peer = 0; peer < rank.size; ++peer) {
    if (peer != rank.rank || rank.size == 1) total += rows[peer];
  }
  return total * config.hidden * 2;
}

// ----------------------------------------------------------------------------------------------
// Compute stand-ins (cuBLAS, row-major [m, k] x [k, n] as column-major C^T = B^T A^T)

void Gemm(Rank& rank, const uint16_t* a, const uint16_t* b, uint16_t* c, int m, int n, int k,
          int lda, int ldc) {
  const float alpha = 1.0f, beta = 0.0f;
  Check(cublasGemmEx(rank.cublas, CUBLAS_OP_N, CUBLAS_OP_N, n, m, k, &alpha, b, CUDA_R_16BF, n, a,
                     CUDA_R_16BF, lda, &beta, c, CUDA_R_16BF, ldc, CUBLAS_COMPUTE_32F,
                     CUBLAS_GEMM_DEFAULT),
        "cublasGemmEx");
}

void AttentionProjections(const Config& config, Rank& rank, MicroBatch& batch) {
  Gemm(rank, batch.tokens.as<uint16_t>(), rank.attention_weight.as<uint16_t>(),
       batch.attention_out.as<uint16_t>(), batch.num_tokens, config.attention_width, config.hidden,
       config.hidden, config.attention_width);
}

// Routed experts on the received rows, split evenly over the local experts (the even routing of
// this benchmark): gate/up projection, then down projection, as strided batched GEMMs. The
// element-wise SwiGLU between them is left out (negligible next to the GEMMs).
void RoutedExperts(const Config& config, Rank& rank, MicroBatch& batch) {
  if (batch.total_recv_rows == 0 || rank.num_local_experts == 0) return;
  const int experts = rank.num_local_experts, hidden = config.hidden;
  const int intermediate = config.expert_intermediate;
  const int rows = static_cast<int>((batch.total_recv_rows + experts - 1) / experts);
  const float alpha = 1.0f, beta = 0.0f;
  Check(cublasGemmStridedBatchedEx(
            rank.cublas, CUBLAS_OP_N, CUBLAS_OP_N, 2 * intermediate, rows, hidden, &alpha,
            rank.expert_gate_up.as<uint16_t>(), CUDA_R_16BF, 2 * intermediate,
            int64_t{hidden} * 2 * intermediate, batch.recv_rows.as<uint16_t>(), CUDA_R_16BF, hidden,
            int64_t{rows} * hidden, &beta, batch.expert_hidden.as<uint16_t>(), CUDA_R_16BF,
            2 * intermediate, int64_t{rows} * 2 * intermediate, experts, CUBLAS_COMPUTE_32F,
            CUBLAS_GEMM_DEFAULT),
        "expert gate/up");
  Check(cublasGemmStridedBatchedEx(
            rank.cublas, CUBLAS_OP_N, CUBLAS_OP_N, hidden, rows, intermediate, &alpha,
            rank.expert_down.as<uint16_t>(), CUDA_R_16BF, hidden, int64_t{intermediate} * hidden,
            batch.expert_hidden.as<uint16_t>(), CUDA_R_16BF, 2 * intermediate,
            int64_t{rows} * 2 * intermediate, &beta, batch.expert_out.as<uint16_t>(), CUDA_R_16BF,
            hidden, int64_t{rows} * hidden, experts, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
        "expert down");
}

void SharedExpert(const Config& config, Rank& rank, MicroBatch& batch) {
  const int intermediate = config.expert_intermediate;
  Gemm(rank, batch.tokens.as<uint16_t>(), rank.shared_gate_up.as<uint16_t>(),
       batch.shared_hidden.as<uint16_t>(), batch.num_tokens, 2 * intermediate, config.hidden,
       config.hidden, 2 * intermediate);
  Gemm(rank, batch.shared_hidden.as<uint16_t>(), rank.shared_down.as<uint16_t>(),
       batch.shared_out.as<uint16_t>(), batch.num_tokens, config.hidden, intermediate,
       2 * intermediate, config.hidden);
}

void PrepareLayerBuffers(const Config& config, Rank& rank, MicroBatch& batch) {
  const int64_t capacity_rows = batch.total_recv_rows + rank.num_local_experts;
  Resize(batch.attention_out, int64_t{batch.num_tokens} * config.attention_width * 2);
  Resize(batch.expert_hidden, capacity_rows * 2 * config.expert_intermediate * 2);
  Resize(batch.expert_out, capacity_rows * config.hidden * 2);
  Resize(batch.shared_hidden, int64_t{batch.num_tokens} * 2 * config.expert_intermediate * 2);
  Resize(batch.shared_out, int64_t{batch.num_tokens} * config.hidden * 2);
}

// ----------------------------------------------------------------------------------------------
// One MoE layer of two micro-batches

enum class LayerMode { kComputeOnly, kCommunicationOnly, kSequential, kOverlapped };

struct Span {
  std::string name;
  int lane;  // 0 compute, 1 communication
  cudaEvent_t begin, end;
  double begin_us = 0, end_us = 0;  // from the layer's start, filled once the layer finished
};

// Returns the layer's time on this rank in milliseconds; fills `spans` when given.
float RunLayer(const Config& config, Rank& rank, MicroBatch (&batches)[2], LayerMode mode,
               std::vector<Span>* spans) {
  rank.next_event = 0;
  cudaStream_t compute = rank.compute, communication = rank.communication();
  cudaEvent_t start = rank.Record(compute);
  Check(cudaStreamWaitEvent(communication, start, 0), "cudaStreamWaitEvent");
  Check(cudaStreamWaitEvent(rank.pack, start, 0), "cudaStreamWaitEvent");
  auto on = [&](int lane, const std::string& name, auto&& work) {
    cudaStream_t stream = lane == 0 ? compute : communication;
    cudaEvent_t begin = spans != nullptr ? rank.Record(stream) : nullptr;
    work();
    if (spans != nullptr) spans->push_back({name, lane, begin, rank.Record(stream)});
  };
  auto attention = [&](int i) {
    on(0, absl::StrCat("attention(", i, ")"),
       [&] { AttentionProjections(config, rank, batches[i]); });
  };
  auto experts = [&](int i) {
    on(0, absl::StrCat("experts(", i, ")"), [&] { RoutedExperts(config, rank, batches[i]); });
  };
  auto shared = [&](int i) {
    on(0, absl::StrCat("shared expert(", i, ")"), [&] { SharedExpert(config, rank, batches[i]); });
  };
  auto dispatch = [&](int i) {
    on(1, absl::StrCat("dispatch(", i, ")"), [&] { Dispatch(config, rank, batches[i]); });
  };
  auto combine = [&](int i) {
    on(1, absl::StrCat("combine(", i, ")"),
       [&] { Combine(config, rank, batches[i], batches[i].expert_out); });
  };
  switch (mode) {
    case LayerMode::kComputeOnly:
      attention(0);
      attention(1);
      experts(0);
      experts(1);
      shared(0);
      shared(1);
      break;
    case LayerMode::kCommunicationOnly:
      dispatch(0);
      dispatch(1);
      combine(0);
      combine(1);
      break;
    case LayerMode::kSequential:
      attention(0);
      attention(1);
      rank.Order(compute, communication);
      dispatch(0);
      dispatch(1);
      rank.Order(communication, compute);
      experts(0);
      experts(1);
      rank.Order(compute, communication);
      combine(0);
      combine(1);
      rank.Order(communication, compute);
      shared(0);
      shared(1);
      break;
    case LayerMode::kOverlapped: {
      // The order of two-batch overlap: one micro-batch's exchange is in flight while the
      // other computes; the shared expert hides the last combine.
      attention(0);
      cudaEvent_t attention0_done = rank.Record(compute);
      attention(1);
      cudaEvent_t attention1_done = rank.Record(compute);
      Check(cudaStreamWaitEvent(communication, attention0_done, 0), "wait");
      dispatch(0);
      rank.Order(communication, compute);
      experts(0);
      cudaEvent_t experts0_done = rank.Record(compute);
      Check(cudaStreamWaitEvent(communication, attention1_done, 0), "wait");
      dispatch(1);
      rank.Order(communication, compute);
      experts(1);
      cudaEvent_t experts1_done = rank.Record(compute);
      shared(0);
      shared(1);
      Check(cudaStreamWaitEvent(communication, experts0_done, 0), "wait");
      combine(0);
      Check(cudaStreamWaitEvent(communication, experts1_done, 0), "wait");
      combine(1);
      break;
    }
  }
  rank.Order(communication, compute);
  rank.Order(rank.pack, compute);
  cudaEvent_t stop = rank.Record(compute);
  Check(cudaEventSynchronize(stop), "layer");
  Check(rank.comm->Synchronize(), "layer communication");
  float milliseconds = 0;
  Check(cudaEventElapsedTime(&milliseconds, start, stop), "cudaEventElapsedTime");
  if (spans != nullptr) {
    // Convert now: the events are reused by the next layer.
    for (Span& span : *spans) {
      float begin_ms = 0, end_ms = 0;
      Check(cudaEventElapsedTime(&begin_ms, start, span.begin), "elapsed");
      Check(cudaEventElapsedTime(&end_ms, start, span.end), "elapsed");
      span.begin_us = 1000.0 * begin_ms;
      span.end_us = 1000.0 * end_ms;
    }
  }
  return milliseconds;
}

// ----------------------------------------------------------------------------------------------
// Driver

double Median(std::vector<double> values) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const size_t middle = values.size() / 2;
  return values.size() % 2 ? values[middle] : 0.5 * (values[middle - 1] + values[middle]);
}

// Per-iteration times of every rank; the figure is the median over iterations of the slowest rank.
class Measurements {
 public:
  Measurements(int num_ranks, int iterations)
      : times_(num_ranks, std::vector<double>(iterations, 0.0)) {}
  void Set(int rank, int iteration, double ms) { times_[rank][iteration] = ms; }
  double MedianOfSlowest() const {
    std::vector<double> slowest(times_[0].size(), 0.0);
    for (const auto& rank_times : times_) {
      for (size_t i = 0; i < slowest.size(); ++i) slowest[i] = std::max(slowest[i], rank_times[i]);
    }
    return Median(slowest);
  }

 private:
  std::vector<std::vector<double>> times_;
};

struct SizeResult {
  int tokens = 0;
  int chunks = 1;
  int64_t dispatch_bytes = 0, combine_bytes = 0;  // summed over ranks
  int64_t mismatches = 0;
  double dispatch_ms = 0, raw_dispatch_ms = 0, combine_ms = 0, raw_combine_ms = 0;
  double compute_ms = 0, communication_ms = 0, sequential_ms = 0, overlapped_ms = 0;
  // The exchange planned on the GPUs, where the shape allows it (bytes summed over ranks).
  bool device_planned = false;
  int64_t block_dispatch_bytes = 0, block_combine_bytes = 0;
  int64_t needed_dispatch_bytes = 0, needed_combine_bytes = 0;
  int64_t device_mismatches = 0;
  double device_dispatch_ms = 0, device_raw_dispatch_ms = 0;
  double device_combine_ms = 0, device_raw_combine_ms = 0;
};

struct Shared {
  Config config;
  int num_ranks = 0;
  std::barrier<> host_barrier;
  std::vector<SizeResult> results;
  std::vector<std::vector<Span>> trace_spans;  // per rank
  std::vector<std::unique_ptr<Measurements>> measurements;
  std::vector<int64_t> dispatch_bytes, combine_bytes, mismatches;  // per rank
  // The exchange planned on the GPUs, per rank: block bytes, needed bytes, mismatches.
  std::vector<int64_t> block_dispatch_bytes, block_combine_bytes, needed_dispatch_bytes,
      needed_combine_bytes, device_mismatches;

  Shared(const Config& c, int n)
      : config(c),
        num_ranks(n),
        host_barrier(n),
        trace_spans(n),
        dispatch_bytes(n),
        combine_bytes(n),
        mismatches(n),
        block_dispatch_bytes(n),
        block_combine_bytes(n),
        needed_dispatch_bytes(n),
        needed_combine_bytes(n),
        device_mismatches(n) {}
};

// Runs `step` warmup + iterations times on every rank, each iteration after a barrier, and
// returns the median of the slowest rank's times (rank 0 computes; all ranks return it).
template <typename Step>
double Measure(Shared& shared, Rank& rank, int slot, Step step) {
  const Config& config = shared.config;
  if (rank.rank == 0)
    shared.measurements[slot] = std::make_unique<Measurements>(shared.num_ranks, config.iterations);
  shared.host_barrier.arrive_and_wait();
  for (int iteration = -config.warmup; iteration < config.iterations; ++iteration) {
    Check(rank.comm->Barrier(), "barrier");
    const double ms = step();
    if (iteration >= 0) shared.measurements[slot]->Set(rank.rank, iteration, ms);
  }
  shared.host_barrier.arrive_and_wait();
  const double median = shared.measurements[slot]->MedianOfSlowest();
  shared.host_barrier.arrive_and_wait();  // nobody reuses the slot while others still read it
  return median;
}

// Times `work` on the communication stream.
template <typename Work>
double TimeOnCommunicationStream(Rank& rank, Work work) {
  rank.next_event = 0;
  cudaEvent_t start = rank.Record(rank.communication());
  work();
  rank.Order(rank.pack, rank.communication());
  cudaEvent_t stop = rank.Record(rank.communication());
  Check(cudaEventSynchronize(stop), "exchange");
  float ms = 0;
  Check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
  return ms;
}

void RunRank(Shared& shared, Rank& rank) {
  const Config& config = shared.config;
  Check(cudaSetDevice(rank.comm->device()), "cudaSetDevice");
  int least = 0, greatest = 0;
  Check(cudaDeviceGetStreamPriorityRange(&least, &greatest), "priorities");
  Check(cudaStreamCreateWithPriority(&rank.compute, cudaStreamNonBlocking, least), "stream");
  Check(cudaStreamCreateWithPriority(&rank.pack, cudaStreamNonBlocking, greatest), "stream");
  Check(cublasCreate(&rank.cublas), "cublasCreate");
  Check(cublasSetStream(rank.cublas, rank.compute), "cublasSetStream");
  for (int expert = 0; expert < config.num_experts; ++expert) {
    if (RankOfExpert(expert, config.num_experts, rank.size) == rank.rank) ++rank.num_local_experts;
  }
  if (!config.skip_overlap) {
    const int hidden = config.hidden, intermediate = config.expert_intermediate;
    auto fill = [&](DeviceMemory& memory, int64_t elements, uint32_t seed) {
      Resize(memory, elements * 2);
      Check(LaunchFillRandom(memory.as<uint16_t>(), elements, seed, 0.02f, rank.compute), "fill");
    };
    fill(rank.attention_weight, int64_t{hidden} * config.attention_width, 1);
    fill(rank.expert_gate_up, int64_t{rank.num_local_experts} * hidden * 2 * intermediate, 2);
    fill(rank.expert_down, int64_t{rank.num_local_experts} * intermediate * hidden, 3);
    fill(rank.shared_gate_up, int64_t{hidden} * 2 * intermediate, 4);
    fill(rank.shared_down, int64_t{intermediate} * hidden, 5);
    Check(cudaStreamSynchronize(rank.compute), "fill weights");
  }

  for (size_t size_index = 0; size_index < config.tokens_per_rank.size(); ++size_index) {
    const int tokens = config.tokens_per_rank[size_index];
    const uint32_t seed =
        7919u * static_cast<uint32_t>(rank.rank + 1) + static_cast<uint32_t>(tokens);
    auto whole = std::make_unique<MicroBatch>();
    InitMicroBatch(config, rank, tokens, seed, *whole);
    shared.mismatches[rank.rank] = VerifyRoundTrip(config, rank, *whole);
    shared.dispatch_bytes[rank.rank] = DispatchBytes(config, rank, *whole);
    shared.combine_bytes[rank.rank] = CombineBytes(config, rank, *whole);
    SizeResult result;
    result.tokens = tokens;
    result.chunks = whole->num_chunks;
    result.dispatch_ms = Measure(shared, rank, 0, [&] {
      return TimeOnCommunicationStream(rank, [&] { Dispatch(config, rank, *whole); });
    });
    result.raw_dispatch_ms = Measure(shared, rank, 1, [&] {
      return TimeOnCommunicationStream(rank, [&] { RawExchange(config, rank, *whole, false); });
    });
    // Combine repeats on the routing of the last dispatch.
    result.combine_ms = Measure(shared, rank, 2, [&] {
      return TimeOnCommunicationStream(rank,
                                       [&] { Combine(config, rank, *whole, whole->recv_rows); });
    });
    result.raw_combine_ms = Measure(shared, rank, 3, [&] {
      return TimeOnCommunicationStream(rank, [&] { RawExchange(config, rank, *whole, true); });
    });

    // The same routing through the exchange planned on the GPUs (every rank decides alike).
    DevicePlanned planned;
    result.device_planned = PrepareDevicePlanned(config, rank, *whole, planned);
    if (result.device_planned) {
      const ExchangeShape& shape = planned.shape;
      const int64_t row_bytes = int64_t{config.hidden} * 2;
      shared.device_mismatches[rank.rank] = VerifyDeviceRoundTrip(config, rank, *whole, planned);
      const int remote_peers = std::max(rank.size - 1, 1);
      shared.block_dispatch_bytes[rank.rank] =
          int64_t{remote_peers} * shape.block_rows() * row_bytes;
      shared.block_combine_bytes[rank.rank] = int64_t{remote_peers} * shape.entries * row_bytes;
      shared.needed_dispatch_bytes[rank.rank] = RemoteRowBytes(config, rank, planned.rows_to);
      shared.needed_combine_bytes[rank.rank] = RemoteRowBytes(config, rank, planned.entries_from);
      result.device_dispatch_ms = Measure(shared, rank, 0, [&] {
        return TimeOnCommunicationStream(rank,
                                         [&] { DeviceDispatch(config, rank, *whole, planned); });
      });
      result.device_raw_dispatch_ms = Measure(shared, rank, 1, [&] {
        return TimeOnCommunicationStream(rank, [&] {
          RawRows(rank, planned.send.data(), planned.rows_to, planned.received.data(),
                  planned.rows_from, row_bytes);
        });
      });
      DeviceIdentityExperts(config, rank, planned);
      result.device_combine_ms = Measure(shared, rank, 2, [&] {
        return TimeOnCommunicationStream(rank,
                                         [&] { DeviceCombine(config, rank, *whole, planned); });
      });
      result.device_raw_combine_ms = Measure(shared, rank, 3, [&] {
        return TimeOnCommunicationStream(rank, [&] {
          RawRows(rank, planned.results.data(), planned.entries_from, planned.returned.data(),
                  planned.entries_to, row_bytes);
        });
      });
    }
    whole.reset();

    if (!config.skip_overlap) {
      MicroBatch batches[2];
      for (int i = 0; i < 2; ++i) {
        InitMicroBatch(config, rank, std::max(1, tokens / 2), seed * 3 + i, batches[i]);
        Dispatch(config, rank, batches[i]);  // learns the receive counts and sizes buffers
        Check(rank.comm->Synchronize(), "first dispatch");
        PrepareLayerBuffers(config, rank, batches[i]);
      }
      auto layer = [&](LayerMode mode) {
        return Measure(shared, rank, 4,
                       [&] { return RunLayer(config, rank, batches, mode, nullptr); });
      };
      result.compute_ms = layer(LayerMode::kComputeOnly);
      result.communication_ms = layer(LayerMode::kCommunicationOnly);
      result.sequential_ms = layer(LayerMode::kSequential);
      result.overlapped_ms = layer(LayerMode::kOverlapped);
      const int trace_tokens =
          config.trace_tokens > 0 ? config.trace_tokens : config.tokens_per_rank.back();
      if (!config.trace_path.empty() && tokens == trace_tokens) {
        Check(rank.comm->Barrier(), "barrier");
        std::vector<Span> spans;
        RunLayer(config, rank, batches, LayerMode::kOverlapped, &spans);
        shared.trace_spans[rank.rank] = std::move(spans);
      }
    }
    shared.host_barrier.arrive_and_wait();
    if (rank.rank == 0) {
      for (int r = 0; r < shared.num_ranks; ++r) {
        result.dispatch_bytes += shared.dispatch_bytes[r];
        result.combine_bytes += shared.combine_bytes[r];
        result.mismatches += shared.mismatches[r];
        result.block_dispatch_bytes += shared.block_dispatch_bytes[r];
        result.block_combine_bytes += shared.block_combine_bytes[r];
        result.needed_dispatch_bytes += shared.needed_dispatch_bytes[r];
        result.needed_combine_bytes += shared.needed_combine_bytes[r];
        result.device_mismatches += shared.device_mismatches[r];
      }
      shared.results.push_back(result);
    }
    shared.host_barrier.arrive_and_wait();
  }
  for (cudaEvent_t event : rank.events) cudaEventDestroy(event);
  cublasDestroy(rank.cublas);
  cudaStreamDestroy(rank.compute);
  cudaStreamDestroy(rank.pack);
}

void WriteTrace(const Shared& shared, const std::string& gpu_name, const std::string& path) {
  std::string json = "{\"displayTimeUnit\": \"ms\", \"traceEvents\": [\n";
  bool first = true;
  auto add = [&](const std::string& event) {
    json += (first ? "  " : ",\n  ") + event;
    first = false;
  };
  for (int rank = 0; rank < shared.num_ranks; ++rank) {
    add(absl::StrFormat(
        R"json({"name": "process_name", "ph": "M", "pid": %d, "args": {"name": "GPU %d (%s)"}})json",
        rank, rank, gpu_name));
    add(absl::StrFormat(
        R"json({"name": "thread_name", "ph": "M", "pid": %d, "tid": 0, "args": {"name": "compute"}})json",
        rank));
    add(absl::StrFormat(
        R"json({"name": "thread_name", "ph": "M", "pid": %d, "tid": 1, "args": {"name": "communication"}})json",
        rank));
    for (const Span& span : shared.trace_spans[rank]) {
      add(absl::StrFormat(
          R"json({"name": "%s", "cat": "%s", "ph": "X", "pid": %d, "tid": %d, "ts": %.3f, "dur": %.3f})json",
          span.name, span.lane == 0 ? "compute" : "communication", rank, span.lane, span.begin_us,
          span.end_us - span.begin_us));
    }
  }
  json += "\n]}\n";
  std::ofstream out(path);
  out << json;
  if (!out) Fail(absl::StrCat("cannot write the trace to ", path));
}

void PrintTables(const Shared& shared, const std::string& gpu_name, int nccl_version) {
  const Config& config = shared.config;
  const int n = shared.num_ranks;
  std::printf("\n## moeserve-dispatch-bench\n\n");
  std::printf("- GPUs: %d x %s\n", n, gpu_name.c_str());
  std::printf("- NCCL %d.%d.%d, NCCL_NVLS_ENABLE=%s\n", nccl_version / 10000,
              (nccl_version / 100) % 100, nccl_version % 100, std::getenv("NCCL_NVLS_ENABLE"));
  std::printf(
      "- hidden %d bf16, top-%d of %d experts spread evenly over the GPUs, "
      "median of %d iterations after %d warm-up, slowest rank per iteration\n",
      config.hidden, config.top_k, config.num_experts, config.iterations, config.warmup);
  std::printf(
      "- GB/s = bytes a GPU sends to other GPUs (all bytes on one GPU) / time, averaged "
      "over GPUs; raw = one grouped ncclSend/ncclRecv of the same per-peer bytes\n\n");
  std::printf(
      "| tokens/GPU | chunks | MB/GPU | dispatch ms | raw ms | dispatch GB/s | raw GB/s | "
      "dispatch/raw | combine ms | raw ms | combine GB/s | raw GB/s | combine/raw | "
      "round trip |\n");
  std::printf("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
  for (const SizeResult& r : shared.results) {
    const double dispatch_bytes = static_cast<double>(r.dispatch_bytes) / n;
    const double combine_bytes = static_cast<double>(r.combine_bytes) / n;
    auto gbps = [](double bytes, double ms) { return ms > 0 ? bytes / (ms * 1e6) : 0.0; };
    std::printf(
        "| %d | %d | %.1f | %.3f | %.3f | %.1f | %.1f | %.1f%% | %.3f | %.3f | %.1f | "
        "%.1f | %.1f%% | %s |\n",
        r.tokens, r.chunks, dispatch_bytes / 1e6, r.dispatch_ms, r.raw_dispatch_ms,
        gbps(dispatch_bytes, r.dispatch_ms), gbps(dispatch_bytes, r.raw_dispatch_ms),
        100.0 * r.raw_dispatch_ms / r.dispatch_ms, r.combine_ms, r.raw_combine_ms,
        gbps(combine_bytes, r.combine_ms), gbps(combine_bytes, r.raw_combine_ms),
        100.0 * r.raw_combine_ms / r.combine_ms,
        r.mismatches == 0 ? "exact" : absl::StrCat(r.mismatches, " wrong").c_str());
  }
  std::printf(
      "\nThe exchange as serving plans it on the GPUs for decode steps (--gpu-exchange-plan "
      "device): fixed-size blocks (a header and one row per token per destination GPU; one row "
      "per (token, expert) back), sized from the batch, no host round trip. Dispatch = plan, "
      "rows into the blocks, all-to-all, grouping by slot; combine = results into the blocks, "
      "all-to-all, weighted sum. raw = ncclSend/ncclRecv of only the rows needed (one per token "
      "and destination; one per entry back). MB/GPU sent to other GPUs.\n\n");
  std::printf(
      "| tokens/GPU | block MB/GPU | needed MB/GPU | dispatch ms | raw ms | dispatch/raw | "
      "combine block MB/GPU | needed MB/GPU | combine ms | raw ms | combine/raw | round trip |\n");
  std::printf("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
  for (const SizeResult& r : shared.results) {
    if (!r.device_planned) {
      std::printf("| %d | (a prefill size: planned on the host) |||||||||||\n", r.tokens);
      continue;
    }
    std::printf(
        "| %d | %.2f | %.2f | %.3f | %.3f | %.1f%% | %.2f | %.2f | %.3f | %.3f | %.1f%% | "
        "%s |\n",
        r.tokens, r.block_dispatch_bytes / 1e6 / n, r.needed_dispatch_bytes / 1e6 / n,
        r.device_dispatch_ms, r.device_raw_dispatch_ms,
        100.0 * r.device_raw_dispatch_ms / r.device_dispatch_ms, r.block_combine_bytes / 1e6 / n,
        r.needed_combine_bytes / 1e6 / n, r.device_combine_ms, r.device_raw_combine_ms,
        100.0 * r.device_raw_combine_ms / r.device_combine_ms,
        r.device_mismatches == 0 ? "exact" : absl::StrCat(r.device_mismatches, " wrong").c_str());
  }
  if (config.skip_overlap) return;
  std::printf(
      "\nTwo-micro-batch MoE layer (compute: attention projections %dx%d, routed "
      "experts %dx%d SwiGLU-sized grouped GEMMs on the GPU's %s experts, shared expert; "
      "all bf16 cuBLAS on the compute stream; communication: dispatch + combine of both "
      "micro-batches on the communication stream).\n"
      "hidden = (compute + communication - overlapped) / communication\n\n",
      config.hidden, config.attention_width, config.hidden, config.expert_intermediate,
      absl::StrCat(config.num_experts / n).c_str());
  std::printf(
      "| tokens/GPU | compute ms | communication ms | sequential ms | overlapped ms | "
      "hidden | speed-up |\n");
  std::printf("|---:|---:|---:|---:|---:|---:|---:|\n");
  for (const SizeResult& r : shared.results) {
    const double hidden =
        r.communication_ms > 0
            ? (r.compute_ms + r.communication_ms - r.overlapped_ms) / r.communication_ms
            : 0.0;
    std::printf("| %d | %.3f | %.3f | %.3f | %.3f | %.1f%% | %.2fx |\n", r.tokens, r.compute_ms,
                r.communication_ms, r.sequential_ms, r.overlapped_ms, 100.0 * hidden,
                r.sequential_ms / r.overlapped_ms);
  }
}

int Main(int argc, char** argv) {
  Config config;
  CLI::App app{
      "moeserve-dispatch-bench: MoE dispatch/combine over NCCL against raw NCCL, and "
      "two-micro-batch overlap, on the GPUs of this machine"};
  app.add_option("--tokens", config.tokens_per_rank, "tokens per GPU, one run per value")
      ->check(CLI::PositiveNumber);
  app.add_option("--iterations", config.iterations, "timed iterations")->check(CLI::PositiveNumber);
  app.add_option("--warmup", config.warmup, "untimed iterations first")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--chunks", config.chunks,
                 "chunks per exchange (pipelines permutation with sending); 0 chooses by size")
      ->check(CLI::Range(0, kMaxRouteKeys));
  app.add_option("--gpus", config.num_gpus, "GPUs to use (default: all visible)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--trace", config.trace_path, "write a Chrome trace of one overlapped layer here");
  app.add_option("--trace-tokens", config.trace_tokens,
                 "tokens per GPU of the traced layer (default: the largest --tokens)");
  app.add_option("--timeout-seconds", config.timeout_seconds, "collective timeout")
      ->check(CLI::PositiveNumber);
  app.add_flag("--skip-overlap", config.skip_overlap, "only measure dispatch/combine bandwidth");
  app.add_option("--exchange-max-ctas", config.exchange_max_ctas,
                 "at most this many CTAs per NCCL collective of the exchange (serving's "
                 "--gpu-exchange-max-ctas; the raw NCCL baseline keeps NCCL's choice); 0: NCCL's")
      ->check(CLI::Range(0, engine::comm::kMaxCollectiveCtas));
  CLI11_PARSE(app, argc, argv);

  // NVLink multicast (NVLS) stays off unless the caller decided otherwise.
  setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/0);
  int visible = 0;
  if (cudaGetDeviceCount(&visible) != cudaSuccess || visible < 1) {
    std::fprintf(stderr, "moeserve-dispatch-bench: no CUDA device visible\n");
    return 2;
  }
  const int n = config.num_gpus > 0 ? std::min(config.num_gpus, visible) : visible;
  if (config.tokens_per_rank.empty()) Fail("--tokens needs at least one value");
  cudaDeviceProp properties{};
  Check(cudaGetDeviceProperties(&properties, 0), "cudaGetDeviceProperties");
  const std::string gpu_name = properties.name;
  int nccl_version = 0;
  ncclGetVersion(&nccl_version);
  std::printf("moeserve-dispatch-bench: %d x %s, NCCL %d, exchange CTAs %s\n", n, gpu_name.c_str(),
              nccl_version,
              config.exchange_max_ctas > 0 ? std::to_string(config.exchange_max_ctas).c_str()
                                           : "NCCL's choice");
  std::fflush(stdout);

  std::vector<int> devices(n);
  std::iota(devices.begin(), devices.end(), 0);
  NcclCommunicatorOptions options;
  options.timeout = std::chrono::seconds(config.timeout_seconds);
  options.max_ctas = config.exchange_max_ctas;
  auto communicators = NcclCommunicator::CreateForDevices(devices, options);
  Check(communicators.status(), "NCCL group");
  std::vector<ncclComm_t> raw_comms(n);
  Check(ncclCommInitAll(raw_comms.data(), n, devices.data()), "ncclCommInitAll (baseline)");

  Shared shared(config, n);
  shared.measurements.resize(5);
  std::vector<Rank> ranks(n);
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r) {
    ranks[r].rank = r;
    ranks[r].size = n;
    ranks[r].comm = (*communicators)[r].get();
    ranks[r].raw_comm = raw_comms[r];
    threads.emplace_back([&shared, &ranks, r] { RunRank(shared, ranks[r]); });
  }
  for (auto& thread : threads) thread.join();

  PrintTables(shared, gpu_name, nccl_version);
  if (!config.trace_path.empty() && !config.skip_overlap) {
    WriteTrace(shared, gpu_name, config.trace_path);
    std::printf("\ntrace: %s\n", config.trace_path.c_str());
  }
  std::fflush(stdout);
  bool all_exact = true;
  for (const SizeResult& r : shared.results) {
    all_exact = all_exact && r.mismatches == 0 && r.device_mismatches == 0;
  }

  std::vector<std::thread> destroyers;  // tearing down a group waits for all of its ranks
  for (ncclComm_t comm : raw_comms) destroyers.emplace_back([comm] { ncclCommDestroy(comm); });
  for (auto& destroyer : destroyers) destroyer.join();
  NcclCommunicator::DestroyAll(*communicators);
  return all_exact ? 0 : 1;
}

}  // namespace
}  // namespace moeserve::kernels::dispatch_bench

int main(int argc, char** argv) { return moeserve::kernels::dispatch_bench::Main(argc, argv); }
