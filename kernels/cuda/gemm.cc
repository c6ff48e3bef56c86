#include "kernels/cuda/gemm.h"

#include <cstdint>

#include "common/status.h"
#include "common/cuda/cuda_check.h"
#include "kernels/cuda/ops.h"

namespace kvgate::kernels::cuda {
namespace {

// 32 MiB: what cuBLAS recommends on Hopper; plenty on Ampere.
constexpr size_t kWorkspaceBytes = size_t{32} << 20;

cudaDataType_t CudaType(DType t) {
  switch (t) {
    case DType::kF32:
      return CUDA_R_32F;
    case DType::kF16:
      return CUDA_R_16F;
    case DType::kBF16:
      return CUDA_R_16BF;
  }
  return CUDA_R_32F;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Gemm>> Gemm::Create(cudaStream_t stream) {
  cublasHandle_t handle = nullptr;
  KVGATE_CUBLAS_RETURN_IF_ERROR(cublasCreate(&handle));
  std::unique_ptr<Gemm> gemm(new Gemm(handle, stream));
  KVGATE_CUBLAS_RETURN_IF_ERROR(cublasSetStream(handle, stream));
  KVGATE_CUBLAS_RETURN_IF_ERROR(cublasSetMathMode(handle, CUBLAS_DEFAULT_MATH));
  KVGATE_CUDA_RETURN_IF_ERROR(cudaMalloc(&gemm->workspace_, kWorkspaceBytes));
  KVGATE_CUBLAS_RETURN_IF_ERROR(cublasSetWorkspace(handle, gemm->workspace_, kWorkspaceBytes));
  return gemm;
}

Gemm::~Gemm() {
  // The stream may still use the buffers: wait for it before freeing them.
  if (stream_ != nullptr) cudaStreamSynchronize(stream_);
  if (handle_ != nullptr) cublasDestroy(handle_);
  cudaFree(workspace_);
  cudaFree(scratch_);
}

absl::Status Gemm::EnsureScratch(size_t bytes) {
  if (bytes <= scratch_bytes_) return absl::OkStatus();
  // The previous scratch may still be read by enqueued GEMMs.
  KVGATE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  KVGATE_CUDA_RETURN_IF_ERROR(cudaFree(scratch_));
  scratch_ = nullptr;
  scratch_bytes_ = 0;
  const size_t grown = bytes + bytes / 2;
  KVGATE_CUDA_RETURN_IF_ERROR(cudaMalloc(&scratch_, grown));
  scratch_bytes_ = grown;
  return absl::OkStatus();
}

absl::Status Gemm::MatMul(const float* x, int64_t n, const void* w, DType w_dtype, int64_t m,
                          int64_t k, const void* bias, DType bias_dtype, float* y) {
  if (n == 0 || m == 0) return absl::OkStatus();
  if (n > INT32_MAX || m > INT32_MAX || k > INT32_MAX) {
    return absl::InvalidArgumentError("Gemm::MatMul: dimension over 2^31");
  }
  // Row-major y[n, m] = x[n, k] @ w[m, k]^T, seen column-major: w is [k, m] (ld k), x is
  // [k, n] (ld k) and y is [m, n] (ld m), so y = op_T(w) @ x.
  const void* b = x;
  if (w_dtype != DType::kF32) {
    RETURN_IF_ERROR(EnsureScratch(static_cast<size_t>(n * k) * DTypeSize(w_dtype)));
    KVGATE_CUDA_RETURN_IF_ERROR(ConvertFromF32(x, n * k, w_dtype, scratch_, stream_));
    b = scratch_;
  }
  const float alpha = 1.0f, beta = 0.0f;
  const cudaDataType_t t = CudaType(w_dtype);
  KVGATE_CUBLAS_RETURN_IF_ERROR(cublasGemmEx(
      handle_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(m), static_cast<int>(n),
      static_cast<int>(k), &alpha, w, t, static_cast<int>(k), b, t, static_cast<int>(k), &beta, y,
      CUDA_R_32F, static_cast<int>(m), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  if (bias != nullptr) {
    KVGATE_CUDA_RETURN_IF_ERROR(AddBias(y, n, m, bias, bias_dtype, stream_));
  }
  return absl::OkStatus();
}

}  // namespace kvgate::kernels::cuda
