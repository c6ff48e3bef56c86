// Quantized weights (q8_0, q4_0): the blocks' round trip, and the CPU's quantized MatMul at
// every SIMD level this CPU has: up to 4 tokens against the scalar reference (same integer sums
// over int8 activations) and near the float32 product (within what quantizing activations
// costs); more tokens (prefill) against the float32 product of the dequantized rows. Fresh random
// inputs each run; odd row counts and token counts.
#include "kernels/cpu/quant.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <tuple>
#include <vector>

#include "kernels/cpu/ops.h"

namespace kvgate::kernels::cpu {
namespace {

std::vector<float> Random(size_t n, std::mt19937& rng) {
  std::normal_distribution<float> d(0.f, 1.f);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

TEST(Quant, BlocksRoundTripWithinHalfAStep) {
  std::mt19937 rng(std::random_device{}());
  for (auto [q, cols] : std::vector<std::pair<Quant, int64_t>>{
           {Quant::kQ8_0, 256}, {Quant::kQ4_0, 256}, {Quant::kQ8_0, 288}, {Quant::kQ4_0, 288}}) {
    std::vector<float> x = Random(cols, rng);
    x[5] = 0.f;
    std::vector<uint8_t> blocks(static_cast<size_t>(cols / kQuantBlock * QuantBlockBytes(q)));
    QuantizeRow(x.data(), cols, q, blocks.data());
    std::vector<float> back(cols);
    DequantizeRow(blocks.data(), cols, q, back.data());
    for (int64_t b = 0; b < cols / kQuantBlock; ++b) {
      float amax = 0;
      for (int64_t j = 0; j < kQuantBlock; ++j) amax = std::max(amax, std::fabs(x[b * 32 + j]));
      // One step: amax / 127 (q8_0) or amax / 8 (q4_0). Rounding errs by at most half a step,
      // except q4_0's clamp: its levels are -8..7 steps with -8 at the largest magnitude, so
      // the other sign's extreme lands a whole step short. Plus the f16 scale's rounding.
      const float step = q == Quant::kQ8_0 ? amax / 127.f : amax / 8.f;
      const float bound = (q == Quant::kQ8_0 ? 0.5f : 1.f) * step + 2e-3f * amax;
      for (int64_t j = 0; j < kQuantBlock; ++j) {
        EXPECT_NEAR(back[b * 32 + j], x[b * 32 + j], bound)
            << (q == Quant::kQ8_0 ? "q8_0" : "q4_0") << " element " << b * 32 + j;
      }
    }
    EXPECT_EQ(back[5], 0.f);
  }
}

class QuantMatMulTest : public ::testing::TestWithParam<std::tuple<Quant, SimdLevel>> {
 protected:
  void TearDown() override {
    ResetSimdLevel();
    SetBf16Products(false);
  }
};

TEST_P(QuantMatMulTest, MatchesTheReferenceAndTheFloatProduct) {
  const auto [quant, level] = GetParam();
  if (level > ActiveSimdLevel()) GTEST_SKIP() << "this CPU lacks the SIMD level";
  std::mt19937 rng(std::random_device{}());
  for (auto [n, m, k] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{{1, 7, 64},
                                                                           {2, 33, 256},
                                                                           {5, 64, 288},
                                                                           {17, 13, 1024},
                                                                           {3, 5, 1120},
                                                                           {4, 6, 96},
                                                                           {37, 40, 160}}) {
    const std::vector<float> x = Random(static_cast<size_t>(n * k), rng);
    const std::vector<float> wf = Random(static_cast<size_t>(m * k), rng);
    std::vector<uint8_t> blocks(
        static_cast<size_t>(m * (k / kQuantBlock) * QuantBlockBytes(quant)));
    for (int64_t r = 0; r < m; ++r) {
      QuantizeRow(wf.data() + r * k, k, quant,
                  blocks.data() + r * (k / kQuantBlock) * QuantBlockBytes(quant));
    }
    WeightView w{blocks.data(), DType::kF32, m, k, quant};
    std::vector<float> want(static_cast<size_t>(n * m)), got(want.size());
    MatMulQuantReference(x.data(), n, w, want.data());
    SetSimdLevel(level);
    SetBf16Products(level == SimdLevel::kAvx512Bf16);  // that level's own prefill tiles
    MatMul(x.data(), n, w, nullptr, got.data());
    const bool bf16 = MatMulRoundsActivationsToBf16(w, n);
    // The float product of the dequantized weights: quantizing activations costs ~0.5% here.
    std::vector<float> deq(static_cast<size_t>(m * k));
    for (int64_t r = 0; r < m; ++r) {
      DequantizeRow(blocks.data() + r * (k / kQuantBlock) * QuantBlockBytes(quant), k, quant,
                    deq.data() + r * k);
    }
    if (n > 4 && !bf16) {
      // Prefill (panels of dequantized rows) is bit for bit the float32 product over the
      // dequantized rows packed into panels, as the CPU backend holds a float32 model.
      std::vector<float> panels(static_cast<size_t>(PanelElements(m, k)));
      const WeightView packed =
          PackPanels(WeightView{deq.data(), DType::kF32, m, k}, panels.data());
      std::vector<float> over_deq(got.size(), NAN);
      MatMul(x.data(), n, packed, nullptr, over_deq.data());
      for (size_t at = 0; at < got.size(); ++at) {
        ASSERT_EQ(got[at], over_deq[at]) << "n " << n << " m " << m << " k " << k << " at " << at;
      }
    }
    ResetSimdLevel();
    SetBf16Products(false);
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t r = 0; r < m; ++r) {
        const size_t at = static_cast<size_t>(i * m + r);
        double exact = 0;
        for (int64_t j = 0; j < k; ++j) exact += double(x[i * k + j]) * deq[r * k + j];
        if (n <= 4) {
          // Decode: int8 activations, integer sums: the reference's own numbers.
          EXPECT_NEAR(got[at], want[at], 1e-4f * (1.f + std::fabs(want[at])))
              << "n " << n << " m " << m << " k " << k << " at " << i << "," << r;
          // Quantizing activations moves each x_j by at most half its block's step
          // (max|x| / 127 / 2): a hard bound on what that does to the sum.
          double bound = 1e-4 * (1.0 + std::fabs(exact));
          for (int64_t b = 0; b < k / kQuantBlock; ++b) {
            double amax = 0, wsum = 0;
            for (int64_t j = b * kQuantBlock; j < (b + 1) * kQuantBlock; ++j) {
              amax = std::max(amax, double(std::fabs(x[i * k + j])));
              wsum += std::fabs(deq[r * k + j]);
            }
            bound += amax / 254.0 * wsum;
          }
          EXPECT_NEAR(got[at], exact, bound) << "n " << n << " m " << m << " k " << k;
        } else if (bf16) {
          // Prefill with bf16 products: activations and dequantized rows rounded to bf16.
          double rounded = 0;
          for (int64_t j = 0; j < k; ++j) {
            rounded +=
                double(Bf16ToF32(F32ToBf16(x[i * k + j]))) * Bf16ToF32(F32ToBf16(deq[r * k + j]));
          }
          EXPECT_NEAR(got[at], rounded, 1e-4 * (1.0 + std::fabs(rounded)) + 1e-5 * k)
              << "n " << n << " m " << m << " k " << k << " at " << i << "," << r;
        } else {
          // Prefill: float32 activations over the dequantized rows.
          EXPECT_NEAR(got[at], exact, 1e-4 * (1.0 + std::fabs(exact)) + 1e-5 * k)
              << "n " << n << " m " << m << " k " << k << " at " << i << "," << r;
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    EveryLevel, QuantMatMulTest,
    ::testing::Combine(::testing::Values(Quant::kQ8_0, Quant::kQ4_0),
                       ::testing::Values(SimdLevel::kScalar, SimdLevel::kAvx2, SimdLevel::kAvx512,
                                         SimdLevel::kAvx512Vnni, SimdLevel::kAvx512Bf16)));

}  // namespace
}  // namespace kvgate::kernels::cpu
