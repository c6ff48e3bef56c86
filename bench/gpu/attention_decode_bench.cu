// Decode attention bandwidth on Llama-3.1-8B-like shapes: one sequence, one new token (n = 1),
// 32 query heads over 8 KV heads, head_dim 128, float32 KV, one layer per kernel call, at
// contexts of 4K, 32K and 128K tokens. Decode attention reads every retained K and V row once,
// so its roofline is the device's memory bandwidth, measured here by a large device-to-device
// cudaMemcpy (which reads and writes each byte: 2 x size bytes moved).
//
// Prints a markdown table: time per call, the KV bytes read per call, the achieved GB/s and its
// percentage of the copy bandwidth; with and without the AttentionMass side output. Then, for
// scale, a small prefill table (causal n x n, TFLOP/s).
//
//   build/bench/gpu/attention_decode_bench [--iters N]
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "common/cuda/cuda_check.h"
#include "kernels/cuda/device.h"
#include "kernels/cuda/ops.h"

namespace {

using kvgate::kernels::AttentionMass;
using kvgate::kernels::KvHeadView;
namespace cuda = kvgate::kernels::cuda;

constexpr int64_t kHeads = 32, kKvHeads = 8, kHeadDim = 128;

__global__ void FillKernel(float* p, size_t count, uint32_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    uint32_t x = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    x ^= x >> 15;
    x *= 2246822519u;
    x ^= x >> 13;
    p[i] = static_cast<float>(x & 0xffff) / 65536.0f - 0.5f;
  }
}

// Milliseconds per call of f, averaged over `iters` calls after 3 warm-up calls.
template <typename F>
float TimeMs(int iters, F&& f) {
  for (int i = 0; i < 3; ++i) f();
  cudaEvent_t start, stop;
  KVGATE_CUDA_CHECK(cudaEventCreate(&start));
  KVGATE_CUDA_CHECK(cudaEventCreate(&stop));
  KVGATE_CUDA_CHECK(cudaEventRecord(start));
  for (int i = 0; i < iters; ++i) f();
  KVGATE_CUDA_CHECK(cudaEventRecord(stop));
  KVGATE_CUDA_CHECK(cudaEventSynchronize(stop));
  float ms = 0.f;
  KVGATE_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return ms / static_cast<float>(iters);
}

}  // namespace

