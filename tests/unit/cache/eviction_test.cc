// The evicting KV cache and the training-free policies: invariants under random workloads,
// equality with the full cache when the budget exceeds the context, and each policy's retained
// set against a deliberately simple reference written here.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <numeric>
#include <random>
#include <set>

#include "cache/evicting_kv_cache.h"
#include "kernels/backend.h"
#include "model/arch/transformer.h"
#include "model/weights/stage_weights.h"
#include "nlohmann/json.hpp"
#include "tests/unit/test_backend.h"
#include "tests/unit/test_seed.h"

namespace kvgate::cache {
namespace {

// A tiny random Llama of a given GQA shape.
model::ModelConfig TinyConfig(int64_t heads, int64_t kv_heads, int64_t head_dim) {
  nlohmann::json j = {{"architectures", {"LlamaForCausalLM"}},
                      {"hidden_size", 32},
                      {"intermediate_size", 48},
                      {"num_hidden_layers", 2},
                      {"num_attention_heads", heads},
                      {"num_key_value_heads", kv_heads},
                      {"head_dim", head_dim},
                      {"vocab_size", 50},
                      {"max_position_embeddings", 4096}};
  return *model::ModelConfig::FromJson(j, "tiny");
}

struct DriveResult {
  std::vector<float> last_logits;  // of every step, concatenated
  std::vector<int32_t> tokens;
};

// Prefill `prompt` in chunks, then greedy-decode `steps` tokens, checking the cache invariants
// after every step.
DriveResult Drive(model::Transformer& t, KvCache& cache, const std::vector<int32_t>& prompt,
                  int64_t chunk, int64_t steps, int64_t budget, int64_t slack) {
  const auto& c = t.config();
  DriveResult r;
  std::vector<float> logits(static_cast<size_t>(c.vocab_size));
  auto check = [&](int64_t n_new) {
    for (int64_t l = 0; l < c.num_layers; ++l) {
      for (int64_t h = 0; h < c.num_kv_heads; ++h) {
        const auto view = cache.View(l, h);
        const int32_t* pos = cache.Positions(l, h);
        if (budget > 0) {
          // After a prefill chunk every head is within the budget; in decode within
          // budget + slack - 1 (it evicts on reaching budget + slack).
          ASSERT_LE(view.len, n_new > 1 ? budget : budget + slack - 1) << "layer " << l;
        }
        for (int64_t j = 1; j < view.len; ++j) ASSERT_LT(pos[j - 1], pos[j]) << "order";
      }
    }
    ASSERT_LE(cache.bytes_used(), cache.bytes_reserved());
  };
  const int64_t n = static_cast<int64_t>(prompt.size());
  for (int64_t start = 0; start < n; start += chunk) {
    const int64_t len = std::min(chunk, n - start);
    std::vector<int32_t> pos(static_cast<size_t>(len));
    std::iota(pos.begin(), pos.end(), static_cast<int32_t>(start));
    model::SequenceStep s{&cache, pos.data(), len};
    EXPECT_TRUE(t.Forward({&s, 1}, prompt.data() + start).ok());
    check(len);
  }
  int64_t row = (n - 1) % chunk;
  EXPECT_TRUE(t.Logits({&row, 1}, logits.data()).ok());
  for (int64_t step = 0; step < steps; ++step) {
    r.last_logits.insert(r.last_logits.end(), logits.begin(), logits.end());
    const int32_t next =
        static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    r.tokens.push_back(next);
    const int32_t p = static_cast<int32_t>(n + step);
    model::SequenceStep s{&cache, &p, 1};
    EXPECT_TRUE(t.Forward({&s, 1}, &next).ok());
    check(1);
    row = 0;
    EXPECT_TRUE(t.Logits({&row, 1}, logits.data()).ok());
  }
  return r;
}

TEST(Eviction, RandomizedInvariants) {
  // A fresh seed each run (printed on failure); KVGATE_TEST_SEED replays one.
  const uint32_t seed = testing::TestSeed();
  SCOPED_TRACE("KVGATE_TEST_SEED=" + std::to_string(seed));
  std::mt19937 rng(seed);
  auto backend = testing::TestBackend(0);
  const std::vector<std::string> policies = {"streaming", "h2o", "snapkv", "tova",
                                             "expected-attention"};
  for (int trial = 0; trial < 24; ++trial) {
    const int64_t kv_heads = 1 + static_cast<int64_t>(rng() % 3);
    const int64_t group = 1 + static_cast<int64_t>(rng() % 3);
    const auto config = TinyConfig(kv_heads * group, kv_heads, 8);
    auto w = model::MakeSyntheticWeights(config, DType::kF32, 0, -1, rng());
    ASSERT_TRUE(w.ok());
    auto made = model::Transformer::Create(config, std::move(*w), backend.get());
    ASSERT_TRUE(made.ok());
    model::Transformer& t = **made;
    EvictionParams p;
    p.policy = policies[rng() % policies.size()];
    p.budget = 8 + static_cast<int64_t>(rng() % 40);
    p.chunk = 1 + static_cast<int64_t>(rng() % 48);
    p.decode_slack = 1 + static_cast<int64_t>(rng() % 8);
    p.sinks = static_cast<int64_t>(rng() % 4);
    p.window = 1 + static_cast<int64_t>(rng() % (p.budget - 1));
    p.position = rng() % 2 ? "reassign" : "original";
    auto cache = MakeEvictingKvCache(t.cache_shape(), p, backend.get(), t.Rotation());
    ASSERT_TRUE(cache.ok()) << cache.status();
    std::vector<int32_t> prompt(static_cast<size_t>(20 + rng() % 150));
    for (auto& id : prompt) id = static_cast<int32_t>(rng() % 50);
    SCOPED_TRACE(p.policy + " budget " + std::to_string(p.budget) + " chunk " +
                 std::to_string(p.chunk) + " kv_heads " + std::to_string(kv_heads) + " group " +
                 std::to_string(group));
    Drive(t, **cache, prompt, p.chunk, 30, p.budget, p.decode_slack);
    const auto stats = (*cache)->stats();
    // After an eviction a head keeps at most the budget; a sequence that never outgrew budget +
    // decode slack never evicted and keeps all it saw.
    const int64_t seen = (*cache)->num_tokens_seen();
    if (stats.evicted_tokens > 0) {
      EXPECT_LE(stats.max_retained_per_head, p.budget);
    } else {
      EXPECT_LE(seen, p.budget + std::max(p.chunk, p.decode_slack));
      EXPECT_LE(stats.max_retained_per_head, seen);
    }
    EXPECT_LE(stats.max_held_per_head, p.budget + std::max(p.chunk, p.decode_slack));
    EXPECT_EQ(seen, static_cast<int64_t>(prompt.size()) + 30);
    if (seen > p.budget + p.decode_slack) EXPECT_GT(stats.evicted_tokens, 0);
  }
}

TEST(Eviction, BudgetAboveContextEqualsFull) {
  auto backend = testing::TestBackend(0);
  const auto config = TinyConfig(6, 2, 8);
  auto w = model::MakeSyntheticWeights(config, DType::kF32, 0, -1, 99);
  ASSERT_TRUE(w.ok());
  auto made = model::Transformer::Create(config, std::move(*w), backend.get());
  ASSERT_TRUE(made.ok());
  model::Transformer& t = **made;
  std::vector<int32_t> prompt(90);
  for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = static_cast<int32_t>((i * 17 + 5) % 50);
  auto full = MakeFullKvCache(t.cache_shape(), 4096, backend.get());
  const DriveResult ref = Drive(t, *full, prompt, 16, 40, 0, 0);
  for (const std::string& policy : {"streaming", "h2o", "snapkv", "tova", "expected-attention"}) {
    for (const std::string position : {"original", "reassign"}) {
      EvictionParams p;
      p.policy = policy;
      p.budget = 200;  // more than the 130 tokens of the sequence
      p.chunk = 16;
      p.position = position;
      auto cache = MakeEvictingKvCache(t.cache_shape(), p, backend.get(), t.Rotation());
      ASSERT_TRUE(cache.ok());
      const DriveResult got = Drive(t, **cache, prompt, 16, 40, p.budget, p.decode_slack);
      EXPECT_EQ(got.tokens, ref.tokens) << policy;
      EXPECT_EQ(got.last_logits, ref.last_logits) << policy;  // exactly: same kernels
      EXPECT_EQ((*cache)->stats().evicted_tokens, 0);
    }
  }
}

// ---- Each policy against a simple reference, driving the cache directly. ----

// Feeds `n_new` tokens to one layer with random K/V and the given mass rows; returns the
// original positions kept per head.
class CacheHarness {
 public:
  CacheHarness(const EvictionParams& p, int64_t kv_heads)
      : shape_{1, kv_heads, 4},
        backend_(testing::TestBackend(1)),
        cache_(*MakeEvictingKvCache(shape_, p, backend_.get())) {}
  KvCache& cache() { return *cache_; }
  void Step(const std::vector<std::vector<float>>& mass_per_head, int64_t n_new) {
    auto kv = backend_->Alloc(n_new * shape_.num_kv_heads * shape_.head_dim, DType::kF32);
    ASSERT_TRUE(kv.ok());
    std::vector<int32_t> pos(static_cast<size_t>(n_new));
    std::iota(pos.begin(), pos.end(), next_pos_);
    next_pos_ += static_cast<int32_t>(n_new);
    auto ctx = cache_->Prepare(pos.data(), n_new);
    ASSERT_TRUE(ctx.ok()) << ctx.status();
    cache_->Append(0, kv->as<float>(), kv->as<float>(), pos.data(), n_new);
    const auto req = (*ctx)->mass;
    int64_t stride = 0;
    std::vector<float> mass;
    if (req.wanted) {
      stride = cache_->View(0, 0).len;
      mass.assign(static_cast<size_t>(stride * shape_.num_kv_heads), 0.f);
      for (int64_t h = 0; h < shape_.num_kv_heads; ++h)
        std::copy(mass_per_head[h].begin(), mass_per_head[h].end(), mass.begin() + h * stride);
    }
    ASSERT_TRUE(cache_->AfterAttention(0, req.wanted ? mass.data() : nullptr, stride).ok());
  }
  std::vector<int32_t> Kept(int64_t head) const {
    const auto v = cache_->View(0, head);
    const int32_t* p = cache_->Positions(0, head);
    return std::vector<int32_t>(p, p + v.len);
  }
  int64_t len(int64_t head) const { return cache_->View(0, head).len; }

