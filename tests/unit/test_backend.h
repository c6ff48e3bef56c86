// The backend the C++ tests run the engine on: $KVGATE_DEVICE (CI runs the suites once more
// with KVGATE_DEVICE=guarded, proving no host code touches device memory), else the CPU.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#include "kernels/backend.h"

namespace kvgate::testing {

inline std::unique_ptr<kernels::Backend> TestBackend(int threads = 0) {
  auto device = kernels::Device::ParseOrDefault("");
  if (!device.ok()) {
    std::fprintf(stderr, "KVGATE_DEVICE: %s\n", device.status().ToString().c_str());
    std::abort();
  }
  auto backend = kernels::MakeBackend(*device, threads);
  if (!backend.ok()) {
    std::fprintf(stderr, "test backend: %s\n", backend.status().ToString().c_str());
    std::abort();
  }
  return *std::move(backend);
}

}  // namespace kvgate::testing
