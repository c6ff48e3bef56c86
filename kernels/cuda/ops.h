// CUDA twins of the CPU ops (kernels/cpu/ops.h). Framework-free, stream-explicit; pointers are
// device pointers. The CUDA backend issue fills in the rest of the op set.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kvgate::kernels::cuda {

// out = x / rms(x) * weight per row; float32.
cudaError_t RmsNorm(const float* x,       // [n, dim]
                    const float* weight,  // [dim]
                    int64_t n, int64_t dim, float eps,
                    float* out,  // [n, dim]
                    cudaStream_t stream);

// out = silu(gate) * up.
cudaError_t SiluMul(const float* gate,  // [count]
                    const float* up,    // [count]
                    int64_t count,
                    float* out,  // [count]
                    cudaStream_t stream);

}  // namespace kvgate::kernels::cuda
