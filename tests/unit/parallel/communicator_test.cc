// InProcessGroup / InProcessCommunicator: every collective with 1, 2, 3 and 8 rank threads.
// Each rank's expected result is computed here from the byte patterns and values every rank
// contributes (a pure function of sender, receiver and index), never by the communicator.
// Also: many collectives back to back, two channels driven concurrently, a missing rank (the
// others fail with UNAVAILABLE after the group's timeout instead of hanging), Abort(), and
// mismatched byte counts (an error, not a crash).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "engine/comm/in_process_communicator.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moeserve::engine::parallel {
namespace {

using ::testing::HasSubstr;
using Clock = std::chrono::steady_clock;

// Runs body(rank) on one thread per rank and joins them all.
void RunRanks(int size, const std::function<void(int)>& body) {
  std::vector<std::thread> threads;
  for (int rank = 0; rank < size; ++rank) threads.emplace_back(body, rank);
  for (auto& thread : threads) thread.join();
}

// The i-th byte that `sender` sends to `receiver` (distinct for every pair and position).
uint8_t PatternByte(int sender, int receiver, int64_t i, int salt = 0) {
  return static_cast<uint8_t>((sender * 131 + receiver * 29 + i * 7 + salt * 13 + 1) & 0xff);
}

// bytes[sender][receiver] for the all-to-all-v cases.
using ByteMatrix = std::vector<std::vector<int64_t>>;

// Every rank sends bytes[rank][p] pattern bytes to each p and checks what it receives against
// the pattern of each sender, in rank order.
void CheckAllToAllV(int size, const ByteMatrix& bytes, int salt = 0) {
  comm::InProcessGroup group(size, 1, std::chrono::seconds(20));
  std::vector<std::string> failures(size);
  RunRanks(size, [&](int rank) {
    comm::Communicator& comm = group.communicator(rank);
    std::vector<int64_t> send_bytes(bytes[rank]);
    std::vector<int64_t> recv_bytes(size);
    for (int p = 0; p < size; ++p) recv_bytes[p] = bytes[p][rank];
    std::vector<uint8_t> send;
    for (int p = 0; p < size; ++p) {
      for (int64_t i = 0; i < send_bytes[p]; ++i) send.push_back(PatternByte(rank, p, i, salt));
    }
    std::vector<uint8_t> expected;
    for (int p = 0; p < size; ++p) {
      for (int64_t i = 0; i < recv_bytes[p]; ++i) expected.push_back(PatternByte(p, rank, i, salt));
    }
    // A guard byte after the received data must stay untouched.
    std::vector<uint8_t> recv(expected.size() + 1, 0xAB);
    absl::Status status = comm.AllToAllV(send.data(), send_bytes, recv.data(), recv_bytes);
    if (!status.ok()) {
      failures[rank] = status.ToString();
      return;
    }
    if (recv.back() != 0xAB) failures[rank] = "wrote past the received bytes";
    recv.pop_back();
    if (recv != expected) failures[rank] = "received bytes differ from the senders' patterns";
  });
  for (int rank = 0; rank < size; ++rank) {
    EXPECT_EQ(failures[rank], "") << "rank " << rank << " of " << size;
  }
}

class CommunicatorSizeTest : public ::testing::TestWithParam<int> {};

TEST_P(CommunicatorSizeTest, AllToAllVUnevenSizes) {
  const int size = GetParam();
  ByteMatrix bytes(size, std::vector<int64_t>(size));
  for (int s = 0; s < size; ++s) {
    for (int r = 0; r < size; ++r) bytes[s][r] = 1 + (s * 7 + r * 3) % 11;  // 1..11, odd lengths
  }
  CheckAllToAllV(size, bytes);
}

TEST_P(CommunicatorSizeTest, AllToAllVWithZeroSizes) {
  const int size = GetParam();
  // Rank 0 sends nothing; nobody sends to the last rank; everyone else sends to itself only
  // when its rank is odd.
  ByteMatrix bytes(size, std::vector<int64_t>(size));
  for (int s = 0; s < size; ++s) {
    for (int r = 0; r < size; ++r) {
      if (s == 0 || r == size - 1) {
        bytes[s][r] = 0;
      } else if (s == r) {
        bytes[s][r] = s % 2 == 1 ? 5 : 0;
      } else {
        bytes[s][r] = 3 * s + r;
      }
    }
  }
  CheckAllToAllV(size, bytes);
  // And every rank sends nothing at all.
  CheckAllToAllV(size, ByteMatrix(size, std::vector<int64_t>(size, 0)));
}

TEST_P(CommunicatorSizeTest, AllToAllVRandomSizes) {
  const int size = GetParam();
  std::mt19937 random(1234 + size);
  std::uniform_int_distribution<int64_t> length(0, 300);
  for (int trial = 0; trial < 5; ++trial) {
    ByteMatrix bytes(size, std::vector<int64_t>(size));
    for (auto& row : bytes) {
      for (auto& b : row) b = length(random) % 4 == 0 ? 0 : length(random);
    }
    CheckAllToAllV(size, bytes, trial);
  }
}

TEST_P(CommunicatorSizeTest, AllToAllCountsTransposes) {
  const int size = GetParam();
  comm::InProcessGroup group(size, 1, std::chrono::seconds(20));
  std::vector<std::vector<int64_t>> received(size, std::vector<int64_t>(size, -1));
  std::vector<absl::Status> statuses(size);
  RunRanks(size, [&](int rank) {
    std::vector<int64_t> send(size);
    for (int p = 0; p < size; ++p) send[p] = 1000 * rank + p;
    statuses[rank] = group.communicator(rank).AllToAllCounts(send, received[rank]);
  });
  for (int rank = 0; rank < size; ++rank) {
    ASSERT_TRUE(statuses[rank].ok()) << statuses[rank];
    for (int p = 0; p < size; ++p) EXPECT_EQ(received[rank][p], 1000 * p + rank);
  }
}

TEST_P(CommunicatorSizeTest, AllReduceInt64SumMaxMin) {
  const int size = GetParam();
  constexpr int kCount = 5;
  // Rank r contributes value(r, i); the expected results are computed over r directly.
  auto value = [](int r, int i) -> int64_t {
    return (i % 2 == 0 ? 1 : -1) * (int64_t{1} << 40) + r * 17 - i * 1000 + (r % 3) * i;
  };
  for (comm::ReduceOp op : {comm::ReduceOp::kSum, comm::ReduceOp::kMax, comm::ReduceOp::kMin}) {
    comm::InProcessGroup group(size, 1, std::chrono::seconds(20));
    std::vector<std::vector<int64_t>> results(size, std::vector<int64_t>(kCount));
    std::vector<absl::Status> statuses(size);
    RunRanks(size, [&](int rank) {
      for (int i = 0; i < kCount; ++i) results[rank][i] = value(rank, i);
      statuses[rank] = group.communicator(rank).AllReduce(results[rank].data(), kCount, op);
    });
    std::vector<int64_t> expected(kCount);
    for (int i = 0; i < kCount; ++i) {
      int64_t sum = 0, max = std::numeric_limits<int64_t>::min(),
              min = std::numeric_limits<int64_t>::max();
      for (int r = 0; r < size; ++r) {
        sum += value(r, i);
        max = std::max(max, value(r, i));
        min = std::min(min, value(r, i));
      }
      expected[i] = op == comm::ReduceOp::kSum ? sum : op == comm::ReduceOp::kMax ? max : min;
    }
    for (int rank = 0; rank < size; ++rank) {
      ASSERT_TRUE(statuses[rank].ok()) << statuses[rank];
      EXPECT_EQ(results[rank], expected) << "rank " << rank << " op " << static_cast<int>(op);
    }
  }
}

TEST_P(CommunicatorSizeTest, AllReduceFloatSumMaxMinIdenticalOnAllRanks) {
  const int size = GetParam();
  constexpr int kCount = 7;
  auto value = [](int r, int i) -> float {
    return static_cast<float>(std::sin(0.7 * r + 1.3 * i) * 1000.0 + 1e-3 * (r + 1));
  };
  for (comm::ReduceOp op : {comm::ReduceOp::kSum, comm::ReduceOp::kMax, comm::ReduceOp::kMin}) {
    comm::InProcessGroup group(size, 1, std::chrono::seconds(20));
    std::vector<std::vector<float>> results(size, std::vector<float>(kCount));
    std::vector<absl::Status> statuses(size);
    RunRanks(size, [&](int rank) {
      for (int i = 0; i < kCount; ++i) results[rank][i] = value(rank, i);
      statuses[rank] = group.communicator(rank).AllReduce(results[rank].data(), kCount, op);
    });
    for (int rank = 0; rank < size; ++rank) ASSERT_TRUE(statuses[rank].ok()) << statuses[rank];
    for (int i = 0; i < kCount; ++i) {
      double sum = 0;
      float max = -std::numeric_limits<float>::infinity();
      float min = std::numeric_limits<float>::infinity();
      for (int r = 0; r < size; ++r) {
        sum += value(r, i);
        max = std::max(max, value(r, i));
        min = std::min(min, value(r, i));
      }
      if (op == comm::ReduceOp::kSum) {
        EXPECT_NEAR(results[0][i], sum, 1e-6 * size * 1000) << "element " << i;
      } else {
        EXPECT_EQ(results[0][i], op == comm::ReduceOp::kMax ? max : min) << "element " << i;
      }
    }
    // Every rank must hold bit-identical results (ranks take decisions from them).
    for (int rank = 1; rank < size; ++rank) {
      EXPECT_EQ(std::memcmp(results[rank].data(), results[0].data(), kCount * sizeof(float)), 0)
          << "rank " << rank << " differs from rank 0, op " << static_cast<int>(op);
    }
  }
}

TEST_P(CommunicatorSizeTest, AllGatherInRankOrder) {
  const int size = GetParam();
  constexpr int64_t kBytes = 13;
  comm::InProcessGroup group(size, 1, std::chrono::seconds(20));
  std::vector<std::vector<uint8_t>> received(size);
  std::vector<absl::Status> statuses(size);
  RunRanks(size, [&](int rank) {
    std::vector<uint8_t> send(kBytes);
    for (int64_t i = 0; i < kBytes; ++i) send[i] = PatternByte(rank, -1, i);
    received[rank].assign(size * kBytes, 0);
    statuses[rank] = group.communicator(rank).AllGather(send.data(), kBytes, received[rank].data());
  });
  std::vector<uint8_t> expected;
  for (int r = 0; r < size; ++r) {
    for (int64_t i = 0; i < kBytes; ++i) expected.push_back(PatternByte(r, -1, i));
  }
  for (int rank = 0; rank < size; ++rank) {
    ASSERT_TRUE(statuses[rank].ok()) << statuses[rank];
    EXPECT_EQ(received[rank], expected) << "rank " << rank;
  }
}

TEST_P(CommunicatorSizeTest, BroadcastFromEveryRoot) {
  const int size = GetParam();
  constexpr int64_t kBytes = 21;
  comm::InProcessGroup group(size, 1, std::chrono::seconds(20));
  // The last root first, so a non-zero root is exercised before root 0 (for size > 1).
  for (int root = size - 1; root >= 0; --root) {
    std::vector<std::vector<uint8_t>> data(size);
    std::vector<absl::Status> statuses(size);
    RunRanks(size, [&](int rank) {
      data[rank].resize(kBytes);
      for (int64_t i = 0; i < kBytes; ++i) data[rank][i] = PatternByte(rank, root, i);
      statuses[rank] = group.communicator(rank).Broadcast(data[rank].data(), kBytes, root);
    });
    std::vector<uint8_t> expected(kBytes);
    for (int64_t i = 0; i < kBytes; ++i) expected[i] = PatternByte(root, root, i);
    for (int rank = 0; rank < size; ++rank) {
      ASSERT_TRUE(statuses[rank].ok()) << statuses[rank];
      EXPECT_EQ(data[rank], expected) << "rank " << rank << " root " << root;
    }
  }
}

TEST_P(CommunicatorSizeTest, BarrierHoldsEveryRankUntilTheLastArrives) {
  const int size = GetParam();
  comm::InProcessGroup group(size, 1, std::chrono::seconds(20));
  std::atomic<int> arrived{0};
  std::vector<int> seen_after(size, -1);
  std::vector<absl::Status> statuses(size);
  RunRanks(size, [&](int rank) {
    // The last rank is late: nobody may leave the barrier before it arrived.
    if (rank == size - 1) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    arrived.fetch_add(1);
    statuses[rank] = group.communicator(rank).Barrier();
    seen_after[rank] = arrived.load();
  });
  for (int rank = 0; rank < size; ++rank) {
    ASSERT_TRUE(statuses[rank].ok()) << statuses[rank];
    EXPECT_EQ(seen_after[rank], size) << "rank " << rank << " left the barrier early";
  }
}

TEST_P(CommunicatorSizeTest, HundredsOfMixedCollectivesBackToBack) {
  const int size = GetParam();
  constexpr int kIterations = 250;
  comm::InProcessGroup group(size, 1, std::chrono::seconds(20));
  std::vector<std::string> failures(size);
  RunRanks(size, [&](int rank) {
    comm::Communicator& comm = group.communicator(rank);
    auto fail = [&](const std::string& what, int iteration) {
      if (failures[rank].empty())
        failures[rank] = what + " at iteration " + std::to_string(iteration);
    };
    for (int it = 0; it < kIterations && failures[rank].empty(); ++it) {
      // All-reduce: sum of (r + 1) * it over ranks, and the max rank.
      int64_t values[2] = {static_cast<int64_t>(rank + 1) * it, rank};
      if (!comm.AllReduce(values, 1, comm::ReduceOp::kSum).ok() ||
          !comm.AllReduce(values + 1, 1, comm::ReduceOp::kMax).ok()) {
        fail("all-reduce failed", it);
        break;
      }
      if (values[0] != static_cast<int64_t>(size) * (size + 1) / 2 * it || values[1] != size - 1) {
        fail("wrong all-reduce result", it);
      }
      // All-to-all-v with sizes depending on the iteration.
      std::vector<int64_t> send_bytes(size), recv_bytes(size);
      std::vector<uint8_t> send, expected;
      for (int p = 0; p < size; ++p) {
        send_bytes[p] = (rank + 2 * p + it) % 5;
        recv_bytes[p] = (p + 2 * rank + it) % 5;
        for (int64_t i = 0; i < send_bytes[p]; ++i) send.push_back(PatternByte(rank, p, i, it));
        for (int64_t i = 0; i < recv_bytes[p]; ++i) expected.push_back(PatternByte(p, rank, i, it));
      }
      std::vector<uint8_t> recv(expected.size());
      if (!comm.AllToAllV(send.data(), send_bytes, recv.data(), recv_bytes).ok()) {
        fail("all-to-all-v failed", it);
        break;
      }
      if (recv != expected) fail("wrong all-to-all-v bytes", it);
      // Broadcast from a root that moves every iteration.
      int64_t word = rank == it % size ? 7919 * it + 1 : -1;
      if (!comm.Broadcast(&word, sizeof(word), it % size).ok()) {
        fail("broadcast failed", it);
        break;
      }
      if (word != 7919 * it + 1) fail("wrong broadcast value", it);
      // All-gather of (rank, it).
      int32_t mine[2] = {rank, it};
      std::vector<int32_t> all(2 * size);
      if (!comm.AllGather(mine, sizeof(mine), all.data()).ok()) {
        fail("all-gather failed", it);
        break;
      }
      for (int p = 0; p < size; ++p) {
        if (all[2 * p] != p || all[2 * p + 1] != it) fail("wrong all-gather value", it);
      }
      if (!comm.Barrier().ok()) {
        fail("barrier failed", it);
        break;
      }
    }
  });
  for (int rank = 0; rank < size; ++rank) EXPECT_EQ(failures[rank], "") << "rank " << rank;
}

TEST_P(CommunicatorSizeTest, TwoChannelsUsedConcurrentlyDoNotInterfere) {
  const int size = GetParam();
  constexpr int kIterations = 200;
  comm::InProcessGroup group(size, 2, std::chrono::seconds(20));
  std::vector<std::string> failures(2 * size);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < size; ++rank) {
    // Channel 0: all-reduce sums. Channel 1: all-to-all-v of patterns and all-gathers.
    threads.emplace_back([&, rank] {
      comm::Communicator& comm = group.communicator(rank, 0);
      for (int it = 0; it < kIterations; ++it) {
        int64_t value = (rank + 1) * 1000 + it;
        if (!comm.AllReduce(&value, 1, comm::ReduceOp::kSum).ok()) {
          failures[2 * rank] = "channel 0 all-reduce failed";
          return;
        }
        const int64_t expected = 1000LL * size * (size + 1) / 2 + static_cast<int64_t>(size) * it;
        if (value != expected) {
          failures[2 * rank] = "channel 0 wrong sum at iteration " + std::to_string(it);
          return;
        }
      }
    });
    threads.emplace_back([&, rank] {
      comm::Communicator& comm = group.communicator(rank, 1);
      EXPECT_EQ(comm.rank(), rank);
      EXPECT_EQ(comm.size(), size);
      for (int it = 0; it < kIterations; ++it) {
        std::vector<int64_t> send_bytes(size), recv_bytes(size);
        std::vector<uint8_t> send, expected;
        for (int p = 0; p < size; ++p) {
          send_bytes[p] = 1 + (rank * 3 + p + it) % 9;
          recv_bytes[p] = 1 + (p * 3 + rank + it) % 9;
          for (int64_t i = 0; i < send_bytes[p]; ++i) send.push_back(PatternByte(rank, p, i, it));
          for (int64_t i = 0; i < recv_bytes[p]; ++i) {
            expected.push_back(PatternByte(p, rank, i, it));
          }
        }
        std::vector<uint8_t> recv(expected.size());
        if (!comm.AllToAllV(send.data(), send_bytes, recv.data(), recv_bytes).ok()) {
          failures[2 * rank + 1] = "channel 1 all-to-all-v failed";
          return;
        }
        if (recv != expected) {
          failures[2 * rank + 1] = "channel 1 wrong bytes at iteration " + std::to_string(it);
          return;
        }
        int64_t mine = rank * 100 + it;
        std::vector<int64_t> all(size);
        if (!comm.AllGather(&mine, sizeof(mine), all.data()).ok()) {
          failures[2 * rank + 1] = "channel 1 all-gather failed";
          return;
        }
        for (int p = 0; p < size; ++p) {
          if (all[p] != p * 100 + it) {
            failures[2 * rank + 1] = "channel 1 wrong gather at iteration " + std::to_string(it);
            return;
          }
        }
      }
    });
  }
  for (auto& thread : threads) thread.join();
  for (size_t i = 0; i < failures.size(); ++i) {
    EXPECT_EQ(failures[i], "") << "rank " << i / 2 << " channel " << i % 2;
  }
}

