// NcclCommunicator on the GPUs of this machine, one process driving all of them (one thread per
// GPU): all-to-all-v with uneven and empty peers, reductions, all-gather, broadcast, barrier,
// host buffers, the asynchronous form, creation through a rendezvous file, and the timeout that
// fails a group whose rank never arrives. Tests skip without a GPU (or with one GPU where they
// need two); the rendezvous-file and id-encoding tests need no GPU.
#include "engine/comm/nccl_communicator.h"

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "engine/comm/nccl_bootstrap.h"
#include "kernels/device_array.h"

namespace moeserve::engine::parallel {
namespace {

using std::chrono::milliseconds;
using Communicators = std::vector<std::unique_ptr<comm::NcclCommunicator>>;

int VisibleDeviceCount() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

std::vector<int> AllDevices() {
  std::vector<int> devices(VisibleDeviceCount());
  std::iota(devices.begin(), devices.end(), 0);
  return devices;
}

// Runs `body` for every rank at once, each on its own thread with its GPU current.
void OnEveryRank(Communicators& communicators,
                 const std::function<void(comm::NcclCommunicator&)>& body) {
  std::vector<std::thread> threads;
  for (auto& communicator : communicators) {
    threads.emplace_back([&body, &communicator] {
      ASSERT_EQ(cudaSetDevice(communicator->device()), cudaSuccess);
      body(*communicator);
    });
  }
  for (auto& thread : threads) thread.join();
}

// `bytes` of the current GPU's memory (the project's DeviceArray), with whole-buffer copies.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) { EXPECT_TRUE(memory_.Reserve(bytes).ok()); }
  template <typename T>
  T* as() {
    return memory_.as<T>();
  }
  void Upload(const void* host) {
    ASSERT_EQ(cudaMemcpy(memory_.data(), host, bytes_, cudaMemcpyHostToDevice), cudaSuccess);
  }
  template <typename T>
  std::vector<T> Download() {
    std::vector<T> host(bytes_ / sizeof(T));
    EXPECT_TRUE(memory_.Download(reinterpret_cast<std::byte*>(host.data()), bytes_, nullptr).ok());
    return host;
  }

 private:
  kernels::DeviceArray<std::byte> memory_;
  size_t bytes_;
};

// What rank `from` sends to rank `to`: uneven sizes, some peers (and some self-sends) empty.
int64_t MessageBytes(int from, int to) {
  return ((from + 2 * to + 1) % 3) * (1000 + 13 * from + 7 * to);
}
uint8_t MessageByte(int from, int to, int64_t index) {
  return static_cast<uint8_t>(from * 31 + to * 7 + index * 13);
}

struct AllToAllCase {
  std::vector<int64_t> send_bytes, recv_bytes;
  std::vector<uint8_t> send, expected_recv;
};

AllToAllCase MakeAllToAllCase(int rank, int size) {
  AllToAllCase test;
  for (int peer = 0; peer < size; ++peer) {
    test.send_bytes.push_back(MessageBytes(rank, peer));
    test.recv_bytes.push_back(MessageBytes(peer, rank));
    for (int64_t i = 0; i < MessageBytes(rank, peer); ++i)
      test.send.push_back(MessageByte(rank, peer, i));
    for (int64_t i = 0; i < MessageBytes(peer, rank); ++i) {
      test.expected_recv.push_back(MessageByte(peer, rank, i));
    }
  }
  return test;
}

// One rank's part of an all-to-all of MakeAllToAllCase's messages between device buffers.
void ExpectAllToAllVDelivers(comm::NcclCommunicator& comm) {
  AllToAllCase test = MakeAllToAllCase(comm.rank(), comm.size());
  DeviceBuffer send(test.send.size()), recv(test.expected_recv.size());
  send.Upload(test.send.data());
  ASSERT_TRUE(
      comm.AllToAllV(send.as<void>(), test.send_bytes, recv.as<void>(), test.recv_bytes).ok());
  EXPECT_EQ(recv.Download<uint8_t>(), test.expected_recv) << "rank " << comm.rank();
}

// One group over every visible GPU, shared by the functional tests (creation takes seconds).
class NcclCommunicatorTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (VisibleDeviceCount() < 1) return;
    comm::NcclCommunicatorOptions options;
    options.timeout = std::chrono::seconds(60);
    auto created = comm::NcclCommunicator::CreateForDevices(AllDevices(), options);
    creation_status_ = new absl::Status(created.status());
    if (created.ok()) communicators_ = new Communicators(std::move(*created));
  }
  static void TearDownTestSuite() {
    if (communicators_ != nullptr) comm::NcclCommunicator::DestroyAll(*communicators_);
    delete communicators_;
    delete creation_status_;
    communicators_ = nullptr;
    creation_status_ = nullptr;
  }
  void SetUp() override {
    if (VisibleDeviceCount() < 1) GTEST_SKIP() << "no CUDA device visible";
    ASSERT_TRUE(creation_status_->ok()) << *creation_status_;
  }
  Communicators& group() { return *communicators_; }
  int size() const { return static_cast<int>(communicators_->size()); }

  static Communicators* communicators_;
  static absl::Status* creation_status_;
};
Communicators* NcclCommunicatorTest::communicators_ = nullptr;
absl::Status* NcclCommunicatorTest::creation_status_ = nullptr;

