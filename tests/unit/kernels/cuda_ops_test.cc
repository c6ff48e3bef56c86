// CUDA ops against the CPU reference (kernels/cpu/ops.h; for eviction selection, compaction and
// sampling, references written in this file). Skipped, saying so, when no GPU is found.
//
// Every test draws fresh inputs from a seed printed with every failure; rerun a failure with
// KVGATE_TEST_SEED=<seed>. Output buffers are poisoned with NaN (0xFF bytes) before each run, so
// an element a kernel forgets to write fails the comparison.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/cuda/cuda_check.h"
#include "common/dtype.h"
#include "kernels/backend.h"
#include "kernels/cpu/ops.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/device.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/ops.h"

namespace kvgate::kernels {
namespace {

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

uint32_t TestSeed() {
  if (const char* s = std::getenv("KVGATE_TEST_SEED")) {
    return static_cast<uint32_t>(std::strtoul(s, nullptr, 10));
  }
  return std::random_device{}();
}

std::string SeedNote(uint32_t seed) {
  return absl::StrCat("seed ", seed, " (rerun with KVGATE_TEST_SEED=", seed, ")");
}

class CudaOpsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda::DeviceCount() == 0) GTEST_SKIP() << "no CUDA GPU found: GPU parity tests skipped";
    seed_ = TestSeed();
    rng_.seed(seed_);
    std::printf("[ seed     ] %s\n", SeedNote(seed_).c_str());
  }
  std::vector<float> Normal(size_t count, float stddev = 1.0f) {
    std::normal_distribution<float> d(0.f, stddev);
    std::vector<float> v(count);
    for (float& f : v) f = d(rng_);
    return v;
  }
  uint32_t seed_ = 0;
  std::mt19937 rng_;
};

#define KVGATE_SEED_TRACE() SCOPED_TRACE(SeedNote(seed_))

// A device array freed on destruction.
template <typename T>
class DeviceArray {
 public:
  explicit DeviceArray(size_t count) : count_(count) {
    KVGATE_CUDA_CHECK(cudaMalloc(&ptr_, std::max<size_t>(count, 1) * sizeof(T)));
  }
  explicit DeviceArray(const std::vector<T>& v) : DeviceArray(v.size()) { Upload(v); }
  ~DeviceArray() { cudaFree(ptr_); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  DeviceArray(DeviceArray&& o) noexcept : ptr_(o.ptr_), count_(o.count_) { o.ptr_ = nullptr; }

  T* get() const { return ptr_; }
  size_t size() const { return count_; }
  void Upload(const std::vector<T>& v) {
    KVGATE_CUDA_CHECK(cudaMemcpy(ptr_, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
    KVGATE_CUDA_CHECK(cudaDeviceSynchronize());  // before use on any stream
  }
  std::vector<T> Download() const {
    KVGATE_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<T> v(count_);
    KVGATE_CUDA_CHECK(cudaMemcpy(v.data(), ptr_, count_ * sizeof(T), cudaMemcpyDeviceToHost));
    return v;
  }
  // 0xFF bytes: NaN as float32, -1 as int32.
  void Poison() { KVGATE_CUDA_CHECK(cudaMemset(ptr_, 0xFF, count_ * sizeof(T))); }

 private:
  T* ptr_ = nullptr;
  size_t count_ = 0;
};

// Elementwise |got - ref| <= atol + rtol * |ref| (equal infinities pass, NaN never does).
::testing::AssertionResult AllClose(const std::vector<float>& got, const std::vector<float>& ref,
                                    double rtol, double atol, const std::string& what) {
  if (got.size() != ref.size()) {
    return ::testing::AssertionFailure() << what << ": size " << got.size() << " != " << ref.size();
  }
  size_t bad = 0, first = 0, worst = 0;
  double max_abs = -1.0, max_rel = 0.0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = got[i], r = ref[i];
    bool ok;
    double err;
    if (g == r) {
      ok = true;
      err = 0.0;
    } else if (!std::isfinite(g) || !std::isfinite(r)) {
      ok = false;
      err = std::numeric_limits<double>::infinity();
    } else {
      err = std::abs(g - r);
      ok = err <= atol + rtol * std::abs(r);
      max_rel = std::max(max_rel, err / std::max(std::abs(r), 1e-30));
    }
    if (err > max_abs) {
      max_abs = err;
      worst = i;
    }
    if (!ok && bad++ == 0) first = i;
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << what << ": " << bad << " of " << got.size() << " elements outside rtol " << rtol
         << " atol " << atol << "; first at [" << first << "] got " << got[first] << " want "
         << ref[first] << "; max abs error " << max_abs << " at [" << worst << "] (got "
         << got[worst] << " want " << ref[worst] << "); max rel error " << max_rel;
}

double Rms(const std::vector<float>& v) {
  double s = 0.0;
  for (float f : v) s += static_cast<double>(f) * f;
  return v.empty() ? 0.0 : std::sqrt(s / static_cast<double>(v.size()));
}

// Host bytes of `v` in dtype t (the rounding the stored weights have).
std::vector<uint16_t> To16(const std::vector<float>& v, DType t) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    out[i] = t == DType::kBF16 ? F32ToBf16(v[i]) : F32ToF16(v[i]);
  }
  return out;
}

// A weight in dtype t on the host (for the CPU) and on the device (for the kernels).
struct TestWeight {
  TestWeight(const std::vector<float>& values, DType dtype, int64_t rows, int64_t cols)
      : dtype(dtype), rows(rows), cols(cols), f32(values) {
    if (dtype != DType::kF32) h16 = To16(values, dtype);
    const size_t bytes = values.size() * DTypeSize(dtype);
    KVGATE_CUDA_CHECK(cudaMalloc(&device, std::max<size_t>(bytes, 1)));
    KVGATE_CUDA_CHECK(cudaMemcpy(device, host(), bytes, cudaMemcpyHostToDevice));
    KVGATE_CUDA_CHECK(cudaDeviceSynchronize());
  }
  ~TestWeight() { cudaFree(device); }
  TestWeight(const TestWeight&) = delete;
  TestWeight& operator=(const TestWeight&) = delete;
  const void* host() const {
    return dtype == DType::kF32 ? static_cast<const void*>(f32.data()) : h16.data();
  }
  WeightView view() const { return WeightView{host(), dtype, rows, cols}; }

