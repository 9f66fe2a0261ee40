// NcclCommunicator: the Communicator of a rank that owns one GPU, over NCCL. Used by the GPU
// engine (one process per GPU in a deployment), by the GPU tests and by the dispatch benchmark
// (one process driving every visible GPU, one thread per GPU).
//
// Every collective runs on one CUDA stream, the rank's communication stream. The Communicator
// methods are synchronous, as the interface promises (the caller reads the result on return):
// they enqueue, then wait for the stream — never longer than the group timeout. A collective
// that has not finished by then (a peer hung, died or never joined) aborts the NCCL
// communicator and returns UNAVAILABLE, and every later call returns UNAVAILABLE: the group is
// failed and must be rebuilt. Buffers may be device memory or plain host memory; host buffers
// are staged through pinned and device scratch buffers, which suits the small per-step
// agreements and count exchanges the engine makes on the host.
//
// The Enqueue* methods are the asynchronous form used by two-batch overlap: they take device
// pointers only, put the collective on the communication stream and return once NCCL has
// enqueued it. RecordCompletion() then returns a CollectiveCompletion whose event other streams
// can wait on (the compute stream waits for dispatched tokens without blocking the host), or
// which the host can wait on with the same timeout. WaitForEvent() makes the communication
// stream wait for work of another stream (e.g. the tokens the compute stream produced).
//
// Thread-safety: one thread at a time per communicator (the rank's communication thread);
// different communicators (ranks of one process, or separate channels made from separate
// NCCL ids) may be used from different threads concurrently. Abort() is the one method that
// any thread may call at any time.
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/comm/communicator.h"

namespace moeserve::engine::comm {

// NCCL runs a collective on at most one CTA per channel, and has at most this many channels.
inline constexpr int kMaxCollectiveCtas = 64;

struct NcclCommunicatorOptions {
  // How long any collective (and creation) may take before the group is declared failed.
  std::chrono::milliseconds timeout = std::chrono::seconds(120);
  // The communication stream. Null: the communicator creates a non-blocking stream of the
  // highest priority (so its kernels get SMs while compute kernels fill the GPU) and owns it.
  cudaStream_t stream = nullptr;
  // At most this many CTAs (thread blocks, one per NCCL channel) run each collective, so that a
  // collective overlapped with compute leaves the other SMs to it (ncclConfig_t::maxCTAs);
  // 0: NCCL's own choice.
  int max_ctas = 0;
};

class CollectiveCompletion;

class NcclCommunicator : public Communicator {
 public:
  // One process per GPU, every rank given the same id (e.g. through a flag).
  static absl::StatusOr<std::unique_ptr<NcclCommunicator>> CreateWithId(
      int rank, int world_size, int device, const ncclUniqueId& id,
      NcclCommunicatorOptions options = {});
  // One process driving several GPUs (tests, benchmarks): rank i uses devices[i]. Each
  // communicator gets its own stream (options.stream must be null).
  static absl::StatusOr<std::vector<std::unique_ptr<NcclCommunicator>>> CreateForDevices(
      std::span<const int> devices, NcclCommunicatorOptions options = {});
  // Destroys the communicators of one process together. Tearing down a healthy NCCL group
  // waits for every rank, so destroying them one after another from one thread would stall
  // on the first; this destroys each from its own thread.
  static void DestroyAll(std::vector<std::unique_ptr<NcclCommunicator>>& communicators);

  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;
  // Waits (up to the timeout) for queued work, then releases NCCL; a failed or timed-out group
  // is aborted instead.
  ~NcclCommunicator() override;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int device() const { return device_; }
  cudaStream_t stream() const { return stream_; }
  std::chrono::milliseconds timeout() const { return timeout_; }
  // False once the group failed (timeout, NCCL error or Abort()).
  bool healthy() const { return !failed_.load(); }

  // Communicator: synchronous; device or host buffers.
  absl::Status AllToAllV(const void* send, std::span<const int64_t> send_bytes, void* recv,
                         std::span<const int64_t> recv_bytes) override;
  absl::Status AllReduce(int64_t* values, int count, ReduceOp op) override;
  absl::Status AllReduce(float* values, int count, ReduceOp op) override;
  absl::Status AllGather(const void* send, int64_t bytes, void* recv) override;
  absl::Status Broadcast(void* data, int64_t bytes, int root) override;
  absl::Status Barrier() override;