TEST_F(NcclCommunicatorTest, AllToAllVDeliversUnevenAndEmptyMessagesBetweenDeviceBuffers) {
  OnEveryRank(group(), ExpectAllToAllVDelivers);
}

TEST_F(NcclCommunicatorTest, AllToAllVAcceptsHostBuffers) {
  OnEveryRank(group(), [](comm::NcclCommunicator& comm) {
    AllToAllCase test = MakeAllToAllCase(comm.rank(), comm.size());
    std::vector<uint8_t> recv(test.expected_recv.size(), 0xEE);
    ASSERT_TRUE(
        comm.AllToAllV(test.send.data(), test.send_bytes, recv.data(), test.recv_bytes).ok());
    EXPECT_EQ(recv, test.expected_recv) << "rank " << comm.rank();
  });
}

TEST_F(NcclCommunicatorTest, AllToAllCountsExchangesHostCountsThroughTheInterface) {
  OnEveryRank(group(), [](comm::NcclCommunicator& nccl) {
    comm::Communicator& comm = nccl;  // what the engine holds
    std::vector<int64_t> send(comm.size()), recv(comm.size(), -1);
    for (int peer = 0; peer < comm.size(); ++peer) send[peer] = 1000 * comm.rank() + peer;
    ASSERT_TRUE(comm.AllToAllCounts(send, recv).ok());
    for (int peer = 0; peer < comm.size(); ++peer) EXPECT_EQ(recv[peer], 1000 * peer + comm.rank());
  });
}

TEST_F(NcclCommunicatorTest, AllReduceSumsAndTakesExtremesOnDeviceAndHost) {
  const int n = size();
  OnEveryRank(group(), [n](comm::NcclCommunicator& comm) {
    const int r = comm.rank();
    // Host int64, each op.
    std::vector<int64_t> sum = {r, 10 * r + 1, int64_t{1} << 40};
    ASSERT_TRUE(comm.AllReduce(sum.data(), 3, comm::ReduceOp::kSum).ok());
    EXPECT_EQ(sum, (std::vector<int64_t>{n * (n - 1) / 2, 10 * n * (n - 1) / 2 + n,
                                         n * (int64_t{1} << 40)}));
    std::vector<int64_t> max = {r, -r}, min = {r, -r};
    ASSERT_TRUE(comm.AllReduce(max.data(), 2, comm::ReduceOp::kMax).ok());
    ASSERT_TRUE(comm.AllReduce(min.data(), 2, comm::ReduceOp::kMin).ok());
    EXPECT_EQ(max, (std::vector<int64_t>{n - 1, 0}));
    EXPECT_EQ(min, (std::vector<int64_t>{0, -(n - 1)}));
    // Device float (values exactly representable, so the sum is exact in any order).
    std::vector<float> values = {0.5f * r, -2.0f * r, 1.0f};
    DeviceBuffer device(values.size() * sizeof(float));
    device.Upload(values.data());
    ASSERT_TRUE(comm.AllReduce(device.as<float>(), 3, comm::ReduceOp::kSum).ok());
    EXPECT_EQ(
        device.Download<float>(),
        (std::vector<float>{0.25f * n * (n - 1), -1.0f * n * (n - 1), static_cast<float>(n)}));
    std::vector<float> float_max = {static_cast<float>(r), -1.5f * r};
    ASSERT_TRUE(comm.AllReduce(float_max.data(), 2, comm::ReduceOp::kMax).ok());
    EXPECT_EQ(float_max, (std::vector<float>{static_cast<float>(n - 1), 0.0f}));
    EXPECT_TRUE(comm.AllReduce(sum.data(), 0, comm::ReduceOp::kSum).ok());
  });
}

