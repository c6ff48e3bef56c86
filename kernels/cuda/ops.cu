#include "kernels/cuda/device.h"
#include "kernels/cuda/ops.h"

namespace kvgate::kernels::cuda {
namespace {

// One block per row; blockDim.x threads reduce the sum of squares.
__global__ void RmsNormKernel(const float* __restrict__ x, const float* __restrict__ weight,
                              int64_t dim, float eps, float* __restrict__ out) {
  const float* xr = x + blockIdx.x * dim;
  float* orow = out + blockIdx.x * dim;
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
  const float inv = rsqrtf(partial[0] / static_cast<float>(dim) + eps);
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) orow[j] = weight[j] * (xr[j] * inv);
}

__global__ void SiluMulKernel(const float* __restrict__ gate, const float* __restrict__ up,
                              int64_t count, float* __restrict__ out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < count) {
    const float g = gate[i];
    out[i] = g / (1.f + __expf(-g)) * up[i];
  }
}

}  // namespace

cudaError_t RmsNorm(const float* x, const float* weight, int64_t n, int64_t dim, float eps,
                    float* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  RmsNormKernel<<<static_cast<unsigned>(n), 256, 0, stream>>>(x, weight, dim, eps, out);
  return cudaGetLastError();
}

cudaError_t SiluMul(const float* gate, const float* up, int64_t count, float* out,
                    cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((count + 255) / 256);
  SiluMulKernel<<<blocks, 256, 0, stream>>>(gate, up, count, out);
  return cudaGetLastError();
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
