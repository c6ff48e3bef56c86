// Block-wide radix selection over 64-bit keys, shared by eviction top-k (topk.cu) and the
// top-k / top-p filters of sampling (sampling.cu). Integer weights and shared-memory integer
// atomics keep the result independent of thread scheduling (deterministic).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kvgate::kernels::cuda {

// A float as an unsigned integer with the same order (-0.0 and +0.0 map to the same value).
__device__ __forceinline__ uint32_t OrderedFloatBits(float f) {
  const uint32_t u = __float_as_uint(f + 0.0f);  // -0.0 + 0.0 == +0.0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Shared memory RadixSelectDescending needs.
struct RadixSelectSmem {
  unsigned long long hist[256];
  unsigned long long prefix;
  int failed;
};

// Over the candidates j in [0, count) (candidate_key(j, &key) returns true for a candidate and
// sets its key; keys are distinct), returns the key tau of the candidate at which the weights
// summed in descending key order first reach `target`: the candidates with key >= tau are the
// shortest prefix of that order with total weight >= target. Returns 0 (every key qualifies)
// when all candidates together weigh less than target. Must be called by every thread of the
// block; the result is the same in all of them.
template <typename CandidateKey, typename Weight>
__device__ uint64_t RadixSelectDescending(int64_t count, CandidateKey candidate_key, Weight weight,
                                          unsigned long long target, RadixSelectSmem& sm) {
  unsigned long long prefix = 0, above = 0;
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) sm.hist[b] = 0;
    __syncthreads();
    const unsigned long long high_mask = shift == 56 ? 0ull : (~0ull << (shift + 8));
    for (int64_t j = threadIdx.x; j < count; j += blockDim.x) {
      uint64_t key;
      if (!candidate_key(j, &key)) continue;
      if ((key & high_mask) != prefix) continue;
      const unsigned long long w = weight(j);
      if (w != 0) atomicAdd(&sm.hist[(key >> shift) & 255], w);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int sel = -1;
      for (int b = 255; b >= 0; --b) {
        if (above + sm.hist[b] >= target) {
          sel = b;
          break;
        }
        above += sm.hist[b];
      }
      sm.failed = sel < 0;
      if (sel >= 0) sm.prefix = prefix | (static_cast<unsigned long long>(sel) << shift);
    }
    __syncthreads();
    if (sm.failed) return 0;
    prefix = sm.prefix;
    __syncthreads();  // everyone has read sm before the next pass resets it
  }
  return prefix;
}

}  // namespace kvgate::kernels::cuda