  DType dtype;
  int64_t rows, cols;
  std::vector<float> f32;
  std::vector<uint16_t> h16;
  void* device = nullptr;
};

std::string Name(DType t) { return std::string(DTypeName(t)); }

constexpr DType kDTypes[] = {DType::kF32, DType::kBF16, DType::kF16};

// ---------------------------------------------------------------------------------------------
// Elementwise ops
// ---------------------------------------------------------------------------------------------

TEST_F(CudaOpsTest, EmbeddingMatchesCpu) {
  KVGATE_SEED_TRACE();
  const int64_t vocab = 1001;
  for (DType dt : kDTypes) {
    for (int64_t hidden : {64, 80, 2049}) {
      for (int64_t n : {1, 7}) {
        const std::string what =
            absl::StrCat("Embedding dtype ", Name(dt), " n ", n, " hidden ", hidden);
        TestWeight table(Normal(static_cast<size_t>(vocab * hidden)), dt, vocab, hidden);
        std::vector<int32_t> ids(static_cast<size_t>(n));
        std::uniform_int_distribution<int32_t> pick(0, static_cast<int32_t>(vocab - 1));
        for (int32_t& id : ids) id = pick(rng_);
        ids[0] = static_cast<int32_t>(vocab - 1);
        std::vector<float> ref(static_cast<size_t>(n * hidden));
        cpu::Embedding(ids.data(), n, table.view(), ref.data());
        DeviceArray<int32_t> dids(ids);
        DeviceArray<float> out(ref.size());
        out.Poison();
        ASSERT_EQ(
            cuda::Embedding(dids.get(), n, table.device, dt, vocab, hidden, out.get(), nullptr),
            cudaSuccess);
        EXPECT_TRUE(AllClose(out.Download(), ref, 0.0, 0.0, what));
      }
    }
  }
}

TEST_F(CudaOpsTest, RmsNormMatchesCpu) {
  KVGATE_SEED_TRACE();
  for (DType dt : kDTypes) {
    for (int64_t dim : {1, 64, 80, 2049, 4096}) {
      for (int64_t n : {1, 7}) {
        const std::string what = absl::StrCat("RmsNorm weight ", Name(dt), " n ", n, " dim ", dim);
        const std::vector<float> x = Normal(static_cast<size_t>(n * dim), 3.0f);
        TestWeight w(Normal(static_cast<size_t>(dim)), dt, 1, dim);
        std::vector<float> ref(x.size());
        cpu::RmsNorm(x.data(), n, dim, w.view(), 1e-5, ref.data());
        DeviceArray<float> dx(x);
        DeviceArray<float> out(x.size());
        out.Poison();
        ASSERT_EQ(cuda::RmsNorm(dx.get(), w.device, dt, n, dim, 1e-5f, out.get(), nullptr),
                  cudaSuccess);
        EXPECT_TRUE(AllClose(out.Download(), ref, 1e-5, 1e-6, what));
        // In place (out aliases x).
        ASSERT_EQ(cuda::RmsNorm(dx.get(), w.device, dt, n, dim, 1e-5f, dx.get(), nullptr),
                  cudaSuccess);
        EXPECT_TRUE(AllClose(dx.Download(), ref, 1e-5, 1e-6, what + " in place"));
      }
    }
  }
}

TEST_F(CudaOpsTest, RopeMatchesCpu) {
  KVGATE_SEED_TRACE();
  for (int64_t head_dim : {64, 80, 96, 128}) {
    for (int64_t rotary_dim : {head_dim, head_dim / 2}) {
      for (int64_t n : {1, 7}) {
        for (int64_t heads : {1, 5}) {
          const std::string what = absl::StrCat("Rope n ", n, " heads ", heads, " head_dim ",
                                                head_dim, " rotary_dim ", rotary_dim);
          std::vector<float> x = Normal(static_cast<size_t>(n * heads * head_dim));
          std::vector<float> cos(static_cast<size_t>(n * rotary_dim / 2));
          std::vector<float> sin(cos.size());
          std::uniform_real_distribution<float> angle(-3.2f, 3.2f);
          for (size_t i = 0; i < cos.size(); ++i) {
            const float a = angle(rng_);
            cos[i] = std::cos(a);
            sin[i] = std::sin(a);
          }
          DeviceArray<float> dx(x), dcos(cos), dsin(sin);
          std::vector<float> ref = x;
          cpu::Rope(ref.data(), n, heads, head_dim, rotary_dim, cos.data(), sin.data());
          ASSERT_EQ(
              cuda::Rope(dx.get(), n, heads, head_dim, rotary_dim, dcos.get(), dsin.get(), nullptr),
              cudaSuccess);
          EXPECT_TRUE(AllClose(dx.Download(), ref, 1e-6, 1e-7, what));
        }
      }
    }
  }
}

TEST_F(CudaOpsTest, SiluMulAndAddMatchCpu) {
  KVGATE_SEED_TRACE();
  for (int64_t count : {1, 17, 2049, (1 << 20) + 3}) {
    const std::vector<float> gate = Normal(static_cast<size_t>(count), 4.0f);
    const std::vector<float> up = Normal(static_cast<size_t>(count));
    DeviceArray<float> dgate(gate), dup(up), out(gate.size());
    out.Poison();
    std::vector<float> ref(gate.size());
    cpu::SiluMul(gate.data(), up.data(), gate.size(), ref.data());
    ASSERT_EQ(cuda::SiluMul(dgate.get(), dup.get(), count, out.get(), nullptr), cudaSuccess);
    EXPECT_TRUE(AllClose(out.Download(), ref, 1e-5, 1e-7, absl::StrCat("SiluMul count ", count)));
    // Aliased output (out == gate).
    ASSERT_EQ(cuda::SiluMul(dgate.get(), dup.get(), count, dgate.get(), nullptr), cudaSuccess);
    EXPECT_TRUE(AllClose(dgate.Download(), ref, 1e-5, 1e-7,
                         absl::StrCat("SiluMul in place count ", count)));
    std::vector<float> sum = ref;
    cpu::Add(sum.data(), up.data(), sum.size());
    ASSERT_EQ(cuda::Add(dgate.get(), dup.get(), count, nullptr), cudaSuccess);
    EXPECT_TRUE(AllClose(dgate.Download(), sum, 1e-5, 1e-7, absl::StrCat("Add count ", count)));
  }
}

// ---------------------------------------------------------------------------------------------
// MatMul (cuBLAS)
// ---------------------------------------------------------------------------------------------

TEST_F(CudaOpsTest, MatMulMatchesCpu) {
  KVGATE_SEED_TRACE();
  cudaStream_t stream = nullptr;
  KVGATE_CUDA_CHECK(cudaStreamCreate(&stream));
  auto gemm = cuda::Gemm::Create(stream);
  ASSERT_TRUE(gemm.ok()) << gemm.status();
  struct Shape {
    int64_t m, k;
  };
  for (DType dt : kDTypes) {
    for (Shape s : {Shape{17, 64}, Shape{2049, 80}, Shape{96, 4096}}) {
      for (int64_t n : {1, 7, 33}) {
        for (int bias_kind = 0; bias_kind < 3; ++bias_kind) {  // none, f32, bf16
          const std::string what =
              absl::StrCat("MatMul w ", Name(dt), " n ", n, " m ", s.m, " k ", s.k, " bias ",
                           bias_kind == 0 ? "none" : (bias_kind == 1 ? "f32" : "bf16"));
          const std::vector<float> x = Normal(static_cast<size_t>(n * s.k));
          TestWeight w(Normal(static_cast<size_t>(s.m * s.k)), dt, s.m, s.k);
          const DType bias_dt = bias_kind == 2 ? DType::kBF16 : DType::kF32;
          TestWeight bias(Normal(static_cast<size_t>(s.m)), bias_dt, 1, s.m);
          const WeightView bias_view = bias.view();
          std::vector<float> ref(static_cast<size_t>(n * s.m));
          cpu::MatMul(x.data(), n, w.view(), bias_kind == 0 ? nullptr : &bias_view, ref.data());
          DeviceArray<float> dx(x), y(ref.size());
          y.Poison();
          const absl::Status st =
              (*gemm)->MatMul(dx.get(), n, w.device, dt, s.m, s.k,
                              bias_kind == 0 ? nullptr : bias.device, bias_dt, y.get());
          ASSERT_TRUE(st.ok()) << what << ": " << st;
          KVGATE_CUDA_CHECK(cudaStreamSynchronize(stream));
          // Relative to the element and to the output's scale (sums of k products cancel).
          const double rtol = dt == DType::kF32 ? 1e-5 : 1e-2;
          EXPECT_TRUE(AllClose(y.Download(), ref, rtol, rtol * Rms(ref), what));
        }
      }
    }
  }
  gemm->reset();
  cudaStreamDestroy(stream);
}

// ---------------------------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------------------------

struct AttentionCase {
  int64_t n;
  int64_t num_heads;
  int64_t num_kv_heads;
  int64_t head_dim;
  int64_t base_len;  // head g has base_len + (g * 7) % 23 retained entries (ragged)
  int64_t window;
  bool gates;  // random new_visible
  bool mass;
  int64_t first_query;
  int64_t pad;  // row stride = head_dim + pad (odd pad: the unaligned load path)

