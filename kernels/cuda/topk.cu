// Eviction on the device: per-head top-k selection (radix select on (score, index) keys, then an
// order-preserving block compaction of the winners) and the gather of the kept rows.
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/ops.h"
#include "kernels/cuda/radix_select.cuh"

namespace kvgate::kernels::cuda {
namespace {

constexpr int kSelectThreads = 512;
constexpr int kStageElems = 8192;  // 32 KiB of rows staged per chunk by the in-place gather

// Higher score first; equal scores: the larger index (the more recent token) first.
__device__ __forceinline__ uint64_t EvictionKey(float score, int64_t j) {
  return (static_cast<uint64_t>(OrderedFloatBits(score)) << 32) | static_cast<uint32_t>(j);
}

__global__ void __launch_bounds__(kSelectThreads)
    SelectTopKKernel(const float* __restrict__ scores,  // [num_kv_heads, stride]
                     int64_t stride,
                     const int32_t* __restrict__ lens,  // [num_kv_heads]
                     int64_t budget,
                     int32_t* __restrict__ kept,          // [num_kv_heads, budget]
                     int32_t* __restrict__ kept_count) {  // [num_kv_heads]
  __shared__ RadixSelectSmem sm;
  __shared__ int warp_counts[kSelectThreads / 32];
  const int64_t g = blockIdx.x;
  const int64_t len = lens[g];
  const float* row = scores + g * stride;
  int32_t* out = kept + g * budget;
  if (len <= budget) {
    for (int64_t t = threadIdx.x; t < len; t += blockDim.x) out[t] = static_cast<int32_t>(t);
    if (threadIdx.x == 0) kept_count[g] = static_cast<int32_t>(len < 0 ? 0 : len);
    return;
  }
  const uint64_t tau = RadixSelectDescending(
      len,
      [&](int64_t j, uint64_t* key) {
        *key = EvictionKey(row[j], j);
        return true;
      },
      [](int64_t) { return 1ull; }, static_cast<unsigned long long>(budget), sm);
  // Winners in ascending index order: ballot + warp prefix per chunk of blockDim indices.
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warps = blockDim.x / 32;
  int64_t written = 0;
  for (int64_t base = 0; base < len; base += blockDim.x) {
    const int64_t j = base + threadIdx.x;
    const bool keep = j < len && EvictionKey(row[j], j) >= tau;
    const unsigned ballot = __ballot_sync(0xffffffffu, keep);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, total = 0;
    for (int w = 0; w < warps; ++w) {
      if (w < warp) before += warp_counts[w];
      total += warp_counts[w];
    }
    if (keep) {
      const int64_t at = written + before + __popc(ballot & ((1u << lane) - 1u));
      if (at < budget) out[at] = static_cast<int32_t>(j);
    }
    written += total;
    __syncthreads();  // warp_counts are read before the next chunk writes them
  }
  if (threadIdx.x == 0) kept_count[g] = static_cast<int32_t>(budget);
}

// Out of place: every (head, kept row, element) independently.
__global__ void GatherRowsKernel(const uint32_t* __restrict__ src,  // [num_kv_heads, head_stride]
                                 uint32_t* __restrict__ dst,        // [num_kv_heads, head_stride]
                                 int64_t head_stride, int64_t row_stride, int64_t width,
                                 const int32_t* __restrict__ kept,  // [num_kv_heads, kept_stride]
                                 int64_t kept_stride,
                                 const int32_t* __restrict__ kept_count) {  // [num_kv_heads]
  const int64_t g = blockIdx.y;
  const int64_t count = kept_count[g];
  const int64_t total = count * width;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = idx / width, e = idx % width;
    const int64_t from = kept[g * kept_stride + t];
    dst[g * head_stride + t * row_stride + e] = src[g * head_stride + from * row_stride + e];
  }
}

// In place, one block per head: chunks of rows in ascending order, each fully staged in shared
// memory before it is written. Safe because kept[t] >= t: a chunk only reads rows at or after
// its own first row, which no earlier chunk has written.
__global__ void CompactRowsInPlaceKernel(uint32_t* data,  // [num_kv_heads, head_stride]
                                         int64_t head_stride, int64_t row_stride, int64_t width,
                                         const int32_t* __restrict__ kept,  // [heads, kept_stride]
                                         int64_t kept_stride,
                                         const int32_t* __restrict__ kept_count) {  // [heads]
  __shared__ uint32_t stage[kStageElems];
  const int64_t g = blockIdx.x;
  const int64_t count = kept_count[g];
  const int64_t rows_per_chunk = kStageElems / width;
  uint32_t* head = data + g * head_stride;
  const int32_t* kg = kept + g * kept_stride;
  for (int64_t t0 = 0; t0 < count; t0 += rows_per_chunk) {
    const int64_t rows = min(rows_per_chunk, count - t0);
    for (int64_t idx = threadIdx.x; idx < rows * width; idx += blockDim.x) {
      const int64_t t = idx / width, e = idx % width;
      stage[idx] = head[static_cast<int64_t>(kg[t0 + t]) * row_stride + e];
    }
    __syncthreads();
    for (int64_t idx = threadIdx.x; idx < rows * width; idx += blockDim.x) {
      const int64_t t = idx / width, e = idx % width;
      head[(t0 + t) * row_stride + e] = stage[idx];
    }
    __syncthreads();
  }
}

}  // namespace

cudaError_t SelectTopK(const float* scores, int64_t num_kv_heads, int64_t stride,
                       const int32_t* lens, int64_t budget, int32_t* kept, int32_t* kept_count,
                       cudaStream_t stream) {
  if (num_kv_heads == 0) return cudaSuccess;
  if (budget <= 0 || stride > INT32_MAX) return cudaErrorInvalidValue;
  SelectTopKKernel<<<static_cast<unsigned>(num_kv_heads), kSelectThreads, 0, stream>>>(
      scores, stride, lens, budget, kept, kept_count);
  return cudaGetLastError();
}

cudaError_t CompactRows(const void* src, void* dst, int64_t num_kv_heads, int64_t head_stride,
                        int64_t row_stride, int64_t width, const int32_t* kept, int64_t kept_stride,
                        const int32_t* kept_count, cudaStream_t stream) {
  if (num_kv_heads == 0 || width == 0 || kept_stride == 0) return cudaSuccess;
  if (width > kStageElems || num_kv_heads > 65535) return cudaErrorInvalidValue;
  if (src == dst) {
    CompactRowsInPlaceKernel<<<static_cast<unsigned>(num_kv_heads), 256, 0, stream>>>(
        static_cast<uint32_t*>(dst), head_stride, row_stride, width, kept, kept_stride, kept_count);
    return cudaGetLastError();
  }
  const int64_t per_head = kept_stride * width;
  const int64_t blocks = (per_head + 255) / 256;
  const dim3 grid(static_cast<unsigned>(blocks < 4096 ? blocks : 4096),
                  static_cast<unsigned>(num_kv_heads));
  GatherRowsKernel<<<grid, 256, 0, stream>>>(static_cast<const uint32_t*>(src),
                                             static_cast<uint32_t*>(dst), head_stride, row_stride,
                                             width, kept, kept_stride, kept_count);
  return cudaGetLastError();
}

}  // namespace kvgate::kernels::cuda
