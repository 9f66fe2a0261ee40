// Scheduler without a model: admission in arrival order with KV blocks reserved for
// prompt + max_tokens, bounded overtaking of a sequence whose blocks do not fit yet, the running
// limit, chunked prefill within the token budget (decoding sequences first, one token each;
// prefills in max-min fair shares), cancellation of queued and running sequences, release of
// blocks, and stopping.
#include "engine/runtime/scheduler.h"

#include <memory>
#include <set>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moeserve::engine {
namespace {

// A sequence of `prompt` tokens that may generate `max_tokens`.
std::unique_ptr<Sequence> MakeSequence(int prompt, int max_tokens, int salt = 0) {
  auto seq = std::make_unique<Sequence>();
  for (int i = 0; i < prompt; ++i) seq->tokens.push_back((i + salt) % 256);
  seq->prompt_length = prompt;
  seq->input.max_tokens = max_tokens;
  seq->stream = std::make_shared<RequestStream>("test-" + std::to_string(salt));
  return seq;
}

SchedulerLimits Limits(int kv_blocks, int max_batch_tokens = 64, int max_running = 8) {
  return {.max_batch_tokens = max_batch_tokens,
          .max_running = max_running,
          .kv_block_size = 16,
          .kv_blocks = kv_blocks};
}

std::vector<Sequence*> Admit(Scheduler& scheduler) {
  std::vector<std::unique_ptr<Sequence>> cancelled;
  std::vector<Sequence*> admitted = scheduler.Admit(cancelled);
  EXPECT_TRUE(cancelled.empty());
  return admitted;
}

TEST(Scheduler, AdmitsFirstComeFirstServedWhileTheirBlocksFit) {
  Scheduler scheduler(Limits(/*kv_blocks=*/10));
  // 40 + 24 = 64 tokens = 4 blocks each; three need 12 of the 10 blocks.
  std::vector<Sequence*> sequences;
  for (int i = 0; i < 3; ++i) {
    auto seq = MakeSequence(40, 24, i);
    sequences.push_back(seq.get());
    ASSERT_EQ(scheduler.Enqueue(std::move(seq)), nullptr);
  }
  EXPECT_EQ(scheduler.queued(), 3);
  EXPECT_THAT(Admit(scheduler), ::testing::ElementsAre(sequences[0], sequences[1]));
  EXPECT_EQ(scheduler.queued(), 1);
  EXPECT_EQ(scheduler.running(), 2);
  EXPECT_EQ(scheduler.kv_blocks_free(), 2);
  EXPECT_EQ(sequences[0]->blocks.size(), 4u);
  std::set<int32_t> blocks(sequences[0]->blocks.begin(), sequences[0]->blocks.end());
  blocks.insert(sequences[1]->blocks.begin(), sequences[1]->blocks.end());
  EXPECT_EQ(blocks.size(), 8u) << "two sequences must not share a block";
  EXPECT_TRUE(Admit(scheduler).empty()) << "the third must wait for blocks";
  // Releasing one makes room for the third.
  std::unique_ptr<Sequence> released = scheduler.Release(sequences[0]);
  ASSERT_NE(released, nullptr);
  EXPECT_TRUE(released->blocks.empty());
  EXPECT_EQ(scheduler.kv_blocks_free(), 6);
  EXPECT_THAT(Admit(scheduler), ::testing::ElementsAre(sequences[2]));
  EXPECT_EQ(scheduler.kv_blocks_free(), 2);
}

TEST(Scheduler, AShortSequencePassesOneWhoseBlocksDoNotFitYet) {
  // A 32-token request used to wait, for its whole deadline, behind 4000-token requests whose
  // KV reservations did not fit.
  Scheduler scheduler(Limits(/*kv_blocks=*/6));
  ASSERT_EQ(scheduler.Enqueue(MakeSequence(40, 24, 0)), nullptr);  // 4 blocks
  auto large = MakeSequence(80, 16, 1);                            // 6 blocks: not now
  Sequence* large_ptr = large.get();
  ASSERT_EQ(scheduler.Enqueue(std::move(large)), nullptr);
  auto small = MakeSequence(8, 8, 2);  // 1 block
  Sequence* small_ptr = small.get();
  ASSERT_EQ(scheduler.Enqueue(std::move(small)), nullptr);
  const std::vector<Sequence*> admitted = Admit(scheduler);
  ASSERT_EQ(admitted.size(), 2u);
  EXPECT_EQ(admitted[1], small_ptr);
  EXPECT_EQ(scheduler.queued(), 1);
  EXPECT_EQ(large_ptr->times_overtaken, 1);
}

TEST(Scheduler, OvertakingIsBoundedSoALargeSequenceIsNotStarved) {
  // One block stays taken, so the large sequence (all 8 blocks) never fits while small ones
  // keep coming; after max_overtakes of them admission waits for it.
  SchedulerLimits limits = Limits(/*kv_blocks=*/8, 64, /*max_running=*/100);
  limits.max_overtakes = 3;
  Scheduler scheduler(limits);
  auto holder = MakeSequence(8, 8, 0);
  Sequence* holder_ptr = holder.get();
  ASSERT_EQ(scheduler.Enqueue(std::move(holder)), nullptr);
  ASSERT_EQ(Admit(scheduler).size(), 1u);
  auto large = MakeSequence(100, 28, 1);  // 8 blocks
  Sequence* large_ptr = large.get();
  ASSERT_EQ(scheduler.Enqueue(std::move(large)), nullptr);
  std::vector<Sequence*> small;
  for (int i = 0; i < 5; ++i) {
    auto seq = MakeSequence(8, 8, 10 + i);
    small.push_back(seq.get());
    ASSERT_EQ(scheduler.Enqueue(std::move(seq)), nullptr);
  }
  EXPECT_THAT(Admit(scheduler), ::testing::ElementsAre(small[0], small[1], small[2]));
  EXPECT_EQ(large_ptr->times_overtaken, 3);
  EXPECT_TRUE(Admit(scheduler).empty()) << "the fourth small one waits for the large one";
  // As the running ones finish, their blocks go to the large sequence first.
  for (Sequence* done : {holder_ptr, small[0], small[1], small[2]}) scheduler.Release(done);
  EXPECT_THAT(Admit(scheduler), ::testing::ElementsAre(large_ptr));
  EXPECT_EQ(scheduler.queued(), 2);
}

TEST(Scheduler, RunningSequencesAreLimited) {
  Scheduler scheduler(Limits(/*kv_blocks=*/100, 64, /*max_running=*/3));
  for (int i = 0; i < 5; ++i) ASSERT_EQ(scheduler.Enqueue(MakeSequence(4, 4, i)), nullptr);
  EXPECT_EQ(Admit(scheduler).size(), 3u);
  EXPECT_EQ(scheduler.running(), 3);
  EXPECT_EQ(scheduler.queued(), 2);
}

TEST(Scheduler, DecodingSequencesGoFirstAndPrefillsShareTheRestInChunks) {
  Scheduler scheduler(Limits(/*kv_blocks=*/100, /*max_batch_tokens=*/10));
  auto long_prompt = MakeSequence(25, 5, 1);
  Sequence* prefilling = long_prompt.get();
  auto decoding_seq = MakeSequence(3, 5, 2);
  Sequence* decoding = decoding_seq.get();
  decoding->num_cached = 3;
  decoding->tokens.push_back(7);  // its first generated token, not yet cached
  ASSERT_EQ(scheduler.Enqueue(std::move(long_prompt)), nullptr);
  ASSERT_EQ(scheduler.Enqueue(std::move(decoding_seq)), nullptr);
  ASSERT_EQ(Admit(scheduler).size(), 2u);

  StepPlan plan = scheduler.Plan();
  ASSERT_EQ(plan.members.size(), 2u);
  EXPECT_EQ(plan.members[0], decoding) << "decoding sequences come first";
  EXPECT_EQ(plan.batch[0].tokens.size(), 1u);
  EXPECT_EQ(plan.batch[0].start_position, 3);
  EXPECT_TRUE(plan.samples[0]);
  EXPECT_EQ(plan.members[1], prefilling);
  EXPECT_EQ(plan.batch[1].tokens.size(), 9u) << "the prefill takes what is left of 10";
  EXPECT_EQ(plan.batch[1].start_position, 0);
  EXPECT_FALSE(plan.samples[1]) << "a prefill that continues gets no token";
  EXPECT_EQ(plan.tokens, 10);
  EXPECT_EQ(plan.batch[1].block_table, &prefilling->blocks);

  scheduler.Advance(plan);
  EXPECT_EQ(prefilling->num_cached, 9);
  EXPECT_EQ(decoding->num_cached, 4);
  // The decoding sequence got its next token (the emitter appends it); the prefill takes 9 of
  // its 16 left, then the last 7 — and only then needs a token.
  decoding->tokens.push_back(8);
  plan = scheduler.Plan();
  ASSERT_EQ(plan.members.size(), 2u);
  EXPECT_EQ(plan.batch[1].tokens.size(), 9u);
  EXPECT_EQ(plan.batch[1].start_position, 9);
  EXPECT_FALSE(plan.samples[1]);
  scheduler.Advance(plan);
  decoding->tokens.push_back(9);
  plan = scheduler.Plan();
  ASSERT_EQ(plan.members.size(), 2u);
  EXPECT_EQ(plan.batch[1].tokens.size(), 7u);
  EXPECT_TRUE(plan.samples[1]) << "the last chunk completes the prompt";
  EXPECT_EQ(plan.tokens, 8);
}

TEST(Scheduler, PrefillsShareTheBudgetSoAShortPromptIsNotStuckBehindLongOnes) {
  // Three long prompts admitted first, then a short one: the short prompt completes its prefill
  // in the first step, and the long ones share what is left equally (max-min fair shares).
  Scheduler scheduler(Limits(/*kv_blocks=*/1000, /*max_batch_tokens=*/100));
  std::vector<Sequence*> longs;
  for (int i = 0; i < 3; ++i) {
    auto seq = MakeSequence(1000, 8, i);
    longs.push_back(seq.get());
    ASSERT_EQ(scheduler.Enqueue(std::move(seq)), nullptr);
  }
  auto short_seq = MakeSequence(10, 8, 9);
  Sequence* short_prompt = short_seq.get();
  ASSERT_EQ(scheduler.Enqueue(std::move(short_seq)), nullptr);
  ASSERT_EQ(Admit(scheduler).size(), 4u);
  const StepPlan plan = scheduler.Plan();
  ASSERT_EQ(plan.members.size(), 4u);
  EXPECT_EQ(plan.tokens, 100);
  for (size_t i = 0; i < plan.members.size(); ++i) {
    if (plan.members[i] == short_prompt) {
      EXPECT_EQ(plan.batch[i].tokens.size(), 10u) << "the whole short prompt, in one step";
      EXPECT_TRUE(plan.samples[i]);
    } else {
      EXPECT_EQ(plan.batch[i].tokens.size(), 30u) << "the rest, shared equally";
    }
  }
}

TEST(Scheduler, WithMorePrefillsThanBudgetTheOldestGoFirst) {
  Scheduler scheduler(Limits(/*kv_blocks=*/1000, /*max_batch_tokens=*/3));
  std::vector<Sequence*> sequences;
  for (int i = 0; i < 5; ++i) {
    auto seq = MakeSequence(20, 4, i);
    sequences.push_back(seq.get());
    ASSERT_EQ(scheduler.Enqueue(std::move(seq)), nullptr);
  }
  ASSERT_EQ(Admit(scheduler).size(), 5u);
  const StepPlan plan = scheduler.Plan();
  EXPECT_THAT(plan.members, ::testing::ElementsAre(sequences[0], sequences[1], sequences[2]));
  EXPECT_EQ(plan.tokens, 3);
}

TEST(Scheduler, CancelledSequencesLeaveAtTheNextAdmissionWithTheirBlocks) {
  Scheduler scheduler(Limits(/*kv_blocks=*/4, 64, /*max_running=*/1));
  auto running_seq = MakeSequence(20, 12, 0);  // 2 blocks
  Sequence* running = running_seq.get();
  auto queued_seq = MakeSequence(20, 12, 1);
  Sequence* queued = queued_seq.get();
  ASSERT_EQ(scheduler.Enqueue(std::move(running_seq)), nullptr);
  ASSERT_EQ(scheduler.Enqueue(std::move(queued_seq)), nullptr);
  ASSERT_EQ(Admit(scheduler).size(), 1u);
  queued->stream->Cancel();
  running->stream->Cancel();
  std::vector<std::unique_ptr<Sequence>> cancelled;
  EXPECT_TRUE(scheduler.Admit(cancelled).empty());
  ASSERT_EQ(cancelled.size(), 2u);
  EXPECT_EQ(cancelled[0].get(), running);
  EXPECT_EQ(cancelled[1].get(), queued);
  EXPECT_TRUE(running->blocks.empty());
  EXPECT_EQ(scheduler.kv_blocks_free(), 4);
  EXPECT_EQ(scheduler.running(), 0);
  EXPECT_EQ(scheduler.queued(), 0);
  EXPECT_TRUE(scheduler.Plan().members.empty());
}

TEST(Scheduler, ReleaseAllReturnsEveryBlockAndStopReturnsTheQueue) {
  Scheduler scheduler(Limits(/*kv_blocks=*/8, 64, /*max_running=*/2));
  for (int i = 0; i < 3; ++i) ASSERT_EQ(scheduler.Enqueue(MakeSequence(16, 16, i)), nullptr);
  ASSERT_EQ(Admit(scheduler).size(), 2u);
  EXPECT_EQ(scheduler.kv_blocks_free(), 4);
  EXPECT_EQ(scheduler.Release(nullptr), nullptr) << "an unknown sequence releases nothing";
  std::vector<std::unique_ptr<Sequence>> running = scheduler.ReleaseAll();
  EXPECT_EQ(running.size(), 2u);
  EXPECT_EQ(scheduler.kv_blocks_free(), 8);
  EXPECT_EQ(scheduler.running(), 0);
  auto queued = scheduler.Stop();
  EXPECT_EQ(queued.size(), 1u);
  EXPECT_EQ(scheduler.queued(), 0);
  // Once stopped, the scheduler hands sequences back instead of queueing them.
  auto late = MakeSequence(4, 4, 9);
  Sequence* late_ptr = late.get();
  std::unique_ptr<Sequence> refused = scheduler.Enqueue(std::move(late));
  EXPECT_EQ(refused.get(), late_ptr);
  EXPECT_EQ(scheduler.queued(), 0);
}

TEST(Scheduler, EnqueueIsSafeFromManyThreads) {
  Scheduler scheduler(Limits(/*kv_blocks=*/1000, 64, /*max_running=*/1000));
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 100; ++i) {
        EXPECT_EQ(scheduler.Enqueue(MakeSequence(4, 4, t * 100 + i)), nullptr);
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(scheduler.queued(), 400);
  EXPECT_EQ(Admit(scheduler).size(), 400u);
  EXPECT_EQ(scheduler.kv_blocks_free(), 600);
}

}  // namespace
}  // namespace moeserve::engine
