#include "kernels/cuda/cuda_backend.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "common/cuda/cuda_check.h"
#include "kernels/cuda/device.h"
#include "kernels/cuda/ops.h"

namespace kvgate::kernels::cuda {

absl::StatusOr<std::unique_ptr<CudaBackend>> CudaBackend::Create(int device) {
  const int count = DeviceCount();
  if (device < 0 || device >= count) {
    return absl::NotFoundError(
        absl::StrCat("CUDA device ", device, " not found (", count, " devices)"));
  }
  KVGATE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  cudaDeviceProp prop{};
  KVGATE_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, device));
  cudaStream_t stream = nullptr;
  KVGATE_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  absl::StatusOr<std::unique_ptr<Gemm>> gemm = Gemm::Create(stream);
  if (!gemm.ok()) {
    cudaStreamDestroy(stream);
    return gemm.status();
  }
  std::string name = absl::StrCat("cuda:", device, " (", prop.name, ")");
  return std::unique_ptr<CudaBackend>(
      new CudaBackend(device, stream, *std::move(gemm), std::move(name)));
}

CudaBackend::CudaBackend(int device, cudaStream_t stream, std::unique_ptr<Gemm> gemm,
                         std::string name)
    : device_(device), stream_(stream), gemm_(std::move(gemm)), name_(std::move(name)) {}

CudaBackend::~CudaBackend() {
  SetDevice();
  cudaStreamSynchronize(stream_);
  gemm_.reset();
  cudaFree(ids_.ptr);
  cudaFree(attention_workspace_.ptr);
  for (auto& [key, w] : weights_) {
    if (w.owned) cudaFree(w.ptr);
  }
  cudaStreamDestroy(stream_);
}

void CudaBackend::SetDevice() const { KVGATE_CUDA_CHECK(cudaSetDevice(device_)); }

void* CudaBackend::Ensure(Scratch& s, size_t bytes) {
  if (bytes <= s.bytes) return s.ptr;
  KVGATE_CUDA_CHECK(cudaStreamSynchronize(stream_));  // the old buffer may still be in use
  KVGATE_CUDA_CHECK(cudaFree(s.ptr));
  s.ptr = nullptr;
  s.bytes = 0;
  const size_t grown = std::max<size_t>(bytes + bytes / 2, 4096);
  KVGATE_CUDA_CHECK(cudaMalloc(&s.ptr, grown));
  s.bytes = grown;
  return s.ptr;
}

Backend::Buffer CudaBackend::Alloc(size_t count) {
  SetDevice();
  float* p = nullptr;
  const cudaError_t err = cudaMalloc(&p, std::max<size_t>(count, 1) * sizeof(float));
  if (err == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    throw std::bad_alloc();
  }
  KVGATE_CUDA_CHECK(err);
  return Buffer(p, [](float* q) { cudaFree(q); });
}

const void* CudaBackend::PrefetchWeight(const WeightView& w) {
  const WeightKey key{w.data, static_cast<int>(w.dtype), w.rows, w.cols};
  auto it = weights_.find(key);
  if (it != weights_.end()) return it->second.ptr;
  SetDevice();
  DeviceWeight dw;
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, w.data) == cudaSuccess &&
      (attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged)) {
    dw.ptr = const_cast<void*>(w.data);  // already on the device: used in place
  } else {
    cudaGetLastError();  // older drivers report plain host pointers as an error
    const size_t bytes = static_cast<size_t>(w.rows * w.cols) * DTypeSize(w.dtype);
    KVGATE_CUDA_CHECK(cudaMalloc(&dw.ptr, std::max<size_t>(bytes, 1)));
    // On the backend's stream, so the ops enqueued after it are ordered behind the copy.
    KVGATE_CUDA_CHECK(cudaMemcpyAsync(dw.ptr, w.data, bytes, cudaMemcpyHostToDevice, stream_));
    KVGATE_CUDA_CHECK(cudaStreamSynchronize(stream_));
    dw.owned = true;
    cached_weight_bytes_ += bytes;
  }
  weights_.emplace(key, dw);
  return dw.ptr;
}

