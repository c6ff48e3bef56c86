#include "model/sampling/sampler.h"

#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <numeric>
#include <vector>

#include "model/sampling/logprobs.h"

namespace kvgate::model {
namespace {

std::vector<float> Logits() { return {1.0f, 3.0f, 2.0f, 0.5f, 2.9f, -1.0f}; }

int32_t SampleOnce(const SamplingParams& p, std::vector<int32_t> prompt = {},
                   std::vector<int32_t> generated = {}) {
  Sampler s(p);
  auto l = Logits();
  return s.Sample(l, prompt, generated);
}

TEST(Sampler, GreedyIsArgmax) {
  SamplingParams p;
  p.temperature = 0;
  EXPECT_EQ(SampleOnce(p), 1);
}

TEST(Sampler, SameSeedSameTokensDifferentSeedDiffers) {
  SamplingParams p;
  p.seed = 42;
  auto run = [](const SamplingParams& p) {
    Sampler s(p);
    std::vector<int32_t> out;
    for (int i = 0; i < 64; ++i) {
      auto l = Logits();
      out.push_back(s.Sample(l, {}, {}));
    }
    return out;
  };
  EXPECT_EQ(run(p), run(p));
  SamplingParams q = p;
  q.seed = 43;
  EXPECT_NE(run(p), run(q));
}

TEST(Sampler, FrequenciesFollowSoftmaxAtTemperature) {
  SamplingParams p;
  p.temperature = 0.7;
  p.seed = 7;
  Sampler s(p);
  const auto base = Logits();
  std::vector<double> expect(base.size());
  double z = 0;
  for (size_t i = 0; i < base.size(); ++i) z += (expect[i] = std::exp(base[i] / 0.7));
  std::vector<int> counts(base.size());
  const int n = 20000;
  for (int i = 0; i < n; ++i) {
    auto l = base;
    ++counts[static_cast<size_t>(s.Sample(l, {}, {}))];
  }
  for (size_t i = 0; i < base.size(); ++i) {
    const double pr = expect[i] / z;
    EXPECT_NEAR(counts[i] / static_cast<double>(n), pr, 4 * std::sqrt(pr * (1 - pr) / n) + 1e-3)
        << i;
  }
}

TEST(Sampler, TopKTopPMinPRestrictTheCandidates) {
  for (uint64_t seed = 0; seed < 200; ++seed) {
    SamplingParams k;
    k.seed = seed;
    k.top_k = 2;  // {1, 4}
    const int32_t a = SampleOnce(k);
    EXPECT_TRUE(a == 1 || a == 4) << a;
    SamplingParams p;
    p.seed = seed;
    p.top_p = 0.3;  // the top token alone holds ~0.36 of the mass
    EXPECT_EQ(SampleOnce(p), 1);
    SamplingParams m;
    m.seed = seed;
    m.min_p = 0.5;  // keeps tokens with p >= 0.5 p_max: 1, 4, 2 (e^-1 = 0.37 < 0.5 excludes 2)
    const int32_t b = SampleOnce(m);
    EXPECT_TRUE(b == 1 || b == 4) << b;
  }
}

TEST(Sampler, Penalties) {
  SamplingParams p;
  p.temperature = 0;
  p.repetition_penalty = 2.0;  // token 1: 3.0 -> 1.5, so token 4 (2.9) wins
  EXPECT_EQ(SampleOnce(p, {1}), 4);
  SamplingParams f;
  f.temperature = 0;
  f.frequency_penalty = 0.5;  // token 1 generated once: 3.0 - 0.5 = 2.5 < 2.9
  EXPECT_EQ(SampleOnce(f, {}, {1}), 4);
  EXPECT_EQ(SampleOnce(f, {1}, {}), 1);  // frequency counts generated tokens only
  SamplingParams pr;
  pr.temperature = 0;
  pr.presence_penalty = 0.2;  // 3.0 - 0.2 = 2.8 < 2.9
  EXPECT_EQ(SampleOnce(pr, {}, {1, 1, 1}), 4);
}

TEST(Sampler, ValidationNamesTheParameter) {
  auto msg = [](SamplingParams p) { return std::string(p.Validate().message()); };
  SamplingParams p;
  EXPECT_TRUE(p.Validate().ok());
  p.temperature = -1;
  EXPECT_NE(msg(p).find("temperature"), std::string::npos);
  p = {};
  p.top_p = 0;
  EXPECT_NE(msg(p).find("top_p"), std::string::npos);
  p = {};
  p.top_k = -3;
  EXPECT_NE(msg(p).find("top_k"), std::string::npos);
  p = {};
  p.min_p = 1.5;
  EXPECT_NE(msg(p).find("min_p"), std::string::npos);
  p = {};
  p.repetition_penalty = 0;
  EXPECT_NE(msg(p).find("repetition_penalty"), std::string::npos);
  p = {};
  p.temperature = NAN;
  EXPECT_FALSE(p.Validate().ok());
}

}  // namespace
}  // namespace kvgate::model

// ComputeLogprobs against a direct log-softmax and a full sort.
namespace kvgate::model {
namespace {

TEST(Logprobs, MatchALogSoftmaxAndASort) {
  std::vector<float> logits(1000);
  for (size_t i = 0; i < logits.size(); ++i) {
    logits[i] = static_cast<float>(std::sin(0.37 * static_cast<double>(i)) * 7.0);
  }
  logits[17] = logits[18] = 9.5f;  // a tie: the smaller id first
  double sum = 0;
  for (float v : logits) sum += std::exp(static_cast<double>(v));
  const Logprobs lp = ComputeLogprobs(logits, 5);
  ASSERT_EQ(lp.top.size(), 5u);
  std::vector<int32_t> order(logits.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  for (size_t k = 0; k < 5; ++k) {
    EXPECT_EQ(lp.top[k].first, order[k]);
    EXPECT_NEAR(lp.top[k].second, logits[static_cast<size_t>(order[k])] - std::log(sum), 1e-5);
  }
  EXPECT_EQ(lp.top[0].first, 17);
  EXPECT_NEAR(lp.Of(logits[3]), logits[3] - std::log(sum), 1e-5);
  EXPECT_TRUE(ComputeLogprobs(logits, 0).top.empty());
  EXPECT_EQ(ComputeLogprobs(logits, 99).top.size(), static_cast<size_t>(kMaxTopLogprobs));
}

}  // namespace
}  // namespace kvgate::model
