// The CUDA backend: kernels::Backend on one GPU, every op enqueued on one stream it owns.
//
// Memory. Alloc returns device memory (cudaMalloc, freed by cudaFree). Every activation pointer
// given to an op is a device pointer from Alloc (or any device pointer); in Attention the
// KvHeadView array and the AttentionMass struct are host objects whose k, v, new_visible and
// mass pointers are device pointers. Embedding's ids are host memory, per the interface; they
// are range-checked on the host (abort, as the CPU backend) and copied to the device.
//
// Weights. WeightViews may be host memory (mmapped safetensors): the first op that uses a view
// uploads it (synchronously) and caches the device copy keyed by (host pointer, dtype, rows,
// cols); later calls reuse it. The host memory must therefore stay mapped and unchanged while
// the backend lives, and two different views of overlapping memory (e.g. Rows() slices of a
// fused matrix) are uploaded separately. Views that already point to device memory are used in
// place. PrefetchWeight uploads ahead of time.
//
// Ordering. Ops are asynchronous with respect to the host; Synchronize / CopyToHost wait for
// the stream. Errors abort (the Backend ops return void) with the failing call, file and line.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <tuple>

#include "absl/status/statusor.h"
#include "kernels/backend.h"
#include "kernels/cuda/gemm.h"

namespace kvgate::kernels::cuda {

class CudaBackend final : public Backend {
 public:
  // Makes the backend on CUDA device `device` (creates its stream and cuBLAS handle).
  static absl::StatusOr<std::unique_ptr<CudaBackend>> Create(int device);
  ~CudaBackend() override;
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  std::string name() const override { return name_; }
  Buffer Alloc(size_t count) override;

  void Embedding(const int32_t* ids, int64_t n, const WeightView& table, float* out) override;
  void RmsNorm(const float* x, int64_t n, int64_t dim, const WeightView& weight, double eps,
               float* out) override;
  void MatMul(const float* x, int64_t n, const WeightView& w, const WeightView* bias,
              float* y) override;
  void Rope(float* x, int64_t n, int64_t num_heads, int64_t head_dim, int64_t rotary_dim,
            const float* cos, const float* sin) override;
  void SiluMul(const float* gate, const float* up, size_t count, float* out) override;
  void Add(float* x, const float* y, size_t count) override;
  void Attention(const float* q, int64_t n, int64_t num_heads, int64_t num_kv_heads,
                 int64_t head_dim, const KvHeadView* kv, int64_t window, float* out,
                 const AttentionMass* mass) override;

  // Beyond the Backend interface.
  int device() const { return device_; }
  cudaStream_t stream() const { return stream_; }
  // Waits until every enqueued op has finished.
  void Synchronize();
  // Synchronous copies between host memory and device memory (both wait for the stream).
  void CopyToHost(const float* device_src, size_t count, float* host_dst);
  void CopyToDevice(const float* host_src, size_t count, float* device_dst);
  // The device copy of a weight view (uploaded and cached on first use; see above).
  const void* PrefetchWeight(const WeightView& w);
  // Bytes of device memory held by uploaded weights.
  size_t cached_weight_bytes() const { return cached_weight_bytes_; }

 private:
  // A device buffer that grows (synchronizing the stream before it frees the old one).
  struct Scratch {
    void* ptr = nullptr;
    size_t bytes = 0;
  };

  CudaBackend(int device, cudaStream_t stream, std::unique_ptr<Gemm> gemm, std::string name);
  void* Ensure(Scratch& s, size_t bytes);
  void SetDevice() const;

  int device_;
  cudaStream_t stream_;
  std::unique_ptr<Gemm> gemm_;
  std::string name_;
  Scratch ids_;
  Scratch attention_workspace_;
  // (host pointer, dtype, rows, cols) -> device copy (owned unless the view was on the device).
  using WeightKey = std::tuple<const void*, int, int64_t, int64_t>;
  struct DeviceWeight {
    void* ptr = nullptr;
    bool owned = false;
  };
  std::map<WeightKey, DeviceWeight> weights_;
  size_t cached_weight_bytes_ = 0;
};

}  // namespace kvgate::kernels::cuda

namespace kvgate::kernels {

// The CUDA backend on `device` (kernels/cuda/cuda_backend.h); an error when there is no such
// device or it cannot be initialized.
absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(int device);

}  // namespace kvgate::kernels
