// GlooCommunicatorGroup: ranks that meet through a key-value store and exchange over Gloo's TCP
// transport on loopback. Each rank here is a thread with its own group, as each would be a
// process. Expected values are computed in the test (byte patterns, sums); the failure cases
// check that a missing rank fails formation after the timeout and that a peer whose
// connections close fails the others' collectives at once, not at the timeout.
#include "engine/comm/gloo_communicator.h"

#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <thread>
#include <vector>

#include "engine/comm/gloo_store.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moeserve::engine::comm {
namespace {

using ::testing::HasSubstr;

// The rendezvous of a test: a map every rank thread shares.
class MapStore : public KeyValueStore {
 public:
  absl::Status Set(const std::string& key, const std::string& value) override {
    std::lock_guard lock(mutex_);
    values_[key] = value;
    changed_.notify_all();
    return absl::OkStatus();
  }
  absl::StatusOr<std::string> Get(const std::string& key,
                                  std::chrono::milliseconds timeout) override {
    std::unique_lock lock(mutex_);
    if (!changed_.wait_for(lock, timeout, [&] { return values_.count(key) > 0; })) {
      return absl::DeadlineExceededError("no " + key + " in the store");
    }
    return values_[key];
  }

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
  std::map<std::string, std::string> values_;
};

std::unique_ptr<GlooCommunicatorGroup> Join(std::shared_ptr<KeyValueStore> store, int rank,
                                            int size, std::chrono::milliseconds timeout,
                                            const std::string& prefix,
                                            absl::Status* status = nullptr) {
  GlooGroupOptions options;
  options.rank = rank;
  options.size = size;
  options.timeout = timeout;
  options.key_prefix = prefix;
  auto group = GlooCommunicatorGroup::Create(std::make_shared<GlooStore>(store, timeout), options);
  if (status != nullptr) *status = group.status();
  return group.ok() ? std::move(*group) : nullptr;
}

// What rank `from` sends to rank `to`: uneven sizes, some empty.
std::vector<uint8_t> Message(int from, int to) {
  return std::vector<uint8_t>(((from + 2 * to) % 3) * (5 + from + to),
                              static_cast<uint8_t>(from * 16 + to));
}

TEST(GlooCommunicator, EveryCollectiveDeliversOnBothChannels) {
  constexpr int kSize = 3;
  auto store = std::make_shared<MapStore>();
  std::vector<std::thread> threads;
  std::vector<absl::Status> statuses(kSize);
  for (int rank = 0; rank < kSize; ++rank) {
    threads.emplace_back([&, rank] {
      auto group = Join(store, rank, kSize, std::chrono::seconds(20), "collectives");
      ASSERT_NE(group, nullptr);
      EXPECT_EQ(group->local_ranks(), std::vector<int>{rank});
      // The two channels run at once, as the compute and communication threads do.
      std::thread other([&] {
        Communicator& comm = group->communicator(rank, 1);
        for (int i = 0; i < 20; ++i) {
          int64_t value = rank + i;
          statuses[rank].Update(comm.AllReduce(&value, 1, ReduceOp::kSum));
          EXPECT_EQ(value, 3 + 3 * i);
        }
      });
      Communicator& comm = group->communicator(rank, 0);
      EXPECT_EQ(comm.rank(), rank);
      EXPECT_EQ(comm.size(), kSize);
      std::vector<uint8_t> send;
      std::vector<int64_t> send_bytes(kSize), recv_bytes(kSize);
      std::vector<uint8_t> expected;
      for (int to = 0; to < kSize; ++to) {
        std::vector<uint8_t> m = Message(rank, to);
        send.insert(send.end(), m.begin(), m.end());
        send_bytes[to] = static_cast<int64_t>(m.size());
        std::vector<uint8_t> in = Message(to, rank);
        recv_bytes[to] = static_cast<int64_t>(in.size());
        expected.insert(expected.end(), in.begin(), in.end());
      }
      std::vector<uint8_t> recv(expected.size());
      statuses[rank].Update(comm.AllToAllV(send.data(), send_bytes, recv.data(), recv_bytes));
      EXPECT_EQ(recv, expected);

      int64_t ints[3] = {rank, -rank, 10 * rank};
      statuses[rank].Update(comm.AllReduce(ints, 3, ReduceOp::kMax));
      EXPECT_EQ(ints[0], 2);
      EXPECT_EQ(ints[1], 0);
      EXPECT_EQ(ints[2], 20);
      int64_t minimum = rank + 5;
      statuses[rank].Update(comm.AllReduce(&minimum, 1, ReduceOp::kMin));
      EXPECT_EQ(minimum, 5);
      float floats[2] = {0.5f * rank, 1.0f};
      statuses[rank].Update(comm.AllReduce(floats, 2, ReduceOp::kSum));
      EXPECT_FLOAT_EQ(floats[0], 1.5f);
      EXPECT_FLOAT_EQ(floats[1], 3.0f);

      const int32_t mine[2] = {rank, rank * rank};
      std::vector<int32_t> all(2 * kSize);
      statuses[rank].Update(comm.AllGather(mine, sizeof(mine), all.data()));
      EXPECT_THAT(all, ::testing::ElementsAre(0, 0, 1, 1, 2, 4));

      std::vector<int64_t> data(4, rank == 1 ? 42 : -1);
      statuses[rank].Update(comm.Broadcast(data.data(), data.size() * sizeof(int64_t), 1));
      EXPECT_EQ(data, std::vector<int64_t>(4, 42));
      statuses[rank].Update(comm.Barrier());
      statuses[rank].Update(
          comm.AllToAllCounts(std::vector<int64_t>{rank, rank, rank}, std::span<int64_t>(ints, 3)));
      EXPECT_EQ(ints[2], 2);
      other.join();
    });
  }
  for (auto& thread : threads) thread.join();
  for (int rank = 0; rank < kSize; ++rank) EXPECT_TRUE(statuses[rank].ok()) << statuses[rank];
}

TEST(GlooCommunicator, ARankWhosePeersNeverComeFailsAfterItsTimeout) {
  auto store = std::make_shared<MapStore>();
  absl::Status status;
  const auto start = std::chrono::steady_clock::now();
  auto group = Join(store, 0, 2, std::chrono::milliseconds(800), "lonely", &status);
  EXPECT_EQ(group, nullptr);
  EXPECT_EQ(status.code(), absl::StatusCode::kDeadlineExceeded) << status;
  EXPECT_THAT(status.message(), HasSubstr("did not form within 800 ms"));
  EXPECT_GE(std::chrono::steady_clock::now() - start, std::chrono::milliseconds(700));
}

TEST(GlooCommunicator, APeerThatGoesAwayFailsTheOthersAtOnce) {
  constexpr int kSize = 3;
  const auto timeout = std::chrono::seconds(60);
  auto store = std::make_shared<MapStore>();
  std::vector<absl::Status> statuses(kSize);
  std::vector<std::chrono::steady_clock::duration> took(kSize);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < kSize; ++rank) {
    threads.emplace_back([&, rank] {
      auto group = Join(store, rank, kSize, timeout, "departure");
      ASSERT_NE(group, nullptr);
      int64_t value = 1;
      ASSERT_TRUE(group->communicator(rank, 0).AllReduce(&value, 1, ReduceOp::kSum).ok());
      if (rank == 2) {
        group.reset();  // its process ends: the connections close
        return;
      }
      const auto start = std::chrono::steady_clock::now();
      statuses[rank] = group->communicator(rank, 0).AllReduce(&value, 1, ReduceOp::kSum);
      took[rank] = std::chrono::steady_clock::now() - start;
      // Once failed, the channel stays failed.
      EXPECT_FALSE(group->communicator(rank, 0).Barrier().ok());
    });
  }
  for (auto& thread : threads) thread.join();
  for (int rank = 0; rank < 2; ++rank) {
    EXPECT_EQ(statuses[rank].code(), absl::StatusCode::kUnavailable) << statuses[rank];
    EXPECT_LT(took[rank], timeout / 4) << "rank " << rank << " waited for the timeout";
  }
}

TEST(GlooCommunicator, AbortFailsLaterCollectives) {
  constexpr int kSize = 2;
  auto store = std::make_shared<MapStore>();
  std::vector<std::thread> threads;
  for (int rank = 0; rank < kSize; ++rank) {
    threads.emplace_back([&, rank] {
      auto group = Join(store, rank, kSize, std::chrono::seconds(20), "abort");
      ASSERT_NE(group, nullptr);
      group->Abort();
      int64_t value = 1;
      EXPECT_EQ(group->communicator(rank, 0).AllReduce(&value, 1, ReduceOp::kSum).code(),
                absl::StatusCode::kUnavailable);
    });
  }
  for (auto& thread : threads) thread.join();
}

}  // namespace
}  // namespace moeserve::engine::comm
