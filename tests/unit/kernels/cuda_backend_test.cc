// The CUDA backend through the Backend interface against the CPU backend: the KV cache's ops
// (AppendKv in every storage dtype, CompactKv with re-rotation, GatherRows) and whole-model
// generation (stories260K and the default model, every policy: same greedy tokens and retained
// counts as the CPU). Skipped, saying so, when no GPU is found.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "model/generation/generator.h"

namespace kvgate {
namespace {

using kernels::Backend;
using kernels::DeviceBuffer;

class CudaBackendTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (kernels::CudaDeviceCount() == 0) {
      GTEST_SKIP() << "no CUDA GPU found: CUDA backend tests skipped";
    }
    auto made = kernels::MakeBackend(kernels::Device{kernels::Device::Type::kCuda, 0}, 0);
    ASSERT_TRUE(made.ok()) << made.status();
    gpu_ = *std::move(made);
    cpu_ = kernels::MakeCpuBackend(0);
  }
  DeviceBuffer Upload(const std::vector<float>& host) {
    auto b = gpu_->Alloc(static_cast<int64_t>(host.size()), DType::kF32);
    EXPECT_TRUE(b.ok());
    EXPECT_TRUE(gpu_->CopyToDevice(b->data(), host.data(), host.size() * 4).ok());
    return *std::move(b);
  }
  std::vector<uint8_t> Download(const DeviceBuffer& b) {
    std::vector<uint8_t> out(b.bytes());
    EXPECT_TRUE(gpu_->CopyToHost(out.data(), b.data(), out.size()).ok());
    return out;
  }
  std::unique_ptr<Backend> gpu_, cpu_;
};

TEST_F(CudaBackendTest, KvOpsMatchCpu) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  const int64_t n = 5, heads = 3, d = 16, slots = 12, rot = 16;
  std::vector<float> k(static_cast<size_t>(n * heads * d)), v(k.size());
  for (float& x : k) x = normal(rng);
  for (float& x : v) x = normal(rng);
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
    SCOPED_TRACE(std::string(DTypeName(dt)));
    const size_t row = static_cast<size_t>(d) * DTypeSize(dt);
    // AppendKv into row 2 of each head's slab.
    std::vector<uint8_t> ck(static_cast<size_t>(heads * slots) * row), cv(ck.size());
    auto gk = gpu_->Alloc(heads * slots * d, dt);
    auto gv = gpu_->Alloc(heads * slots * d, dt);
    ASSERT_TRUE(gk.ok() && gv.ok());
    std::vector<kernels::KvHeadSlot> cs, gs;
    for (int64_t h = 0; h < heads; ++h) {
      const size_t off = static_cast<size_t>(h * slots + 2) * row;
      cs.push_back({ck.data() + off, cv.data() + off, dt});
      gs.push_back({gk->as<uint8_t>() + off, gv->as<uint8_t>() + off, dt});
    }
    cpu_->AppendKv(k.data(), v.data(), n, heads, d, cs.data());
    DeviceBuffer dk = Upload(k), dv = Upload(v);
    gpu_->AppendKv(dk.as<float>(), dv.as<float>(), n, heads, d, gs.data());
    EXPECT_EQ(Download(*gk), ck);
    EXPECT_EQ(Download(*gv), cv);
    // CompactKv of head 1 keeping rows {2, 4, 6} with a rotation of the moved rows.
    const std::vector<int64_t> keep = {2, 4, 6};
    std::vector<float> cos(keep.size() * rot / 2), sin(cos.size());
    for (size_t i = 0; i < cos.size(); ++i) {
      cos[i] = std::cos(0.1f * static_cast<float>(i));
      sin[i] = std::sin(0.1f * static_cast<float>(i));
    }
    const size_t head1 = static_cast<size_t>(slots) * row;
    cpu_->CompactKv(ck.data() + head1, cv.data() + head1, dt, d, keep.data(), 3, rot, cos.data(),
                    sin.data());
    gpu_->CompactKv(gk->as<uint8_t>() + head1, gv->as<uint8_t>() + head1, dt, d, keep.data(), 3,
                    rot, cos.data(), sin.data());
    EXPECT_EQ(Download(*gv), cv);
    // Keys: the same arithmetic without FMA, so equal up to the storage rounding.
    const std::vector<uint8_t> got = Download(*gk);
    std::vector<float> a(static_cast<size_t>(heads * slots * d)), b(a.size());
    ConvertToF32(dt, got.data(), a.data(), a.size());
    ConvertToF32(dt, ck.data(), b.data(), b.size());
    for (size_t i = 0; i < a.size(); ++i) ASSERT_NEAR(a[i], b[i], 1e-2 * (1 + std::abs(b[i])));
  }
  // SelectTopK, with ties (they go to the larger index) and a row shorter than the budget.
  {
    const int64_t rows = 3, stride = 50, budget = 12;
    std::vector<float> prio(static_cast<size_t>(rows * stride));
    for (float& x : prio) x = static_cast<float>(rng() % 7);
    const std::vector<int32_t> lens = {50, 31, 9};
    std::vector<int32_t> want(static_cast<size_t>(rows * budget), -1), got(want);
    std::vector<int32_t> want_n(3), got_n(3);
    cpu_->SelectTopK(prio.data(), rows, stride, lens.data(), budget, want.data(), want_n.data());
    DeviceBuffer dp = Upload(prio);
    gpu_->SelectTopK(dp.as<float>(), rows, stride, lens.data(), budget, got.data(), got_n.data());
    EXPECT_EQ(got_n, want_n);
    for (int64_t g = 0; g < rows; ++g) {
      for (int32_t i = 0; i < want_n[static_cast<size_t>(g)]; ++i) {
        EXPECT_EQ(got[static_cast<size_t>(g * budget + i)],
                  want[static_cast<size_t>(g * budget + i)]);
      }
    }
  }
  // GatherRows.
  std::vector<float> src(40);
  std::iota(src.begin(), src.end(), 0.f);
  const std::vector<int64_t> rows = {3, 0, 2};
  std::vector<float> want(12), got(12);
  cpu_->GatherRows(src.data(), 4, rows.data(), 3, want.data());
  DeviceBuffer s = Upload(src), dst = Upload(got);
  gpu_->GatherRows(s.as<float>(), 4, rows.data(), 3, dst.as<float>());
  ASSERT_TRUE(gpu_->CopyToHost(got.data(), dst.data(), 48).ok());
  EXPECT_EQ(got, want);
}

