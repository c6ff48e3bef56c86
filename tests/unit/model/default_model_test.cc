// kvgate's own default model (models/kvgate-default) against Hugging Face transformers'
// outputs recorded by tests/fixtures/make_default_model_reference.py: tokenizer ids, logits
// and greedy tokens, through the same path as `kvgate generate`.
#include <gtest/gtest.h>

#include "model/generation/generator.h"
#include "tests/unit/model/test_util.h"

namespace kvgate::testing {
namespace {

TEST(DefaultModel, MatchesTransformers) {
  const nlohmann::json ref = ReadJson("tests/testdata/default_model_reference.json");
  ASSERT_FALSE(ref.is_discarded()) << "tests/testdata/default_model_reference.json is missing";
  auto gen = model::Generator::Load("models/kvgate-default", {});
  ASSERT_TRUE(gen.ok()) << gen.status();
  ASSERT_NE((*gen)->tokenizer(), nullptr);
  const int64_t vocab = (*gen)->config().vocab_size;
  for (const auto& r : ref["records"]) {
    const auto prompt = r["prompt_ids"].get<std::vector<int32_t>>();
    auto ids = (*gen)->tokenizer()->Encode(r["text"].get<std::string>(), true);
    ASSERT_TRUE(ids.ok()) << ids.status();
    EXPECT_EQ(*ids, prompt);
    auto logits = (*gen)->PromptLogits(prompt, 512);
    ASSERT_TRUE(logits.ok()) << logits.status();
    const auto positions = r["last_positions"].get<std::vector<int64_t>>();
    double max_err = 0;
    for (size_t i = 0; i < positions.size(); ++i) {
      for (int64_t t = 0; t < vocab; ++t) {
        const double want = r["logits"][i][static_cast<size_t>(t)].get<double>();
        max_err = std::max(max_err, std::abs((*logits)[positions[i] * vocab + t] - want));
      }
    }
    EXPECT_LT(max_err, 2e-4);
    model::GenerateOptions opt;
    opt.sampling.temperature = 0;
    opt.max_tokens = 16;
    opt.ignore_eos = true;
    auto out = (*gen)->Generate(prompt, opt, nullptr);
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_EQ(out->token_ids, r["greedy"].get<std::vector<int32_t>>());
  }
}

}  // namespace
}  // namespace kvgate::testing