void CudaBackend::Synchronize() {
  SetDevice();
  KVGATE_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void CudaBackend::CopyToHost(const float* device_src, size_t count, float* host_dst) {
  SetDevice();
  KVGATE_CUDA_CHECK(cudaMemcpyAsync(host_dst, device_src, count * sizeof(float),
                                    cudaMemcpyDeviceToHost, stream_));
  KVGATE_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void CudaBackend::CopyToDevice(const float* host_src, size_t count, float* device_dst) {
  SetDevice();
  KVGATE_CUDA_CHECK(cudaMemcpyAsync(device_dst, host_src, count * sizeof(float),
                                    cudaMemcpyHostToDevice, stream_));
  KVGATE_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void CudaBackend::Embedding(const int32_t* ids, int64_t n, const WeightView& table, float* out) {
  if (n == 0) return;
  for (int64_t i = 0; i < n; ++i) KVGATE_CHECK(ids[i] >= 0 && ids[i] < table.rows);
  const void* dtable = PrefetchWeight(table);
  auto* dids = static_cast<int32_t*>(Ensure(ids_, static_cast<size_t>(n) * sizeof(int32_t)));
  // From pageable memory: returns once `ids` is staged, so the caller may reuse it at once.
  KVGATE_CUDA_CHECK(cudaMemcpyAsync(dids, ids, static_cast<size_t>(n) * sizeof(int32_t),
                                    cudaMemcpyHostToDevice, stream_));
  KVGATE_CUDA_CHECK(
      cuda::Embedding(dids, n, dtable, table.dtype, table.rows, table.cols, out, stream_));
}

void CudaBackend::RmsNorm(const float* x, int64_t n, int64_t dim, const WeightView& weight,
                          double eps, float* out) {
  const void* dw = PrefetchWeight(weight);
  SetDevice();
  KVGATE_CUDA_CHECK(
      cuda::RmsNorm(x, dw, weight.dtype, n, dim, static_cast<float>(eps), out, stream_));
}

void CudaBackend::MatMul(const float* x, int64_t n, const WeightView& w, const WeightView* bias,
                         float* y) {
  const void* dw = PrefetchWeight(w);
  const void* db = nullptr;
  DType bias_dtype = DType::kF32;
  if (bias != nullptr && !bias->empty()) {
    db = PrefetchWeight(*bias);
    bias_dtype = bias->dtype;
  }
  SetDevice();
  const absl::Status s = gemm_->MatMul(x, n, dw, w.dtype, w.rows, w.cols, db, bias_dtype, y);
  if (!s.ok()) {
    std::fprintf(stderr, "CudaBackend::MatMul: %s\n", s.ToString().c_str());
    std::abort();
  }
}

void CudaBackend::Rope(float* x, int64_t n, int64_t num_heads, int64_t head_dim, int64_t rotary_dim,
                       const float* cos, const float* sin) {
  SetDevice();
  KVGATE_CUDA_CHECK(cuda::Rope(x, n, num_heads, head_dim, rotary_dim, cos, sin, stream_));
}

void CudaBackend::SiluMul(const float* gate, const float* up, size_t count, float* out) {
  SetDevice();
  KVGATE_CUDA_CHECK(cuda::SiluMul(gate, up, static_cast<int64_t>(count), out, stream_));
}

void CudaBackend::Add(float* x, const float* y, size_t count) {
  SetDevice();
  KVGATE_CUDA_CHECK(cuda::Add(x, y, static_cast<int64_t>(count), stream_));
}

void CudaBackend::Attention(const float* q, int64_t n, int64_t num_heads, int64_t num_kv_heads,
                            int64_t head_dim, const KvHeadView* kv, int64_t window, float* out,
                            const AttentionMass* mass) {
  SetDevice();
  int64_t max_len = 0;
  for (int64_t g = 0; g < num_kv_heads; ++g) max_len = std::max(max_len, kv[g].len);
  const size_t bytes = AttentionWorkspaceBytes(n, num_heads, num_kv_heads, head_dim, max_len);
  void* ws = Ensure(attention_workspace_, bytes);
  KVGATE_CUDA_CHECK(cuda::Attention(q, n, num_heads, num_kv_heads, head_dim, kv, window, out, mass,
                                    ws, attention_workspace_.bytes, stream_));
}

}  // namespace kvgate::kernels::cuda

namespace kvgate::kernels {

absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(int device) {
  ASSIGN_OR_RETURN(std::unique_ptr<cuda::CudaBackend> backend, cuda::CudaBackend::Create(device));
  return std::unique_ptr<Backend>(std::move(backend));
}

}  // namespace kvgate::kernels
