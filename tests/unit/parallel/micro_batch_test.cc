// SplitIntoMicroBatches: near-equal token counts, a sequence straddling the middle cut into two
// chunks with consecutive positions (only the last chunk emits logits unless all_logits), and the
// edge cases (empty batch, a single one-token sequence). Expected pieces are derived here from
// the batch itself.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "engine/parallel/ep_forward.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moeserve::engine::parallel {
namespace {

// Owns the token storage and block tables a batch points into.
struct TestBatch {
  std::vector<std::vector<int32_t>> tokens;
  std::vector<std::vector<int32_t>> tables;
  std::vector<BatchSequence> sequences;

  TestBatch(const std::vector<int>& lengths, const std::vector<int>& starts = {},
            const std::vector<bool>& all_logits = {}) {
    tokens.resize(lengths.size());
    tables.resize(lengths.size());
    for (size_t s = 0; s < lengths.size(); ++s) {
      for (int i = 0; i < lengths[s]; ++i) tokens[s].push_back(static_cast<int32_t>(100 * s + i));
      tables[s] = {static_cast<int32_t>(s), static_cast<int32_t>(s + 10)};
    }
    for (size_t s = 0; s < lengths.size(); ++s) {
      BatchSequence seq;
      seq.tokens = tokens[s];
      seq.start_position = starts.empty() ? 0 : starts[s];
      seq.block_table = &tables[s];
      seq.all_logits = all_logits.empty() ? false : static_cast<bool>(all_logits[s]);
      sequences.push_back(seq);
    }
  }
};

int TokensIn(const std::vector<BatchPiece>& part) {
  int total = 0;
  for (const BatchPiece& piece : part) total += static_cast<int>(piece.sequence.tokens.size());
  return total;
}

// Checks the invariants of any split: every token of every sequence appears exactly once, in
// order, in pieces that keep the sequence's block table and flags, with consecutive positions;
// only a sequence's last piece emits logits (every piece with all_logits); part sizes differ by
// at most one token; pieces keep batch order across parts.
void ExpectValidSplit(const TestBatch& batch, const std::vector<std::vector<BatchPiece>>& parts,
                      int num_parts) {
  ASSERT_EQ(static_cast<int>(parts.size()), num_parts);
  int total = 0;
  for (const auto& seq : batch.sequences) total += static_cast<int>(seq.tokens.size());
  int min_tokens = total, max_tokens = 0;
  for (const auto& part : parts) {
    min_tokens = std::min(min_tokens, TokensIn(part));
    max_tokens = std::max(max_tokens, TokensIn(part));
  }
  EXPECT_LE(max_tokens - min_tokens, 1) << "part sizes are not near-equal";

  // Walk the pieces in order and match them against the sequences.
  size_t seq_index = 0;
  int offset = 0;
  int cut_sequences = 0;
  int pieces_of_current = 0;
  for (int p = 0; p < num_parts; ++p) {
    for (const BatchPiece& piece : parts[p]) {
      ASSERT_LT(seq_index, batch.sequences.size()) << "more pieces than sequences";
      const BatchSequence& seq = batch.sequences[seq_index];
      const int length = static_cast<int>(seq.tokens.size());
      const int taken = static_cast<int>(piece.sequence.tokens.size());
      EXPECT_EQ(piece.sequence.tokens.data(), seq.tokens.data() + offset)
          << "sequence " << seq_index << " piece at offset " << offset;
      EXPECT_EQ(piece.sequence.start_position, seq.start_position + offset);
      EXPECT_EQ(piece.sequence.block_table, seq.block_table);
      EXPECT_EQ(piece.sequence.all_logits, seq.all_logits);
      EXPECT_GT(taken, 0) << "empty piece of a non-empty sequence";
      offset += taken;
      ASSERT_LE(offset, length);
      const bool last = offset == length;
      EXPECT_EQ(piece.emits_logits, seq.all_logits || last)
          << "sequence " << seq_index << " piece ending at " << offset;
      ++pieces_of_current;
      if (last) {
        if (pieces_of_current > 1) ++cut_sequences;
        EXPECT_LE(pieces_of_current, num_parts);
        ++seq_index;
        offset = 0;
        pieces_of_current = 0;
      }
    }
  }
  EXPECT_EQ(seq_index, batch.sequences.size()) << "not every sequence was placed";
  EXPECT_LE(cut_sequences, num_parts - 1) << "more sequences cut than part boundaries";
}

TEST(SplitIntoMicroBatchesTest, TwoPartsOfNearEqualTokens) {
  for (const std::vector<int>& lengths : std::vector<std::vector<int>>{{5, 3, 8},
                                                                       {7},
                                                                       {2, 2, 2, 2},
                                                                       {10, 1},
                                                                       {1, 10},
                                                                       {1, 1, 1},
                                                                       {100, 1, 1, 1},
                                                                       {13, 17, 1, 4, 9}}) {
    TestBatch batch(lengths);
    auto parts = SplitIntoMicroBatches(batch.sequences, 2);
    SCOPED_TRACE(::testing::PrintToString(lengths));
    ExpectValidSplit(batch, parts, 2);
    int total = 0;
    for (int length : lengths) total += length;
    EXPECT_EQ(TokensIn(parts[0]) + TokensIn(parts[1]), total);
  }
}

TEST(SplitIntoMicroBatchesTest, RandomBatchesSplitIntoTwoThreeAndFourParts) {
  std::mt19937 random(77);
  std::uniform_int_distribution<int> count(1, 9), length(1, 40), start(0, 500);
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<int> lengths(count(random)), starts;
    std::vector<bool> all_logits;
    for (int& l : lengths) {
      l = length(random);
      starts.push_back(start(random));
      all_logits.push_back(random() % 4 == 0);
    }
    TestBatch batch(lengths, starts, all_logits);
    for (int parts : {2, 3, 4}) {
      SCOPED_TRACE("trial " + std::to_string(trial) + " parts " + std::to_string(parts));
      ExpectValidSplit(batch, SplitIntoMicroBatches(batch.sequences, parts), parts);
    }
  }
}

