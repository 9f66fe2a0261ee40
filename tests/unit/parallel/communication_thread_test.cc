// CommunicationThread: queued work runs on one other thread, in submission order, and each
// future carries its task's status; destruction runs what is still queued.
#include "engine/parallel/communication_thread.h"

#include <atomic>
#include <chrono>
#include <future>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moeserve::engine::parallel {
namespace {

TEST(CommunicationThreadTest, TasksRunInSubmissionOrder) {
  constexpr int kTasks = 500;
  std::vector<int> order;  // touched only by the communication thread until the futures join
  std::vector<std::future<absl::Status>> futures;
  {
    CommunicationThread thread;
    for (int i = 0; i < kTasks; ++i) {
      futures.push_back(thread.Submit([&order, i] {
        // Early tasks are slow, so a reordering thread would show.
        if (i % 97 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(2));
        order.push_back(i);
        return absl::OkStatus();
      }));
    }
    for (auto& future : futures) EXPECT_TRUE(future.get().ok());
  }
  ASSERT_EQ(order.size(), static_cast<size_t>(kTasks));
  for (int i = 0; i < kTasks; ++i) ASSERT_EQ(order[i], i);
}

TEST(CommunicationThreadTest, FuturesCarryEachTasksStatus) {
  CommunicationThread thread;
  std::vector<std::future<absl::Status>> futures;
  for (int i = 0; i < 30; ++i) {
    futures.push_back(thread.Submit([i]() -> absl::Status {
      if (i % 3 == 1) return absl::UnavailableError("peer " + std::to_string(i) + " gone");
      if (i % 3 == 2) return absl::InternalError("mismatch " + std::to_string(i));
      return absl::OkStatus();
    }));
  }
  for (int i = 0; i < 30; ++i) {
    absl::Status status = futures[i].get();
    if (i % 3 == 0) {
      EXPECT_TRUE(status.ok()) << status;
    } else if (i % 3 == 1) {
      EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable);
      EXPECT_EQ(status.message(), "peer " + std::to_string(i) + " gone");
    } else {
      EXPECT_EQ(status.code(), absl::StatusCode::kInternal);
      EXPECT_EQ(status.message(), "mismatch " + std::to_string(i));
    }
  }
}

TEST(CommunicationThreadTest, WorkRunsOnAnotherThreadWhileTheSubmitterContinues) {
  CommunicationThread thread;
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  std::atomic<bool> started{false};
  std::thread::id worker;
  auto future = thread.Submit([&] {
    worker = std::this_thread::get_id();
    started = true;
    released.wait();  // blocks until the submitter (this thread) lets it go
    return absl::OkStatus();
  });
  // The submitter was not blocked by the queued work.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (!started && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
  ASSERT_TRUE(started);
  EXPECT_EQ(future.wait_for(std::chrono::milliseconds(20)), std::future_status::timeout);
  release.set_value();
  EXPECT_TRUE(future.get().ok());
  EXPECT_NE(worker, std::this_thread::get_id());
}

TEST(CommunicationThreadTest, DestructionRunsTheQueuedWork) {
  std::atomic<int> ran{0};
  std::vector<std::future<absl::Status>> futures;
  {
    CommunicationThread thread;
    for (int i = 0; i < 10; ++i) {
      futures.push_back(thread.Submit([&] {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
        ran.fetch_add(1);
        return absl::OkStatus();
      }));
    }
  }  // destroyed while most tasks are still queued
  EXPECT_EQ(ran.load(), 10);
  for (auto& future : futures) {
    ASSERT_EQ(future.wait_for(std::chrono::seconds(0)), std::future_status::ready);
    EXPECT_TRUE(future.get().ok());
  }
}

}  // namespace
}  // namespace moeserve::engine::parallel