TEST_P(CommunicatorSizeTest, CommunicatorsReportRankAndSize) {
  const int size = GetParam();
  comm::InProcessGroup group(size, 3);
  EXPECT_EQ(group.size(), size);
  for (int channel = 0; channel < 3; ++channel) {
    for (int rank = 0; rank < size; ++rank) {
      EXPECT_EQ(group.communicator(rank, channel).rank(), rank);
      EXPECT_EQ(group.communicator(rank, channel).size(), size);
    }
  }
  // Distinct objects per (rank, channel).
  if (size > 1) {
    EXPECT_NE(&group.communicator(0, 0), &group.communicator(1, 0));
  }
  EXPECT_NE(&group.communicator(0, 0), &group.communicator(0, 1));
}

INSTANTIATE_TEST_SUITE_P(Sizes, CommunicatorSizeTest, ::testing::Values(1, 2, 3, 8),
                         [](const auto& info) { return "ranks" + std::to_string(info.param); });

// --- Failure behaviour --------------------------------------------------------------------------

// A rank that never arrives: the others fail with UNAVAILABLE shortly after the timeout.
TEST(InProcessCommunicatorFailureTest, MissingRankMakesOthersFailWithUnavailable) {
  constexpr int kSize = 3;
  const auto timeout = std::chrono::milliseconds(200);
  comm::InProcessGroup group(kSize, 1, timeout);
  std::vector<absl::Status> statuses(kSize);
  std::vector<double> seconds(kSize, 0);
  // Rank 2 never calls.
  std::vector<std::thread> threads;
  for (int rank = 0; rank < 2; ++rank) {
    threads.emplace_back([&, rank] {
      const auto start = Clock::now();
      int64_t value = 1;
      statuses[rank] = group.communicator(rank).AllReduce(&value, 1, comm::ReduceOp::kSum);
      seconds[rank] = std::chrono::duration<double>(Clock::now() - start).count();
    });
  }
  for (auto& thread : threads) thread.join();
  for (int rank = 0; rank < 2; ++rank) {
    EXPECT_EQ(statuses[rank].code(), absl::StatusCode::kUnavailable) << statuses[rank];
    EXPECT_GE(seconds[rank], 0.15) << "rank " << rank << " gave up before the timeout";
    EXPECT_LT(seconds[rank], 5.0) << "rank " << rank << " waited far past the 200 ms timeout";
  }
  // The group stays failed: a later collective fails at once instead of waiting again.
  const auto start = Clock::now();
  EXPECT_EQ(group.communicator(2).Barrier().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(group.communicator(0).Barrier().code(), absl::StatusCode::kUnavailable);
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - start).count(), 0.15);
}