TEST_F(NcclCommunicatorTest, AllGatherCollectsEveryRanksBytesInRankOrder) {
  const int n = size();
  OnEveryRank(group(), [n](comm::NcclCommunicator& comm) {
    constexpr int kBytes = 4099;
    std::vector<uint8_t> mine(kBytes), expected;
    for (int i = 0; i < kBytes; ++i) mine[i] = MessageByte(comm.rank(), 0, i);
    for (int rank = 0; rank < n; ++rank) {
      for (int i = 0; i < kBytes; ++i) expected.push_back(MessageByte(rank, 0, i));
    }
    DeviceBuffer send(kBytes), recv(static_cast<size_t>(kBytes) * n);
    send.Upload(mine.data());
    ASSERT_TRUE(comm.AllGather(send.as<void>(), kBytes, recv.as<void>()).ok());
    EXPECT_EQ(recv.Download<uint8_t>(), expected);
    std::vector<uint8_t> host_recv(expected.size());
    ASSERT_TRUE(comm.AllGather(mine.data(), kBytes, host_recv.data()).ok());
    EXPECT_EQ(host_recv, expected);
  });
}

TEST_F(NcclCommunicatorTest, BroadcastCopiesTheRootsBytesToEveryRank) {
  const int root = size() - 1;
  OnEveryRank(group(), [root](comm::NcclCommunicator& comm) {
    std::vector<int64_t> data(257, comm.rank() == root ? 77 : -1);
    data[3] = comm.rank() == root ? 123456789 : 0;
    ASSERT_TRUE(comm.Broadcast(data.data(), data.size() * sizeof(int64_t), root).ok());
    EXPECT_EQ(data[3], 123456789);
    EXPECT_EQ(data[256], 77);
    DeviceBuffer device(data.size() * sizeof(int64_t));
    std::vector<int64_t> fresh(data.size(), comm.rank() == root ? 5 : 0);
    device.Upload(fresh.data());
    ASSERT_TRUE(comm.Broadcast(device.as<void>(), fresh.size() * sizeof(int64_t), root).ok());
    EXPECT_EQ(device.Download<int64_t>(), std::vector<int64_t>(data.size(), 5));
  });
}

TEST_F(NcclCommunicatorTest, BarrierReturnsOnlyAfterTheLastRankArrives) {
  std::atomic<int64_t> last_arrival_ns{0};
  const int late_rank = size() - 1;
  OnEveryRank(group(), [&](comm::NcclCommunicator& comm) {
    ASSERT_TRUE(comm.Barrier().ok());
    if (comm.rank() == late_rank) {
      std::this_thread::sleep_for(milliseconds(300));
      last_arrival_ns = std::chrono::steady_clock::now().time_since_epoch().count();
    }
    ASSERT_TRUE(comm.Barrier().ok());
    const int64_t returned_ns = std::chrono::steady_clock::now().time_since_epoch().count();
    EXPECT_GE(returned_ns, last_arrival_ns.load()) << "rank " << comm.rank();
  });
}

TEST_F(NcclCommunicatorTest, EnqueuedAllToAllVCanBeAwaitedByAnotherStream) {
  OnEveryRank(group(), [](comm::NcclCommunicator& comm) {
    AllToAllCase test = MakeAllToAllCase(comm.rank(), comm.size());
    DeviceBuffer send(test.send.size()), recv(test.expected_recv.size());
    send.Upload(test.send.data());
    cudaStream_t compute = nullptr;
    ASSERT_EQ(cudaStreamCreateWithFlags(&compute, cudaStreamNonBlocking), cudaSuccess);
    // The compute stream produces the send buffer; communication waits for it on the GPU.
    cudaEvent_t produced = nullptr;
    ASSERT_EQ(cudaEventCreateWithFlags(&produced, cudaEventDisableTiming), cudaSuccess);
    ASSERT_EQ(cudaMemcpyAsync(send.as<void>(), test.send.data(), test.send.size(),
                              cudaMemcpyHostToDevice, compute),
              cudaSuccess);
    ASSERT_EQ(cudaEventRecord(produced, compute), cudaSuccess);
    ASSERT_TRUE(comm.WaitForEvent(produced).ok());
    ASSERT_TRUE(
        comm.EnqueueAllToAllV(send.as<void>(), test.send_bytes, recv.as<void>(), test.recv_bytes)
            .ok());
    auto completion = comm.RecordCompletion();
    ASSERT_TRUE(completion.ok()) << completion.status();
    // The compute stream consumes the received bytes after the exchange, without a host wait.
    ASSERT_TRUE(completion->MakeStreamWait(compute).ok());
    std::vector<uint8_t> consumed(test.expected_recv.size());
    ASSERT_EQ(cudaMemcpyAsync(consumed.data(), recv.as<void>(), consumed.size(),
                              cudaMemcpyDeviceToHost, compute),
              cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(compute), cudaSuccess);
    EXPECT_TRUE(completion->Ready());
    EXPECT_TRUE(completion->Wait().ok());
    EXPECT_EQ(consumed, test.expected_recv);
    cudaEventDestroy(produced);
    cudaStreamDestroy(compute);
  });
}

