// Device-side element access for the weight dtypes (common/dtype.h), shared by the .cu files.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/dtype.h"

namespace kvgate::kernels::cuda {

// Element i of an array of dtype `t`, widened to float32 (exact for all three dtypes).
__device__ __forceinline__ float LoadAsFloat(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::kBF16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case DType::kF16:
      return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kF32:
    default:
      return static_cast<const float*>(p)[i];
  }
}

// Typed variants for kernels templated on the stored type.
__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float ToFloat(__half v) { return __half2float(v); }

}  // namespace kvgate::kernels::cuda
