// The real pretrained models in ../shared/models against their published greedy outputs
// (computed in float64 by a reference no one here wrote).
#include <gtest/gtest.h>

#include <filesystem>

#include "tests/unit/model/test_util.h"

namespace kvgate::testing {
namespace {

class GoldenTest : public ::testing::TestWithParam<std::string> {};

TEST_P(GoldenTest, GreedyTokensAndLogitsMatchReference) {
  const std::string dir = SharedModel(GetParam());
  ASSERT_TRUE(std::filesystem::exists(dir + "/golden_greedy.json"))
      << dir << " is missing: these tests need ../shared/models beside the repository";
  const nlohmann::json golden = ReadJson(dir + "/golden_greedy.json");
  ASSERT_FALSE(golden.is_discarded());
  auto m = LoadModel(dir);
  ASSERT_TRUE(m.ok()) << m.status();
  const std::vector<int32_t> expected = golden["greedy_token_ids"].get<std::vector<int32_t>>();
  const std::vector<int32_t> prompt = {expected[0]};  // BOS
  auto ids = GreedyDecode(*m->transformer, prompt, static_cast<int64_t>(expected.size()) - 1);
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_EQ(*ids, expected);

  // Logits of the whole greedy sequence in one pass (and in odd chunks: same logits).
  const int64_t vocab = m->transformer->config().vocab_size;
  const std::vector<int32_t>& seq = expected;  // "last": after the last greedy token
  auto logits = ForwardLogits(*m->transformer, seq, 512);
  ASSERT_TRUE(logits.ok()) << logits.status();
  auto check_top5 = [&](const char* key, int64_t pos) {
    if (!golden.contains(key)) return;
    SCOPED_TRACE(key);
    for (const auto& pair : golden[key]) {
      const int64_t token = pair[0].get<int64_t>();
      const double value = pair[1].get<double>();
      EXPECT_NEAR((*logits)[static_cast<size_t>(pos * vocab + token)], value, 1e-4)
          << "position " << pos << " token " << token;
    }
  };
  check_top5("logits_pos0_top5", 0);
  check_top5("logits_pos10_top5", 10);
  check_top5("logits_last_top5", static_cast<int64_t>(seq.size()) - 1);

  auto chunked = ForwardLogits(*m->transformer, seq, 7);
  ASSERT_TRUE(chunked.ok()) << chunked.status();
  double max_diff = 0;
  for (size_t i = 0; i < logits->size(); ++i) {
    max_diff = std::max(max_diff, static_cast<double>(std::abs((*logits)[i] - (*chunked)[i])));
  }
  EXPECT_LT(max_diff, 1e-4);
}

INSTANTIATE_TEST_SUITE_P(SharedModels, GoldenTest,
                         ::testing::Values("stories260K", "babyllama-tok105"));

}  // namespace
}  // namespace kvgate::testing