TEST(InProcessCommunicatorFailureTest, MissingRankInAllToAllVFailsWithUnavailable) {
  constexpr int kSize = 2;
  comm::InProcessGroup group(kSize, 1, std::chrono::milliseconds(200));
  std::vector<int64_t> bytes = {4, 4};
  std::vector<uint8_t> send(8, 1), recv(8, 0);
  const auto start = Clock::now();
  absl::Status status = group.communicator(0).AllToAllV(send.data(), bytes, recv.data(), bytes);
  EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable) << status;
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - start).count(), 5.0);
}

TEST(InProcessCommunicatorFailureTest, EveryCollectiveFailsAfterAbort) {
  constexpr int kSize = 2;
  comm::InProcessGroup group(kSize, 2);  // the default, long timeout: no collective may wait on it
  group.Abort();
  const auto start = Clock::now();
  for (int channel = 0; channel < 2; ++channel) {
    for (int rank = 0; rank < kSize; ++rank) {
      comm::Communicator& comm = group.communicator(rank, channel);
      int64_t ints[2] = {1, 2};
      float floats[2] = {1, 2};
      std::vector<int64_t> bytes = {8, 8};
      std::vector<uint8_t> send(16, 1), recv(16, 0);
      std::vector<int64_t> counts_send = {1, 2}, counts_recv(2);
      EXPECT_EQ(comm.AllReduce(ints, 2, comm::ReduceOp::kSum).code(),
                absl::StatusCode::kUnavailable);
      EXPECT_EQ(comm.AllReduce(floats, 2, comm::ReduceOp::kMax).code(),
                absl::StatusCode::kUnavailable);
      EXPECT_EQ(comm.AllToAllV(send.data(), bytes, recv.data(), bytes).code(),
                absl::StatusCode::kUnavailable);
      EXPECT_EQ(comm.AllToAllCounts(counts_send, counts_recv).code(),
                absl::StatusCode::kUnavailable);
      EXPECT_EQ(comm.AllGather(send.data(), 8, recv.data()).code(), absl::StatusCode::kUnavailable);
      EXPECT_EQ(comm.Broadcast(send.data(), 8, 1).code(), absl::StatusCode::kUnavailable);
      EXPECT_EQ(comm.Barrier().code(), absl::StatusCode::kUnavailable);
      // Failed collectives leave the caller's buffers alone.
      EXPECT_EQ(ints[0], 1);
      EXPECT_EQ(ints[1], 2);
    }
  }
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - start).count(), 1.0);
}