  std::string Name() const {
    return absl::StrCat("n ", n, " heads ", num_heads, "/", num_kv_heads, " d ", head_dim, " len ",
                        base_len, "+ragged window ", window, " gates ", gates, " mass ", mass,
                        " first_query ", first_query, " pad ", pad);
  }
};

// Runs one case on the CPU and the GPU and compares out (and mass).
void CheckAttention(const AttentionCase& c, std::mt19937& rng) {
  SCOPED_TRACE(c.Name());
  const int64_t d = c.head_dim, stride = d + c.pad;
  std::normal_distribution<float> normal;
  std::bernoulli_distribution coin(0.5);
  std::vector<std::vector<float>> hk(c.num_kv_heads), hv(c.num_kv_heads);
  std::vector<std::vector<uint8_t>> hvis(c.num_kv_heads);
  std::vector<DeviceArray<float>> dk, dv;
  std::vector<DeviceArray<uint8_t>> dvis;
  std::vector<KvHeadView> host_views(c.num_kv_heads), dev_views(c.num_kv_heads);
  int64_t max_len = 0;
  for (int64_t g = 0; g < c.num_kv_heads; ++g) {
    const int64_t len = std::max(c.n, c.base_len + (g * 7) % 23);
    max_len = std::max(max_len, len);
    // Padding columns are NaN: reading them would poison the output.
    hk[g].assign(static_cast<size_t>(len * stride), std::numeric_limits<float>::quiet_NaN());
    hv[g] = hk[g];
    for (int64_t j = 0; j < len; ++j) {
      for (int64_t e = 0; e < d; ++e) {
        hk[g][j * stride + e] = normal(rng);
        hv[g][j * stride + e] = normal(rng);
      }
    }
    hvis[g].resize(static_cast<size_t>(c.n));
    for (auto& b : hvis[g]) b = coin(rng) ? 1 : 0;
    dk.emplace_back(hk[g]);
    dv.emplace_back(hv[g]);
    dvis.emplace_back(hvis[g]);
    host_views[g] =
        KvHeadView{hk[g].data(), hv[g].data(), len, stride, c.gates ? hvis[g].data() : nullptr};
    dev_views[g] =
        KvHeadView{dk[g].get(), dv[g].get(), len, stride, c.gates ? dvis[g].get() : nullptr};
  }
  std::vector<float> q(static_cast<size_t>(c.n * c.num_heads * d));
  for (float& f : q) f = normal(rng);
  const int64_t mass_stride = max_len + 5;
  std::vector<float> ref(q.size()), ref_mass(static_cast<size_t>(c.num_kv_heads * mass_stride),
                                             std::numeric_limits<float>::quiet_NaN());
  AttentionMass hmass{ref_mass.data(), mass_stride, c.first_query};
  cpu::Attention(q.data(), c.n, c.num_heads, c.num_kv_heads, d, host_views.data(), c.window,
                 ref.data(), c.mass ? &hmass : nullptr);

  DeviceArray<float> dq(q), out(q.size()), dmass(ref_mass.size());
  out.Poison();
  dmass.Poison();
  AttentionMass gmass{dmass.get(), mass_stride, c.first_query};
  const size_t ws_bytes =
      cuda::AttentionWorkspaceBytes(c.n, c.num_heads, c.num_kv_heads, d, max_len);
  DeviceArray<uint8_t> ws(ws_bytes);
  ASSERT_EQ(
      cuda::Attention(dq.get(), c.n, c.num_heads, c.num_kv_heads, d, dev_views.data(), c.window,
                      out.get(), c.mass ? &gmass : nullptr, ws.get(), ws_bytes, nullptr),
      cudaSuccess);
  KVGATE_CUDA_CHECK(cudaDeviceSynchronize());
  EXPECT_TRUE(AllClose(out.Download(), ref, 1e-4, 1e-5, "attention out"));
  if (c.mass) {
    // Entries [0, len) of each row are written; the rest must stay untouched (NaN).
    std::vector<float> got = dmass.Download();
    for (int64_t g = 0; g < c.num_kv_heads; ++g) {
      const int64_t len = host_views[g].len;
      for (int64_t j = len; j < mass_stride; ++j) {
        ASSERT_TRUE(std::isnan(got[g * mass_stride + j]))
            << "mass written past len at head " << g << " entry " << j;
        got[g * mass_stride + j] = 0.f;
        ref_mass[g * mass_stride + j] = 0.f;
      }
    }
    EXPECT_TRUE(AllClose(got, ref_mass, 1e-4, 1e-6, "attention mass"));
  }
}

TEST_F(CudaOpsTest, AttentionDecodeMatchesCpu) {
  KVGATE_SEED_TRACE();
  for (int64_t d : {64, 80, 96, 128}) {
    for (int64_t len : {1, 17, 511, 2049}) {
      CheckAttention({1, 8, 2, d, len, 0, false, false, 0, 0}, rng_);
      CheckAttention({1, 8, 2, d, len, 0, true, true, 0, 4}, rng_);
    }
  }
  // MHA, group 8, a window, an unaligned stride.
  CheckAttention({1, 4, 4, 128, 2049, 0, false, true, 0, 0}, rng_);
  CheckAttention({1, 32, 4, 128, 4100, 0, false, true, 0, 0}, rng_);
  CheckAttention({1, 8, 2, 64, 2049, 100, false, true, 0, 0}, rng_);
  CheckAttention({1, 8, 2, 80, 511, 0, false, true, 0, 1}, rng_);
  // More KV heads than one launch takes (64).
  CheckAttention({1, 72, 72, 64, 100, 0, true, true, 0, 0}, rng_);
}

TEST_F(CudaOpsTest, AttentionPrefillMatchesCpu) {
  KVGATE_SEED_TRACE();
  for (int64_t d : {64, 80, 96, 128}) {
    for (int64_t len : {7, 17, 511}) {
      CheckAttention({7, 8, 2, d, len, 0, false, false, 0, 0}, rng_);
      CheckAttention({7, 8, 2, d, len, 0, true, true, 0, 0}, rng_);
      CheckAttention({7, 8, 2, d, len, 16, true, true, 4, 0}, rng_);
    }
  }
  CheckAttention({17, 6, 3, 96, 17, 0, true, true, 0, 0}, rng_);
  CheckAttention({33, 4, 4, 80, 600, 0, false, true, 30, 1}, rng_);
  CheckAttention({64, 16, 2, 128, 2049, 0, true, true, 48, 0}, rng_);
  CheckAttention({5, 8, 1, 256, 300, 0, false, true, 0, 0}, rng_);
  CheckAttention({9, 4, 2, 176, 100, 0, true, false, 0, 0}, rng_);
  CheckAttention({5, 130, 65, 64, 40, 0, true, true, 1, 0}, rng_);
  CheckAttention({2049, 8, 2, 128, 2049, 0, false, false, 0, 0}, rng_);
  CheckAttention({2049, 4, 2, 64, 2049, 256, true, true, 2000, 0}, rng_);
}

// Head dims the kernels do not take directly (not a multiple of 16: stories260K's 8) run on
// zero-padded copies with the real head_dim's softmax scale: same as the CPU, mass included.
TEST_F(CudaOpsTest, AttentionOnOtherHeadDimsMatchesCpu) {
  KVGATE_SEED_TRACE();
  for (int64_t d : {8, 40, 72, 100}) {
    CheckAttention({1, 8, 4, d, 17, 0, false, false, 0, 0}, rng_);
    CheckAttention({1, 8, 4, d, 2049, 0, true, true, 0, 3}, rng_);
    CheckAttention({7, 8, 4, d, 511, 16, true, true, 4, 0}, rng_);
    CheckAttention({33, 4, 4, d, 600, 0, false, true, 30, 1}, rng_);
  }
}

// ---------------------------------------------------------------------------------------------
// Eviction: top-k selection and compaction
// ---------------------------------------------------------------------------------------------

// EvictingKvCache::Select: the `budget` highest scores (ties: the larger index), ascending.
std::vector<int32_t> SelectReference(const float* scores, int64_t len, int64_t budget) {
  std::vector<int32_t> keep(static_cast<size_t>(len));
  std::iota(keep.begin(), keep.end(), 0);
  if (len <= budget) return keep;
  std::nth_element(keep.begin(), keep.begin() + budget - 1, keep.end(), [&](int32_t a, int32_t c) {
    const float pa = scores[a], pc = scores[c];
    return pa > pc || (pa == pc && a > c);
  });
  keep.resize(static_cast<size_t>(budget));
  std::sort(keep.begin(), keep.end());
  return keep;
}

TEST_F(CudaOpsTest, SelectTopKMatchesCacheSelection) {
  KVGATE_SEED_TRACE();
  const std::vector<int32_t> lens = {1, 17, 511, 2049, 0, 300};
  const int64_t heads = static_cast<int64_t>(lens.size());
  const int64_t stride = 2049 + 3;
  for (int64_t budget : {1, 16, 300, 2048}) {
    for (int ties = 0; ties < 2; ++ties) {
      std::vector<float> scores(static_cast<size_t>(heads * stride),
                                std::numeric_limits<float>::quiet_NaN());
      std::uniform_int_distribution<int> small(-3, 3);
      for (int64_t g = 0; g < heads; ++g) {
        for (int64_t j = 0; j < lens[g]; ++j) {
          float s = ties ? static_cast<float>(small(rng_)) * 0.5f : Normal(1)[0];
          if (ties && s == 0.f && (j % 2)) s = -0.0f;                   // -0.0 and +0.0 tie
          if (j % 97 == 5) s = std::numeric_limits<float>::infinity();  // "always keep"
          scores[g * stride + j] = s;
        }
      }
      DeviceArray<float> dscores(scores);
      DeviceArray<int32_t> dlens(lens), kept(static_cast<size_t>(heads * budget)), count(heads);
      kept.Poison();
      count.Poison();
      ASSERT_EQ(cuda::SelectTopK(dscores.get(), heads, stride, dlens.get(), budget, kept.get(),
                                 count.get(), nullptr),
                cudaSuccess);
      const std::vector<int32_t> got = kept.Download(), got_count = count.Download();
      for (int64_t g = 0; g < heads; ++g) {
        const std::vector<int32_t> ref = SelectReference(&scores[g * stride], lens[g], budget);
        ASSERT_EQ(got_count[g], static_cast<int32_t>(ref.size()))
            << "head " << g << " len " << lens[g] << " budget " << budget << " ties " << ties;
        const std::vector<int32_t> row(got.begin() + g * budget,
                                       got.begin() + g * budget + static_cast<int64_t>(ref.size()));
        EXPECT_EQ(row, ref) << "head " << g << " len " << lens[g] << " budget " << budget
                            << " ties " << ties;
      }
    }
  }
}

TEST_F(CudaOpsTest, CompactRowsMatchesSequentialMove) {
  KVGATE_SEED_TRACE();
  const std::vector<int32_t> lens = {1, 17, 511, 2049};
  const int64_t heads = static_cast<int64_t>(lens.size());
  const int64_t slots = 2049;
  for (int64_t width : {1, 80, 128}) {
    const int64_t row_stride = width + (width > 1 ? 4 : 0);
    const int64_t head_stride = slots * row_stride;
    for (int64_t budget : {1, 100, 2048}) {
      // Random kept sets, ascending.
      std::vector<int32_t> kept(static_cast<size_t>(heads * budget), -1), counts(heads);
      for (int64_t g = 0; g < heads; ++g) {
        std::vector<int32_t> all(static_cast<size_t>(lens[g]));
        std::iota(all.begin(), all.end(), 0);
        std::shuffle(all.begin(), all.end(), rng_);
        all.resize(static_cast<size_t>(std::min<int64_t>(budget, lens[g])));
        std::sort(all.begin(), all.end());
        counts[g] = static_cast<int32_t>(all.size());
        std::copy(all.begin(), all.end(), kept.begin() + g * budget);
      }
      const std::vector<float> data = Normal(static_cast<size_t>(heads * head_stride));
      // Reference: the cache's in-order memmove.
      std::vector<float> ref = data;
      for (int64_t g = 0; g < heads; ++g) {
        for (int64_t t = 0; t < counts[g]; ++t) {
          const int64_t from = kept[g * budget + t];
          std::memmove(&ref[g * head_stride + t * row_stride],
                       &ref[g * head_stride + from * row_stride], width * sizeof(float));
        }
      }
      DeviceArray<int32_t> dkept(kept), dcounts(counts);
      const std::string what = absl::StrCat("CompactRows width ", width, " budget ", budget);
      {  // in place
        DeviceArray<float> d(data);
        ASSERT_EQ(cuda::CompactRows(d.get(), d.get(), heads, head_stride, row_stride, width,
                                    dkept.get(), budget, dcounts.get(), nullptr),
                  cudaSuccess);
        EXPECT_TRUE(AllClose(d.Download(), ref, 0.0, 0.0, what + " in place"));
      }
      {  // to a second buffer: kept rows as in ref, the rest untouched (NaN)
        DeviceArray<float> src(data), dst(data.size());
        dst.Poison();
        ASSERT_EQ(cuda::CompactRows(src.get(), dst.get(), heads, head_stride, row_stride, width,
                                    dkept.get(), budget, dcounts.get(), nullptr),
                  cudaSuccess);
        std::vector<float> got = dst.Download();
        std::vector<float> want(got.size(), std::numeric_limits<float>::quiet_NaN());
        for (int64_t g = 0; g < heads; ++g) {
          for (int64_t t = 0; t < counts[g]; ++t) {
            for (int64_t e = 0; e < width; ++e) {
              const int64_t at = g * head_stride + t * row_stride + e;
              want[at] = ref[at];
            }
          }
        }
        for (size_t i = 0; i < got.size(); ++i) {
          if (std::isnan(want[i])) {
            ASSERT_TRUE(std::isnan(got[i])) << what << ": wrote outside kept rows at " << i;
            got[i] = want[i] = 0.f;
          }
        }
        EXPECT_TRUE(AllClose(got, want, 0.0, 0.0, what + " to second buffer"));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Sampling
// ---------------------------------------------------------------------------------------------

// The CPU sampler's candidate set (model/sampling/sampler.cc): sorted by logit (ties by id),
// top-k, softmax, top-p, min-p.
std::vector<int32_t> AllowedSet(const float* logits, int64_t vocab, const cuda::SampleParams& p) {
  std::vector<int32_t> order(static_cast<size_t>(vocab));
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  });
  size_t keep = order.size();
  if (p.top_k > 0 && static_cast<size_t>(p.top_k) < keep) keep = static_cast<size_t>(p.top_k);
  const double inv_t = 1.0 / p.temperature;
  std::vector<double> probs(keep);
  const double max_l = logits[order[0]] * inv_t;
  double sum = 0.0;
  for (size_t i = 0; i < keep; ++i) {
    probs[i] = std::exp(logits[order[i]] * inv_t - max_l);
    sum += probs[i];
  }
  for (double& q : probs) q /= sum;
  if (p.top_p < 1.0f) {
    double cum = 0.0;
    size_t n = 0;
    while (n < keep) {
      cum += probs[n++];
      if (cum >= p.top_p) break;
    }
    keep = std::max<size_t>(n, 1);
  }
  if (p.min_p > 0.0f) {
    const double threshold = p.min_p * probs[0];
    size_t n = 1;
    while (n < keep && probs[n] >= threshold) ++n;
    keep = n;
  }
  order.resize(keep);
  std::sort(order.begin(), order.end());
  return order;
}

std::vector<int32_t> RunSample(const DeviceArray<float>& logits, int64_t batch, int64_t vocab,
                               const cuda::SampleParams& p) {
  DeviceArray<int32_t> tokens(static_cast<size_t>(batch));
  tokens.Poison();
  KVGATE_CUDA_CHECK(cuda::Sample(logits.get(), batch, vocab, p, tokens.get(), nullptr));
  return tokens.Download();
}

TEST_F(CudaOpsTest, SampleGreedyIsFirstArgmax) {
  KVGATE_SEED_TRACE();
  for (int64_t vocab : {1, 17, 32000, 128256}) {
    const int64_t batch = 7;
    std::vector<float> logits = Normal(static_cast<size_t>(batch * vocab), 3.0f);
    // Row 1: a tied maximum at two ids (the first wins); row 2: all equal.
    if (vocab > 3) {
      logits[vocab + 2] = 100.f;
      logits[vocab + vocab - 1] = 100.f;
      std::fill(logits.begin() + 2 * vocab, logits.begin() + 3 * vocab, -1.5f);
    }
    DeviceArray<float> d(logits);
    cuda::SampleParams p;
    p.temperature = 0.f;
    const std::vector<int32_t> got = RunSample(d, batch, vocab, p);
    for (int64_t r = 0; r < batch; ++r) {
      const float* row = &logits[r * vocab];
      EXPECT_EQ(got[r], std::max_element(row, row + vocab) - row)
          << "vocab " << vocab << " row " << r;
    }
  }
}

TEST_F(CudaOpsTest, SampleIsDeterministicAndRespectsFilters) {
  KVGATE_SEED_TRACE();
  const int64_t batch = 64;
  for (int64_t vocab : {17, 32000, 128256}) {
    const std::vector<float> logits = Normal(static_cast<size_t>(batch * vocab), 2.0f);
    DeviceArray<float> d(logits);
    cuda::SampleParams greedy;
    greedy.temperature = 0.f;
    const std::vector<int32_t> argmax = RunSample(d, batch, vocab, greedy);

    // Filters that leave only the top token equal greedy.
    for (int which = 0; which < 3; ++which) {
      cuda::SampleParams p;
      p.temperature = 0.7f;
      p.seed = seed_;
      if (which == 0) p.top_k = 1;
      if (which == 1) p.top_p = 1e-6f;
      if (which == 2) p.min_p = 1.0f;
      EXPECT_EQ(RunSample(d, batch, vocab, p), argmax) << "vocab " << vocab
                                                       << (which == 0   ? " top_k 1"
                                                           : which == 1 ? " top_p 1e-6"
                                                                        : " min_p 1");
    }

    struct Filter {
      float temperature;
      int64_t top_k;
      float top_p;
      float min_p;
    };
    for (Filter f :
         {Filter{1.f, 0, 1.f, 0.f}, Filter{0.8f, 40, 1.f, 0.f}, Filter{1.f, 0, 0.9f, 0.f},
          Filter{1.2f, 0, 1.f, 0.05f}, Filter{0.9f, 50, 0.8f, 0.02f}, Filter{2.f, 5, 0.5f, 0.f}}) {
      cuda::SampleParams p;
      p.temperature = f.temperature;
      p.top_k = f.top_k;
      p.top_p = f.top_p;
      p.min_p = f.min_p;
      p.seed = seed_;
      const std::string what = absl::StrCat("vocab ", vocab, " T ", f.temperature, " top_k ",
                                            f.top_k, " top_p ", f.top_p, " min_p ", f.min_p);
      const std::vector<int32_t> first = RunSample(d, batch, vocab, p);
      EXPECT_EQ(RunSample(d, batch, vocab, p), first) << what << ": a seeded run repeats";
      std::vector<std::vector<int32_t>> allowed(static_cast<size_t>(batch));
      for (int64_t r = 0; r < batch; ++r) allowed[r] = AllowedSet(&logits[r * vocab], vocab, p);
      for (uint64_t offset = 0; offset < 8; ++offset) {
        p.offset = offset;
        const std::vector<int32_t> got = RunSample(d, batch, vocab, p);
        for (int64_t r = 0; r < batch; ++r) {
          EXPECT_TRUE(std::binary_search(allowed[r].begin(), allowed[r].end(), got[r]))
              << what << " offset " << offset << " row " << r << ": token " << got[r]
              << " outside the allowed set of " << allowed[r].size();
        }
      }
    }
  }
}

TEST_F(CudaOpsTest, SampleFrequenciesMatchSoftmax) {
  KVGATE_SEED_TRACE();
  const std::vector<float> row = {0.f, 0.5f, 1.f, -1.f, 2.f, 0.1f};
  const int64_t vocab = static_cast<int64_t>(row.size());
  const int64_t batch = 8192;
  std::vector<float> logits;
  for (int64_t r = 0; r < batch; ++r) logits.insert(logits.end(), row.begin(), row.end());
  DeviceArray<float> d(logits);
  std::vector<double> counts(row.size(), 0.0);
  int64_t draws = 0;
  for (uint64_t s = 0; s < 8; ++s) {
    cuda::SampleParams p;
    p.seed = seed_ + s * 0x9e3779b97f4a7c15ull;
    p.offset = s;
    for (int32_t t : RunSample(d, batch, vocab, p)) {
      ASSERT_TRUE(t >= 0 && t < vocab);
      counts[static_cast<size_t>(t)] += 1;
      ++draws;
    }
  }
  double z = 0.0;
  for (float l : row) z += std::exp(static_cast<double>(l));
  for (size_t i = 0; i < row.size(); ++i) {
    const double p = std::exp(static_cast<double>(row[i])) / z;
    const double freq = counts[i] / static_cast<double>(draws);
    const double sigma = std::sqrt(p * (1 - p) / static_cast<double>(draws));
    EXPECT_NEAR(freq, p, 5 * sigma + 1e-4) << "token " << i << " over " << draws << " draws";
  }
}

}  // namespace
}  // namespace kvgate::kernels
