#include "engine/comm/nccl_communicator.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <numeric>
#include <thread>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "engine/base/status_macros.h"

namespace moeserve::engine::comm {
namespace {

// Makes `device` current for the scope (the calling thread may drive another GPU).
class ScopedDevice {
 public:
  explicit ScopedDevice(int device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    if (previous_ != device) cudaSetDevice(device);
  }
  ~ScopedDevice() {
    int current = -1;
    if (previous_ >= 0 && cudaGetDevice(&current) == cudaSuccess && current != previous_) {
      cudaSetDevice(previous_);
    }
  }
  ScopedDevice(const ScopedDevice&) = delete;
  ScopedDevice& operator=(const ScopedDevice&) = delete;

 private:
  int previous_ = -1;
};

absl::Status CudaError(const char* what, cudaError_t error) {
  return absl::InternalError(absl::StrCat(what, ": CUDA error ", cudaGetErrorName(error), " (",
                                          cudaGetErrorString(error), ")"));
}

#define MOESERVE_RETURN_IF_CUDA_ERROR(what, call)                                           \
  do {                                                                                      \
    if (cudaError_t error_ = (call); error_ != cudaSuccess) return CudaError(what, error_); \
  } while (false)

// NCCL accepts device (and managed) memory; anything else is staged.
bool IsDeviceAccessible(const void* pointer) {
  if (pointer == nullptr) return true;
  cudaPointerAttributes attributes{};
  if (cudaPointerGetAttributes(&attributes, pointer) != cudaSuccess) {
    cudaGetLastError();  // clear the error: plain host memory is not a failure
    return false;
  }
  return attributes.type == cudaMemoryTypeDevice || attributes.type == cudaMemoryTypeManaged;
}

ncclRedOp_t ToNccl(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return ncclSum;
    case ReduceOp::kMax:
      return ncclMax;
    case ReduceOp::kMin:
      return ncclMin;
  }
  return ncclSum;
}

// Polls a short while with yields (collectives of a decode step take tens of microseconds),
// then sleeps so a long wait does not burn a core.
class Backoff {
 public:
  void Pause() {
    if (++polls_ < 2000) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

 private:
  int polls_ = 0;
};

// Waits for a non-blocking communicator's pending operation (creation, finalization).
// Returns the final NCCL state, or ncclInProgress if the deadline passed first.
ncclResult_t AwaitCommunicatorState(ncclComm_t comm,
                                    std::chrono::steady_clock::time_point deadline) {
  Backoff backoff;
  while (true) {
    ncclResult_t state = ncclSuccess;
    if (ncclResult_t result = ncclCommGetAsyncError(comm, &state); result != ncclSuccess) {
      return result;
    }
    if (state != ncclInProgress) return state;
    if (std::chrono::steady_clock::now() > deadline) return ncclInProgress;
    backoff.Pause();
  }
}

ncclConfig_t CommunicatorConfig(const NcclCommunicatorOptions& options) {
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  // Non-blocking: creation and connection set-up return at once and are polled, so a peer that
  // never arrives is noticed at the timeout instead of blocking the thread inside NCCL.
  config.blocking = 0;
  if (options.max_ctas > 0) {
    config.maxCTAs = options.max_ctas;
    // NCCL refuses a minimum above the maximum; its default minimum may be larger than a
    // small bound.
    config.minCTAs = 1;
  }
  return config;
}

absl::Status CheckOptions(const NcclCommunicatorOptions& options) {
  if (options.max_ctas < 0 || options.max_ctas > kMaxCollectiveCtas) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_ctas ", options.max_ctas, " is outside 0 (NCCL's choice) to ", kMaxCollectiveCtas));
  }
  return absl::OkStatus();
}

absl::StatusOr<cudaStream_t> CreateCommunicationStream() {
  int least_priority = 0, greatest_priority = 0;
  MOESERVE_RETURN_IF_CUDA_ERROR(
      "cudaDeviceGetStreamPriorityRange",
      cudaDeviceGetStreamPriorityRange(&least_priority, &greatest_priority));
  cudaStream_t stream = nullptr;
  MOESERVE_RETURN_IF_CUDA_ERROR(
      "cudaStreamCreateWithPriority",
      cudaStreamCreateWithPriority(&stream, cudaStreamNonBlocking, greatest_priority));
  return stream;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Creation

NcclCommunicator::NcclCommunicator(int rank, int size, int device, ncclComm_t comm,
                                   cudaStream_t stream, bool owns_stream,
                                   std::chrono::milliseconds timeout)
    : rank_(rank),
      size_(size),
      device_(device),
      comm_(comm),
      stream_(stream),
      owns_stream_(owns_stream),
      timeout_(timeout) {}

absl::StatusOr<std::unique_ptr<NcclCommunicator>> NcclCommunicator::CreateWithId(
    int rank, int world_size, int device, const ncclUniqueId& id, NcclCommunicatorOptions options) {
  if (world_size < 1 || rank < 0 || rank >= world_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("rank ", rank, " is outside a group of ", world_size));
  }
  int device_count = 0;
  if (cudaGetDeviceCount(&device_count) != cudaSuccess) device_count = 0;
  if (device < 0 || device >= device_count) {
    return absl::InvalidArgumentError(
        absl::StrCat("CUDA device ", device, " does not exist (", device_count, " visible)"));
  }
  RETURN_IF_ERROR(CheckOptions(options));
  ScopedDevice scoped_device(device);
  ncclConfig_t config = CommunicatorConfig(options);
  ncclComm_t comm = nullptr;
  const auto deadline = std::chrono::steady_clock::now() + options.timeout;
  ncclResult_t result = ncclCommInitRankConfig(&comm, world_size, id, rank, &config);
  if (result == ncclSuccess || result == ncclInProgress) {
    result = AwaitCommunicatorState(comm, deadline);
  }
  if (result != ncclSuccess) {
    if (comm != nullptr) ncclCommAbort(comm);
    if (result == ncclInProgress) {
      return absl::UnavailableError(
          absl::StrCat("rank ", rank, " of ", world_size, ": the NCCL group did not form within ",
                       options.timeout.count(), " ms (a rank is missing or has another id)"));
    }
    return absl::UnavailableError(
        absl::StrCat("rank ", rank, " of ", world_size,
                     ": ncclCommInitRankConfig failed: ", ncclGetErrorString(result)));
  }
  cudaStream_t stream = options.stream;
  const bool owns_stream = stream == nullptr;
  if (owns_stream) {
    auto created = CreateCommunicationStream();
    if (!created.ok()) {
      ncclCommAbort(comm);
      return created.status();
    }
    stream = *created;
  }
  return std::unique_ptr<NcclCommunicator>(
      new NcclCommunicator(rank, world_size, device, comm, stream, owns_stream, options.timeout));
}

absl::StatusOr<std::vector<std::unique_ptr<NcclCommunicator>>> NcclCommunicator::CreateForDevices(
    std::span<const int> devices, NcclCommunicatorOptions options) {
  if (devices.empty()) return absl::InvalidArgumentError("no devices given");
  if (options.stream != nullptr) {
    return absl::InvalidArgumentError("CreateForDevices makes one stream per device itself");
  }
  const int world_size = static_cast<int>(devices.size());
  ncclUniqueId id{};
  if (ncclResult_t result = ncclGetUniqueId(&id); result != ncclSuccess) {
    return absl::UnavailableError(
        absl::StrCat("ncclGetUniqueId failed: ", ncclGetErrorString(result)));
  }
  RETURN_IF_ERROR(CheckOptions(options));
  int previous_device = 0;
  cudaGetDevice(&previous_device);
  std::vector<ncclComm_t> comms(devices.size(), nullptr);
  ncclConfig_t config = CommunicatorConfig(options);
  // One thread creating several ranks must group the calls (each rank's creation waits for
  // the others); this is what ncclCommInitAll does, with the non-blocking configuration added.
  ncclResult_t result = ncclGroupStart();
  for (int rank = 0; rank < world_size && result == ncclSuccess; ++rank) {
    cudaSetDevice(devices[rank]);
    result = ncclCommInitRankConfig(&comms[rank], world_size, id, rank, &config);
    if (result == ncclInProgress) result = ncclSuccess;
  }
  ncclResult_t end_result = ncclGroupEnd();
  if (result == ncclSuccess && end_result != ncclInProgress) result = end_result;
  const auto deadline = std::chrono::steady_clock::now() + options.timeout;
  for (int rank = 0; rank < world_size && result == ncclSuccess; ++rank) {
    result = AwaitCommunicatorState(comms[rank], deadline);
  }
  cudaSetDevice(previous_device);
  auto abort_all = [&] {
    for (ncclComm_t comm : comms) {
      if (comm != nullptr) ncclCommAbort(comm);
    }
  };
  if (result != ncclSuccess) {
    abort_all();
    return absl::UnavailableError(absl::StrCat(
        "creating an NCCL group of ", world_size,
        " devices failed: ", result == ncclInProgress ? "timed out" : ncclGetErrorString(result)));
  }
  std::vector<std::unique_ptr<NcclCommunicator>> communicators;
  for (int rank = 0; rank < world_size; ++rank) {
    ScopedDevice scoped_device(devices[rank]);
    auto stream = CreateCommunicationStream();
    if (!stream.ok()) {
      // Communicators made so far own their NCCL handles; abort the rest here.
      for (auto& made : communicators) made->Abort();
      communicators.clear();
      for (int rest = rank; rest < world_size; ++rest) ncclCommAbort(comms[rest]);
      return stream.status();
    }
    communicators.push_back(std::unique_ptr<NcclCommunicator>(new NcclCommunicator(
        rank, world_size, devices[rank], comms[rank], *stream, true, options.timeout)));
  }
  return communicators;
}

void NcclCommunicator::DestroyAll(std::vector<std::unique_ptr<NcclCommunicator>>& communicators) {
  std::vector<std::thread> threads;
  for (auto& communicator : communicators) {
    threads.emplace_back([&communicator] { communicator.reset(); });
  }
  for (auto& thread : threads) thread.join();
  communicators.clear();
}

NcclCommunicator::~NcclCommunicator() {
  ScopedDevice scoped_device(device_);
  if (!nccl_aborted_) {
    const auto deadline = Clock::now() + timeout_;
    // A failed wait aborts the NCCL communicator itself (nccl_aborted_ becomes true).
    const bool drained = !abort_requested_.load() && !failed_.load() &&
                         AwaitCompletion("shutdown", nullptr, deadline).ok();
    if (!nccl_aborted_) {
      // Finalizing waits until the whole group is quiescent; past the deadline, abort.
      ncclResult_t result = drained ? ncclCommFinalize(comm_) : ncclInternalError;
      if (result == ncclSuccess || result == ncclInProgress) {
        result = AwaitCommunicatorState(comm_, deadline);
      }
      if (result == ncclSuccess) {
        ncclCommDestroy(comm_);
      } else {
        ncclCommAbort(comm_);
      }
      nccl_aborted_ = true;
    }
  }
  if (device_scratch_ != nullptr) cudaFree(device_scratch_);
  if (pinned_scratch_ != nullptr) cudaFreeHost(pinned_scratch_);
  if (owns_stream_ && stream_ != nullptr) cudaStreamDestroy(stream_);
}

// ---------------------------------------------------------------------------------------------
// Failure handling and waiting

void NcclCommunicator::Abort() { abort_requested_.store(true); }

absl::Status NcclCommunicator::FailGroup(absl::Status why) {
  failed_.store(true);
  if (!nccl_aborted_) {
    ncclCommAbort(comm_);
    nccl_aborted_ = true;
  }
  return why;
}

absl::Status NcclCommunicator::NcclFailure(const char* what, ncclResult_t result) {
  const std::string detail = nccl_aborted_ ? "" : ncclGetLastError(comm_);
  const std::string message =
      absl::StrCat("rank ", rank_, ": ", what, ": NCCL error ", ncclGetErrorString(result),
                   detail.empty() ? "" : absl::StrCat(" (", detail, ")"),
                   "; the expert-parallel group is failed");
  if (result == ncclInvalidArgument || result == ncclInvalidUsage) {
    return FailGroup(absl::InternalError(message));
  }
  return FailGroup(absl::UnavailableError(message));
}

absl::Status NcclCommunicator::CheckUsable(const char* what) const {
  if (failed_.load() || abort_requested_.load()) {
    return absl::UnavailableError(absl::StrCat(
        "rank ", rank_, ": ", what,
        ": the expert-parallel group failed earlier (a rank stopped responding or it was "
        "aborted)"));
  }
  return absl::OkStatus();
}

absl::Status NcclCommunicator::AwaitEnqueued(const char* what, Clock::time_point deadline) {
  Backoff backoff;
  while (true) {
    ncclResult_t state = ncclSuccess;
    if (ncclResult_t result = ncclCommGetAsyncError(comm_, &state); result != ncclSuccess) {
      return NcclFailure(what, result);
    }
    if (state == ncclSuccess) return absl::OkStatus();
    if (state != ncclInProgress) return NcclFailure(what, state);
    if (abort_requested_.load()) {
      return FailGroup(absl::UnavailableError(
          absl::StrCat("rank ", rank_, ": ", what, ": the expert-parallel group was aborted")));
    }
    if (Clock::now() > deadline) {
      return FailGroup(absl::UnavailableError(
          absl::StrCat("rank ", rank_, ": ", what, ": peers did not connect within ",
                       timeout_.count(), " ms; the expert-parallel group is failed")));
    }
    backoff.Pause();
  }
}

absl::Status NcclCommunicator::AwaitCompletion(const char* what, cudaEvent_t event,
                                               Clock::time_point deadline) {
  Backoff backoff;
  for (int poll = 0;; ++poll) {
    const cudaError_t query = event != nullptr ? cudaEventQuery(event) : cudaStreamQuery(stream_);
    if (query == cudaSuccess) return absl::OkStatus();
    if (query != cudaErrorNotReady) {
      return FailGroup(CudaError(absl::StrCat("rank ", rank_, ": ", what).c_str(), query));
    }
    if (abort_requested_.load()) {
      return FailGroup(absl::UnavailableError(
          absl::StrCat("rank ", rank_, ": ", what, ": the expert-parallel group was aborted")));
    }
    // A peer's failure shows up as an asynchronous NCCL error (e.g. a broken connection).
    if (poll % 16 == 0) {
      ncclResult_t state = ncclSuccess;
      ncclResult_t result = ncclCommGetAsyncError(comm_, &state);
      if (result != ncclSuccess) return NcclFailure(what, result);
      if (state != ncclSuccess && state != ncclInProgress) return NcclFailure(what, state);
    }
    if (Clock::now() > deadline) {
      return FailGroup(absl::UnavailableError(absl::StrCat(
          "rank ", rank_, ": ", what, " did not complete within ", timeout_.count(),
          " ms (a rank of the expert-parallel group hung, died or never joined); the group is "
          "failed")));
    }
    backoff.Pause();
  }
}

absl::Status NcclCommunicator::Synchronize() {
  RETURN_IF_ERROR(CheckUsable("Synchronize"));
  ScopedDevice scoped_device(device_);
  return AwaitCompletion("Synchronize", nullptr, Clock::now() + timeout_);
}

// ---------------------------------------------------------------------------------------------
// Asynchronous collectives (device buffers)

absl::Status NcclCommunicator::EnqueueAllToAllV(const void* device_send,
                                                std::span<const int64_t> send_bytes,
                                                void* device_recv,
                                                std::span<const int64_t> recv_bytes) {
  if (static_cast<int>(send_bytes.size()) != size_ ||
      static_cast<int>(recv_bytes.size()) != size_) {
    return absl::InvalidArgumentError(
        absl::StrCat("AllToAllV: count vectors must have one entry per rank (", size_, ")"));
  }
  for (int peer = 0; peer < size_; ++peer) {
    if (send_bytes[peer] < 0 || recv_bytes[peer] < 0) {
      return absl::InvalidArgumentError("AllToAllV: byte counts must not be negative");
    }
  }
  RETURN_IF_ERROR(CheckUsable("AllToAllV"));
  ScopedDevice scoped_device(device_);
  const auto deadline = Clock::now() + timeout_;
  const char* send = static_cast<const char*>(device_send);
  char* recv = static_cast<char*>(device_recv);
  int64_t send_offset = 0, recv_offset = 0;
  ncclResult_t result = ncclGroupStart();
  if (result != ncclSuccess) return NcclFailure("AllToAllV", result);
  for (int peer = 0; peer < size_; ++peer) {
    // Zero-byte peers are skipped on both sides (the pairing is symmetric), which saves the
    // connection set-up and the per-peer work for experts nobody routed to.
    if (send_bytes[peer] > 0 && result == ncclSuccess) {
      result = ncclSend(send + send_offset, static_cast<size_t>(send_bytes[peer]), ncclInt8, peer,
                        comm_, stream_);
    }
    if (recv_bytes[peer] > 0 && result == ncclSuccess) {
      result = ncclRecv(recv + recv_offset, static_cast<size_t>(recv_bytes[peer]), ncclInt8, peer,
                        comm_, stream_);
    }
    send_offset += send_bytes[peer];
    recv_offset += recv_bytes[peer];
  }
  const ncclResult_t end_result = ncclGroupEnd();
  if (result == ncclInProgress) result = ncclSuccess;
  if (result == ncclSuccess && end_result != ncclInProgress) result = end_result;
  if (result != ncclSuccess) return NcclFailure("AllToAllV", result);
  return AwaitEnqueued("AllToAllV", deadline);
}

absl::Status NcclCommunicator::EnqueueAllReduceTyped(void* device_values, int count,
                                                     ncclDataType_t type, ReduceOp op) {
  if (count < 0) return absl::InvalidArgumentError("AllReduce: negative count");
  RETURN_IF_ERROR(CheckUsable("AllReduce"));
  if (count == 0) return absl::OkStatus();
  ScopedDevice scoped_device(device_);
  const auto deadline = Clock::now() + timeout_;
  ncclResult_t result = ncclAllReduce(device_values, device_values, static_cast<size_t>(count),
                                      type, ToNccl(op), comm_, stream_);
  if (result != ncclSuccess && result != ncclInProgress) return NcclFailure("AllReduce", result);
  return AwaitEnqueued("AllReduce", deadline);
}

absl::Status NcclCommunicator::EnqueueAllReduce(int64_t* device_values, int count, ReduceOp op) {
  return EnqueueAllReduceTyped(device_values, count, ncclInt64, op);
}

absl::Status NcclCommunicator::EnqueueAllReduce(float* device_values, int count, ReduceOp op) {
  return EnqueueAllReduceTyped(device_values, count, ncclFloat32, op);
}

absl::Status NcclCommunicator::EnqueueAllGather(const void* device_send, int64_t bytes,
                                                void* device_recv) {
  if (bytes < 0) return absl::InvalidArgumentError("AllGather: negative byte count");
  RETURN_IF_ERROR(CheckUsable("AllGather"));
  if (bytes == 0) return absl::OkStatus();
  ScopedDevice scoped_device(device_);
  const auto deadline = Clock::now() + timeout_;
  ncclResult_t result =
      ncclAllGather(device_send, device_recv, static_cast<size_t>(bytes), ncclInt8, comm_, stream_);
  if (result != ncclSuccess && result != ncclInProgress) return NcclFailure("AllGather", result);
  return AwaitEnqueued("AllGather", deadline);
}

absl::Status NcclCommunicator::EnqueueBroadcast(void* device_data, int64_t bytes, int root) {
  if (bytes < 0) return absl::InvalidArgumentError("Broadcast: negative byte count");
  if (root < 0 || root >= size_) {
    return absl::InvalidArgumentError(
        absl::StrCat("Broadcast: root ", root, " is outside the group of ", size_));
  }
  RETURN_IF_ERROR(CheckUsable("Broadcast"));
  if (bytes == 0) return absl::OkStatus();
  ScopedDevice scoped_device(device_);
  const auto deadline = Clock::now() + timeout_;
  ncclResult_t result = ncclBroadcast(device_data, device_data, static_cast<size_t>(bytes),
                                      ncclInt8, root, comm_, stream_);
  if (result != ncclSuccess && result != ncclInProgress) return NcclFailure("Broadcast", result);
  return AwaitEnqueued("Broadcast", deadline);
}

absl::Status NcclCommunicator::WaitForEvent(cudaEvent_t event) {
  RETURN_IF_ERROR(CheckUsable("WaitForEvent"));
  ScopedDevice scoped_device(device_);
  MOESERVE_RETURN_IF_CUDA_ERROR("cudaStreamWaitEvent", cudaStreamWaitEvent(stream_, event, 0));
  return absl::OkStatus();
}

absl::StatusOr<CollectiveCompletion> NcclCommunicator::RecordCompletion() {
  return RecordCompletion(stream_);
}

absl::StatusOr<CollectiveCompletion> NcclCommunicator::RecordCompletion(cudaStream_t stream) {
  RETURN_IF_ERROR(CheckUsable("RecordCompletion"));
  ScopedDevice scoped_device(device_);
  cudaEvent_t event = nullptr;
  MOESERVE_RETURN_IF_CUDA_ERROR("cudaEventCreateWithFlags",
                                cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  if (cudaError_t error = cudaEventRecord(event, stream); error != cudaSuccess) {
    cudaEventDestroy(event);
    return CudaError("cudaEventRecord", error);
  }
  return CollectiveCompletion(this, event);
}

// ---------------------------------------------------------------------------------------------
// Synchronous collectives (device or host buffers)

absl::Status NcclCommunicator::EnsureScratch(int64_t bytes) {
  if (bytes <= scratch_bytes_) return absl::OkStatus();
  const int64_t capacity = std::max<int64_t>({bytes, 2 * scratch_bytes_, int64_t{64} << 10});
  if (device_scratch_ != nullptr) cudaFree(device_scratch_);
  if (pinned_scratch_ != nullptr) cudaFreeHost(pinned_scratch_);
  device_scratch_ = pinned_scratch_ = nullptr;
  scratch_bytes_ = 0;
  MOESERVE_RETURN_IF_CUDA_ERROR("cudaMalloc (staging)", cudaMalloc(&device_scratch_, capacity));
  MOESERVE_RETURN_IF_CUDA_ERROR("cudaMallocHost (staging)",
                                cudaMallocHost(&pinned_scratch_, capacity));
  scratch_bytes_ = capacity;
  return absl::OkStatus();
}

template <typename Enqueue>
absl::Status NcclCommunicator::RunStaged(const char* what, std::span<StagedBuffer> buffers,
                                         Enqueue enqueue) {
  RETURN_IF_ERROR(CheckUsable(what));
  ScopedDevice scoped_device(device_);
  constexpr int64_t kAlignment = 256;
  // Lay out one scratch region per buffer that has a host side.
  std::vector<int64_t> offsets(buffers.size(), -1);
  int64_t scratch_needed = 0;
  for (size_t i = 0; i < buffers.size(); ++i) {
    const StagedBuffer& buffer = buffers[i];
    const bool staged = (buffer.in != nullptr && !IsDeviceAccessible(buffer.in)) ||
                        (buffer.out != nullptr && !IsDeviceAccessible(buffer.out));
    if (staged && buffer.bytes > 0) {
      offsets[i] = scratch_needed;
      scratch_needed += (buffer.bytes + kAlignment - 1) / kAlignment * kAlignment;
    }
  }
  RETURN_IF_ERROR(EnsureScratch(scratch_needed));
  char* device_scratch = static_cast<char*>(device_scratch_);
  char* pinned_scratch = static_cast<char*>(pinned_scratch_);
  std::vector<void*> device_pointers(buffers.size());
  for (size_t i = 0; i < buffers.size(); ++i) {
    const StagedBuffer& buffer = buffers[i];
    if (offsets[i] < 0) {
      device_pointers[i] = buffer.out != nullptr ? buffer.out : const_cast<void*>(buffer.in);
      continue;
    }
    device_pointers[i] = device_scratch + offsets[i];
    if (buffer.in == nullptr) continue;
    const cudaMemcpyKind kind =
        IsDeviceAccessible(buffer.in) ? cudaMemcpyDeviceToDevice : cudaMemcpyHostToDevice;
    const void* source = buffer.in;
    if (kind == cudaMemcpyHostToDevice) {
      // Through pinned memory, so the copy is asynchronous and ordered on the stream.
      std::memcpy(pinned_scratch + offsets[i], buffer.in, buffer.bytes);
      source = pinned_scratch + offsets[i];
    }
    MOESERVE_RETURN_IF_CUDA_ERROR("staging copy in", cudaMemcpyAsync(device_pointers[i], source,
                                                                     buffer.bytes, kind, stream_));
  }
  RETURN_IF_ERROR(enqueue(std::span<void* const>(device_pointers)));
  std::vector<bool> copy_to_host(buffers.size(), false);
  for (size_t i = 0; i < buffers.size(); ++i) {
    const StagedBuffer& buffer = buffers[i];
    if (offsets[i] < 0 || buffer.out == nullptr) continue;
    copy_to_host[i] = !IsDeviceAccessible(buffer.out);
    void* destination = copy_to_host[i] ? pinned_scratch + offsets[i] : buffer.out;
    MOESERVE_RETURN_IF_CUDA_ERROR(
        "staging copy out",
        cudaMemcpyAsync(destination, device_pointers[i], buffer.bytes, cudaMemcpyDefault, stream_));
  }
  RETURN_IF_ERROR(AwaitCompletion(what, nullptr, Clock::now() + timeout_));
  for (size_t i = 0; i < buffers.size(); ++i) {
    if (copy_to_host[i]) std::memcpy(buffers[i].out, pinned_scratch + offsets[i], buffers[i].bytes);
  }
  return absl::OkStatus();
}

absl::Status NcclCommunicator::AllToAllV(const void* send, std::span<const int64_t> send_bytes,
                                         void* recv, std::span<const int64_t> recv_bytes) {
  if (static_cast<int>(send_bytes.size()) != size_ ||
      static_cast<int>(recv_bytes.size()) != size_) {
    return absl::InvalidArgumentError(
        absl::StrCat("AllToAllV: count vectors must have one entry per rank (", size_, ")"));
  }
  StagedBuffer buffers[] = {
      {send, nullptr, std::accumulate(send_bytes.begin(), send_bytes.end(), int64_t{0})},
      {nullptr, recv, std::accumulate(recv_bytes.begin(), recv_bytes.end(), int64_t{0})}};
  return RunStaged("AllToAllV", buffers, [&](std::span<void* const> device) {
    return EnqueueAllToAllV(device[0], send_bytes, device[1], recv_bytes);
  });
}

absl::Status NcclCommunicator::AllReduce(int64_t* values, int count, ReduceOp op) {
  if (count < 0) return absl::InvalidArgumentError("AllReduce: negative count");
  StagedBuffer buffers[] = {{values, values, int64_t{count} * int64_t{sizeof(int64_t)}}};
  return RunStaged("AllReduce", buffers, [&](std::span<void* const> device) {
    return EnqueueAllReduce(static_cast<int64_t*>(device[0]), count, op);
  });
}

absl::Status NcclCommunicator::AllReduce(float* values, int count, ReduceOp op) {
  if (count < 0) return absl::InvalidArgumentError("AllReduce: negative count");
  StagedBuffer buffers[] = {{values, values, int64_t{count} * int64_t{sizeof(float)}}};
  return RunStaged("AllReduce", buffers, [&](std::span<void* const> device) {
    return EnqueueAllReduce(static_cast<float*>(device[0]), count, op);
  });
}

absl::Status NcclCommunicator::AllGather(const void* send, int64_t bytes, void* recv) {
  if (bytes < 0) return absl::InvalidArgumentError("AllGather: negative byte count");
  StagedBuffer buffers[] = {{send, nullptr, bytes}, {nullptr, recv, bytes * size_}};
  return RunStaged("AllGather", buffers, [&](std::span<void* const> device) {
    return EnqueueAllGather(device[0], bytes, device[1]);
  });
}

absl::Status NcclCommunicator::Broadcast(void* data, int64_t bytes, int root) {
  if (bytes < 0) return absl::InvalidArgumentError("Broadcast: negative byte count");
  StagedBuffer buffers[] = {{data, data, bytes}};
  return RunStaged("Broadcast", buffers, [&](std::span<void* const> device) {
    return EnqueueBroadcast(device[0], bytes, root);
  });
}

absl::Status NcclCommunicator::Barrier() {
  // A one-element all-reduce: it completes on a rank only once every rank has reached it.
  RETURN_IF_ERROR(CheckUsable("Barrier"));
  ScopedDevice scoped_device(device_);
  RETURN_IF_ERROR(EnsureScratch(sizeof(int64_t)));
  RETURN_IF_ERROR(EnqueueAllReduce(static_cast<int64_t*>(device_scratch_), 1, ReduceOp::kSum));
  return AwaitCompletion("Barrier", nullptr, Clock::now() + timeout_);
}

// ---------------------------------------------------------------------------------------------
// CollectiveCompletion

CollectiveCompletion::CollectiveCompletion(CollectiveCompletion&& other) noexcept
    : communicator_(other.communicator_), event_(std::exchange(other.event_, nullptr)) {}

CollectiveCompletion& CollectiveCompletion::operator=(CollectiveCompletion&& other) noexcept {
  if (this != &other) {
    if (event_ != nullptr) cudaEventDestroy(event_);
    communicator_ = other.communicator_;
    event_ = std::exchange(other.event_, nullptr);
  }
  return *this;
}

CollectiveCompletion::~CollectiveCompletion() {
  // Destroying a pending event is allowed: CUDA releases it once it completes.
  if (event_ != nullptr) cudaEventDestroy(event_);
}

absl::Status CollectiveCompletion::MakeStreamWait(cudaStream_t stream) const {
  if (event_ == nullptr) return absl::FailedPreconditionError("moved-from CollectiveCompletion");
  MOESERVE_RETURN_IF_CUDA_ERROR("cudaStreamWaitEvent", cudaStreamWaitEvent(stream, event_, 0));
  return absl::OkStatus();
}

bool CollectiveCompletion::Ready() const {
  return event_ != nullptr && cudaEventQuery(event_) == cudaSuccess;
}

absl::Status CollectiveCompletion::Wait() {
  if (event_ == nullptr) return absl::FailedPreconditionError("moved-from CollectiveCompletion");
  RETURN_IF_ERROR(communicator_->CheckUsable("Wait"));
  ScopedDevice scoped_device(communicator_->device_);
  return communicator_->AwaitCompletion("collective", event_,
                                        NcclCommunicator::Clock::now() + communicator_->timeout_);
}

}  // namespace moeserve::engine::comm
