// Sampling on the device, one block per row of logits (see ops.h Sample).
//   1. The first maximum M (greedy returns it).
//   2. top-k: the key of the k-th candidate by (logit desc, id asc), by radix select on keys
//      (ordered logit bits << 32 | ~id) with unit weights.
//   3. top-p: over the top-k set, the weights exp((l - M) / T) in 2^-40 fixed point (integer
//      sums: deterministic); the radix select finds the shortest prefix reaching top_p of them.
//   4. min-p: exp((l - M) / T) >= min_p (relative to the top candidate, as the CPU sampler).
//   5. The draw: argmax over the surviving set of (l - M) / T + Gumbel noise from Philox, which
//      samples softmax(l / T) restricted to that set; ties go to the smaller id.
#include <cuda_runtime.h>
#include <curand_kernel.h>

#include <cstdint>

#include "kernels/cuda/ops.h"
#include "kernels/cuda/radix_select.cuh"

namespace kvgate::kernels::cuda {
namespace {

constexpr int kThreads = 1024;
constexpr double kFixedOne = 1099511627776.0;  // 2^40

__device__ __forceinline__ uint64_t SampleKey(float logit, int64_t j) {
  return (static_cast<uint64_t>(OrderedFloatBits(logit)) << 32) |
         static_cast<uint32_t>(0xffffffffu - static_cast<uint32_t>(j));
}

// Block-wide argmax of (value, index): the larger value, ties to the smaller index; index
// `none` marks "no element" and always loses.
__device__ void BlockArgMax(float& v, int64_t& i, int64_t none, float* sv, int64_t* si) {
  auto better = [none](float va, int64_t ia, float vb, int64_t ib) {
    if (ib == none) return true;
    if (ia == none) return false;
    return va > vb || (va == vb && ia < ib);
  };
  for (int off = 16; off > 0; off >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, off);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, i, off);
    if (!better(v, i, ov, oi)) {
      v = ov;
      i = oi;
    }
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sv[warp] = v;
    si[warp] = i;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / 32;
    v = lane < warps ? sv[lane] : 0.f;
    i = lane < warps ? si[lane] : none;
    for (int off = 16; off > 0; off >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, v, off);
      const int64_t oi = __shfl_xor_sync(0xffffffffu, i, off);
      if (!better(v, i, ov, oi)) {
        v = ov;
        i = oi;
      }
    }
    if (lane == 0) {
      sv[0] = v;
      si[0] = i;
    }
  }
  __syncthreads();
  v = sv[0];
  i = si[0];
  __syncthreads();  // sv / si may be reused
}

__device__ __forceinline__ float Gumbel(uint64_t seed, uint64_t offset, int64_t row, int64_t j) {
  const uint4 counter =
      make_uint4(static_cast<uint32_t>(j), static_cast<uint32_t>(row),
                 static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32));
  const uint2 key = make_uint2(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const uint4 r = curand_Philox4x32_10(counter, key);
  const float u = (static_cast<float>(r.x >> 8) + 0.5f) * (1.0f / 16777216.0f);  // (0, 1)
  return -logf(-logf(u));
}

__global__ void __launch_bounds__(kThreads)
    SampleKernel(const float* __restrict__ logits,  // [batch, vocab]; one block per row
                 int64_t vocab, SampleParams p,
                 int32_t* __restrict__ tokens) {  // [batch]
  __shared__ RadixSelectSmem sm;
  __shared__ float sv[32];
  __shared__ int64_t si[32];
  __shared__ unsigned long long total;
  const int64_t r = blockIdx.x;
  const float* row = logits + r * vocab;

  float best = -INFINITY;
  int64_t best_i = vocab;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    const float v = row[j];
    if (best_i == vocab || v > best) {
      best = v;
      best_i = j;
    }
  }
  BlockArgMax(best, best_i, vocab, sv, si);
  if (p.temperature == 0.0f || best_i == vocab) {
    if (threadIdx.x == 0) tokens[r] = static_cast<int32_t>(best_i == vocab ? 0 : best_i);
    return;
  }
  const float max_logit = best;
  const float inv_t = 1.0f / p.temperature;

  uint64_t tau = 0;
  if (p.top_k > 0 && p.top_k < vocab) {
    tau = RadixSelectDescending(
        vocab,
        [&](int64_t j, uint64_t* key) {
          *key = SampleKey(row[j], j);
          return true;
        },
        [](int64_t) { return 1ull; }, static_cast<unsigned long long>(p.top_k), sm);
  }
  auto weight = [&](int64_t j) {
    const float w = expf((row[j] - max_logit) * inv_t);
    return static_cast<unsigned long long>(static_cast<double>(w) * kFixedOne);
  };
  if (p.top_p < 1.0f) {
    if (threadIdx.x == 0) total = 0;
    __syncthreads();
    unsigned long long mine = 0;
    for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
      if (SampleKey(row[j], j) >= tau) mine += weight(j);
    }
    atomicAdd(&total, mine);
    __syncthreads();
    double target = static_cast<double>(p.top_p) * static_cast<double>(total);
    unsigned long long t = static_cast<unsigned long long>(target);
    if (static_cast<double>(t) < target) ++t;
    if (t == 0) t = 1;
    const uint64_t tau_p = RadixSelectDescending(
        vocab,
        [&](int64_t j, uint64_t* key) {
          *key = SampleKey(row[j], j);
          return *key >= tau;
        },
        weight, t, sm);
    if (tau_p > tau) tau = tau_p;
  }

  float draw = -INFINITY;
  int64_t draw_i = vocab;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    const float l = row[j];
    if (SampleKey(l, j) < tau) continue;
    const float scaled = (l - max_logit) * inv_t;
    if (p.min_p > 0.0f && !(expf(scaled) >= p.min_p)) continue;
    const float v = scaled + Gumbel(p.seed, p.offset, r, j);
    if (draw_i == vocab || v > draw) {
      draw = v;
      draw_i = j;
    }
  }
  BlockArgMax(draw, draw_i, vocab, sv, si);
  if (threadIdx.x == 0) tokens[r] = static_cast<int32_t>(draw_i == vocab ? best_i : draw_i);
}

}  // namespace

cudaError_t Sample(const float* logits, int64_t batch, int64_t vocab, const SampleParams& params,
                   int32_t* tokens, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  if (vocab <= 0 || vocab > INT32_MAX || !(params.temperature >= 0.0f)) {
    return cudaErrorInvalidValue;
  }
  SampleKernel<<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(logits, vocab, params,
                                                                      tokens);
  return cudaGetLastError();
}

}  // namespace kvgate::kernels::cuda
