// The one CUDA / cuBLAS error-check macro family of kvgate (kernels, backend, NCCL transport).
//
//   KVGATE_CUDA_RETURN_IF_ERROR(expr)    cudaError_t expr; returns absl::Status (INTERNAL) naming
//                                        the statement, file:line and the CUDA error string.
//   KVGATE_CUBLAS_RETURN_IF_ERROR(expr)  the same for a cublasStatus_t expr.
//   KVGATE_CUDA_TRY(expr)                cudaError_t expr inside a function that itself returns
//                                        cudaError_t (the kernel launchers in ops.h): returns it.
//   KVGATE_CUDA_CHECK(expr)              aborts with the same message (tests, benches, and the
//                                        Backend interface, whose ops return void).
//   KVGATE_CUBLAS_CHECK(expr)            the abort variant for cuBLAS.
//
// All are built on KVGATE_GPU_CHECK_GEN(expr, ok, to_str, on_error), so the message format is
// the same everywhere.
#pragma once

#include <cublas_api.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace kvgate::gpu {

inline const char* ErrorString(cudaError_t e) { return cudaGetErrorString(e); }
inline const char* ErrorString(cublasStatus_t s) { return cublasGetStatusString(s); }

inline absl::Status GpuErrorStatus(const char* stmt, const char* file, int line, const char* msg) {
  return absl::InternalError(absl::StrCat(file, ":", line, ": ", stmt, " failed: ", msg));
}

[[noreturn]] inline void GpuErrorAbort(const char* stmt, const char* file, int line,
                                       const char* msg) {
  int device = -1;
  cudaGetDevice(&device);
  std::fprintf(stderr, "%s:%d: %s failed on device %d: %s\n", file, line, stmt, device, msg);
  std::abort();
}

}  // namespace kvgate::gpu

// on_error(stmt, msg, err) is the statement run when expr != ok.
#define KVGATE_GPU_CHECK_GEN(expr, ok, on_error)                                     \
  do {                                                                               \
    const auto kvgate_gpu_err_ = (expr);                                             \
    if (kvgate_gpu_err_ != (ok)) {                                                   \
      on_error(#expr, ::kvgate::gpu::ErrorString(kvgate_gpu_err_), kvgate_gpu_err_); \
    }                                                                                \
  } while (0)

#define KVGATE_GPU_ON_ERROR_RETURN_STATUS_(stmt, msg, err) \
  return ::kvgate::gpu::GpuErrorStatus(stmt, __FILE__, __LINE__, msg)
#define KVGATE_GPU_ON_ERROR_ABORT_(stmt, msg, err) \
  ::kvgate::gpu::GpuErrorAbort(stmt, __FILE__, __LINE__, msg)
#define KVGATE_GPU_ON_ERROR_RETURN_ERR_(stmt, msg, err) return err

#define KVGATE_CUDA_RETURN_IF_ERROR(expr) \
  KVGATE_GPU_CHECK_GEN(expr, cudaSuccess, KVGATE_GPU_ON_ERROR_RETURN_STATUS_)
#define KVGATE_CUBLAS_RETURN_IF_ERROR(expr) \
  KVGATE_GPU_CHECK_GEN(expr, CUBLAS_STATUS_SUCCESS, KVGATE_GPU_ON_ERROR_RETURN_STATUS_)
#define KVGATE_CUDA_TRY(expr) \
  KVGATE_GPU_CHECK_GEN(expr, cudaSuccess, KVGATE_GPU_ON_ERROR_RETURN_ERR_)
#define KVGATE_CUDA_CHECK(expr) KVGATE_GPU_CHECK_GEN(expr, cudaSuccess, KVGATE_GPU_ON_ERROR_ABORT_)
#define KVGATE_CUBLAS_CHECK(expr) \
  KVGATE_GPU_CHECK_GEN(expr, CUBLAS_STATUS_SUCCESS, KVGATE_GPU_ON_ERROR_ABORT_)