 private:
  KvCacheShape shape_;
  std::unique_ptr<kernels::Backend> backend_;
  std::unique_ptr<KvCache> cache_;
  int32_t next_pos_ = 0;
};

// Top `b` of `prio` (ties: larger index), returned as the positions `pos` in ascending order.
std::vector<int32_t> TopB(const std::vector<float>& prio, const std::vector<int32_t>& pos,
                          size_t b) {
  std::vector<size_t> idx(prio.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](size_t a, size_t c) {
    return prio[a] > prio[c] || (prio[a] == prio[c] && a > c);
  });
  idx.resize(std::min(b, idx.size()));
  std::sort(idx.begin(), idx.end());
  std::vector<int32_t> out;
  for (size_t i : idx) out.push_back(pos[i]);
  return out;
}

TEST(PolicyReference, StreamingKeepsSinksAndRecent) {
  EvictionParams p{
      .policy = "streaming", .budget = 10, .chunk = 8, .sinks = 3, .position = "original"};
  CacheHarness h(p, 2);
  for (int step = 0; step < 6; ++step) h.Step({}, 8);
  const std::vector<int32_t> want = {0, 1, 2, 41, 42, 43, 44, 45, 46, 47};
  EXPECT_EQ(h.Kept(0), want);
  EXPECT_EQ(h.Kept(1), want);
}

// Under position re-assignment new tokens are rotated at their cache index, and a key moved
// from index src to dst by eviction is re-rotated by dst - src: every retained key then sits at
// its contiguous cache index. Keys here are the unit vector (1, 0, 0, 0) rotated to their
// position p with inv_freq 1 (so key j must read (cos j, 0, sin j, 0)); the backend applies the
// rotations, the test reads the keys back through it.
TEST(PolicyReference, ReassignKeepsContiguousPositions) {
  auto backend = testing::TestBackend(1);
  KeyRotation rotation{4, [](const int32_t* deltas, int64_t n, float* cos, float* sin) {
                         for (int64_t i = 0; i < n; ++i) {
                           cos[2 * i] = std::cos(static_cast<float>(deltas[i]));
                           sin[2 * i] = std::sin(static_cast<float>(deltas[i]));
                           cos[2 * i + 1] = 1.f;  // the second pair does not turn
                           sin[2 * i + 1] = 0.f;
                         }
                       }};
  for (const std::string policy : {"streaming", "h2o"}) {
    EvictionParams p{
        .policy = policy, .budget = 10, .chunk = 8, .sinks = 3, .position = "reassign"};
    KvCacheShape shape{1, 2, 4};
    auto cache = *MakeEvictingKvCache(shape, p, backend.get(), rotation);
    int32_t next = 0;
    for (int step = 0; step < 9; ++step) {
      const int64_t n = step < 6 ? 8 : 1;
      std::vector<int32_t> orig(n), rope(n);
      std::iota(orig.begin(), orig.end(), next);
      next += static_cast<int32_t>(n);
      auto ctx = cache->Prepare(orig.data(), n);
      ASSERT_TRUE(ctx.ok()) << ctx.status();
      rope = (*ctx)->rope_positions;
      std::vector<float> k(n * 2 * 4, 0.f);
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t h = 0; h < 2; ++h) {
          k[(i * 2 + h) * 4] = std::cos(static_cast<float>(rope[i]));
          k[(i * 2 + h) * 4 + 2] = std::sin(static_cast<float>(rope[i]));
        }
      }
      auto dk = backend->Alloc(static_cast<int64_t>(k.size()), DType::kF32);
      ASSERT_TRUE(dk.ok());
      ASSERT_TRUE(backend->CopyToDevice(dk->data(), k.data(), k.size() * 4).ok());
      cache->Append(0, dk->as<float>(), dk->as<float>(), orig.data(), n);
      std::vector<float> mass(2 * 64, 0.1f);
      const auto req = (*ctx)->mass;
      ASSERT_TRUE(cache->AfterAttention(0, req.wanted ? mass.data() : nullptr, 64).ok());
      for (int64_t h = 0; h < 2; ++h) {
        const auto view = cache->View(0, h);
        std::vector<float> keys(static_cast<size_t>(view.len * view.stride));
        ASSERT_TRUE(backend->CopyToHost(keys.data(), view.k, keys.size() * 4).ok());
        for (int64_t j = 0; j < view.len; ++j) {
          const float* key = &keys[static_cast<size_t>(j * view.stride)];
          ASSERT_NEAR(key[0], std::cos(static_cast<float>(j)), 1e-4) << policy << " step " << step;
          ASSERT_NEAR(key[2], std::sin(static_cast<float>(j)), 1e-4) << policy << " step " << step;
        }
      }
    }
    EXPECT_GT(cache->stats().evicted_tokens, 0);
  }
}