TEST_F(NcclCommunicatorTest, BadArgumentsAreRefusedWithoutFailingTheGroup) {
  OnEveryRank(group(), [](comm::NcclCommunicator& comm) {
    std::vector<int64_t> too_few(comm.size() + 1, 0);
    EXPECT_EQ(comm.AllToAllV(nullptr, too_few, nullptr, too_few).code(),
              absl::StatusCode::kInvalidArgument);
    int64_t value = 0;
    EXPECT_EQ(comm.Broadcast(&value, sizeof(value), comm.size()).code(),
              absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(comm.AllReduce(&value, -1, comm::ReduceOp::kSum).code(),
              absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(comm.healthy());
    EXPECT_TRUE(comm.Barrier().ok());
  });
}

// A bound on the CTAs of each collective (serving's --gpu-exchange-max-ctas) is NCCL's maxCTAs:
// a group made with one CTA per collective delivers the same bytes; bounds NCCL has no channels
// for are refused before any group forms.
TEST(NcclCommunicatorCtaBoundTest, AGroupBoundToOneCtaDeliversAndOutOfRangeBoundsAreRefused) {
  if (VisibleDeviceCount() < 1) GTEST_SKIP() << "no CUDA device visible";
  for (int refused : {-1, comm::kMaxCollectiveCtas + 1}) {
    comm::NcclCommunicatorOptions options;
    options.max_ctas = refused;
    auto created = comm::NcclCommunicator::CreateForDevices(AllDevices(), options);
    EXPECT_EQ(created.status().code(), absl::StatusCode::kInvalidArgument) << refused;
    EXPECT_NE(created.status().message().find("max_ctas"), std::string::npos) << created.status();
  }
  comm::NcclCommunicatorOptions options;
  options.timeout = std::chrono::seconds(60);
  options.max_ctas = 1;
  auto created = comm::NcclCommunicator::CreateForDevices(AllDevices(), options);
  ASSERT_TRUE(created.ok()) << created.status();
  Communicators group = std::move(*created);
  OnEveryRank(group, ExpectAllToAllVDelivers);
  comm::NcclCommunicator::DestroyAll(group);
}

// A group whose last rank never takes part: the others fail with UNAVAILABLE within the timeout
// and stay failed; nobody hangs.
TEST(NcclCommunicatorTimeoutTest, ARankThatNeverArrivesFailsTheOthersWithUnavailable) {
  if (VisibleDeviceCount() < 2) GTEST_SKIP() << "needs at least two CUDA devices";
  comm::NcclCommunicatorOptions options;
  options.timeout = std::chrono::seconds(3);
  auto created = comm::NcclCommunicator::CreateForDevices(AllDevices(), options);
  ASSERT_TRUE(created.ok()) << created.status();
  Communicators group = std::move(*created);
  const int absent = static_cast<int>(group.size()) - 1;
  OnEveryRank(group, [&](comm::NcclCommunicator& comm) {
    if (comm.rank() == absent) return;
    const auto start = std::chrono::steady_clock::now();
    std::vector<int64_t> values = {comm.rank()};
    const absl::Status status = comm.AllReduce(values.data(), 1, comm::ReduceOp::kSum);
    const auto elapsed = std::chrono::steady_clock::now() - start;
    EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable) << status;
    EXPECT_GE(elapsed, options.timeout - milliseconds(50));
    EXPECT_LT(elapsed, options.timeout + std::chrono::seconds(10));
    EXPECT_FALSE(comm.healthy());
    EXPECT_EQ(comm.Barrier().code(), absl::StatusCode::kUnavailable);
  });
  group[absent]->Abort();
  const auto start = std::chrono::steady_clock::now();
  comm::NcclCommunicator::DestroyAll(group);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(30));
}

