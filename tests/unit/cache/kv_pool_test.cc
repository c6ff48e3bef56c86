// The worker's KV memory pool: every cache leases its memory from it; the pool never hands out
// more than its capacity and gets everything back when caches go away.
#include "cache/kv_pool.h"

#include <gtest/gtest.h>

#include <memory>
#include <vector>

#include "cache/evicting_kv_cache.h"
#include "cache/kv_cache.h"
#include "tests/unit/test_backend.h"

namespace kvgate::cache {
namespace {

const KvCacheShape kShape{2, 2, 8, 0};                // 2 layers, 2 KV heads, head_dim 8
constexpr size_t kBytesPerToken = 2 * 2 * 2 * 8 * 4;  // K+V, layers, heads, d, float

EvictionParams H2o(int64_t budget) {
  EvictionParams p;
  p.policy = "h2o";
  p.budget = budget;
  p.chunk = 16;
  return p;
}

TEST(KvPool, EvictingCachesLeaseTheirSlabAndGiveItBack) {
  auto backend = testing::TestBackend(1);
  KvPool pool(10 * 48 * kBytesPerToken);  // room for 10 slabs of 32 + 16 slots
  std::vector<std::unique_ptr<KvCache>> caches;
  for (int i = 0; i < 10; ++i) {
    auto c = MakeEvictingKvCache(kShape, H2o(32), backend.get(), {}, &pool);
    ASSERT_TRUE(c.ok()) << c.status();
    EXPECT_EQ((*c)->bytes_reserved(), 48 * kBytesPerToken);
    caches.push_back(std::move(*c));
  }
  EXPECT_EQ(pool.used_bytes(), pool.capacity_bytes());
  EXPECT_EQ(pool.used_token_slots(), 10 * 48 * 2 * 2);
  EXPECT_EQ(pool.leases(), 10);
  auto refused = MakeEvictingKvCache(kShape, H2o(32), backend.get(), {}, &pool);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(pool.used_bytes(), pool.capacity_bytes());  // a refusal changes nothing
  caches.pop_back();
  EXPECT_EQ(pool.used_bytes(), 9 * 48 * kBytesPerToken);
  EXPECT_TRUE(MakeEvictingKvCache(kShape, H2o(32), backend.get(), {}, &pool)
                  .ok());  // fits again (and goes)
  caches.clear();
  EXPECT_EQ(pool.used_bytes(), 0u);
  EXPECT_EQ(pool.used_token_slots(), 0);
  EXPECT_EQ(pool.leases(), 0);
  EXPECT_EQ(pool.peak_bytes(), pool.capacity_bytes());
}

TEST(KvPool, FullCacheGrowsInsideThePoolAndStopsAtItsEdge) {
  auto backend = testing::TestBackend(1);
  KvPool pool(100 * kBytesPerToken);
  auto cache = MakeFullKvCache(kShape, 1000, backend.get(), &pool);
  // One token's K/V [1, heads, d], in the backend's memory as the model would give it.
  std::vector<float> host(static_cast<size_t>(2 * 8), 0.5f);
  auto kv = backend->Alloc(2 * 8, DType::kF32);
  ASSERT_TRUE(kv.ok());
  ASSERT_TRUE(backend->CopyToDevice(kv->data(), host.data(), host.size() * 4).ok());
  int64_t held = 0;
  absl::Status s;
  while ((s = cache->Reserve(1)).ok()) {
    for (int64_t layer = 0; layer < 2; ++layer) {
      const int32_t pos = static_cast<int32_t>(held);
      cache->Append(layer, kv->as<float>(), kv->as<float>(), &pos, 1);
    }
    ++held;
    ASSERT_LE(pool.used_bytes(), pool.capacity_bytes());
    ASSERT_LT(held, 1000);
  }
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(held, 100);  // the pool's edge, exactly (growth falls back to an exact fit)
  EXPECT_EQ(cache->View(1, 1).len, 100);
  cache.reset();
  EXPECT_EQ(pool.used_bytes(), 0u);
}

TEST(KvPool, UnlimitedPoolOnlyAccounts) {
  auto backend = testing::TestBackend(1);
  KvPool pool;
  auto a = MakeEvictingKvCache(kShape, H2o(64), backend.get(), {}, &pool);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(pool.used_bytes(), (*a)->bytes_reserved());
}

}  // namespace
}  // namespace kvgate::cache