TEST(InProcessCommunicatorFailureTest, AbortWakesARankWaitingInACollective) {
  comm::InProcessGroup group(2, 1);  // long default timeout: only Abort can end the wait
  absl::Status status;
  const auto start = Clock::now();
  std::thread waiter([&] { status = group.communicator(0).Barrier(); });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  group.Abort();
  waiter.join();
  EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable) << status;
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - start).count(), 5.0);
}

TEST(InProcessCommunicatorFailureTest, MismatchedByteCountsGiveAnErrorNotACrash) {
  constexpr int kSize = 2;
  comm::InProcessGroup group(kSize, 1, std::chrono::seconds(20));
  std::vector<absl::Status> statuses(kSize);
  std::vector<std::vector<uint8_t>> recv(kSize);
  RunRanks(kSize, [&](int rank) {
    // Rank 0 sends 64 bytes to rank 1, which expects only 4 (and would overflow if the
    // communicator trusted the sender).
    std::vector<int64_t> send_bytes =
        rank == 0 ? std::vector<int64_t>{2, 64} : std::vector<int64_t>{2, 2};
    std::vector<int64_t> recv_bytes =
        rank == 0 ? std::vector<int64_t>{2, 2} : std::vector<int64_t>{4, 2};
    std::vector<uint8_t> send(send_bytes[0] + send_bytes[1], static_cast<uint8_t>(rank + 1));
    recv[rank].assign(recv_bytes[0] + recv_bytes[1] + 64, 0);
    statuses[rank] =
        group.communicator(rank).AllToAllV(send.data(), send_bytes, recv[rank].data(), recv_bytes);
  });
  EXPECT_TRUE(statuses[0].ok()) << statuses[0];
  EXPECT_FALSE(statuses[1].ok());
  EXPECT_THAT(std::string(statuses[1].message()), HasSubstr("rank 0 sends 64 bytes to rank 1"));
  // Nothing was written past what rank 1 expected.
  for (size_t i = 6; i < recv[1].size(); ++i) ASSERT_EQ(recv[1][i], 0) << "byte " << i;
}

TEST(InProcessCommunicatorFailureTest, CountVectorsOfTheWrongLengthAreRejected) {
  comm::InProcessGroup group(3, 1, std::chrono::seconds(20));
  std::vector<int64_t> two = {1, 1}, three = {1, 1, 1};
  std::vector<uint8_t> send(3), recv(3);
  // Rejected before the collective starts, so the rank does not wait for the others.
  EXPECT_EQ(group.communicator(0).AllToAllV(send.data(), two, recv.data(), three).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(group.communicator(1).AllToAllV(send.data(), three, recv.data(), two).code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace moeserve::engine::parallel
