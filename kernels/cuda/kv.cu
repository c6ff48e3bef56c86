// The KV cache's CUDA ops: append of new rows (with conversion to the storage dtype), in-place
// compaction of a head with re-rotation of moved keys, row gathers, and widening of stored rows
// to float32. Twins of cpu::AppendKv / CompactKv / GatherRows (kernels/cpu/ops.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/cuda/dtype.cuh"
#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/ops.h"

namespace kvgate::kernels::cuda {
namespace {


__device__ __forceinline__ void StoreFloat(void* p, DType t, int64_t i, float v) {
  switch (t) {
    case DType::kBF16:
      static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
      return;
    case DType::kF16:
      static_cast<__half*>(p)[i] = __float2half_rn(v);
      return;
    case DType::kF32:
    default:
      static_cast<float*>(p)[i] = v;
  }
}

__global__ void GatherRowsKernel(const float* __restrict__ src, int64_t width,
                                 const int64_t* __restrict__ rows, int64_t n,
                                 float* __restrict__ dst) {
  const int64_t total = n * width;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx / width, e = idx % width;
    dst[idx] = src[rows[i] * width + e];
  }
}

__global__ void AppendKvKernel(const float* __restrict__ k, const float* __restrict__ v, int64_t n,
                               int64_t num_kv_heads, int64_t head_dim,
                               void* const* __restrict__ k_dst,  // [num_kv_heads]
                               void* const* __restrict__ v_dst,  // [num_kv_heads]
                               DType dtype) {
  const int64_t total = n * num_kv_heads * head_dim;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = idx % head_dim;
    const int64_t g = (idx / head_dim) % num_kv_heads;
    const int64_t i = idx / (head_dim * num_kv_heads);
    StoreFloat(k_dst[g], dtype, i * head_dim + e, k[idx]);
    StoreFloat(v_dst[g], dtype, i * head_dim + e, v[idx]);
  }
}

// Stage 1 of a compaction: staged[i] = row keep[i] (keys re-rotated when tables are given).
__global__ void GatherKvKernel(const void* __restrict__ k, const void* __restrict__ v, DType dtype,
                               int64_t head_dim, const int64_t* __restrict__ keep, int64_t count,
                               int64_t half, const float* __restrict__ cos,
                               const float* __restrict__ sin, float* __restrict__ staged_k,
                               float* __restrict__ staged_v) {
  const int64_t total = count * head_dim;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx / head_dim, e = idx % head_dim;
    const int64_t src = keep[i];
    staged_v[idx] = LoadAsFloat(v, dtype, src * head_dim + e);
    float out = LoadAsFloat(k, dtype, src * head_dim + e);
    if (cos != nullptr && src != i && e < 2 * half) {
      // The arithmetic of cpu::CompactKv (no fused multiply-add).
      const int64_t j = e < half ? e : e - half;
      const float c = cos[i * half + j], s = sin[i * half + j];
      const float a = LoadAsFloat(k, dtype, src * head_dim + j);
      const float b = LoadAsFloat(k, dtype, src * head_dim + j + half);
      out = e < half ? __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s))
                     : __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
    }
    staged_k[idx] = out;
  }
}

// Stage 2: rows [0, count) = staged, in the storage dtype.
__global__ void ScatterKvKernel(const float* __restrict__ staged_k,
                                const float* __restrict__ staged_v, int64_t total, DType dtype,
                                void* __restrict__ k, void* __restrict__ v) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    StoreFloat(k, dtype, idx, staged_k[idx]);
    StoreFloat(v, dtype, idx, staged_v[idx]);
  }
}

__global__ void WidenKernel(const void* __restrict__ x, DType dtype, int64_t count,
                            float* __restrict__ out) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < count;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[idx] = LoadAsFloat(x, dtype, idx);
  }
}

}  // namespace

cudaError_t GatherRows(const float* src, int64_t width, const int64_t* rows, int64_t n, float* dst,
                       cudaStream_t stream) {
  if (n == 0 || width == 0) return cudaSuccess;
  GatherRowsKernel<<<GridFor(n * width), kThreads, 0, stream>>>(src, width, rows, n, dst);
  return cudaGetLastError();
}

cudaError_t AppendKv(const float* k, const float* v, int64_t n, int64_t num_kv_heads,
                     int64_t head_dim, void* const* k_dst, void* const* v_dst, DType dtype,
                     cudaStream_t stream) {
  const int64_t total = n * num_kv_heads * head_dim;
  if (total == 0) return cudaSuccess;
  AppendKvKernel<<<GridFor(total), kThreads, 0, stream>>>(k, v, n, num_kv_heads, head_dim, k_dst,
                                                          v_dst, dtype);
  return cudaGetLastError();
}

cudaError_t CompactKv(void* k, void* v, DType dtype, int64_t head_dim, const int64_t* keep,
                      int64_t count, int64_t rotary_dim, const float* cos, const float* sin,
                      float* staging, cudaStream_t stream) {
  const int64_t total = count * head_dim;
  if (total == 0) return cudaSuccess;
  GatherKvKernel<<<GridFor(total), kThreads, 0, stream>>>(
      k, v, dtype, head_dim, keep, count, rotary_dim / 2, cos, sin, staging, staging + total);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  ScatterKvKernel<<<GridFor(total), kThreads, 0, stream>>>(staging, staging + total, total, dtype,
                                                           k, v);
  return cudaGetLastError();
}

cudaError_t WidenToF32(const void* x, DType dtype, int64_t count, float* out, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  WidenKernel<<<GridFor(count), kThreads, 0, stream>>>(x, dtype, count, out);
  return cudaGetLastError();
}

}  // namespace kvgate::kernels::cuda
