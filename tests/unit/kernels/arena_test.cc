// The KV arena: one block of backend memory handed out in pieces; the caches of a pool backed
// by it take their slabs from it and give them back.
#include "kernels/arena.h"

#include <gtest/gtest.h>

#include <vector>

#include "cache/evicting_kv_cache.h"
#include "cache/kv_pool.h"
#include "tests/unit/test_backend.h"

namespace kvgate::kernels {
namespace {

TEST(Arena, HandsOutBlocksCoalescesAndRefusesWhenFull) {
  auto backend = testing::TestBackend(1);
  auto arena = Arena::Create(backend.get(), 4096);
  ASSERT_TRUE(arena.ok()) << arena.status();
  std::vector<DeviceBuffer> blocks;
  for (int i = 0; i < 4; ++i) {
    auto b = (*arena)->Alloc(256, DType::kF32);  // 1 KiB each
    ASSERT_TRUE(b.ok()) << b.status();
    blocks.push_back(*std::move(b));
  }
  EXPECT_EQ((*arena)->used_bytes(), 4096u);
  auto refused = (*arena)->Alloc(1, DType::kF32);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  // Two neighbours freed: one 2 KiB block fits where they were.
  void* second = blocks[1].data();
  blocks[1].Reset();
  blocks[2].Reset();
  auto big = (*arena)->Alloc(512, DType::kF32);
  ASSERT_TRUE(big.ok()) << big.status();
  EXPECT_EQ(big->data(), second);
  // Data written through the backend stays put.
  std::vector<float> in(512, 3.f), out(512);
  ASSERT_TRUE(backend->CopyToDevice(big->data(), in.data(), 2048).ok());
  ASSERT_TRUE(backend->CopyToHost(out.data(), big->data(), 2048).ok());
  EXPECT_EQ(out, in);
  blocks.clear();
  big->Reset();
  EXPECT_EQ((*arena)->used_bytes(), 0u);
}

TEST(Arena, CachesOfAPoolTakeTheirSlabsFromIt) {
  auto backend = testing::TestBackend(1);
  const cache::KvCacheShape shape{2, 2, 8, 0};
  const size_t slab = 2 * 2 * 48 * shape.slot_bytes();  // layers * heads * (32 + 16) slots
  auto arena = Arena::Create(backend.get(), 3 * slab);
  ASSERT_TRUE(arena.ok());
  cache::KvPool pool(3 * slab, arena->get());
  cache::EvictionParams p;
  p.policy = "h2o";
  p.budget = 32;
  p.chunk = 16;
  std::vector<std::unique_ptr<cache::KvCache>> caches;
  for (int i = 0; i < 3; ++i) {
    auto c = cache::MakeEvictingKvCache(shape, p, backend.get(), {}, &pool);
    ASSERT_TRUE(c.ok()) << c.status();
    caches.push_back(*std::move(c));
  }
  EXPECT_EQ((*arena)->used_bytes(), 3 * slab);
  EXPECT_FALSE(cache::MakeEvictingKvCache(shape, p, backend.get(), {}, &pool).ok());
  caches.clear();
  EXPECT_EQ((*arena)->used_bytes(), 0u);
  EXPECT_EQ(pool.used_bytes(), 0u);
}

}  // namespace
}  // namespace kvgate::kernels
