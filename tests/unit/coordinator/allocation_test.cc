// Budget allocation (uniform, pyramid, adaptive) and whole-prompt prefill, end to end through
// the coordinator's grant and the worker's cache: under random workloads a sequence's cache on
// a stage never reserves more than the stage granted, never retains more than its layer
// budgets allow after an eviction, and its retained keys are the keys it was given (the
// adaptive layout moves heads' rows around; nothing may be lost or mixed up on the way).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <numeric>
#include <random>

#include "cache/budget_allocation.h"
#include "cache/evicting_kv_cache.h"
#include "cache/eviction/device_weights.h"
#include "coordinator/planner.h"
#include "model/arch/transformer.h"
#include "model/weights/stage_weights.h"
#include "nlohmann/json.hpp"
#include "tests/unit/test_backend.h"
#include "tests/unit/test_seed.h"

namespace kvgate::coordinator {
namespace {

using cache::EvictionParams;
using cache::KvCache;
using cache::StepKind;

TEST(PyramidBudgets, KeepTheMeanAndGiveLowerLayersMore) {
  for (auto [mean, layers, beta, floor] :
       std::vector<std::tuple<int64_t, int64_t, double, int64_t>>{
           {100, 32, 20, 1}, {64, 7, 20, 33}, {12, 2, 20, 1}, {1000, 80, 5, 1}, {50, 3, 1, 1}}) {
    SCOPED_TRACE(::testing::Message() << mean << " " << layers << " " << beta << " " << floor);
    const std::vector<int64_t> b = cache::PyramidBudgets(mean, layers, beta, floor);
    ASSERT_EQ(static_cast<int64_t>(b.size()), layers);
    EXPECT_EQ(std::accumulate(b.begin(), b.end(), int64_t{0}), mean * layers);
    for (size_t l = 1; l < b.size(); ++l) EXPECT_LE(b[l], b[l - 1] + 1) << "layer " << l;
    for (int64_t x : b) EXPECT_GE(x, floor);
    if (beta > 1) {
      EXPECT_GT(b.front(), mean);
      EXPECT_LT(b.back(), mean);
    }
  }
  // PyramidKV's end points: max = 2 mean - mean / beta, min = mean / beta.
  const std::vector<int64_t> b = cache::PyramidBudgets(200, 11, 20, 1);
  EXPECT_NEAR(static_cast<double>(b.front()), 390, 1);
  EXPECT_NEAR(static_cast<double>(b.back()), 10, 1);
  EXPECT_EQ(cache::PyramidBudgets(30, 1, 20, 1), std::vector<int64_t>{30});
}

model::ModelConfig TinyConfig(int64_t layers, int64_t heads, int64_t kv_heads) {
  nlohmann::json j = {{"architectures", {"LlamaForCausalLM"}},
                      {"hidden_size", 32},
                      {"intermediate_size", 48},
                      {"num_hidden_layers", layers},
                      {"num_attention_heads", heads},
                      {"num_key_value_heads", kv_heads},
                      {"head_dim", 8},
                      {"vocab_size", 50},
                      {"max_position_embeddings", 4096}};
  return *model::ModelConfig::FromJson(j, "tiny");
}

std::shared_ptr<cache::LocretHeads> RandomHeads(const model::ModelConfig& c, std::mt19937& rng) {
  auto h = std::make_shared<cache::LocretHeads>();
  h->num_layers = c.num_layers;
  h->num_heads = c.num_heads;
  h->num_kv_heads = c.num_kv_heads;
  h->head_dim = c.head_dim;
  h->d_r = 8;
  std::normal_distribution<float> normal(0.f, 0.3f);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    h->fc1.emplace_back(static_cast<size_t>(h->d_r * h->d_in()));
    h->fc2.emplace_back(static_cast<size_t>(c.num_kv_heads * h->d_r));
    for (float& x : h->fc1.back()) x = normal(rng);
    for (float& x : h->fc2.back()) x = normal(rng);
  }
  return h;
}

// The rows [n, head_dim] of a view's keys, on the host.
std::vector<float> Keys(kernels::Backend& backend, const kernels::KvHeadView& v) {
  std::vector<float> out(static_cast<size_t>(v.len * v.stride));
  EXPECT_TRUE(backend.CopyToHost(out.data(), v.k, out.size() * sizeof(float)).ok());
  return out;
}

TEST(Allocation, NeverExceedsTheGrantUnderRandomWorkloads) {
  const uint32_t seed = testing::TestSeed();
  SCOPED_TRACE("KVGATE_TEST_SEED=" + std::to_string(seed));
  std::mt19937 rng(seed);
  auto backend = testing::TestBackend(0);
  const std::vector<std::string> policies = {"h2o", "snapkv", "tova", "expected-attention",
                                             "locret"};
  const std::vector<std::string> allocations = cache::AllocationNames();
  int ragged_adaptive = 0, adaptive_multihead = 0;
  for (int trial = 0; trial < 36; ++trial) {
    EvictionParams p;
    p.allocation = allocations[static_cast<size_t>(trial) % allocations.size()];
    p.policy = policies[rng() % policies.size()];
    p.prefill = rng() % 2 ? "whole" : "chunked";
    p.position = rng() % 2 ? "reassign" : "original";
    p.budget = 8 + static_cast<int64_t>(rng() % 40);
    p.chunk = 1 + static_cast<int64_t>(rng() % 24);
    p.decode_slack = 1 + static_cast<int64_t>(rng() % 8);
    p.window = 1 + static_cast<int64_t>(rng() % 6);
    p.protected_tail = static_cast<int64_t>(rng() % 12);
    const int64_t layers = 2 + static_cast<int64_t>(rng() % 4);
    const int64_t kv_heads = (p.adaptive() ? 2 : 1) + static_cast<int64_t>(rng() % 2);
    const int64_t group = 1 + static_cast<int64_t>(rng() % 2);
    const model::ModelConfig config = TinyConfig(layers, kv_heads * group, kv_heads);
    std::vector<int32_t> prompt(static_cast<size_t>(20 + rng() % 140));
    for (int32_t& id : prompt) id = static_cast<int32_t>(rng() % 50);
    const int64_t n = static_cast<int64_t>(prompt.size());
    p.prompt_tokens = n;
    SCOPED_TRACE(::testing::Message()
                 << "trial " << trial << " " << p.policy << " " << p.allocation << " " << p.prefill
                 << " " << p.position << " budget " << p.budget << " chunk " << p.chunk
                 << " layers " << layers << " kv heads " << kv_heads << " prompt " << n);
    auto w = model::MakeSyntheticWeights(config, DType::kF32, 0, -1, rng());
    ASSERT_TRUE(w.ok());
    auto made = model::Transformer::Create(config, std::move(*w), backend.get());
    ASSERT_TRUE(made.ok());
    model::Transformer& t = **made;
    std::shared_ptr<cache::LocretHeads> heads;
    if (p.policy == "locret") {
      heads = RandomHeads(config, rng);
      p.locret = heads;
      auto up = cache::UploadEvictionWeights(heads, nullptr, backend.get());
      ASSERT_TRUE(up.ok()) << up.status();
      p.device_weights = *up;
      p.stabilizers = std::min<int64_t>(p.resolved_stabilizers(), p.budget - 1);
    }
    ASSERT_TRUE(p.Validate().ok()) << p.Validate();

    // The stage's grant, as the coordinator makes it (one stage, room to spare).
    const cache::KvCacheShape shape = t.cache_shape();
    StageCapacity stage;
    stage.bytes_per_token.assign(static_cast<size_t>(layers),
                                 kv_heads * static_cast<int64_t>(shape.slot_bytes()));
    stage.kv_capacity_bytes = int64_t{1} << 40;
    auto grants = GrantBudgets(p, n + 40, 4096, {stage}, 1);
    ASSERT_TRUE(grants.ok()) << grants.status();
    const StageGrant& g = (*grants)[0];
    EXPECT_EQ(g.layer_budgets, cache::LayerBudgets(p, 0, layers, layers));
    if (p.allocation == "pyramid") {
      EXPECT_GT(g.layer_budgets.front(), g.layer_budgets.back());
    }
    // What the worker does with it.
    EvictionParams granted = p;
    granted.budget = g.budget;
    granted.layer_budgets = g.layer_budgets;
    auto made_cache = cache::MakeEvictingKvCache(shape, granted, backend.get(), t.Rotation());
    ASSERT_TRUE(made_cache.ok()) << made_cache.status();
    KvCache& cache = **made_cache;
    EXPECT_EQ(static_cast<int64_t>(cache.bytes_reserved()), g.bytes);
    // A plain cache alongside: layer 0's keys do not depend on what was evicted.
    auto full = cache::MakeFullKvCache(shape, 4096, backend.get());

    // After each step: within the grant, and within the layer budgets as the step allows.
    auto check = [&](StepKind kind, int64_t tail_held, bool bounded) {
      ASSERT_LE(static_cast<int64_t>(cache.bytes_reserved()), g.bytes);
      ASSERT_LE(cache.bytes_used(), cache.bytes_reserved());
      for (int64_t l = 0; l < layers; ++l) {
        const int64_t b = g.layer_budgets[static_cast<size_t>(l)];
        // Per head (uniform, pyramid) and per layer (adaptive, whose heads share H * b):
        // after an eviction step the budget; in decode it evicts on reaching budget + slack;
        // after the protected tail (prefilled after the last eviction) budget + tail.
        int64_t head_bound = b, total_bound = kv_heads * b;
        if (kind == StepKind::kDecode) {
          head_bound = b + p.decode_slack - 1;
          total_bound = kv_heads * (b + p.decode_slack) - 1;
        } else if (kind == StepKind::kPrefillKeep) {
          head_bound = b + tail_held;
          total_bound = kv_heads * (b + tail_held);
        }
        int64_t total = 0;
        for (int64_t h = 0; h < kv_heads; ++h) {
          const kernels::KvHeadView v = cache.View(l, h);
          total += v.len;
          if (bounded && !p.adaptive()) {
            ASSERT_LE(v.len, head_bound) << "layer " << l << " head " << h;
          }
          if (p.adaptive() && kind == StepKind::kPrefillLast && v.len > b) ++ragged_adaptive;
          const int32_t* pos = cache.Positions(l, h);
          for (int64_t j = 1; j < v.len; ++j) ASSERT_LT(pos[j - 1], pos[j]) << "order";
          if (l == 0 && p.position_mode() == "original") {
            // Every retained key is the key its position was given.
            const std::vector<float> kept = Keys(*backend, v);
            const std::vector<float> all = Keys(*backend, full->View(0, h));
            for (int64_t j = 0; j < v.len; ++j) {
              for (int64_t d = 0; d < v.stride; ++d) {
                ASSERT_EQ(kept[static_cast<size_t>(j * v.stride + d)],
                          all[static_cast<size_t>(pos[j] * v.stride + d)])
                    << "head " << h << " row " << j << " (position " << pos[j] << ")";
              }
            }
          }
        }
        if (bounded && p.adaptive()) {
          ASSERT_LE(total, total_bound) << "layer " << l;
        }
      }
    };
    // Prefill as the generator chunks it.
    const int64_t tail = p.prompt_tail();
    const int64_t prefix = std::max<int64_t>(0, n - tail);
    for (int64_t start = 0; start < n;) {
      int64_t end = std::min(start + p.chunk, start < prefix ? prefix : n);
      if (p.whole_prefill() && start == 0 && prefix % p.chunk != 0) end = prefix % p.chunk;
      const StepKind kind = start >= prefix ? StepKind::kPrefillKeep
                            : end < prefix
                                ? (p.whole_prefill() ? StepKind::kPrefillKeep : StepKind::kPrefill)
                                : StepKind::kPrefillLast;
      std::vector<int32_t> pos(static_cast<size_t>(end - start));
      std::iota(pos.begin(), pos.end(), static_cast<int32_t>(start));
      cache.BeginStep(kind);
      full->BeginStep(kind);
      model::SequenceStep s{&cache, pos.data(), end - start};
      model::SequenceStep f{full.get(), pos.data(), end - start};
      ASSERT_TRUE(t.Forward({&s, 1}, prompt.data() + start).ok());
      ASSERT_TRUE(t.Forward({&f, 1}, prompt.data() + start).ok());
      // Whole-prompt prefill keeps every token until its last evicting chunk.
      check(kind, start >= prefix ? end - prefix : 0,
            !(p.whole_prefill() && kind == StepKind::kPrefillKeep && start < prefix));
      start = end;
    }
    if (p.whole_prefill() && prefix > 0) {
      // Compressed once, the slab is back to budget + extra per head.
      int64_t rows = 0;
      for (int64_t b : g.layer_budgets) rows += kv_heads * (b + p.slab_extra());
      EXPECT_EQ(cache.bytes_reserved(), static_cast<size_t>(rows) * shape.slot_bytes());
      EXPECT_EQ(static_cast<int64_t>(cache.stats().peak_bytes), g.bytes);
    }
    // Decode.
    for (int32_t step = 0; step < 40; ++step) {
      const int32_t pos = static_cast<int32_t>(n) + step, token = static_cast<int32_t>(rng() % 50);
      cache.BeginStep(StepKind::kDecode);
      full->BeginStep(StepKind::kDecode);
      model::SequenceStep s{&cache, &pos, 1};
      model::SequenceStep f{full.get(), &pos, 1};
      ASSERT_TRUE(t.Forward({&s, 1}, &token).ok());
      ASSERT_TRUE(t.Forward({&f, 1}, &token).ok());
      check(StepKind::kDecode, 0, true);
    }
    if (p.adaptive()) ++adaptive_multihead;
  }
  // Adaptive gave some head more than the mean at least once (heads' scores differ).
  EXPECT_GT(adaptive_multihead, 0);
  EXPECT_GT(ragged_adaptive, 0);
}

TEST(Allocation, PyramidGrantsFollowTheModelAcrossStages) {
  // Two stages of a 6-layer model: the first holds the lower layers, so it is granted more
  // per layer, and the mean over the model is the request's budget.
  std::vector<StageCapacity> stages(2);
  for (int s = 0; s < 2; ++s) {
    stages[static_cast<size_t>(s)].first_layer = 3 * s;
    stages[static_cast<size_t>(s)].bytes_per_token.assign(3, 64);
    stages[static_cast<size_t>(s)].kv_capacity_bytes = int64_t{1} << 30;
  }
  EvictionParams p;
  p.policy = "snapkv";
  p.budget = 100;
  p.allocation = "pyramid";
  auto g = GrantBudgets(p, 1000, 4096, stages, 4);
  ASSERT_TRUE(g.ok()) << g.status();
  const std::vector<int64_t> all = cache::PyramidBudgets(100, 6, 20, p.min_budget());
  EXPECT_EQ((*g)[0].layer_budgets, std::vector<int64_t>(all.begin(), all.begin() + 3));
  EXPECT_EQ((*g)[1].layer_budgets, std::vector<int64_t>(all.begin() + 3, all.end()));
  EXPECT_GT((*g)[0].bytes, (*g)[1].bytes);
  EXPECT_EQ((*g)[0].bytes + (*g)[1].bytes, 6 * (100 + p.slab_extra()) * 64);
  // A tight stage scales its layers down together and stays within its memory.
  stages[0].kv_capacity_bytes = 4 * 3 * (60 + p.slab_extra()) * 64;
  g = GrantBudgets(p, 1000, 4096, stages, 4);
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_LE((*g)[0].bytes * 4, stages[0].kv_capacity_bytes);
  EXPECT_GT((*g)[0].layer_budgets[0], (*g)[0].layer_budgets[2]);
  EXPECT_LT((*g)[0].budget, 100);
  // Whole-prompt prefill counts the prompt held until it is compressed.
  p.allocation = "uniform";
  p.prefill = "whole";
  p.prompt_tokens = 3000;
  stages[0].kv_capacity_bytes = int64_t{1} << 30;
  g = GrantBudgets(p, 3100, 4096, stages, 4);
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ((*g)[1].bytes, 3 * (3000 + p.slab_extra()) * 64);
  stages[1].kv_capacity_bytes = 4 * 3 * (2000 + p.slab_extra()) * 64;
  g = GrantBudgets(p, 3100, 4096, stages, 4);
  ASSERT_FALSE(g.ok());
  EXPECT_NE(std::string(g.status().message()).find("whole-prompt prefill"), std::string::npos)
      << g.status();
}

}  // namespace
}  // namespace kvgate::coordinator
