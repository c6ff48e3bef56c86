// The matrix product of the CUDA backend, through cuBLAS: y = x @ w^T (+ bias).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/dtype.h"

namespace kvgate::kernels::cuda {

// Owns a cuBLAS handle bound to one stream, its workspace, and the scratch buffer that holds x
// converted to the weight's 16-bit dtype. Not thread-safe; one per stream.
//
// Precision: float32 weights use an fp32 GEMM (CUBLAS_COMPUTE_32F, default math mode: no TF32),
// so results match the CPU to ~1e-5 relative. bf16 / f16 weights: x is rounded to the weight's
// dtype (round to nearest even) and cublasGemmEx multiplies with float32 accumulation
// (CUBLAS_COMPUTE_32F) into a float32 y; the rounding of x costs ~1e-3 relative against the CPU,
// which widens the weights and keeps x in float32.
class Gemm {
 public:
  // Creates the handle on the current device and binds it to `stream`.
  static absl::StatusOr<std::unique_ptr<Gemm>> Create(cudaStream_t stream);
  ~Gemm();
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;

  // y = x @ w^T (+ bias), enqueued on the stream. All pointers on the device.
  absl::Status MatMul(const float* x,  // [n, k]
                      int64_t n,
                      const void* w,  // [m, k] of w_dtype
                      DType w_dtype, int64_t m, int64_t k,
                      const void* bias,  // [m] of bias_dtype, or nullptr
                      DType bias_dtype,
                      float* y);  // [n, m]; must not alias x

  cudaStream_t stream() const { return stream_; }

 private:
  Gemm(cublasHandle_t handle, cudaStream_t stream) : handle_(handle), stream_(stream) {}
  absl::Status EnsureScratch(size_t bytes);

  cublasHandle_t handle_ = nullptr;
  cudaStream_t stream_ = nullptr;
  void* workspace_ = nullptr;  // cuBLAS workspace
  void* scratch_ = nullptr;    // x in the weight's 16-bit dtype
  size_t scratch_bytes_ = 0;
};

}  // namespace kvgate::kernels::cuda