TEST(PolicyReference, H2oSnapKvTovaMatchReferences) {
  std::mt19937 rng(std::random_device{}());
  std::uniform_real_distribution<float> u(0.f, 1.f);
  for (const std::string policy : {"h2o", "snapkv", "tova"}) {
    for (bool max_pool : {true, false}) {
      EvictionParams p{
          .policy = policy, .budget = 12, .chunk = 9, .window = 4, .pool_max = max_pool};
      const int64_t kv_heads = 2;
      CacheHarness h(p, kv_heads);
      // Reference state per head: positions and stored scores.
      std::vector<std::vector<int32_t>> pos(kv_heads);
      std::vector<std::vector<float>> score(kv_heads);
      int32_t next = 0;
      for (int step = 0; step < 7; ++step) {
        const int64_t n_new = step < 5 ? 9 : 1;
        std::vector<std::vector<float>> mass(kv_heads);
        for (int64_t hd = 0; hd < kv_heads; ++hd) {
          for (int64_t i = 0; i < n_new; ++i) pos[hd].push_back(next + static_cast<int32_t>(i));
          score[hd].resize(pos[hd].size(), 0.f);
          for (size_t j = 0; j < pos[hd].size(); ++j) mass[hd].push_back(u(rng));
        }
        next += static_cast<int32_t>(n_new);
        h.Step(mass, n_new);
        // Reference: update stored scores.
        for (int64_t hd = 0; hd < kv_heads; ++hd) {
          for (size_t j = 0; j < pos[hd].size(); ++j) {
            if (policy == "h2o") score[hd][j] += mass[hd][j];
            if (policy == "snapkv")
              score[hd][j] = n_new > 1 ? mass[hd][j] : score[hd][j] + mass[hd][j];
            if (policy == "tova") score[hd][j] = mass[hd][j];
          }
        }
        const size_t len = pos[0].size();
        const bool evict = static_cast<int64_t>(len) > p.budget &&
                           (n_new > 1 || policy == "tova" ||
                            static_cast<int64_t>(len) >= p.budget + p.decode_slack);
        if (!evict) continue;
        auto priorities = [&](int64_t hd) {
          std::vector<float> pr(len);
          const float inf = std::numeric_limits<float>::infinity();
          for (size_t j = 0; j < len; ++j) {
            if (policy == "h2o") {
              pr[j] = j >= len - static_cast<size_t>(p.budget - p.budget / 2) ? inf : score[hd][j];
            } else if (policy == "snapkv") {
              if (j >= len - static_cast<size_t>(p.window)) {
                pr[j] = inf;
                continue;
              }
              float acc = max_pool ? -inf : 0.f;
              for (int64_t t = static_cast<int64_t>(j) - 2; t <= static_cast<int64_t>(j) + 2; ++t) {
                if (t < 0 || t >= static_cast<int64_t>(len) - p.window) continue;
                acc = max_pool ? std::max(acc, score[hd][t]) : acc + score[hd][t];
              }
              pr[j] = max_pool ? acc : acc / 5.f;
            } else {
              pr[j] = score[hd][j];
            }
          }
          return pr;
        };
        if (policy == "tova") {
          std::vector<float> sum(len, 0.f);
          for (int64_t hd = 0; hd < kv_heads; ++hd) {
            auto pr = priorities(hd);
            for (size_t j = 0; j < len; ++j) sum[j] += pr[j];
          }
          auto keep = TopB(sum, pos[0], static_cast<size_t>(p.budget));
          for (int64_t hd = 0; hd < kv_heads; ++hd) {
            std::vector<float> s2;
            for (size_t j = 0; j < len; ++j)
              if (std::binary_search(keep.begin(), keep.end(), pos[hd][j]))
                s2.push_back(score[hd][j]);
            pos[hd] = keep;
            score[hd] = s2;
          }
        } else {
          for (int64_t hd = 0; hd < kv_heads; ++hd) {
            auto keep = TopB(priorities(hd), pos[hd], static_cast<size_t>(p.budget));
            std::vector<float> s2;
            for (size_t j = 0; j < len; ++j)
              if (std::binary_search(keep.begin(), keep.end(), pos[hd][j]))
                s2.push_back(score[hd][j]);
            pos[hd] = keep;
            score[hd] = s2;
          }
        }
        for (int64_t hd = 0; hd < kv_heads; ++hd) {
          ASSERT_EQ(h.Kept(hd), pos[hd]) << policy << " step " << step << " head " << hd;
        }
      }
      if (policy != "snapkv") break;  // pooling only matters to snapkv
    }
  }
}

