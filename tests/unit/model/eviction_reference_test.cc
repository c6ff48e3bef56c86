// kvgate's learned eviction policies against the PyTorch reference of the training package
// (training/kvgate_train/evict_ref.py; fixtures by tests/fixtures/make_eviction_reference.py):
// the stored scores (Locret retaining-head scores, Attention-Gate keep probabilities) within
// 1e-4, the retained positions of every (layer, KV head) after prefill exactly, the last prompt
// token's logits within 1e-4 and the greedy tokens decoded under the decode eviction rule;
// both policies in both position modes.
#include <gtest/gtest.h>

#include <filesystem>
#include <map>

#include "model/generation/generator.h"
#include "tests/unit/model/test_util.h"

namespace kvgate::testing {
namespace {

class EvictionReferenceTest : public ::testing::TestWithParam<std::string> {};

TEST_P(EvictionReferenceTest, ScoresRetainedPositionsLogitsAndTokensMatch) {
  const std::string ref_path = "tests/testdata/eviction/" + GetParam() + ".json";
  const nlohmann::json ref = ReadJson(ref_path);
  ASSERT_FALSE(ref.is_discarded()) << ref_path;
  const std::string dir = SharedModel("stories260K");
  ASSERT_TRUE(std::filesystem::exists(dir + "/config.json"))
      << dir << " is missing: this test needs ../shared/models beside the repository";
  model::LoadOptions lo;
  auto gen = model::Generator::Load(dir, lo);
  ASSERT_TRUE(gen.ok()) << gen.status();

  const nlohmann::json& p = ref["params"];
  cache::EvictionParams kv;
  kv.policy = ref["policy"].get<std::string>();
  kv.budget = p["budget"].get<int64_t>();
  kv.chunk = p["chunk"].get<int64_t>();
  if (kv.policy == "locret") {
    kv.stabilizers = p["stabilizers"].get<int64_t>();
    kv.protected_tail = p["n_loc"].get<int64_t>();
  }
  kv.decode_slack = p["slack"].get<int64_t>();
  kv.position = p["position"].get<std::string>();
  kv.weights = ref["weights"].get<std::string>();
  const std::vector<int32_t> ids = ref["token_ids"].get<std::vector<int32_t>>();

  auto cache = (*gen)->NewCache(kv);
  ASSERT_TRUE(cache.ok()) << cache.status();
  const int64_t vocab = (*gen)->config().vocab_size;
  std::vector<float> last(static_cast<size_t>(vocab));
  ASSERT_TRUE((*gen)->Prefill(cache->get(), ids, kv.chunk, nullptr, last.data()).ok());

  const auto& want_retained = ref["retained_after_prefill"];
  const auto& scores = ref["scores"];
  const int64_t layers = (*gen)->config().num_layers, heads = (*gen)->config().num_kv_heads;
  ASSERT_EQ(static_cast<int64_t>(want_retained.size()), layers);
  double max_score_diff = 0;
  for (int64_t l = 0; l < layers; ++l) {
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t len = (*cache)->View(l, h).len;
      const int32_t* pos = (*cache)->Positions(l, h);
      const std::vector<int32_t> got(pos, pos + len);
      EXPECT_EQ(got, want_retained[l][h].get<std::vector<int32_t>>())
          << "layer " << l << " head " << h;
      const float* sc = (*cache)->Scores(l, h);
      ASSERT_NE(sc, nullptr);
      for (int64_t j = 0; j < len; ++j) {
        const double want = scores[l][h][got[static_cast<size_t>(j)]].get<double>();
        max_score_diff = std::max(max_score_diff, std::abs(want - sc[j]));
      }
    }
  }
  EXPECT_LT(max_score_diff, 1e-4);

  const std::vector<double> want_logits = ref["last_prompt_logits"].get<std::vector<double>>();
  double max_logit_diff = 0;
  for (int64_t t = 0; t < vocab; ++t) {
    max_logit_diff = std::max(max_logit_diff, std::abs(want_logits[static_cast<size_t>(t)] -
                                                       last[static_cast<size_t>(t)]));
  }
  EXPECT_LT(max_logit_diff, 1e-4);

  // Greedy decoding with the decode eviction rule gives the reference's tokens.
  const std::vector<int32_t> want_tokens = ref["generated"].get<std::vector<int32_t>>();
  model::GenerateOptions opt;
  opt.sampling.temperature = 0;
  opt.max_tokens = static_cast<int64_t>(want_tokens.size());
  opt.ignore_eos = true;
  opt.kv = kv;
  auto result = (*gen)->Generate(ids, opt, nullptr);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->token_ids, want_tokens);
  EXPECT_LE(result->kv_stats.max_retained_per_head, kv.budget);
  const int64_t tail = kv.policy == "locret" ? kv.prompt_tail() + 1 : kv.decode_slack;
  EXPECT_LE(result->kv_stats.max_held_per_head, kv.budget + std::max(tail, kv.chunk));
  EXPECT_GT(result->kv_stats.evicted_tokens, 0);
}

INSTANTIATE_TEST_SUITE_P(Policies, EvictionReferenceTest,
                         ::testing::Values("locret-stories260K-reassign",
                                           "locret-stories260K-original",
                                           "attention-gate-stories260K-original",
                                           "attention-gate-stories260K-reassign"));

