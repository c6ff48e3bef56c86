// NCCL results in kvgate's one GPU check family (common/cuda/cuda_check.h):
//   KVGATE_NCCL_RETURN_IF_ERROR(expr)  ncclResult_t expr; returns absl::Status (INTERNAL)
//                                      naming the statement, file:line and NCCL's message.
#pragma once

#include <nccl.h>

#include "common/cuda/cuda_check.h"

namespace kvgate::gpu {
inline const char* ErrorString(ncclResult_t r) { return ncclGetErrorString(r); }
}  // namespace kvgate::gpu

#define KVGATE_NCCL_RETURN_IF_ERROR(expr) \
  KVGATE_GPU_CHECK_GEN(expr, ncclSuccess, KVGATE_GPU_ON_ERROR_RETURN_STATUS_)