std::string FreshPath(const std::string& name) {
  const char* directory = std::getenv("TEST_TMPDIR");
  std::string path = std::string(directory != nullptr ? directory : "/tmp") + "/moeserve-" + name +
                     "-" + std::to_string(getpid()) + "-" +
                     std::to_string(std::chrono::steady_clock::now().time_since_epoch().count());
  std::remove(path.c_str());
  return path;
}

// Every rank on its own thread, as separate processes would: rank 0 publishes the id in a file,
// the others read it.
TEST(NcclCommunicatorRendezvousTest, RanksFormAGroupThroughAnIdFile) {
  const int n = VisibleDeviceCount();
  if (n < 1) GTEST_SKIP() << "no CUDA device visible";
  const std::string path = FreshPath("nccl-id");
  Communicators group(n);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < n; ++rank) {
    threads.emplace_back([&, rank] {
      // Rank 0 starts last, so the others really wait for the file.
      if (rank == 0) std::this_thread::sleep_for(milliseconds(200));
      comm::NcclCommunicatorOptions options;
      options.timeout = std::chrono::seconds(60);
      auto made = comm::CreateNcclCommunicatorWithIdFile(rank, n, rank, path, options);
      ASSERT_TRUE(made.ok()) << made.status();
      group[rank] = std::move(*made);
    });
  }
  for (auto& thread : threads) thread.join();
  for (auto& communicator : group) ASSERT_NE(communicator, nullptr);
  OnEveryRank(group, [n](comm::NcclCommunicator& comm) {
    int64_t rank_sum = comm.rank();
    ASSERT_TRUE(comm.AllReduce(&rank_sum, 1, comm::ReduceOp::kSum).ok());
    EXPECT_EQ(rank_sum, n * (n - 1) / 2);
  });
  comm::NcclCommunicator::DestroyAll(group);
  std::remove(path.c_str());
}

// No GPU needed below.

TEST(NcclUniqueIdTest, HexEncodingRoundTrips) {
  ncclUniqueId id{};
  for (size_t i = 0; i < sizeof(id.internal); ++i) id.internal[i] = static_cast<char>(i * 37);
  const std::string hex = comm::EncodeNcclUniqueId(id);
  EXPECT_EQ(hex.size(), 2 * sizeof(id.internal));
  auto decoded = comm::DecodeNcclUniqueId(hex);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(std::string(decoded->internal, sizeof(id.internal)),
            std::string(id.internal, sizeof(id.internal)));
  EXPECT_EQ(comm::DecodeNcclUniqueId("abc").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(comm::DecodeNcclUniqueId(std::string(hex.size(), 'g')).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(NcclUniqueIdTest, IdFileIsWrittenWholeAndReadBack) {
  const std::string path = FreshPath("nccl-id-file");
  ncclUniqueId id{};
  for (size_t i = 0; i < sizeof(id.internal); ++i) id.internal[i] = static_cast<char>(255 - i);
  std::thread reader_started_first([&] {
    auto read = comm::ReadNcclUniqueIdFile(path, std::chrono::seconds(10));
    ASSERT_TRUE(read.ok()) << read.status();
    EXPECT_EQ(std::string(read->internal, sizeof(id.internal)),
              std::string(id.internal, sizeof(id.internal)));
  });
  std::this_thread::sleep_for(milliseconds(100));
  ASSERT_TRUE(comm::WriteNcclUniqueIdFile(path, id).ok());
  reader_started_first.join();
  std::remove(path.c_str());
}

TEST(NcclUniqueIdTest, ReadingAMissingIdFileTimesOut) {
  const auto start = std::chrono::steady_clock::now();
  auto read = comm::ReadNcclUniqueIdFile(FreshPath("never-written"), milliseconds(150));
  EXPECT_EQ(read.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_GE(std::chrono::steady_clock::now() - start, milliseconds(150));
}

TEST(NcclUniqueIdTest, CreateFromEnvironmentNamesTheMissingVariable) {
  unsetenv(comm::kRankEnv);
  auto made = comm::CreateNcclCommunicatorFromEnvironment();
  ASSERT_FALSE(made.ok());
  EXPECT_EQ(made.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(made.status().message().find(comm::kRankEnv), std::string::npos) << made.status();
}

}  // namespace
}  // namespace moeserve::engine::parallel
