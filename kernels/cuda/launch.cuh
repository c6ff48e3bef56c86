// The launch shape of the elementwise CUDA kernels (grid-stride loops), shared by the .cu files.
#pragma once

#include <cstdint>

namespace kvgate::kernels::cuda {

inline constexpr int kThreads = 256;

// Blocks for `count` elements at kThreads per block, capped (the kernels loop over the rest).
inline unsigned GridFor(int64_t count) {
  const int64_t blocks = (count + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65535 * 16 ? blocks : 65535 * 16);
}

}  // namespace kvgate::kernels::cuda
