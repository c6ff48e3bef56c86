// The guarded backend (device memory the host cannot touch outside the backend's ops), device
// parsing and selection, and memory errors as statuses.
#include <gtest/gtest.h>

#include <vector>

#include "kernels/backend.h"

namespace kvgate::kernels {
namespace {

TEST(Device, ParsesTheChoicesAndNamesThemOnError) {
  EXPECT_EQ(Device::Parse("cpu")->type, Device::Type::kCpu);
  EXPECT_EQ(Device::Parse("guarded")->type, Device::Type::kGuarded);
  EXPECT_EQ(Device::Parse("cuda")->index, 0);
  EXPECT_EQ(Device::Parse("cuda:3")->index, 3);
  EXPECT_EQ(Device::Parse("cuda:3")->ToString(), "cuda:3");
  for (const char* bad : {"gpu", "cuda:", "cuda:-1", "cuda:x", ""}) {
    auto d = Device::Parse(bad);
    ASSERT_FALSE(d.ok()) << bad;
    EXPECT_EQ(d.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(d.status().message().find("cpu, cuda, cuda:N, guarded"), std::string::npos);
  }
}

TEST(Device, AMissingGpuIsAClearError) {
  if (CudaDeviceCount() > 0) GTEST_SKIP() << "a GPU is present: nothing missing to report";
  auto b = MakeBackend(Device{Device::Type::kCuda, 0}, 1);
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(b.status().message().find("--device cpu"), std::string::npos) << b.status();
}

TEST(GuardedBackend, OpsAndCopiesWork) {
  auto backend = MakeGuardedBackend(1);
  EXPECT_FALSE(backend->host_accessible());
  auto x = backend->Alloc(8, DType::kF32);
  auto y = backend->Alloc(8, DType::kF32);
  ASSERT_TRUE(x.ok() && y.ok());
  std::vector<float> a = {1, 2, 3, 4, 5, 6, 7, 8}, b(8, 10.f), out(8);
  ASSERT_TRUE(backend->CopyToDevice(x->data(), a.data(), 32).ok());
  ASSERT_TRUE(backend->CopyToDevice(y->data(), b.data(), 32).ok());
  backend->Add(x->as<float>(), y->as<float>(), 8);
  ASSERT_TRUE(backend->CopyToHost(out.data(), x->data(), 32).ok());
  for (int i = 0; i < 8; ++i)
    EXPECT_EQ(out[static_cast<size_t>(i)], a[static_cast<size_t>(i)] + 10);
  // A weight uploaded once lives in guarded memory too.
  DeviceBuffer storage;
  auto w = backend->Upload(WeightView{b.data(), DType::kF32, 1, 8}, &storage);
  ASSERT_TRUE(w.ok());
  EXPECT_NE(w->data, b.data());
  EXPECT_EQ(storage.bytes(), 32u);
}

TEST(GuardedBackend, HostAccessToDeviceMemoryCrashes) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto backend = MakeGuardedBackend(1);
  auto x = backend->Alloc(16, DType::kF32);
  ASSERT_TRUE(x.ok());
  float* p = x->as<float>();
  EXPECT_DEATH(
      {
        volatile float v = p[3];
        (void)v;
      },
      "");
  EXPECT_DEATH({ p[0] = 1.f; }, "");
}

TEST(GuardedBackend, OutOfMemoryIsResourceExhausted) {
  auto backend = MakeGuardedBackend(1);
  auto x = backend->Alloc(int64_t{1} << 60, DType::kF32);
  ASSERT_FALSE(x.ok());
  EXPECT_EQ(x.status().code(), absl::StatusCode::kResourceExhausted);
}

}  // namespace
}  // namespace kvgate::kernels