TEST(EvictionParams, BadInputIsNamed) {
  auto msg = [](EvictionParams p) { return std::string(p.Validate().message()); };
  EXPECT_NE(msg({.policy = "lru", .budget = 8}).find("unknown --kv-policy 'lru'"),
            std::string::npos);
  EXPECT_NE(msg({.policy = "h2o"}).find("needs --kv-budget"), std::string::npos);
  EXPECT_NE(msg({.policy = "streaming", .budget = 4, .sinks = 4}).find("--kv-sinks"),
            std::string::npos);
  EXPECT_NE(msg({.policy = "snapkv", .budget = 16, .window = 32}).find("window"),
            std::string::npos);
  EXPECT_NE(msg({.policy = "locret", .budget = 64}).find("needs --kv-weights"), std::string::npos);
  EXPECT_NE(msg({.policy = "locret", .budget = 10, .stabilizers = 10, .weights = "w.safetensors"})
                .find("must exceed --kv-stabilizers 10"),
            std::string::npos);
  EXPECT_NE(msg({.policy = "h2o", .budget = 8, .chunk = 0}).find("--kv-chunk"), std::string::npos);
  EXPECT_TRUE(EvictionParams{.policy = "full"}.Validate().ok());
}

}  // namespace

// Per-layer budgets (the coordinator's negotiation and operator caps): each layer keeps its own
// budget; lowering one at run time makes that layer evict down at the next step.
TEST(Eviction, PerLayerBudgetsAndLowering) {
  const model::ModelConfig c = TinyConfig(4, 2, 8);
  auto weights = model::MakeSyntheticWeights(c, DType::kF32, 0, c.num_layers, 5);
  ASSERT_TRUE(weights.ok());
  auto backend = testing::TestBackend(1);
  auto made = model::Transformer::Create(c, *std::move(weights), backend.get());
  ASSERT_TRUE(made.ok());
  model::Transformer& t = **made;
  for (const char* policy : {"h2o", "tova", "snapkv", "streaming"}) {
    SCOPED_TRACE(policy);
    EvictionParams p;
    p.policy = policy;
    p.budget = 12;
    p.chunk = 8;
    p.window = 3;
    p.position = "original";
    p.layer_budgets = {5, 12};
    auto cache = MakeEvictingKvCache(t.cache_shape(), p, backend.get(), t.Rotation());
    ASSERT_TRUE(cache.ok()) << cache.status();
    std::vector<int32_t> prompt(40);
    std::mt19937 rng(3);
    for (int32_t& id : prompt) id = static_cast<int32_t>(rng() % 50);
    Drive(t, **cache, prompt, 8, 0, /*budget=*/12, p.decode_slack);
    for (int64_t h = 0; h < c.num_kv_heads; ++h) {
      EXPECT_EQ((*cache)->View(0, h).len, 5);
      EXPECT_EQ((*cache)->View(1, h).len, 12);
    }
    EXPECT_EQ((*cache)->budget(0), 5);
    (*cache)->LowerBudget(1, 4);
    (*cache)->LowerBudget(0, 9);  // never raises
    EXPECT_EQ((*cache)->budget(0), 5);
    EXPECT_EQ((*cache)->budget(1), 4);
    // One decode step: layer 1 evicts down to its new budget at once.
    const size_t reserved = (*cache)->bytes_reserved();
    const int32_t token = 7, pos = 40;
    (*cache)->BeginStep(StepKind::kDecode);
    model::SequenceStep s{cache->get(), &pos, 1};
    ASSERT_TRUE(t.Forward({&s, 1}, &token).ok());
    for (int64_t h = 0; h < c.num_kv_heads; ++h) {
      EXPECT_EQ((*cache)->View(1, h).len, 4);
      // Layer 0 keeps its budget (tova evicts every step) or holds one more within the slack.
      EXPECT_EQ((*cache)->View(0, h).len, std::string(policy) == "tova" ? 5 : 6);
    }
    // Each layer's slab is its own budget plus the decode slack (16 > chunk): 5 + 16 and
    // 12 + 16 at first, then layer 1 shrank to 4 + 16.
    EXPECT_EQ(reserved, static_cast<size_t>((5 + 16) + (12 + 16)) * c.num_kv_heads *
                            t.cache_shape().slot_bytes());
    EXPECT_EQ((*cache)->bytes_reserved(), reserved * (5 + 16 + 4 + 16) / (5 + 16 + 12 + 16));
    EXPECT_EQ((*cache)->stats().peak_bytes, reserved);
    // And keeps working: more decode steps stay within the budgets.
    for (int32_t i = 0; i < 30; ++i) {
      const int32_t p2 = 41 + i;
      model::SequenceStep s2{cache->get(), &p2, 1};
      ASSERT_TRUE(t.Forward({&s2, 1}, &token).ok());
      for (int64_t h = 0; h < c.num_kv_heads; ++h) {
        EXPECT_LE((*cache)->View(1, h).len, 4 + p.decode_slack);
        EXPECT_LE((*cache)->View(0, h).len, 5 + p.decode_slack);
      }
    }
  }
}

}  // namespace kvgate::cache