// Greedy generation on the GPU equals the CPU's for every policy (float32 KV, so differences
// are only the kernels' rounding; where a near-tie flips a token the test reports the step).
TEST_F(CudaBackendTest, GenerationMatchesCpu) {
  const std::string dir = "models/kvgate-default";
  std::vector<int32_t> prompt;
  for (int i = 0; i < 300; ++i) prompt.push_back(5 + (i * 37) % 1900);
  for (const std::string policy :
       {"full", "streaming", "h2o", "snapkv", "tova", "locret", "attention-gate"}) {
    SCOPED_TRACE(policy);
    model::GenerateOptions o;
    o.max_tokens = 24;
    o.sampling.temperature = 0;
    o.kv.policy = policy;
    if (policy != "full") {
      o.kv.budget = 64;
      o.kv.chunk = 48;
    }
    if (policy == "locret") o.kv.weights = dir + "/locret.safetensors";
    if (policy == "attention-gate") o.kv.weights = dir + "/attention_gate.safetensors";
    std::vector<std::vector<int32_t>> tokens;
    std::vector<int64_t> evicted;
    for (const std::string device : {"cpu", "cuda:0"}) {
      model::LoadOptions lo;
      lo.device = device;
      lo.kv_dtype = "f32";
      auto gen = model::Generator::Load(dir, lo);
      ASSERT_TRUE(gen.ok()) << gen.status();
      auto r = (*gen)->Generate(prompt, o, nullptr);
      ASSERT_TRUE(r.ok()) << r.status();
      tokens.push_back(r->token_ids);
      evicted.push_back(r->kv_stats.evicted_tokens);
    }
    for (size_t i = 0; i < tokens[0].size(); ++i) {
      ASSERT_EQ(tokens[0][i], tokens[1][i]) << "first difference at generated token " << i;
    }
    EXPECT_EQ(evicted[0], evicted[1]);
  }
}

}  // namespace
}  // namespace kvgate