  // Asynchronous form: device buffers only; returns once the collective is on the stream.
  // Peers must pair up exactly (send_bytes[p] here == recv_bytes[rank] at p), or the
  // collective hangs until the timeout; peers with zero bytes are skipped.
  absl::Status EnqueueAllToAllV(const void* device_send, std::span<const int64_t> send_bytes,
                                void* device_recv, std::span<const int64_t> recv_bytes);
  absl::Status EnqueueAllReduce(int64_t* device_values, int count, ReduceOp op);
  absl::Status EnqueueAllReduce(float* device_values, int count, ReduceOp op);
  absl::Status EnqueueAllGather(const void* device_send, int64_t bytes, void* device_recv);
  absl::Status EnqueueBroadcast(void* device_data, int64_t bytes, int root);
  // Makes the communication stream wait for `event` (recorded on another stream).
  absl::Status WaitForEvent(cudaEvent_t event);
  // An event recorded on the communication stream after everything enqueued so far.
  absl::StatusOr<CollectiveCompletion> RecordCompletion();
  // An event recorded on `stream`, waited on like a collective's: for work of another stream
  // that contains this group's collectives (a CUDA graph of a step launched on it), so that the
  // host's wait for it has the group timeout and fails the group instead of hanging.
  absl::StatusOr<CollectiveCompletion> RecordCompletion(cudaStream_t stream);
  // Waits on the host until the communication stream is idle, with the group timeout.
  absl::Status Synchronize();

  // Fails the group: the collective in flight (if any) and every later one return
  // UNAVAILABLE, and the NCCL communicator is aborted by the thread that uses it (or by the
  // destructor). Any thread may call this.
  void Abort();

 private:
  friend class CollectiveCompletion;
  NcclCommunicator(int rank, int size, int device, ncclComm_t comm, cudaStream_t stream,
                   bool owns_stream, std::chrono::milliseconds timeout);

  using Clock = std::chrono::steady_clock;
  // Waits until NCCL finished enqueuing (a non-blocking communicator may still be connecting
  // to peers), failing the group past `deadline`.
  absl::Status AwaitEnqueued(const char* what, Clock::time_point deadline);
  // Waits until `event` (or the stream, when null) completed, watching for NCCL errors and
  // the deadline.
  absl::Status AwaitCompletion(const char* what, cudaEvent_t event, Clock::time_point deadline);
  absl::Status CheckUsable(const char* what) const;
  absl::Status FailGroup(absl::Status why);
  absl::Status NcclFailure(const char* what, ncclResult_t result);
  absl::Status EnqueueAllReduceTyped(void* device_values, int count, ncclDataType_t type,
                                     ReduceOp op);
  // Runs a synchronous collective over `buffers`: host buffers are copied in through scratch
  // memory, `enqueue` runs with device pointers, results are copied back to host buffers.
  struct StagedBuffer {
    const void* in = nullptr;  // data to send (null: none)
    void* out = nullptr;       // where results land (null: none)
    int64_t bytes = 0;
  };
  template <typename Enqueue>
  absl::Status RunStaged(const char* what, std::span<StagedBuffer> buffers, Enqueue enqueue);
  absl::Status EnsureScratch(int64_t bytes);

  int rank_;
  int size_;
  int device_;
  ncclComm_t comm_;
  cudaStream_t stream_;
  bool owns_stream_;
  std::chrono::milliseconds timeout_;
  std::atomic<bool> failed_{false};
  std::atomic<bool> abort_requested_{false};
  bool nccl_aborted_ = false;
  // Staging for host buffers: device scratch and a pinned host mirror of the same size.
  void* device_scratch_ = nullptr;
  void* pinned_scratch_ = nullptr;
  int64_t scratch_bytes_ = 0;
};

// An event on the communication stream; move-only. Must not outlive its communicator.
class CollectiveCompletion {
 public:
  CollectiveCompletion(CollectiveCompletion&& other) noexcept;
  CollectiveCompletion& operator=(CollectiveCompletion&& other) noexcept;
  ~CollectiveCompletion();

  cudaEvent_t event() const { return event_; }
  // GPU-side dependency: `stream` waits for the collectives; the host does not block.
  absl::Status MakeStreamWait(cudaStream_t stream) const;
  // True once the collectives finished (never blocks).
  bool Ready() const;
  // Host waits with the communicator's timeout; UNAVAILABLE (and a failed group) past it.
  absl::Status Wait();

 private:
  friend class NcclCommunicator;
  CollectiveCompletion(NcclCommunicator* communicator, cudaEvent_t event)
      : communicator_(communicator), event_(event) {}
  NcclCommunicator* communicator_;
  cudaEvent_t event_;
};

}  // namespace moeserve::engine::comm
