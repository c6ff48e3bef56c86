// kvgate's own default model (models/kvgate-default) against Hugging Face transformers'
// outputs recorded by tests/fixtures/make_default_model_reference.py: tokenizer ids, logits
// and greedy tokens, through the same path as `kvgate generate`.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>

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

// --quantize: the logits of q8_0 and q4_0 weights stay near the float32 model's (q8_0 closer
// than q4_0), the likeliest token mostly the same; a bad format name is refused by name.
TEST(DefaultModel, QuantizedWeightsStayNearTheFloatModel) {
  const nlohmann::json ref = ReadJson("tests/testdata/default_model_reference.json");
  ASSERT_FALSE(ref.is_discarded());
  auto full = model::Generator::Load("models/kvgate-default", {});
  ASSERT_TRUE(full.ok()) << full.status();
  const int64_t vocab = (*full)->config().vocab_size;
  double err[2] = {0, 0};
  for (int f = 0; f < 2; ++f) {
    model::LoadOptions lo;
    lo.quantize = f == 0 ? "q8_0" : "q4_0";
    auto gen = model::Generator::Load("models/kvgate-default", lo);
    ASSERT_TRUE(gen.ok()) << gen.status();
    int64_t positions = 0, same_top = 0;
    double sq = 0, ref_sq = 0;
    for (const auto& r : ref["records"]) {
      const auto prompt = r["prompt_ids"].get<std::vector<int32_t>>();
      auto want = (*full)->PromptLogits(prompt, 512);
      auto got = (*gen)->PromptLogits(prompt, 512);
      ASSERT_TRUE(want.ok() && got.ok());
      for (size_t p = 0; p < prompt.size(); ++p) {
        const float* a = want->data() + p * vocab;
        const float* b = got->data() + p * vocab;
        same_top += std::max_element(a, a + vocab) - a == std::max_element(b, b + vocab) - b;
        ++positions;
        for (int64_t t = 0; t < vocab; ++t) {
          sq += (a[t] - b[t]) * (a[t] - b[t]);
          ref_sq += a[t] * a[t];
        }
      }
    }
    err[f] = std::sqrt(sq / ref_sq);  // relative RMS error of the logits
    EXPECT_LT(err[f], f == 0 ? 0.03 : 0.25) << lo.quantize;
    std::printf("%s: relative RMS logit error %.4f, same top token %.3f\n", lo.quantize.c_str(),
                err[f], static_cast<double>(same_top) / positions);
    EXPECT_GT(static_cast<double>(same_top) / positions, f == 0 ? 0.95 : 0.75) << lo.quantize;
  }
  EXPECT_LT(err[0], err[1]);  // 8 bits nearer than 4
  // --quantize-all: the tied embedding / LM head as blocks too: fewer bytes per token, logits
  // still near the float model's, and refused without a format.
  for (const char* format : {"q8_0", "q4_0"}) {
    model::LoadOptions layers, all;
    layers.quantize = all.quantize = format;
    all.quantize_all = true;
    auto a = model::Generator::Load("models/kvgate-default", layers);
    auto b = model::Generator::Load("models/kvgate-default", all);
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_LT((*b)->transformer().weights().WeightBytesPerToken(),
              (*a)->transformer().weights().WeightBytesPerToken())
        << format;
    const auto prompt = ref["records"][0]["prompt_ids"].get<std::vector<int32_t>>();
    auto want = (*full)->PromptLogits(prompt, 512);
    auto got = (*b)->PromptLogits(prompt, 512);
    ASSERT_TRUE(want.ok() && got.ok());
    double sq = 0, ref_sq = 0;
    for (size_t i = 0; i < want->size(); ++i) {
      sq += ((*want)[i] - (*got)[i]) * ((*want)[i] - (*got)[i]);
      ref_sq += (*want)[i] * (*want)[i];
    }
    EXPECT_LT(std::sqrt(sq / ref_sq), std::string(format) == "q8_0" ? 0.05 : 0.35) << format;
  }
  model::LoadOptions no_format;
  no_format.quantize_all = true;
  auto no = model::Generator::Load("models/kvgate-default", no_format);
  ASSERT_FALSE(no.ok());
  EXPECT_NE(no.status().message().find("--quantize-all needs"), std::string::npos);
  model::LoadOptions bad;
  bad.quantize = "q3_k";
  auto refused = model::Generator::Load("models/kvgate-default", bad);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("--quantize q3_k"), std::string::npos);
}

}  // namespace
}  // namespace kvgate::testing
