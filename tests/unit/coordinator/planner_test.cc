// The pipeline planner and the budget arithmetic of the coordinator, and the host activation
// transport between stages.
#include "coordinator/planner.h"

#include <gtest/gtest.h>

namespace kvgate::coordinator {
namespace {

TEST(PlanLayers, EvenForEqualMemoryAndProportionalOtherwise) {
  auto even = PlanLayers(32, {8, 8});
  ASSERT_TRUE(even.ok());
  EXPECT_EQ(*even, (std::vector<LayerRange>{{0, 16}, {16, 32}}));
  auto three = PlanLayers(5, {1, 1, 1});
  ASSERT_TRUE(three.ok());
  EXPECT_EQ((*three)[0].first, 0);
  EXPECT_EQ((*three)[2].second, 5);
  for (const auto& r : *three) EXPECT_GE(r.second - r.first, 1);
  auto skew = PlanLayers(32, {3000, 1000});
  ASSERT_TRUE(skew.ok());
  EXPECT_EQ(*skew, (std::vector<LayerRange>{{0, 24}, {24, 32}}));
  // Every stage keeps at least one layer, however small its memory.
  auto tiny = PlanLayers(4, {1000000, 1});
  ASSERT_TRUE(tiny.ok());
  EXPECT_EQ((*tiny)[1], (LayerRange{3, 4}));
  EXPECT_FALSE(PlanLayers(2, {1, 1, 1}).ok());
  EXPECT_FALSE(PlanLayers(2, {}).ok());
}

TEST(ParseLayerSplit, AcceptsOnlyContiguousCover) {
  auto ok = ParseLayerSplit("0-3,3-5", 5, 2);
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ(*ok, (std::vector<LayerRange>{{0, 3}, {3, 5}}));
  for (const char* bad : {"0-3,4-5", "0-3", "1-3,3-5", "0-3,3-6", "0-3,3-3", "a-b,3-5"}) {
    EXPECT_FALSE(ParseLayerSplit(bad, 5, 2).ok()) << bad;
  }
}

StageCapacity Stage(int64_t kv_bytes, int layers, int64_t bpt) {
  StageCapacity s;
  s.kv_capacity_bytes = kv_bytes;
  s.bytes_per_token.assign(static_cast<size_t>(layers), bpt);
  return s;
}

TEST(GrantBudgets, RoomyStagesKeepMoreThanTightOnes) {
  cache::EvictionParams kv;
  kv.policy = "h2o";
  kv.budget = 1000;
  kv.chunk = 64;
  // 4 sequences; stage 0: 4 * 2 layers * 1 KiB * 2048 slots; stage 1: 300 slots.
  std::vector<StageCapacity> stages = {Stage(4 * 2 * 1024 * 2048, 2, 1024),
                                       Stage(4 * 2 * 1024 * 300, 2, 1024)};
  auto g = GrantBudgets(kv, 100, 4096, stages, 4);
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ((*g)[0].budget, 1000);
  EXPECT_EQ((*g)[1].budget, 300 - 64);
  EXPECT_EQ((*g)[1].bytes, 300 * 2 * 1024);
  EXPECT_EQ((*g)[1].layer_budgets, (std::vector<int64_t>{236, 236}));
  // Operator caps lower single layers.
  stages[0].layer_caps = {0, 50};
  g = GrantBudgets(kv, 100, 4096, stages, 4);
  ASSERT_TRUE(g.ok());
  EXPECT_EQ((*g)[0].layer_budgets, (std::vector<int64_t>{1000, 50}));
  // A chunk that does not fit a stage's share can never be admitted.
  kv.chunk = 400;
  g = GrantBudgets(kv, 100, 4096, stages, 4);
  ASSERT_FALSE(g.ok());
  EXPECT_EQ(g.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(g.status().message().find("stage 1"), std::string::npos);
}

TEST(GrantBudgets, FullCachesReserveTheirWorstCaseGrowth) {
  cache::EvictionParams kv;  // full
  EXPECT_EQ(FullCacheTokens(10, 4096), 64);
  EXPECT_EQ(FullCacheTokens(100, 4096), 200);
  EXPECT_EQ(FullCacheTokens(3000, 4096), 4096);
  std::vector<StageCapacity> stages = {Stage(1 << 20, 2, 1024)};
  auto g = GrantBudgets(kv, 100, 4096, stages, 4);
  ASSERT_TRUE(g.ok());
  EXPECT_EQ((*g)[0].bytes, 200 * 2048);
  g = GrantBudgets(kv, 1000, 4096, stages, 4);  // 2000 tokens * 2 KiB > 1 MiB
  EXPECT_EQ(g.status().code(), absl::StatusCode::kResourceExhausted);
}

}  // namespace
}  // namespace kvgate::coordinator
