// CUDA ops against the CPU reference. Skipped, saying so, when no GPU is found.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "kernels/cpu/ops.h"
#include "kernels/cuda/device.h"
#include "kernels/cuda/ops.h"

namespace kvgate::kernels {
namespace {

class CudaOpsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda::DeviceCount() == 0) GTEST_SKIP() << "no CUDA GPU found: GPU parity tests skipped";
  }
};

template <typename T>
T* ToDevice(const std::vector<T>& v) {
  T* p = nullptr;
  EXPECT_EQ(cudaMalloc(&p, v.size() * sizeof(T)), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  return p;
}

TEST_F(CudaOpsTest, RmsNormAndSiluMulMatchCpu) {
  std::mt19937 rng(std::random_device{}());
  std::normal_distribution<float> d;
  for (int64_t dim : {1, 64, 80, 2049, 4096}) {
    const int64_t n = 7;
    std::vector<float> x(n * dim), w(dim);
    for (float& f : x) f = d(rng);
    for (float& f : w) f = d(rng);
    std::vector<float> ref(x.size());
    cpu::RmsNorm(x.data(), n, dim, WeightView{w.data(), DType::kF32, 1, dim}, 1e-5, ref.data());
    float* dx = ToDevice(x);
    float* dw = ToDevice(w);
    float* dout = ToDevice(std::vector<float>(x.size(), NAN));
    ASSERT_EQ(cuda::RmsNorm(dx, dw, n, dim, 1e-5f, dout, nullptr), cudaSuccess);
    std::vector<float> out(x.size());
    ASSERT_EQ(cudaMemcpy(out.data(), dout, out.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    for (size_t i = 0; i < out.size(); ++i)
      ASSERT_NEAR(out[i], ref[i], 1e-5 * (1 + std::abs(ref[i])));
    ASSERT_EQ(cuda::SiluMul(dx, dx, n * dim, dout, nullptr), cudaSuccess);
    cpu::SiluMul(x.data(), x.data(), x.size(), ref.data());
    ASSERT_EQ(cudaMemcpy(out.data(), dout, out.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    for (size_t i = 0; i < out.size(); ++i)
      ASSERT_NEAR(out[i], ref[i], 1e-5 * (1 + std::abs(ref[i])));
    cudaFree(dx);
    cudaFree(dw);
    cudaFree(dout);
  }
}

}  // namespace
}  // namespace kvgate::kernels
