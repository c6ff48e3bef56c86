// The CPU ops against plain reference loops written here, on odd shapes, every weight dtype
// and every SIMD level this CPU has. Fresh random inputs each run.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "kernels/cpu/ops.h"

namespace kvgate::kernels::cpu {
namespace {

std::vector<float> Random(size_t n, std::mt19937& rng, float scale = 1.f) {
  std::normal_distribution<float> d(0.f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

// Stores `src` in dtype `t`; returns the bytes and the float values actually stored.
std::vector<uint16_t> Quantize(const std::vector<float>& src, DType t, std::vector<float>* stored) {
  std::vector<uint16_t> out(src.size());
  stored->resize(src.size());
  for (size_t i = 0; i < src.size(); ++i) {
    out[i] = t == DType::kBF16 ? F32ToBf16(src[i]) : F32ToF16(src[i]);
    (*stored)[i] = t == DType::kBF16 ? Bf16ToF32(out[i]) : F16ToF32(out[i]);
  }
  return out;
}

class MatMulTest : public ::testing::TestWithParam<std::tuple<DType, SimdLevel, bool>> {
 protected:
  void TearDown() override {
    ResetSimdLevel();
    SetBf16Products(false);
  }
};

TEST_P(MatMulTest, MatchesDoubleReference) {
  const auto [dtype, level, bf16_products] = GetParam();
  SetSimdLevel(level);
  SetBf16Products(bf16_products);
  std::mt19937 rng(std::random_device{}());
  for (int64_t n : {1, 2, 3, 7, 17}) {
    for (auto [m, k] :
         std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {5, 13}, {33, 64}, {67, 257}}) {
      std::vector<float> x = Random(static_cast<size_t>(n * k), rng);
      std::vector<float> wf = Random(static_cast<size_t>(m * k), rng);
      std::vector<float> bias = Random(static_cast<size_t>(m), rng);
      std::vector<float> stored = wf;
      std::vector<uint16_t> half;
      WeightView w{wf.data(), DType::kF32, m, k};
      if (dtype != DType::kF32) {
        half = Quantize(wf, dtype, &stored);
        w = WeightView{half.data(), dtype, m, k};
      }
      WeightView b{bias.data(), DType::kF32, 1, m};
      std::vector<float> y(static_cast<size_t>(n * m), NAN);  // poisoned
      MatMul(x.data(), n, w, &b, y.data());
      // The activations the product actually used: bf16-rounded where MatMul says so.
      std::vector<float> used = x;
      if (MatMulRoundsActivationsToBf16(w, n)) {
        for (float& v : used) v = Bf16ToF32(F32ToBf16(v));
      }
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t r = 0; r < m; ++r) {
          double ref = bias[static_cast<size_t>(r)];
          for (int64_t j = 0; j < k; ++j) {
            ref += static_cast<double>(used[static_cast<size_t>(i * k + j)]) *
                   stored[static_cast<size_t>(r * k + j)];
          }
          ASSERT_NEAR(y[static_cast<size_t>(i * m + r)], ref, 1e-5 * (1 + std::abs(ref)) + 1e-4)
              << "n=" << n << " m=" << m << " k=" << k << " i=" << i << " r=" << r;
        }
      }
    }
  }
}

// Continuous batching puts several sequences' tokens into one MatMul: every row must come out
// bit for bit as it does alone, or batched greedy output could drift from the single-sequence
// engine's.
TEST_P(MatMulTest, RowsDoNotDependOnTheBatch) {
  const auto [dtype, level, bf16_products] = GetParam();
  SetSimdLevel(level);
  SetBf16Products(bf16_products);
  std::mt19937 rng(std::random_device{}());
  // The last case's activations pass 1 MiB: the products take blocks of 64 weight rows there.
  for (auto [m, k, n] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
           {33, 64, 37}, {300, 257, 37}, {1024, 512, 37}, {70, 1040, 300}}) {
    std::vector<float> x = Random(static_cast<size_t>(n * k), rng);
    std::vector<float> wf = Random(static_cast<size_t>(m * k), rng);
    std::vector<float> stored;
    std::vector<uint16_t> half;
    WeightView w{wf.data(), DType::kF32, m, k};
    if (dtype != DType::kF32) {
      half = Quantize(wf, dtype, &stored);
      w = WeightView{half.data(), dtype, m, k};
    }
    std::vector<float> all(static_cast<size_t>(n * m), NAN);
    MatMul(x.data(), n, w, nullptr, all.data());
    for (int64_t first : {int64_t{0}, int64_t{5}, n - 1}) {
      for (int64_t rows : {int64_t{1}, int64_t{3}}) {
        if (first + rows > n) continue;
        std::vector<float> part(static_cast<size_t>(rows * m), NAN);
        MatMul(x.data() + first * k, rows, w, nullptr, part.data());
        for (int64_t i = 0; i < rows * m; ++i) {
          ASSERT_EQ(part[static_cast<size_t>(i)], all[static_cast<size_t>(first * m + i)])
              << "m=" << m << " k=" << k << " rows " << first << "+" << rows << " at " << i;
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    AllDtypesAndLevels, MatMulTest,
    ::testing::Combine(::testing::Values(DType::kF32, DType::kF16, DType::kBF16),
                       ::testing::Values(SimdLevel::kScalar, SimdLevel::kAvx2, SimdLevel::kAvx512,
                                         SimdLevel::kAvx512Vnni, SimdLevel::kAvx512Bf16),
                       ::testing::Bool()));  // SetBf16Products

class PanelMatMulTest : public ::testing::TestWithParam<std::tuple<DType, SimdLevel>> {
 protected:
  void TearDown() override { ResetSimdLevel(); }
};

// Weights packed into panels (what the CPU backend does at load): the layout is the one
// kernels/tensor.h documents, the products match a double reference, and every output is the
// same bits at every SIMD level (the scalar loop's index-order fused multiply-adds) and for every
// batch it shares a call with (16-bit panels: widened in registers for one or two tokens, widened
// first for more).
TEST_P(PanelMatMulTest, MatchesReferenceAtEveryBatchAndLevelBitForBit) {
  const auto [dtype, level] = GetParam();
  std::mt19937 rng(std::random_device{}());
  for (auto [m, k] : std::vector<std::pair<int64_t, int64_t>>{
           {1, 1}, {5, 13}, {16, 64}, {33, 64}, {67, 257}, {300, 96}, {129, 40}}) {
    const int64_t n = 17;
    std::vector<float> x = Random(static_cast<size_t>(n * k), rng);
    std::vector<float> wf = Random(static_cast<size_t>(m * k), rng);
    std::vector<float> bias = Random(static_cast<size_t>(m), rng);
    std::vector<float> stored = wf;
    std::vector<uint16_t> half;
    WeightView rows{wf.data(), DType::kF32, m, k};
    if (dtype != DType::kF32) {
      half = Quantize(wf, dtype, &stored);
      rows = WeightView{half.data(), dtype, m, k};
    }
    const size_t elem = DTypeSize(dtype);
    std::vector<uint8_t> storage(static_cast<size_t>(PanelElements(m, k)) * elem, 0xff);
    const WeightView w = PackPanels(rows, storage.data());
    ASSERT_EQ(w.layout, Layout::kPanels);
    ASSERT_EQ(w.bytes(), static_cast<int64_t>(storage.size()));
    for (int64_t r = 0; r < (m + kPanelRows - 1) / kPanelRows * kPanelRows; ++r) {
      for (int64_t c = 0; c < k; ++c) {
        const size_t at =
            static_cast<size_t>(((r / kPanelRows) * k + c) * kPanelRows + r % kPanelRows);
        float got = 0.f;
        ConvertToF32(dtype, storage.data() + at * elem, &got, 1);
        const float want = r < m ? stored[static_cast<size_t>(r * k + c)] : 0.f;
        ASSERT_EQ(got, want) << "m=" << m << " k=" << k << " r=" << r << " c=" << c;
      }
    }
    WeightView b{bias.data(), DType::kF32, 1, m};
    SetSimdLevel(SimdLevel::kScalar);
    std::vector<float> scalar(static_cast<size_t>(n * m), NAN);
    MatMul(x.data(), n, w, &b, scalar.data());
    SetSimdLevel(level);
    std::vector<float> all(static_cast<size_t>(n * m), NAN);
    MatMul(x.data(), n, w, &b, all.data());
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t r = 0; r < m; ++r) {
        double ref = bias[static_cast<size_t>(r)];
        for (int64_t j = 0; j < k; ++j) {
          ref += static_cast<double>(x[static_cast<size_t>(i * k + j)]) *
                 stored[static_cast<size_t>(r * k + j)];
        }
        const size_t at = static_cast<size_t>(i * m + r);
        ASSERT_NEAR(all[at], ref, 1e-5 * (1 + std::abs(ref)) + 1e-4)
            << "m=" << m << " k=" << k << " i=" << i << " r=" << r;
        ASSERT_EQ(all[at], scalar[at]) << "m=" << m << " k=" << k << " i=" << i << " r=" << r;
      }
    }
    for (auto [first, count] : std::vector<std::pair<int64_t, int64_t>>{
             {0, 1}, {3, 1}, {16, 1}, {0, 2}, {5, 2}, {4, 3}, {1, 7}, {10, 7}}) {
      std::vector<float> part(static_cast<size_t>(count * m), NAN);
      MatMul(x.data() + first * k, count, w, &b, part.data());
      for (int64_t i = 0; i < count * m; ++i) {
        ASSERT_EQ(part[static_cast<size_t>(i)], all[static_cast<size_t>(first * m + i)])
            << "m=" << m << " k=" << k << " rows " << first << "+" << count << " at " << i;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    AllDtypesAndLevels, PanelMatMulTest,
    ::testing::Combine(::testing::Values(DType::kF32, DType::kF16, DType::kBF16),
                       ::testing::Values(SimdLevel::kScalar, SimdLevel::kAvx2, SimdLevel::kAvx512,
                                         SimdLevel::kAvx512Vnni, SimdLevel::kAvx512Bf16)));

TEST(CpuOps, ReportsFeatures) {
  EXPECT_FALSE(CpuFeatures().empty());
  EXPECT_GE(NumThreads(), 1);
}

class AttentionTest : public ::testing::TestWithParam<std::tuple<DType, SimdLevel>> {
 protected:
  void TearDown() override {
    ResetSimdLevel();
    SetBf16Products(false);
  }
};

// Every SIMD level against double-precision loops, K and V stored in each KV dtype (the
// reference reads the values actually stored), head sizes that leave vector tails.
TEST_P(AttentionTest, MatchesNaiveCausalSoftmax) {
  const auto [kv_dtype, level] = GetParam();
  SetSimdLevel(level);
  std::mt19937 rng(std::random_device{}());
  for (int64_t head_dim : {8, 20, 64, 80, 130}) {
    for (auto [n, len] :
         std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {1, 37}, {5, 5}, {4, 19}, {13, 40}}) {
      for (int64_t window : {0, 3}) {
        const int64_t heads = 6, kv_heads = 2, group = heads / kv_heads;
        const int64_t stride = head_dim + (len % 2 == 1 ? 3 : 0);  // padded rows, as a gate's
        std::vector<float> q = Random(static_cast<size_t>(n * heads * head_dim), rng);
        std::vector<std::vector<float>> k(kv_heads), v(kv_heads);
        std::vector<std::vector<uint16_t>> k16(kv_heads), v16(kv_heads);
        std::vector<KvHeadView> views(kv_heads);
        for (int64_t h = 0; h < kv_heads; ++h) {
          k[h] = Random(static_cast<size_t>(len * stride), rng);
          v[h] = Random(static_cast<size_t>(len * stride), rng);
          views[h] = KvHeadView{k[h].data(), v[h].data(), len, stride};
          if (kv_dtype == DType::kF32) continue;
          k16[h] = Quantize(k[h], kv_dtype, &k[h]);
          v16[h] = Quantize(v[h], kv_dtype, &v[h]);
          views[h] = KvHeadView{k16[h].data(), v16[h].data(), len, stride, nullptr, kv_dtype};
        }
        std::vector<float> out(q.size(), NAN), out2(q.size(), NAN);
        Attention(q.data(), n, heads, kv_heads, head_dim, views.data(), window, out.data(),
                  nullptr);
        // The same with the attention-mass side output (query by query, where the call above
        // takes blocks of queries): the same outputs bit for bit, and the mass equals the
        // summed probabilities computed below.
        const int64_t first_query = n / 2;
        std::vector<float> mass(kv_heads * len, NAN);
        std::vector<double> want_mass(kv_heads * len, 0.0);
        AttentionMass side{mass.data(), len, first_query};
        Attention(q.data(), n, heads, kv_heads, head_dim, views.data(), window, out2.data(), &side);
        for (int64_t i = 0; i < n; ++i) {
          for (int64_t h = 0; h < heads; ++h) {
            const auto& K = k[h / group];
            const auto& V = v[h / group];
            const int64_t end = len - n + i + 1;
            const int64_t start = window > 0 ? std::max<int64_t>(0, end - window) : 0;
            std::vector<double> s;
            double mx = -1e300;
            for (int64_t j = start; j < end; ++j) {
              double dot = 0;
              for (int64_t e = 0; e < head_dim; ++e)
                dot += q[(i * heads + h) * head_dim + e] * K[j * stride + e];
              s.push_back(dot / std::sqrt(static_cast<double>(head_dim)));
              mx = std::max(mx, s.back());
            }
            double sum = 0;
            for (double& x : s) sum += (x = std::exp(x - mx));
            if (i >= first_query) {
              for (int64_t j = start; j < end; ++j)
                want_mass[(h / group) * len + j] += s[j - start] / sum;
            }
            for (int64_t e = 0; e < head_dim; ++e) {
              double ref = 0;
              for (int64_t j = start; j < end; ++j) ref += s[j - start] / sum * V[j * stride + e];
              ASSERT_NEAR(out[(i * heads + h) * head_dim + e], ref, 1e-5)
                  << "d=" << head_dim << " n=" << n << " len=" << len << " window=" << window;
              ASSERT_EQ(out2[(i * heads + h) * head_dim + e], out[(i * heads + h) * head_dim + e])
                  << "d=" << head_dim << " n=" << n << " len=" << len << " window=" << window;
            }
          }
        }
        for (size_t j = 0; j < mass.size(); ++j) ASSERT_NEAR(mass[j], want_mass[j], 1e-5) << j;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    AllKvDtypesAndLevels, AttentionTest,
    ::testing::Combine(::testing::Values(DType::kF32, DType::kF16, DType::kBF16),
                       ::testing::Values(SimdLevel::kScalar, SimdLevel::kAvx2, SimdLevel::kAvx512,
                                         SimdLevel::kAvx512Vnni, SimdLevel::kAvx512Bf16)));

TEST(CpuOps, RmsNormRopeSiluMul) {
  std::mt19937 rng(std::random_device{}());
  const int64_t n = 3, dim = 37;
  std::vector<float> x = Random(n * dim, rng), w = Random(dim, rng), out(n * dim, NAN);
  RmsNorm(x.data(), n, dim, WeightView{w.data(), DType::kF32, 1, dim}, 1e-5, out.data());
  for (int64_t i = 0; i < n; ++i) {
    double ss = 0;
    for (int64_t j = 0; j < dim; ++j) ss += x[i * dim + j] * x[i * dim + j];
    const double inv = 1 / std::sqrt(ss / dim + 1e-5);
    for (int64_t j = 0; j < dim; ++j)
      EXPECT_NEAR(out[i * dim + j], w[j] * x[i * dim + j] * inv, 1e-5);
  }
  // RoPE: rotate-half over the first rotary_dim dims, the rest untouched.
  const int64_t heads = 2, head_dim = 10, rot = 6, half = rot / 2;
  std::vector<float> v = Random(n * heads * head_dim, rng), orig = v;
  std::vector<float> c = Random(n * half, rng), s = Random(n * half, rng);
  Rope(v.data(), n, heads, head_dim, rot, c.data(), s.data());
  for (int64_t i = 0; i < n; ++i)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t j = 0; j < head_dim; ++j) {
        const float* o = &orig[(i * heads + h) * head_dim];
        float ref = o[j];
        if (j < half)
          ref = o[j] * c[i * half + j] - o[j + half] * s[i * half + j];
        else if (j < rot)
          ref = o[j] * c[i * half + j - half] + o[j - half] * s[i * half + j - half];
        EXPECT_NEAR(v[(i * heads + h) * head_dim + j], ref, 1e-6);
      }
}

// SwiGLU's silu(g) * u at every level (the SIMD ones use a polynomial exp) against double
// precision, over gates from -100 to 100 and lengths that leave vector tails.
TEST(CpuOps, SiluMulAtEveryLevel) {
  std::mt19937 rng(std::random_device{}());
  for (SimdLevel level : {SimdLevel::kScalar, SimdLevel::kAvx2, SimdLevel::kAvx512}) {
    SetSimdLevel(level);
    for (size_t count : {1, 7, 16, 100, 1027}) {
      std::vector<float> g = Random(count, rng, 8.f), u = Random(count, rng), r(count, NAN);
      g[0] = count % 2 == 0 ? 100.f : -100.f;
      SiluMul(g.data(), u.data(), count, r.data());
      for (size_t i = 0; i < count; ++i) {
        const double ref = g[i] / (1 + std::exp(-static_cast<double>(g[i]))) * u[i];
        ASSERT_NEAR(r[i], ref, 2e-6 * std::abs(ref) + 1e-7)
            << "level " << static_cast<int>(level) << " g " << g[i] << " at " << i;
      }
    }
  }
  ResetSimdLevel();
}

// Expected Attention's key scores against the formula written out in double precision: per
// query head a softmax over the non-sink keys of mu . k / sqrt(d) + k^T S k / (2 d), averaged
// over the group, times ||v||; bf16 storage read as stored.
TEST(CpuOps, ExpectedAttentionMatchesTheFormula) {
  std::mt19937 rng(11);
  for (auto [len, d, group, skip, with_cov, bf16] :
       std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t, bool, bool>>{
           {1, 4, 1, 0, true, false},
           {37, 16, 3, 4, true, false},
           {64, 8, 2, 0, false, true},
           {9, 32, 1, 9, true, false},
           {130, 64, 4, 2, true, true}}) {
    SCOPED_TRACE(::testing::Message() << len << " " << d << " " << group << " " << skip);
    std::vector<float> k = Random(static_cast<size_t>(len * d), rng),
                       v = Random(static_cast<size_t>(len * d), rng),
                       mu = Random(static_cast<size_t>(group * d), rng, 2.f),
                       cov = Random(static_cast<size_t>(group * d * d), rng, 0.3f);
    std::vector<uint16_t> kq, vq;
    const void* kp = k.data();
    const void* vp = v.data();
    if (bf16) {
      kq = Quantize(k, DType::kBF16, &k);
      vq = Quantize(v, DType::kBF16, &v);
      kp = kq.data();
      vp = vq.data();
    }
    std::vector<float> got(static_cast<size_t>(len), NAN);
    ExpectedAttention(kp, vp, bf16 ? DType::kBF16 : DType::kF32, len, d, skip, mu.data(),
                      with_cov ? cov.data() : nullptr, group, got.data());
    std::vector<double> want(static_cast<size_t>(len), 0.0);
    for (int64_t g = 0; g < group && skip < len; ++g) {
      std::vector<double> s(static_cast<size_t>(len));
      for (int64_t j = skip; j < len; ++j) {
        double lin = 0, quad = 0;
        for (int64_t a = 0; a < d; ++a) {
          lin += static_cast<double>(mu[static_cast<size_t>(g * d + a)]) *
                 k[static_cast<size_t>(j * d + a)];
          for (int64_t b = 0; with_cov && b < d; ++b) {
            quad += static_cast<double>(k[static_cast<size_t>(j * d + a)]) *
                    cov[static_cast<size_t>((g * d + a) * d + b)] *
                    k[static_cast<size_t>(j * d + b)];
          }
        }
        s[static_cast<size_t>(j)] = lin / std::sqrt(static_cast<double>(d)) + quad / (2.0 * d);
      }
      const double mx = *std::max_element(s.begin() + skip, s.end());
      double sum = 0;
      for (int64_t j = skip; j < len; ++j) sum += std::exp(s[static_cast<size_t>(j)] - mx);
      for (int64_t j = skip; j < len; ++j) {
        want[static_cast<size_t>(j)] += std::exp(s[static_cast<size_t>(j)] - mx) / sum / group;
      }
    }
    for (int64_t j = 0; j < len; ++j) {
      double norm = 0;
      for (int64_t a = 0; a < d; ++a) norm += std::pow(v[static_cast<size_t>(j * d + a)], 2);
      const double w = j < skip ? 0.0 : want[static_cast<size_t>(j)] * std::sqrt(norm);
      EXPECT_NEAR(got[static_cast<size_t>(j)], w, 1e-4 * std::abs(w) + 1e-6) << "key " << j;
    }
  }
}

TEST(Dtype, ConversionsRoundTrip) {
  for (float f : {0.f, 1.f, -2.5f, 65504.f, 6.1e-5f, 1e-7f}) {
    EXPECT_NEAR(F16ToF32(F32ToF16(f)), f, std::abs(f) * 1e-3 + 6e-8);
    EXPECT_NEAR(Bf16ToF32(F32ToBf16(f)), f, std::abs(f) * 8e-3);
  }
  EXPECT_EQ(F32ToF16(1.0f), 0x3c00);
  EXPECT_EQ(F32ToBf16(1.0f), 0x3f80);
  EXPECT_TRUE(std::isinf(F16ToF32(F32ToF16(1e6f))));
  EXPECT_TRUE(std::isnan(Bf16ToF32(F32ToBf16(NAN))));
}

}  // namespace
}  // namespace kvgate::kernels::cpu
