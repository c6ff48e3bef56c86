// The learned eviction scores on the GPU (kernels/cuda/scoring.h) against their CPU references
// (cache::LocretHeads::Score, cache::AttentionGates::Probabilities): random weights and inputs
// drawn fresh each run (seed printed; KVGATE_TEST_SEED reruns one), odd shapes, outputs
// poisoned with NaN first. Skipped, saying so, when no GPU is found.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <random>
#include <tuple>
#include <vector>

#include "cache/eviction/attention_gates.h"
#include "cache/eviction/locret_heads.h"
#include "common/cuda/cuda_check.h"
#include "kernels/cpu/ops.h"
#include "kernels/cuda/device.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/scoring.h"
#include "tests/unit/test_seed.h"

namespace kvgate::kernels::cuda {
namespace {

std::vector<float> Normal(std::mt19937& rng, size_t n, float stddev) {
  std::normal_distribution<float> d(0.f, stddev);
  std::vector<float> v(n);
  for (float& f : v) f = d(rng);
  return v;
}

float* Upload(const std::vector<float>& v) {
  float* d = nullptr;
  KVGATE_CUDA_CHECK(cudaMalloc(&d, std::max<size_t>(v.size(), 1) * sizeof(float)));
  KVGATE_CUDA_CHECK(cudaMemcpy(d, v.data(), v.size() * sizeof(float), cudaMemcpyHostToDevice));
  return d;
}

float* Poisoned(size_t n) {
  float* d = nullptr;
  KVGATE_CUDA_CHECK(cudaMalloc(&d, std::max<size_t>(n, 1) * sizeof(float)));
  KVGATE_CUDA_CHECK(cudaMemset(d, 0xFF, n * sizeof(float)));
  return d;
}

std::vector<float> Download(const float* d, size_t n) {
  std::vector<float> v(n);
  KVGATE_CUDA_CHECK(cudaDeviceSynchronize());
  KVGATE_CUDA_CHECK(cudaMemcpy(v.data(), d, n * sizeof(float), cudaMemcpyDeviceToHost));
  return v;
}

void ExpectClose(const std::vector<float>& got, const std::vector<float>& want, double rtol,
                 double atol) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_TRUE(std::isfinite(got[i])) << "element " << i << " not written";
    ASSERT_LE(std::abs(got[i] - want[i]), atol + rtol * std::abs(want[i]))
        << "element " << i << ": " << got[i] << " vs " << want[i];
  }
}

class CudaScoringTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (DeviceCount() == 0) GTEST_SKIP() << "no CUDA GPU found: GPU scoring tests skipped";
    seed_ = kvgate::testing::TestSeed();
    rng_.seed(seed_);
    std::printf("[ seed     ] %u (rerun with KVGATE_TEST_SEED=%u)\n", seed_, seed_);
    KVGATE_CUDA_CHECK(cudaStreamCreate(&stream_));
    auto g = Gemm::Create(stream_);
    ASSERT_TRUE(g.ok()) << g.status();
    gemm_ = *std::move(g);
  }
  void TearDown() override {
    gemm_.reset();
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }
  uint32_t seed_ = 0;
  std::mt19937 rng_;
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<Gemm> gemm_;
};

TEST_F(CudaScoringTest, LocretMatchesCpu) {
  for (auto [heads, kv_heads, head_dim, d_r, n] : std::vector<std::array<int64_t, 5>>{
           {4, 2, 64, 48, 1}, {8, 2, 80, 96, 7}, {7, 1, 96, 33, 513}, {4, 4, 128, 64, 2049}}) {
    SCOPED_TRACE(::testing::Message() << "heads " << heads << " kv " << kv_heads << " d "
                                      << head_dim << " d_r " << d_r << " n " << n);
    cache::LocretHeads h;
    h.num_layers = 1;
    h.num_heads = heads;
    h.num_kv_heads = kv_heads;
    h.head_dim = head_dim;
    h.d_r = d_r;
    h.fc1 = {Normal(rng_, static_cast<size_t>(d_r * h.d_in()), 0.05f)};
    h.fc2 = {Normal(rng_, static_cast<size_t>(kv_heads * d_r), 0.1f)};
    const int64_t qd = heads * head_dim, kd = kv_heads * head_dim;
    auto q = Normal(rng_, static_cast<size_t>(n * qd), 1.f);
    auto k = Normal(rng_, static_cast<size_t>(n * kd), 1.f);
    auto v = Normal(rng_, static_cast<size_t>(n * kd), 1.f);
    std::vector<float> want(static_cast<size_t>(n * kv_heads));
    h.Score(0, q.data(), k.data(), v.data(), n, want.data());
    float *dq = Upload(q), *dk = Upload(k), *dv = Upload(v), *w1 = Upload(h.fc1[0]),
          *w2 = Upload(h.fc2[0]);
    float* scratch = Poisoned(static_cast<size_t>(n * (h.d_in() + d_r)));
    float* out = Poisoned(want.size());
    ASSERT_TRUE(
        LocretScore(*gemm_, dq, dk, dv, n, qd, kd, w1, w2, d_r, kv_heads, scratch, out).ok());
    ExpectClose(Download(out, want.size()), want, 1e-4, 1e-5);
    for (float* p : {dq, dk, dv, w1, w2, scratch, out}) cudaFree(p);
  }
}

