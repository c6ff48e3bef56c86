// The NCCL transport on a GPU: a one-rank loop (send to self, receive from self), activations
// and error headers in step order; with two GPUs, two ranks in two threads as two stages.
// Skipped, saying so, without a GPU.
#include "worker/nccl_transport.h"

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <random>
#include <thread>

namespace kvgate::worker {
namespace {

int Devices() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

TEST(NcclTransport, SelfSendReceive) {
  if (Devices() < 1) GTEST_SKIP() << "no GPU found: the NCCL transport is checked on a GPU";
  auto id = NcclTransport::UniqueId();
  ASSERT_TRUE(id.ok()) << id.status();
  auto t = NcclTransport::Create(*id, 0, 1, 0, /*prev=*/0, /*next=*/0);
  ASSERT_TRUE(t.ok()) << t.status();
  std::mt19937 rng(std::random_device{}());
  std::uniform_real_distribution<float> u(-1, 1);
  const int64_t n = 2049 * 64 + 7;
  std::vector<float> x(n), y(n, std::nanf(""));
  for (float& v : x) v = u(rng);
  float *dx = nullptr, *dy = nullptr;
  ASSERT_EQ(cudaMalloc(&dx, n * 4), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&dy, n * 4), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(dx, x.data(), n * 4, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(dy, y.data(), n * 4, cudaMemcpyHostToDevice), cudaSuccess);
  int64_t got = 0;
  ASSERT_TRUE((*t)->SendRecvDevice(5, dx, n, 5, dy, n, &got).ok());
  EXPECT_EQ(got, n);
  ASSERT_EQ(cudaMemcpy(y.data(), dy, n * 4, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(x, y);
  // A step id the receiver did not expect is an error, not silent data.
  EXPECT_FALSE((*t)->SendRecvDevice(6, dx, n, 7, dy, n, &got).ok());
  cudaFree(dx);
  cudaFree(dy);
}

TEST(NcclTransport, TwoStagesOnTwoGpus) {
  if (Devices() < 2) GTEST_SKIP() << "fewer than 2 GPUs: the two-stage NCCL path is not checked";
  auto id = NcclTransport::UniqueId();
  ASSERT_TRUE(id.ok());
  std::vector<float> x(4096 * 3 + 1), y;
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i) * 0.25f;
  absl::Status sent, received;
  std::thread stage0([&] {
    auto t = NcclTransport::Create(*id, 0, 2, 0, -1, 1);
    if (!t.ok()) {
      sent = t.status();
      return;
    }
    sent = (*t)->Send(1, absl::OkStatus(), x);
    if (sent.ok()) sent = (*t)->Send(2, absl::ResourceExhaustedError("full"), {});
  });
  std::thread stage1([&] {
    auto t = NcclTransport::Create(*id, 1, 2, 1, 0, -1);
    if (!t.ok()) {
      received = t.status();
      return;
    }
    received = (*t)->Recv(1, &y);
    if (received.ok()) {
      std::vector<float> z;
      const absl::Status s = (*t)->Recv(2, &z);
      if (s.code() != absl::StatusCode::kResourceExhausted) received = absl::InternalError("code");
    }
  });
  stage0.join();
  stage1.join();
  ASSERT_TRUE(sent.ok()) << sent;
  ASSERT_TRUE(received.ok()) << received;
  EXPECT_EQ(x, y);
}

}  // namespace
}  // namespace kvgate::worker