TEST(SplitIntoMicroBatchesTest, SequenceStraddlingTheMiddleIsCutWithConsecutivePositions) {
  // 4 + 6 tokens: the first part takes sequence 0 and one token of sequence 1.
  TestBatch batch({4, 6}, {0, 3});
  auto parts = SplitIntoMicroBatches(batch.sequences, 2);
  ASSERT_EQ(parts.size(), 2u);
  ASSERT_EQ(parts[0].size(), 2u);
  ASSERT_EQ(parts[1].size(), 1u);
  EXPECT_EQ(parts[0][0].sequence.tokens.size(), 4u);
  EXPECT_TRUE(parts[0][0].emits_logits);
  // Sequence 1, first chunk: 1 token at position 3; no logits (its last token is elsewhere).
  const BatchPiece& first = parts[0][1];
  EXPECT_THAT(std::vector<int32_t>(first.sequence.tokens.begin(), first.sequence.tokens.end()),
              ::testing::ElementsAre(100));
  EXPECT_EQ(first.sequence.start_position, 3);
  EXPECT_FALSE(first.emits_logits);
  // Second chunk: the other 5 tokens at positions 4..8; it emits the logits.
  const BatchPiece& second = parts[1][0];
  EXPECT_THAT(std::vector<int32_t>(second.sequence.tokens.begin(), second.sequence.tokens.end()),
              ::testing::ElementsAre(101, 102, 103, 104, 105));
  EXPECT_EQ(second.sequence.start_position, 4);
  EXPECT_TRUE(second.emits_logits);
  EXPECT_EQ(second.sequence.block_table, &batch.tables[1]);
}

TEST(SplitIntoMicroBatchesTest, SingleSequenceIsCutInHalf) {
  TestBatch batch({9}, {20});
  auto parts = SplitIntoMicroBatches(batch.sequences, 2);
  ASSERT_EQ(parts[0].size(), 1u);
  ASSERT_EQ(parts[1].size(), 1u);
  EXPECT_EQ(parts[0][0].sequence.tokens.size() + parts[1][0].sequence.tokens.size(), 9u);
  EXPECT_LE(std::abs(static_cast<int>(parts[0][0].sequence.tokens.size()) -
                     static_cast<int>(parts[1][0].sequence.tokens.size())),
            1);
  EXPECT_EQ(parts[1][0].sequence.start_position,
            20 + static_cast<int>(parts[0][0].sequence.tokens.size()));
  EXPECT_FALSE(parts[0][0].emits_logits);
  EXPECT_TRUE(parts[1][0].emits_logits);
}

TEST(SplitIntoMicroBatchesTest, AllLogitsSequenceEmitsFromBothChunks) {
  TestBatch batch({3, 8}, {0, 0}, {false, true});
  auto parts = SplitIntoMicroBatches(batch.sequences, 2);
  ExpectValidSplit(batch, parts, 2);
  // Sequence 1 is cut (3 + 8 = 11: the first part holds 6 tokens) and both chunks emit.
  ASSERT_EQ(parts[0].size(), 2u);
  ASSERT_EQ(parts[1].size(), 1u);
  EXPECT_EQ(parts[0][1].sequence.tokens.size(), 3u);
  EXPECT_TRUE(parts[0][1].emits_logits);
  EXPECT_TRUE(parts[1][0].emits_logits);
}

TEST(SplitIntoMicroBatchesTest, EmptyBatchGivesEmptyParts) {
  std::vector<BatchSequence> empty;
  auto parts = SplitIntoMicroBatches(empty, 2);
  ASSERT_EQ(parts.size(), 2u);
  EXPECT_TRUE(parts[0].empty());
  EXPECT_TRUE(parts[1].empty());
}

TEST(SplitIntoMicroBatchesTest, SingleOneTokenSequenceIsNotCut) {
  TestBatch batch({1}, {41});
  auto parts = SplitIntoMicroBatches(batch.sequences, 2);
  ASSERT_EQ(parts.size(), 2u);
  ASSERT_EQ(parts[0].size() + parts[1].size(), 1u);
  const BatchPiece& piece = parts[0].empty() ? parts[1][0] : parts[0][0];
  EXPECT_EQ(piece.sequence.tokens.size(), 1u);
  EXPECT_EQ(piece.sequence.tokens.data(), batch.tokens[0].data());
  EXPECT_EQ(piece.sequence.start_position, 41);
  EXPECT_TRUE(piece.emits_logits);
}

TEST(SplitIntoMicroBatchesTest, OnePartKeepsTheBatchWhole) {
  TestBatch batch({4, 6, 1});
  auto parts = SplitIntoMicroBatches(batch.sequences, 1);
  ASSERT_EQ(parts.size(), 1u);
  ASSERT_EQ(parts[0].size(), 3u);
  for (int s = 0; s < 3; ++s) {
    EXPECT_EQ(parts[0][s].sequence.tokens.data(), batch.tokens[s].data());
    EXPECT_EQ(parts[0][s].sequence.tokens.size(), batch.tokens[s].size());
    EXPECT_TRUE(parts[0][s].emits_logits);
  }
}

}  // namespace
}  // namespace moeserve::engine::parallel