// The learned policies keep the cache's invariants over budgets and chunk sizes, and Locret
// with a budget above the context gives exactly the plain cache's logits.
TEST(LearnedPoliciesTest, BudgetInvariantsAndLargeBudgetEqualsFull) {
  model::LoadOptions lo;
  auto gen = model::Generator::Load(SharedModel("stories260K"), lo);
  ASSERT_TRUE(gen.ok()) << gen.status();
  const nlohmann::json golden = ReadJson(SharedModel("stories260K") + "/golden_greedy.json");
  std::vector<int32_t> ids = golden["greedy_token_ids"].get<std::vector<int32_t>>();
  ids.resize(160);
  const std::map<std::string, std::string> weights = {
      {"locret", "tests/testdata/eviction/stories260K-random-locret.safetensors"},
      {"attention-gate", "tests/testdata/eviction/stories260K-random-gates.safetensors"}};
  for (const auto& [policy, file] : weights) {
    for (int64_t budget : {12, 40, 90}) {
      for (int64_t chunk : {7, 32}) {
        SCOPED_TRACE(policy + " budget " + std::to_string(budget) + " chunk " +
                     std::to_string(chunk));
        model::GenerateOptions opt;
        opt.sampling.temperature = 0;
        opt.max_tokens = 60;
        opt.ignore_eos = true;
        opt.kv.policy = policy;
        opt.kv.budget = budget;
        opt.kv.chunk = chunk;
        opt.kv.protected_tail = 20;
        opt.kv.weights = file;
        auto r = (*gen)->Generate(ids, opt, nullptr);
        ASSERT_TRUE(r.ok()) << r.status();
        EXPECT_LE(r->kv_stats.max_retained_per_head, budget);
        const int64_t tail = opt.kv.prompt_tail();
        EXPECT_LE(r->kv_stats.max_held_per_head,
                  budget + std::max(chunk, tail + opt.kv.decode_slack));
        EXPECT_GT(r->kv_stats.evicted_tokens, 0);
        EXPECT_EQ(r->token_ids.size(), 60u);
      }
    }
  }
  // Locret with a budget above the context evicts nothing: the plain cache's logits exactly.
  auto full = (*gen)->PromptLogits(ids, 32);
  ASSERT_TRUE(full.ok());
  cache::EvictionParams kv;
  kv.policy = "locret";
  kv.budget = 400;
  kv.chunk = 32;
  kv.weights = weights.at("locret");
  kv.position = "original";
  auto c = (*gen)->NewCache(kv);
  ASSERT_TRUE(c.ok()) << c.status();
  std::vector<float> logits(full->size());
  ASSERT_TRUE((*gen)->Prefill(c->get(), ids, 32, logits.data(), nullptr).ok());
  EXPECT_EQ(logits, *full);
  EXPECT_EQ((*c)->stats().evicted_tokens, 0);
}

TEST(LocretWeightsTest, RefusesMissingWrongAndForeignWeights) {
  model::LoadOptions lo;
  auto gen = model::Generator::Load(SharedModel("stories260K"), lo);
  ASSERT_TRUE(gen.ok()) << gen.status();
  cache::EvictionParams kv;
  kv.policy = "locret";
  kv.budget = 32;
  kv.stabilizers = 8;
  // No weights.
  auto none = (*gen)->NewCache(kv);
  ASSERT_FALSE(none.ok());
  EXPECT_NE(std::string(none.status().message()).find("needs --kv-weights"), std::string::npos);
  // Weights of another model (the tiny HF fixture's shapes differ).
  kv.weights = "tests/testdata/hf_models/llama-f16/model.safetensors";
  auto foreign = (*gen)->NewCache(kv);
  ASSERT_FALSE(foreign.ok());
  EXPECT_NE(std::string(foreign.status().message()).find("not Locret retaining heads"),
            std::string::npos);
  kv.weights = "tests/testdata/eviction/does-not-exist.safetensors";
  EXPECT_FALSE((*gen)->NewCache(kv).ok());
  // A budget that does not exceed the stabilizers.
  kv.weights = "tests/testdata/eviction/stories260K-random-locret.safetensors";
  kv.budget = 8;
  auto small = (*gen)->NewCache(kv);
  ASSERT_FALSE(small.ok());
  EXPECT_NE(std::string(small.status().message()).find("must exceed --kv-stabilizers"),
            std::string::npos);
  // Attention-Gate: gates of another model (a locret file), an unknown position mode.
  kv.policy = "attention-gate";
  kv.budget = 32;
  auto wrong = (*gen)->NewCache(kv);
  ASSERT_FALSE(wrong.ok());
  EXPECT_NE(std::string(wrong.status().message()).find("not Attention-Gate gates"),
            std::string::npos);
  kv.weights = "tests/testdata/eviction/stories260K-random-gates.safetensors";
  kv.position = "sideways";
  EXPECT_FALSE((*gen)->NewCache(kv).ok());
  for (const std::string position : {"", "original", "reassign"}) {
    kv.position = position;
    EXPECT_TRUE((*gen)->NewCache(kv).ok()) << position;
  }
}

}  // namespace
}  // namespace kvgate::testing
