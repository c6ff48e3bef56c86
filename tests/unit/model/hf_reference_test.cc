// Tiny random checkpoints of every supported architecture (tests/testdata/hf_models, made by
// tests/fixtures/make_model_fixtures.py) against the logits and greedy tokens Hugging Face
// transformers computed for them.
#include <gtest/gtest.h>

#include <filesystem>

#include "model/generation/generator.h"
#include "tests/unit/model/test_util.h"

namespace kvgate::testing {
namespace {

const char* kFixtures[] = {"llama2-mha",   "llama3-gqa-scaled", "llama32-tied-headdim", "mistral",
                           "qwen2",        "phi3-longrope",     "llama-bf16",           "llama-f16",
                           "llama-sharded"};

class HfReferenceTest : public ::testing::TestWithParam<const char*> {
 protected:
  std::string Dir() const { return std::string("tests/testdata/hf_models/") + GetParam(); }
};

TEST_P(HfReferenceTest, LogitsMatchTransformers) {
  const nlohmann::json ref = ReadJson(Dir() + "/reference.json");
  ASSERT_FALSE(ref.is_discarded()) << Dir() << "/reference.json is missing or invalid";
  auto m = LoadModel(Dir());
  ASSERT_TRUE(m.ok()) << m.status();
  const int64_t vocab = m->transformer->config().vocab_size;
  for (size_t p = 0; p < ref["prompts"].size(); ++p) {
    const auto prompt = ref["prompts"][p].get<std::vector<int32_t>>();
    const auto& expected = ref["logits"][p];
    for (int64_t chunk : {int64_t{512}, int64_t{3}}) {
      auto logits = ForwardLogits(*m->transformer, prompt, chunk);
      ASSERT_TRUE(logits.ok()) << logits.status();
      double max_err = 0;
      for (size_t i = 0; i < prompt.size(); ++i) {
        for (int64_t t = 0; t < vocab; ++t) {
          const double want = expected[i][static_cast<size_t>(t)].get<double>();
          max_err = std::max(max_err, std::abs((*logits)[i * vocab + t] - want));
        }
      }
      EXPECT_LT(max_err, 1e-4) << "prompt " << p << " (" << prompt.size() << " tokens), chunk "
                               << chunk;
    }
  }
}

TEST_P(HfReferenceTest, GreedyTokensMatchTransformersGenerate) {
  const nlohmann::json ref = ReadJson(Dir() + "/reference.json");
  ASSERT_FALSE(ref.is_discarded());
  auto gen = model::Generator::Load(Dir(), {});
  ASSERT_TRUE(gen.ok()) << gen.status();
  for (size_t p = 0; p < ref["prompts"].size(); ++p) {
    const auto prompt = ref["prompts"][p].get<std::vector<int32_t>>();
    const auto want = ref["greedy"][p].get<std::vector<int32_t>>();
    model::GenerateOptions opt;
    opt.sampling.temperature = 0;
    opt.max_tokens = static_cast<int64_t>(want.size());
    opt.ignore_eos = true;
    auto r = (*gen)->Generate(prompt, opt, nullptr);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->token_ids, want) << "prompt " << p;
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, HfReferenceTest, ::testing::ValuesIn(kFixtures),
                         [](const auto& info) {
                           std::string s = info.param;
                           for (char& ch : s)
                             if (ch == '-') ch = '_';
                           return s;
                         });

}  // namespace
}  // namespace kvgate::testing