TEST_F(CudaScoringTest, ExpectedAttentionMatchesCpu) {
  for (auto [len, d, group, skip, with_cov] :
       std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t, bool>>{{1, 64, 1, 0, true},
                                                                         {513, 64, 4, 4, true},
                                                                         {37, 128, 2, 0, false},
                                                                         {9, 80, 3, 9, true},
                                                                         {2049, 128, 8, 3, true}}) {
    SCOPED_TRACE(::testing::Message() << "len " << len << " d " << d << " group " << group
                                      << " skip " << skip << " cov " << with_cov);
    auto k = Normal(rng_, static_cast<size_t>(len * d), 1.f);
    auto v = Normal(rng_, static_cast<size_t>(len * d), 1.f);
    auto mu = Normal(rng_, static_cast<size_t>(group * d), 1.f);
    auto cov = Normal(rng_, static_cast<size_t>(group * d * d), 0.05f);
    std::vector<float> want(static_cast<size_t>(len));
    cpu::ExpectedAttention(k.data(), v.data(), DType::kF32, len, d, skip, mu.data(),
                           with_cov ? cov.data() : nullptr, group, want.data());
    float *dk = Upload(k), *dv = Upload(v), *dmu = Upload(mu), *dcov = Upload(cov);
    float* scratch = Poisoned(static_cast<size_t>(group * len + 2 * group));
    float* out = Poisoned(want.size());
    ASSERT_TRUE(ExpectedAttention(dk, dv, DType::kF32, len, d, skip, dmu, with_cov ? dcov : nullptr,
                                  group, scratch, out, stream_)
                    .ok());
    ExpectClose(Download(out, want.size()), want, 1e-4, 1e-6);
    for (float* p : {dk, dv, dmu, dcov, scratch, out}) cudaFree(p);
  }
}

TEST_F(CudaScoringTest, GateMatchesCpuAcrossChunks) {
  for (auto [hidden, heads, head_dim, kv_heads] :
       std::vector<std::array<int64_t, 4>>{{64, 2, 16, 2}, {96, 3, 32, 1}, {256, 4, 64, 4}}) {
    SCOPED_TRACE(::testing::Message() << "hidden " << hidden << " heads " << heads << " d "
                                      << head_dim << " kv " << kv_heads);
    cache::AttentionGates g;
    g.num_layers = 1;
    g.hidden_size = hidden;
    g.num_kv_heads = kv_heads;
    g.heads = heads;
    g.head_dim = head_dim;
    const int64_t w = g.width();
    cache::AttentionGates::Layer L;
    L.wq = Normal(rng_, static_cast<size_t>(w * hidden), 0.1f);
    L.wk = Normal(rng_, static_cast<size_t>(w * hidden), 0.1f);
    L.wv = Normal(rng_, static_cast<size_t>(w * hidden), 0.1f);
    L.wo = Normal(rng_, static_cast<size_t>(kv_heads * w), 0.2f);
    L.bo = Normal(rng_, static_cast<size_t>(kv_heads), 0.5f);
    g.layers = {L};
    float *wq = Upload(L.wq), *wk = Upload(L.wk), *wv = Upload(L.wv), *wo = Upload(L.wo),
          *bo = Upload(L.bo);
    const std::vector<int64_t> chunks = {1, 37, 255, 1, 1};  // prefill chunks, then decode
    int64_t total = 0;
    for (int64_t c : chunks) total += c;
    float* gk = Poisoned(static_cast<size_t>(total * w));
    float* gv = Poisoned(static_cast<size_t>(total * w));
    std::vector<float> cpu_k, cpu_v;
    int64_t past = 0;
    for (int64_t n : chunks) {
      auto x = Normal(rng_, static_cast<size_t>(n * hidden), 1.f);
      std::vector<float> want(static_cast<size_t>(n * kv_heads));
      g.Probabilities(0, x.data(), n, cpu_k, cpu_v, want.data());
      float* dx = Upload(x);
      float* scratch = Poisoned(static_cast<size_t>(n * 2 * w));
      float* p = Poisoned(want.size());
      ASSERT_TRUE(GateProbabilities(*gemm_, dx, n, hidden, wq, wk, wv, wo, bo, heads, head_dim,
                                    kv_heads, gk, gv, past, scratch, p)
                      .ok());
      ExpectClose(Download(p, want.size()), want, 1e-4, 1e-5);
      ExpectClose(Download(gk, static_cast<size_t>((past + n) * w)), cpu_k, 1e-4, 1e-5);
      past += n;
      for (float* f : {dx, scratch, p}) cudaFree(f);
    }
    for (float* f : {wq, wk, wv, wo, bo, gk, gv}) cudaFree(f);
  }
}

}  // namespace
}  // namespace kvgate::kernels::cuda
