// MakeBackend: the one place that knows every backend, and whether this build has CUDA.
#include "absl/strings/str_cat.h"
#include "kernels/backend.h"

#if KVGATE_HAS_CUDA
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/device.h"
#endif

namespace kvgate::kernels {

int CudaDeviceCount() {
#if KVGATE_HAS_CUDA
  return cuda::DeviceCount();
#else
  return 0;
#endif
}

absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(const Device& device, int threads) {
  switch (device.type) {
    case Device::Type::kCpu:
      return MakeCpuBackend(threads);
    case Device::Type::kGuarded:
      return MakeGuardedBackend(threads);
    case Device::Type::kCuda: {
#if KVGATE_HAS_CUDA
      const int count = CudaDeviceCount();
      if (count == 0) {
        return absl::FailedPreconditionError(
            absl::StrCat("--device ", device.ToString(),
                         ": no CUDA GPU found on this machine (use --device cpu)"));
      }
      auto backend = MakeCudaBackend(device.index);
      if (!backend.ok()) {
        return absl::Status(
            backend.status().code(),
            absl::StrCat("--device ", device.ToString(), ": ", backend.status().message()));
      }
      return backend;
#else
      return absl::FailedPreconditionError(
          absl::StrCat("--device ", device.ToString(),
                       ": this kvgate was built without CUDA (nvcc was not found at build time); "
                       "use --device cpu"));
#endif
    }
  }
  return absl::InvalidArgumentError("unknown device");
}

}  // namespace kvgate::kernels
