// BlockAllocator (all-or-nothing allocation, safe frees) and KvRows addressing.
#include <algorithm>
#include <set>
#include <vector>

#include "engine/model/kv_rows.h"
#include "engine/runtime/block_allocator.h"
#include "gtest/gtest.h"

namespace moeserve::engine {
namespace {

TEST(BlockAllocator, AllocatesDistinctIdsInRange) {
  BlockAllocator allocator(6);
  EXPECT_EQ(allocator.num_total(), 6);
  EXPECT_EQ(allocator.num_free(), 6);
  auto first = allocator.Allocate(4);
  ASSERT_TRUE(first.has_value());
  auto second = allocator.Allocate(2);
  ASSERT_TRUE(second.has_value());
  EXPECT_EQ(first->size(), 4u);
  EXPECT_EQ(second->size(), 2u);
  std::set<int32_t> ids(first->begin(), first->end());
  ids.insert(second->begin(), second->end());
  EXPECT_EQ(ids, (std::set<int32_t>{0, 1, 2, 3, 4, 5}));
  EXPECT_EQ(allocator.num_free(), 0);
}

TEST(BlockAllocator, AllOrNothing) {
  BlockAllocator allocator(5);
  ASSERT_TRUE(allocator.Allocate(3).has_value());
  EXPECT_FALSE(allocator.Allocate(3).has_value());
  EXPECT_EQ(allocator.num_free(), 2) << "a failed allocation must take nothing";
  auto rest = allocator.Allocate(2);
  ASSERT_TRUE(rest.has_value());
  EXPECT_EQ(allocator.num_free(), 0);
  EXPECT_FALSE(allocator.Allocate(1).has_value());
}

TEST(BlockAllocator, ZeroAndNegativeCounts) {
  BlockAllocator allocator(3);
  auto none = allocator.Allocate(0);
  ASSERT_TRUE(none.has_value());
  EXPECT_TRUE(none->empty());
  EXPECT_FALSE(allocator.Allocate(-1).has_value());
  EXPECT_EQ(allocator.num_free(), 3);
}

TEST(BlockAllocator, FreeReturnsBlocks) {
  BlockAllocator allocator(4);
  auto a = allocator.Allocate(3);
  ASSERT_TRUE(a.has_value());
  allocator.Free(*a);
  EXPECT_EQ(allocator.num_free(), 4);
  auto all = allocator.Allocate(4);
  ASSERT_TRUE(all.has_value());
  EXPECT_EQ(std::set<int32_t>(all->begin(), all->end()), (std::set<int32_t>{0, 1, 2, 3}));
}

TEST(BlockAllocator, DoubleFreeIsIgnored) {
  BlockAllocator allocator(4);
  auto a = allocator.Allocate(2);
  ASSERT_TRUE(a.has_value());
  allocator.Free(*a);
  allocator.Free(*a);
  EXPECT_EQ(allocator.num_free(), 4);
  // A block listed twice in one call is freed once.
  auto b = allocator.Allocate(1);
  ASSERT_TRUE(b.has_value());
  allocator.Free({(*b)[0], (*b)[0]});
  EXPECT_EQ(allocator.num_free(), 4);
  // Every block can still be handed out exactly once.
  auto all = allocator.Allocate(4);
  ASSERT_TRUE(all.has_value());
  EXPECT_EQ(std::set<int32_t>(all->begin(), all->end()).size(), 4u);
  EXPECT_FALSE(allocator.Allocate(1).has_value());
}

TEST(BlockAllocator, ForeignIdsAreIgnored) {
  BlockAllocator allocator(4);
  auto a = allocator.Allocate(2);
  ASSERT_TRUE(a.has_value());
  allocator.Free({-1, 4, 100, -2147483647 - 1});
  EXPECT_EQ(allocator.num_free(), 2);
  // A never-allocated (free) id is not a foreign block to add twice.
  std::vector<int32_t> free_ids;
  for (int32_t id = 0; id < 4; ++id) {
    if (std::find(a->begin(), a->end(), id) == a->end()) free_ids.push_back(id);
  }
  allocator.Free(free_ids);
  EXPECT_EQ(allocator.num_free(), 2);
  allocator.Free(*a);
  EXPECT_EQ(allocator.num_free(), 4);
}

TEST(BlockAllocator, UsageRatioFollowsAllocations) {
  BlockAllocator allocator(8);
  EXPECT_DOUBLE_EQ(allocator.usage_ratio(), 0.0);
  auto a = allocator.Allocate(2);
  ASSERT_TRUE(a.has_value());
  EXPECT_DOUBLE_EQ(allocator.usage_ratio(), 0.25);
  auto b = allocator.Allocate(6);
  ASSERT_TRUE(b.has_value());
  EXPECT_DOUBLE_EQ(allocator.usage_ratio(), 1.0);
  allocator.Free(*a);
  EXPECT_DOUBLE_EQ(allocator.usage_ratio(), 0.75);
  allocator.Free(*b);
  EXPECT_DOUBLE_EQ(allocator.usage_ratio(), 0.0);
}

TEST(KvRows, BlocksFor) {
  KvRows cache(1, 4, 16, 8);
  for (int tokens : {0, 1, 16, 17, 64}) {
    EXPECT_EQ(cache.BlocksFor(tokens), BlocksFor(tokens, 16)) << tokens;
  }
  EXPECT_EQ(cache.BlocksFor(0), 0);
  EXPECT_EQ(cache.BlocksFor(1), 1);
  EXPECT_EQ(cache.BlocksFor(16), 1);
  EXPECT_EQ(cache.BlocksFor(17), 2);
  EXPECT_EQ(cache.BlocksFor(64), 4);
}

TEST(KvRows, RowsAreDistinctAndAddressedThroughTheBlockTable) {
  const int layers = 2, blocks = 5, block_size = 3, row_dim = 4;
  KvRows cache(layers, blocks, block_size, row_dim);
  // Write a distinct value into every element, then read all back.
  for (int l = 0; l < layers; ++l) {
    for (int b = 0; b < blocks; ++b) {
      for (int o = 0; o < block_size; ++o) {
        float* row = cache.Row(l, b, o);
        for (int i = 0; i < row_dim; ++i)
          row[i] = static_cast<float>(((l * 10 + b) * 10 + o) * 10 + i);
      }
    }
  }
  for (int l = 0; l < layers; ++l) {
    for (int b = 0; b < blocks; ++b) {
      for (int o = 0; o < block_size; ++o) {
        const float* row = cache.Row(l, b, o);
        for (int i = 0; i < row_dim; ++i) {
          ASSERT_EQ(row[i], static_cast<float>(((l * 10 + b) * 10 + o) * 10 + i));
        }
      }
    }
  }
  // Position 7 of a sequence with blocks {4, 0, 2} lives in block 2 (7 / 3), offset 1.
  const std::vector<int32_t> table = {4, 0, 2};
  EXPECT_EQ(cache.RowAt(1, table, 7), cache.Row(1, 2, 1));
  EXPECT_EQ(cache.RowAt(0, table, 0), cache.Row(0, 4, 0));
  EXPECT_EQ(cache.RowAt(0, table, 5), cache.Row(0, 0, 2));
}

}  // namespace
}  // namespace moeserve::engine
