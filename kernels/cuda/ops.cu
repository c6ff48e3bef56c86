// Elementwise CUDA ops: Embedding, RmsNorm, Rope, SiluMul, Add, dtype conversion, bias, and
// device discovery. These are memory-bound: one thread per element (or one block per row for
// the row reductions), grid-stride loops where the element count can exceed the grid limit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/cuda/device.h"
#include "kernels/cuda/dtype.cuh"
#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/ops.h"

namespace kvgate::kernels::cuda {
namespace {


// Calls f(T{}) with T the C++ type of `t`.
template <typename F>
cudaError_t DispatchDType(DType t, F&& f) {
  switch (t) {
    case DType::kF32:
      return f(float{});
    case DType::kBF16:
      return f(__nv_bfloat16{});
    case DType::kF16:
      return f(__half{});
  }
  return cudaErrorInvalidValue;
}

template <typename T>
__global__ void EmbeddingKernel(const int32_t* __restrict__ ids,  // [n]
                                const T* __restrict__ table,      // [vocab, hidden]
                                int64_t vocab, int64_t hidden,
                                float* __restrict__ out) {  // [n, hidden]; one block per row
  const int64_t i = blockIdx.x;
  const int32_t id = ids[i];
  float* orow = out + i * hidden;
  if (id < 0 || id >= vocab) {
    for (int64_t j = threadIdx.x; j < hidden; j += blockDim.x) orow[j] = __int_as_float(0x7fc00000);
    return;
  }
  const T* trow = table + static_cast<int64_t>(id) * hidden;
  for (int64_t j = threadIdx.x; j < hidden; j += blockDim.x) orow[j] = ToFloat(trow[j]);
}

// One block per row; blockDim.x (a multiple of 32, <= 1024) threads reduce the sum of squares.
// x and out may alias: each element is read and then written by the same thread.
template <typename T>
__global__ void RmsNormKernel(const float* x,                // [n, dim]
                              const T* __restrict__ weight,  // [dim]
                              int64_t dim, float eps,
                              float* out) {  // [n, dim]
  const float* xr = x + static_cast<int64_t>(blockIdx.x) * dim;
  float* orow = out + static_cast<int64_t>(blockIdx.x) * dim;
  float ss = 0.f;
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) ss += xr[j] * xr[j];
  __shared__ float partial[32];
  for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = ss;
  __syncthreads();
  if (threadIdx.x < 32) {
    ss = threadIdx.x < (blockDim.x >> 5) ? partial[threadIdx.x] : 0.f;
    for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
    if (threadIdx.x == 0) partial[0] = ss;
  }
  __syncthreads();
  const float inv = 1.0f / sqrtf(partial[0] / static_cast<float>(dim) + eps);
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
    orow[j] = __fmul_rn(ToFloat(weight[j]), __fmul_rn(xr[j], inv));
  }
}

// One thread per (row, j < rotary_dim / 2) pair; rows are (token, head). No FMA contraction,
// so the result equals the CPU's a * c - b * s bit for bit.
__global__ void RopeKernel(float* x,  // [n * num_heads, head_dim]
                           int64_t rows, int64_t num_heads, int64_t head_dim, int64_t half,
                           const float* __restrict__ cos,    // [n, half]
                           const float* __restrict__ sin) {  // [n, half]
  const int64_t total = rows * half;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = idx / half, j = idx % half;
    const int64_t token = row / num_heads;
    const float c = cos[token * half + j], s = sin[token * half + j];
    float* v = x + row * head_dim;
    const float a = v[j], b = v[j + half];
    v[j] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    v[j + half] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
  }
}

// gate / up / out may alias (same index read then written).
__global__ void SiluMulKernel(const float* gate,  // [count]
                              const float* up,    // [count]
                              int64_t count,
                              float* out) {  // [count]
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = gate[i];
    out[i] = __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), up[i]);
  }
}

__global__ void AddKernel(float* x,        // [count]
                          const float* y,  // [count]
                          int64_t count) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    x[i] = __fadd_rn(x[i], y[i]);
  }
}

template <typename T>
__device__ __forceinline__ T FromFloat(float v);
template <>
__device__ __forceinline__ float FromFloat<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half FromFloat<__half>(float v) {
  return __float2half_rn(v);
}

template <typename T>
__global__ void ConvertKernel(const float* __restrict__ x,  // [count]
                              int64_t count,
                              T* __restrict__ out) {  // [count]
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = FromFloat<T>(x[i]);
  }
}

template <typename T>
__global__ void AddBiasKernel(float* y,  // [n, m]
                              int64_t n, int64_t m,
                              const T* __restrict__ bias) {  // [m]
  const int64_t total = n * m;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    y[i] = __fadd_rn(y[i], ToFloat(bias[i % m]));
  }
}

}  // namespace

cudaError_t Embedding(const int32_t* ids, int64_t n, const void* table, DType table_dtype,
                      int64_t vocab_size, int64_t hidden_size, float* out, cudaStream_t stream) {
  if (n == 0 || hidden_size == 0) return cudaSuccess;
  return DispatchDType(table_dtype, [&](auto tag) {
    using T = decltype(tag);
    EmbeddingKernel<T><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(
        ids, static_cast<const T*>(table), vocab_size, hidden_size, out);
    return cudaGetLastError();
  });
}

cudaError_t RmsNorm(const float* x, const void* weight, DType weight_dtype, int64_t n, int64_t dim,
                    float eps, float* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int threads = dim >= 1024 ? 1024 : (dim >= 256 ? 256 : 64);
  return DispatchDType(weight_dtype, [&](auto tag) {
    using T = decltype(tag);
    RmsNormKernel<T><<<static_cast<unsigned>(n), threads, 0, stream>>>(
        x, static_cast<const T*>(weight), dim, eps, out);
    return cudaGetLastError();
  });
}

cudaError_t Rope(float* x, int64_t n, int64_t num_heads, int64_t head_dim, int64_t rotary_dim,
                 const float* cos, const float* sin, cudaStream_t stream) {
  const int64_t half = rotary_dim / 2;
  const int64_t rows = n * num_heads;
  if (rows == 0 || half == 0) return cudaSuccess;
  RopeKernel<<<GridFor(rows * half), kThreads, 0, stream>>>(x, rows, num_heads, head_dim, half, cos,
                                                            sin);
  return cudaGetLastError();
}

cudaError_t SiluMul(const float* gate, const float* up, int64_t count, float* out,
                    cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  SiluMulKernel<<<GridFor(count), kThreads, 0, stream>>>(gate, up, count, out);
  return cudaGetLastError();
}

cudaError_t Add(float* x, const float* y, int64_t count, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  AddKernel<<<GridFor(count), kThreads, 0, stream>>>(x, y, count);
  return cudaGetLastError();
}

cudaError_t ConvertFromF32(const float* x, int64_t count, DType to, void* out,
                           cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  return DispatchDType(to, [&](auto tag) {
    using T = decltype(tag);
    ConvertKernel<T><<<GridFor(count), kThreads, 0, stream>>>(x, count, static_cast<T*>(out));
    return cudaGetLastError();
  });
}

cudaError_t AddBias(float* y, int64_t n, int64_t m, const void* bias, DType bias_dtype,
                    cudaStream_t stream) {
  if (n == 0 || m == 0) return cudaSuccess;
  return DispatchDType(bias_dtype, [&](auto tag) {
    using T = decltype(tag);
    AddBiasKernel<T><<<GridFor(n * m), kThreads, 0, stream>>>(y, n, m, static_cast<const T*>(bias));
    return cudaGetLastError();
  });
}

int DeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

}  // namespace kvgate::kernels::cuda
