// The CUDA backend: kernels::Backend on one GPU, every op enqueued on one stream it owns.
//
// Memory. Alloc returns device memory (cudaMalloc; RESOURCE_EXHAUSTED when the GPU is full).
// Weights are uploaded once at load (Backend::Upload) and used in place; there is no upload
// cache. Host arrays the interface passes by pointer (token ids, row indices, rotation tables,
// KV slot pointers) are staged to device scratch on the stream (cudaMemcpyAsync from pageable
// memory returns once the data is staged, so the caller may reuse them at once).
//
// KV in bf16 / f16: the attention kernels read float32 rows, so Attention first widens each
// sequence's K/V heads into a float32 workspace (one extra pass over the cache per layer and
// step; a native 16-bit attention kernel is the next step).
//
// Ordering. Ops are asynchronous with respect to the host; Synchronize / CopyToHost wait for
// the stream. Kernel launch errors abort (the ops return void) with the failing call, file and
// line; memory management returns absl::Status.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

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
  Device device() const override { return Device{Device::Type::kCuda, device_}; }

  absl::StatusOr<DeviceBuffer> Alloc(int64_t count, DType dtype) override;
  void Free(void* data, size_t bytes) override;
  absl::Status CopyToDevice(void* dst, const void* host_src, size_t bytes) override;
  absl::Status CopyToHost(void* host_dst, const void* src, size_t bytes) override;
  absl::Status CopyOnDevice(void* dst, const void* src, size_t bytes) override;
  absl::Status Synchronize() override;
  int64_t FreeMemory() const override;

  void Embedding(const int32_t* ids, int64_t n, const WeightView& table, float* out) override;
  void RmsNorm(const float* x, int64_t n, int64_t dim, const WeightView& weight, double eps,
               float* out) override;
  void MatMul(const float* x, int64_t n, const WeightView& w, const WeightView* bias,
              float* y) override;
  void Rope(float* x, int64_t n, int64_t num_heads, int64_t head_dim, int64_t rotary_dim,
            const float* cos, const float* sin) override;
  void SiluMul(const float* gate, const float* up, size_t count, float* out) override;
  void Add(float* x, const float* y, size_t count) override;
  void GatherRows(const float* src, int64_t width, const int64_t* rows, int64_t n,
                  float* dst) override;
  void Attention(const float* q, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                 std::span<const AttentionSeq> seqs, int64_t window, float* out) override;
  void AppendKv(const float* k, const float* v, int64_t n, int64_t num_kv_heads, int64_t head_dim,
                const KvHeadSlot* slots) override;
  void SelectTopK(const float* priorities, int64_t rows, int64_t stride, const int32_t* lens,
                  int64_t budget, int32_t* kept, int32_t* kept_count) override;
  void CompactKv(void* k, void* v, DType dtype, int64_t head_dim, const int64_t* keep,
                 int64_t count, int64_t rotary_dim, const float* cos, const float* sin) override;
  void ExpectedAttention(const void* k, const void* v, DType dtype, int64_t len, int64_t head_dim,
                         int64_t skip, const float* mu, const float* cov, int64_t group,
                         float* out) override;
  void LocretScore(const LocretLayerWeights& w, const float* q, const float* k, const float* v,
                   int64_t n, int64_t num_kv_heads, float* out) override;
  void GateProbabilities(const GateLayerWeights& w, const float* x, int64_t n, int64_t hidden_size,
                         int64_t num_kv_heads, float* gate_k, float* gate_v, int64_t past,
                         float* p) override;

  // Beyond the Backend interface.
  int device_index() const { return device_; }
  cudaStream_t stream() const { return stream_; }

 private:
  // A device buffer that grows (synchronizing the stream before it frees the old one).
  struct Scratch {
    void* ptr = nullptr;
    size_t bytes = 0;
  };

  CudaBackend(int device, cudaStream_t stream, std::unique_ptr<Gemm> gemm, std::string name);
  void* Ensure(Scratch& s, size_t bytes);
  // Copies `bytes` of host data into `s` (grown as needed) on the stream.
  void* Stage(Scratch& s, const void* host, size_t bytes);
  void SetDevice() const;

  int device_;
  cudaStream_t stream_;
  std::unique_ptr<Gemm> gemm_;
  std::string name_;
  Scratch ids_, rows_, tables_, slots_, staging_, widened_, scoring_, select_;
  Scratch attention_workspace_;
};

}  // namespace kvgate::kernels::cuda

namespace kvgate::kernels {

// The CUDA backend on `device` (kernels/cuda/cuda_backend.h); an error when there is no such
// device or it cannot be initialized.
absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(int device);

}  // namespace kvgate::kernels
