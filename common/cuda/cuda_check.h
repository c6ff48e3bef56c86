// The one CUDA error-check macro family. KVGATE_CUDA_RETURN_IF_ERROR turns a failing CUDA
// runtime call into an absl::Status naming the call, file and line.
#pragma once

#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

#define KVGATE_CUDA_STATUS_GEN(stmt, ok_value, error_string_fn)                                   \
  ([&]() -> ::absl::Status {                                                                      \
    const auto kvgate_err_ = (stmt);                                                              \
    if (kvgate_err_ == (ok_value)) return ::absl::OkStatus();                                     \
    return ::absl::InternalError(::absl::StrCat(#stmt, " failed: ", error_string_fn(kvgate_err_), \
                                                " at ", __FILE__, ":", __LINE__));                \
  }())

#define KVGATE_CUDA_STATUS(stmt) KVGATE_CUDA_STATUS_GEN(stmt, cudaSuccess, cudaGetErrorString)

#define KVGATE_CUDA_RETURN_IF_ERROR(stmt)                          \
  do {                                                             \
    ::absl::Status kvgate_cuda_status_ = KVGATE_CUDA_STATUS(stmt); \
    if (!kvgate_cuda_status_.ok()) return kvgate_cuda_status_;     \
  } while (0)
