// The real pretrained models in ../shared/models against their published greedy outputs
// (computed in float64 by a reference no one here wrote).
#include <gtest/gtest.h>

#include <filesystem>

#include "tests/unit/model/test_util.h"
#include "tests/unit/test_backend.h"

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

namespace kvgate::testing {
namespace {

// RoPE's re-rotation by a delta equals rotating at the shifted position (default and llama3
// scaling), which position re-assignment relies on.
TEST(Rope, RotateByDeltaEqualsShiftedPosition) {
  for (const char* shape : {"llama-2-7b", "llama-3.2-1b"}) {
    auto config = model::SyntheticConfig(shape);
    ASSERT_TRUE(config.ok());
    model::RotaryEmbedding rope(*config);
    const int64_t d = config->head_dim, half = d / 2;
    std::vector<float> raw(d);
    for (int64_t i = 0; i < d; ++i) raw[i] = std::sin(0.37f * i) + 0.1f;
    auto rotated_at = [&](int32_t pos) {
      std::vector<float> c(half), s(half), v = raw;
      rope.Compute(&pos, 1, pos + 1, c.data(), s.data());
      for (int64_t j = 0; j < half; ++j) {
        const float a = v[j], b = v[j + half];
        v[j] = a * c[j] - b * s[j];
        v[j + half] = b * c[j] + a * s[j];
      }
      return v;
    };
    for (auto [from, to] :
         std::vector<std::pair<int32_t, int32_t>>{{100, 7}, {5000, 1023}, {3, 3}}) {
      std::vector<float> v = rotated_at(from);
      rope.Rotate(v.data(), d, to - from);
      const std::vector<float> want = rotated_at(to);
      for (int64_t i = 0; i < d; ++i)
        EXPECT_NEAR(v[i], want[i], 2e-4) << shape << " " << from << "->" << to;
    }
  }
}

// Pipeline stages: layers [0, 2) then [2, 5), the hidden states passed between them, give
// exactly the logits of the whole model.
TEST(StageSplit, TwoStagesEqualTheWholeModel) {
  const std::string dir = SharedModel("stories260K");
  auto config = model::ModelConfig::Load(dir);
  ASSERT_TRUE(config.ok()) << config.status();
  auto ckpt = model::Checkpoint::Open(dir);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  std::shared_ptr<model::Checkpoint> shared(std::move(*ckpt));
  auto backend = TestBackend(0);
  auto w0 = model::LoadStageWeights(*config, shared, 0, 2);
  auto w1 = model::LoadStageWeights(*config, shared, 2, 5);
  ASSERT_TRUE(w0.ok() && w1.ok());
  auto t0 = model::Transformer::Create(*config, std::move(*w0), backend.get());
  auto t1 = model::Transformer::Create(*config, std::move(*w1), backend.get());
  ASSERT_TRUE(t0.ok() && t1.ok());
  model::Transformer& s0 = **t0;
  model::Transformer& s1 = **t1;
  auto c0 = cache::MakeFullKvCache(s0.cache_shape(), 512, backend.get());
  auto c1 = cache::MakeFullKvCache(s1.cache_shape(), 512, backend.get());
  const std::vector<int32_t> ids = {1, 403, 407, 261, 378, 432, 383, 286};
  const int64_t n = static_cast<int64_t>(ids.size());
  std::vector<int32_t> pos(ids.size());
  std::vector<int64_t> rows(ids.size());
  for (int64_t i = 0; i < n; ++i) pos[i] = static_cast<int32_t>(i), rows[i] = i;
  std::vector<float> hidden(static_cast<size_t>(n * config->hidden_size));
  model::SequenceStep a{c0.get(), pos.data(), n};
  ASSERT_TRUE(s0.Forward({&a, 1}, ids.data()).ok());
  ASSERT_TRUE(s0.StoreHidden(n, hidden.data()).ok());  // what the transport carries
  model::SequenceStep b{c1.get(), pos.data(), n};
  ASSERT_TRUE(s1.LoadHidden(hidden.data(), n).ok());
  ASSERT_TRUE(s1.Forward({&b, 1}, nullptr).ok());
  std::vector<float> logits(static_cast<size_t>(n * config->vocab_size));
  ASSERT_TRUE(s1.Logits(rows, logits.data()).ok());
  EXPECT_FALSE(s0.Logits(rows, logits.data()).ok());  // not the last stage

  auto whole = LoadModel(dir);
  ASSERT_TRUE(whole.ok());
  auto ref = ForwardLogits(*whole->transformer, ids, 512);
  ASSERT_TRUE(ref.ok());
  EXPECT_EQ(logits, *ref);
}

}  // namespace
}  // namespace kvgate::testing
