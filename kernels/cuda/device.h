// Device discovery that works on machines without a GPU.
#pragma once

namespace kvgate::kernels::cuda {

// Number of usable CUDA devices; 0 when there is no driver or no GPU.
int DeviceCount();

}  // namespace kvgate::kernels::cuda
