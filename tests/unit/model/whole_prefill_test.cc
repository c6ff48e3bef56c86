// Whole-prompt prefill (--kv-prefill whole) through the generator on a real model: the prompt
// is prefilled with everything kept and compressed once, so what is retained does not depend
// on how the prompt was cut into compute chunks (the scores each policy reads, accumulated
// mass, the last window's votes, the last query's attention, the queries' statistics, are
// those of the whole prompt), whereas chunked prefill, which evicts after every chunk, does.
// And the memory of the whole prompt is held only until it is compressed.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <map>

#include "model/generation/generator.h"
#include "tests/unit/model/test_util.h"

namespace kvgate::testing {
namespace {

// Per layer and KV head, the retained original positions after prefilling `ids`.
using Retained = std::vector<std::vector<std::vector<int32_t>>>;

Retained Prefill(model::Generator& gen, cache::EvictionParams kv, const std::vector<int32_t>& ids,
                 size_t* peak, size_t* after) {
  kv.prompt_tokens = static_cast<int64_t>(ids.size());
  auto cache = gen.NewCache(kv);
  EXPECT_TRUE(cache.ok()) << cache.status();
  if (!cache.ok()) return {};
  std::vector<float> logits(static_cast<size_t>(gen.config().vocab_size));
  EXPECT_TRUE(gen.Prefill(cache->get(), ids, kv.chunk, nullptr, logits.data()).ok());
  Retained out;
  const cache::KvCacheShape& s = (*cache)->shape();
  for (int64_t l = 0; l < s.num_layers; ++l) {
    out.emplace_back();
    for (int64_t h = 0; h < s.num_kv_heads; ++h) {
      const int32_t* p = (*cache)->Positions(l, h);
      out.back().emplace_back(p, p + (*cache)->View(l, h).len);
    }
  }
  *peak = (*cache)->stats().peak_bytes;
  *after = (*cache)->bytes_reserved();
  return out;
}

// The share of `a`'s retained positions that `b` retains too, over every (layer, KV head).
double Overlap(const Retained& a, const Retained& b) {
  int64_t both = 0, total = 0;
  for (size_t l = 0; l < a.size() && l < b.size(); ++l) {
    for (size_t h = 0; h < a[l].size() && h < b[l].size(); ++h) {
      for (int32_t p : a[l][h]) both += std::count(b[l][h].begin(), b[l][h].end(), p);
      total += static_cast<int64_t>(a[l][h].size());
    }
  }
  return total > 0 ? static_cast<double>(both) / static_cast<double>(total) : 0.0;
}

TEST(WholePrefill, RetainsTheSameWhateverTheChunksAndFreesThePromptAfter) {
  const std::string dir = SharedModel("stories260K");
  ASSERT_TRUE(std::filesystem::exists(dir + "/config.json"))
      << dir << " is missing: this test needs ../shared/models beside the repository";
  model::LoadOptions lo;
  auto gen = model::Generator::Load(dir, lo);
  ASSERT_TRUE(gen.ok()) << gen.status();
  std::vector<int32_t> ids(300);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>((i * 37 + 11) % 500 + 3);
  for (const char* policy : {"h2o", "snapkv", "tova", "expected-attention"}) {
    for (const char* allocation : {"uniform", "adaptive"}) {
      SCOPED_TRACE(::testing::Message() << policy << " " << allocation);
      cache::EvictionParams kv;
      kv.policy = policy;
      kv.budget = 60;
      kv.window = 16;
      kv.allocation = allocation;
      kv.prefill = "whole";
      size_t peak_one = 0, after_one = 0, peak = 0, after = 0;
      kv.chunk = 512;  // one chunk
      const Retained one = Prefill(**gen, kv, ids, &peak_one, &after_one);
      kv.chunk = 64;  // five chunks, the first one short
      const Retained five = Prefill(**gen, kv, ids, &peak, &after);
      // Equal up to the rounding of sums taken in another order (h2o sums every query's
      // attention; a GPU's kernels may group them differently).
      const double same = Overlap(one, five);
      EXPECT_GE(same, 0.99);
      std::printf("%s %s: whole, 1 vs 5 chunks %.4f", policy, allocation, same);
      for (const auto& layer : one) {
        int64_t total = 0;
        for (const auto& head : layer) total += static_cast<int64_t>(head.size());
        EXPECT_EQ(total, static_cast<int64_t>(layer.size()) * kv.budget);
      }
      // The whole prompt was held, then the slab shrank to budget + chunk per head.
      EXPECT_GT(peak, after);
      EXPECT_EQ(after * static_cast<size_t>(300 + 64), peak * static_cast<size_t>(60 + 64));
      // Chunked prefill evicts along the way: it keeps other tokens.
      kv.prefill = "chunked";
      const Retained chunked = Prefill(**gen, kv, ids, &peak, &after);
      const double differ = Overlap(one, chunked);
      std::printf("; whole vs chunked %.4f\n", differ);
      EXPECT_LT(differ, 0.99);
      EXPECT_EQ(peak, after);
    }
  }
}

}  // namespace
}  // namespace kvgate::testing