int main(int argc, char** argv) {
  int iters = 50;
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], "--iters") == 0) iters = std::atoi(argv[i + 1]);
  }
  if (cuda::DeviceCount() == 0) {
    std::printf("no CUDA GPU found: nothing to measure\n");
    return 0;
  }
  cudaDeviceProp prop{};
  KVGATE_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));

  // Roofline: a 1 GiB device-to-device copy.
  const size_t copy_bytes = size_t{1} << 30;
  void *src = nullptr, *dst = nullptr;
  KVGATE_CUDA_CHECK(cudaMalloc(&src, copy_bytes));
  KVGATE_CUDA_CHECK(cudaMalloc(&dst, copy_bytes));
  KVGATE_CUDA_CHECK(cudaMemset(src, 1, copy_bytes));
  const float copy_ms = TimeMs(std::max(5, iters / 5), [&] {
    KVGATE_CUDA_CHECK(cudaMemcpyAsync(dst, src, copy_bytes, cudaMemcpyDeviceToDevice));
  });
  const double copy_gbs = 2.0 * static_cast<double>(copy_bytes) / (copy_ms * 1e-3) / 1e9;
  KVGATE_CUDA_CHECK(cudaFree(src));
  KVGATE_CUDA_CHECK(cudaFree(dst));

  std::printf(
      "device: %s (%d SMs); decode attention, %lld q heads / %lld KV heads, d %lld, "
      "float32 KV, one layer per call, %d iterations\n\n",
      prop.name, prop.multiProcessorCount, static_cast<long long>(kHeads),
      static_cast<long long>(kKvHeads), static_cast<long long>(kHeadDim), iters);
  std::printf("device-to-device cudaMemcpy of 1 GiB: %.3f ms, %.0f GB/s (read + write)\n\n",
              copy_ms, copy_gbs);
  std::printf("| context | mass | KV read per call (MiB) | time (us) | GB/s | %% of copy |\n");
  std::printf("|--------:|:----:|-----------------------:|----------:|-----:|----------:|\n");

  for (int64_t context : {int64_t{4096}, int64_t{32768}, int64_t{131072}}) {
    const size_t per_head = static_cast<size_t>(context * kHeadDim);
    float *k = nullptr, *v = nullptr, *q = nullptr, *out = nullptr, *mass = nullptr;
    KVGATE_CUDA_CHECK(cudaMalloc(&k, per_head * kKvHeads * sizeof(float)));
    KVGATE_CUDA_CHECK(cudaMalloc(&v, per_head * kKvHeads * sizeof(float)));
    KVGATE_CUDA_CHECK(cudaMalloc(&q, kHeads * kHeadDim * sizeof(float)));
    KVGATE_CUDA_CHECK(cudaMalloc(&out, kHeads * kHeadDim * sizeof(float)));
    KVGATE_CUDA_CHECK(cudaMalloc(&mass, kKvHeads * context * sizeof(float)));
    FillKernel<<<1024, 256>>>(k, per_head * kKvHeads, 1);
    FillKernel<<<1024, 256>>>(v, per_head * kKvHeads, 2);
    FillKernel<<<16, 256>>>(q, kHeads * kHeadDim, 3);
    KVGATE_CUDA_CHECK(cudaGetLastError());
    std::vector<KvHeadView> views(kKvHeads);
    for (int64_t g = 0; g < kKvHeads; ++g) {
      views[g] = KvHeadView{k + g * per_head, v + g * per_head, context, kHeadDim, nullptr};
    }
    const size_t ws_bytes = cuda::AttentionWorkspaceBytes(1, kHeads, kKvHeads, kHeadDim, context);
    void* ws = nullptr;
    KVGATE_CUDA_CHECK(cudaMalloc(&ws, std::max<size_t>(ws_bytes, 1)));
    AttentionMass am{mass, context, 0};
    const double kv_bytes = 2.0 * static_cast<double>(per_head * kKvHeads * sizeof(float));
    for (bool with_mass : {false, true}) {
      const float ms = TimeMs(iters, [&] {
        KVGATE_CUDA_CHECK(cuda::Attention(q, 1, kHeads, kKvHeads, kHeadDim, views.data(), 0, out,
                                          with_mass ? &am : nullptr, ws, ws_bytes, nullptr));
      });
      // With mass, K is read a second time by the mass kernel.
      const double bytes = kv_bytes * (with_mass ? 1.5 : 1.0);
      const double gbs = bytes / (ms * 1e-3) / 1e9;
      std::printf("| %lldK | %s | %.0f | %.1f | %.0f | %.1f%% |\n",
                  static_cast<long long>(context / 1024), with_mass ? "yes" : "no",
                  bytes / (1 << 20), ms * 1e3, gbs, 100.0 * gbs / copy_gbs);
    }
    KVGATE_CUDA_CHECK(cudaFree(ws));
    KVGATE_CUDA_CHECK(cudaFree(k));
    KVGATE_CUDA_CHECK(cudaFree(v));
    KVGATE_CUDA_CHECK(cudaFree(q));
    KVGATE_CUDA_CHECK(cudaFree(out));
    KVGATE_CUDA_CHECK(cudaFree(mass));
  }

  // Prefill (n new tokens over a cache of n: the causal square), for scale: float32 CUDA-core
  // flash attention, reported in TFLOP/s counting 4 * heads * d flops per (query, visible key).
  std::printf(
      "\n| prefill tokens | time (ms) | TFLOP/s |\n|---------------:|----------:|--------:|\n");
  for (int64_t n : {int64_t{512}, int64_t{2048}, int64_t{8192}}) {
    const size_t per_head = static_cast<size_t>(n * kHeadDim);
    float *k = nullptr, *v = nullptr, *q = nullptr, *out = nullptr;
    KVGATE_CUDA_CHECK(cudaMalloc(&k, per_head * kKvHeads * sizeof(float)));
    KVGATE_CUDA_CHECK(cudaMalloc(&v, per_head * kKvHeads * sizeof(float)));
    KVGATE_CUDA_CHECK(cudaMalloc(&q, per_head * kHeads * sizeof(float)));
    KVGATE_CUDA_CHECK(cudaMalloc(&out, per_head * kHeads * sizeof(float)));
    FillKernel<<<1024, 256>>>(k, per_head * kKvHeads, 4);
    FillKernel<<<1024, 256>>>(v, per_head * kKvHeads, 5);
    FillKernel<<<1024, 256>>>(q, per_head * kHeads, 6);
    KVGATE_CUDA_CHECK(cudaGetLastError());
    std::vector<KvHeadView> views(kKvHeads);
    for (int64_t g = 0; g < kKvHeads; ++g) {
      views[g] = KvHeadView{k + g * per_head, v + g * per_head, n, kHeadDim, nullptr};
    }
    const size_t ws_bytes = cuda::AttentionWorkspaceBytes(n, kHeads, kKvHeads, kHeadDim, n);
    void* ws = nullptr;
    KVGATE_CUDA_CHECK(cudaMalloc(&ws, std::max<size_t>(ws_bytes, 1)));
    const float ms = TimeMs(std::max(3, iters / 10), [&] {
      KVGATE_CUDA_CHECK(cuda::Attention(q, n, kHeads, kKvHeads, kHeadDim, views.data(), 0, out,
                                        nullptr, ws, ws_bytes, nullptr));
    });
    const double flops = 4.0 * kHeads * kHeadDim * (static_cast<double>(n) * (n + 1) / 2);
    std::printf("| %lld | %.3f | %.1f |\n", static_cast<long long>(n), ms,
                flops / (ms * 1e-3) / 1e12);
    KVGATE_CUDA_CHECK(cudaFree(ws));
    KVGATE_CUDA_CHECK(cudaFree(k));
    KVGATE_CUDA_CHECK(cudaFree(v));
    KVGATE_CUDA_CHECK(cudaFree(q));
    KVGATE_CUDA_CHECK(cudaFree(out));
  }
  return 0;
}
