#include "kernels/cuda/cuda_backend.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/cuda/cuda_check.h"
#include "common/log.h"
#include "common/status.h"
#include "kernels/cuda/device.h"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/scoring.h"

namespace kvgate::kernels::cuda {
namespace {

// Aborts with the message of a failed absl::Status from a void op.
void CheckOk(const absl::Status& s, const char* op) {
  if (!s.ok()) {
    log::Error(absl::StrFormat("CudaBackend::%s: %s", op, s.ToString()));
    std::abort();
  }
}

}  // namespace

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
  for (Scratch* s :
       {&ids_, &rows_, &tables_, &slots_, &staging_, &widened_, &scoring_, &attention_workspace_}) {
    cudaFree(s->ptr);
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

void* CudaBackend::Stage(Scratch& s, const void* host, size_t bytes) {
  void* d = Ensure(s, bytes);
  if (bytes > 0) {
    KVGATE_CUDA_CHECK(cudaMemcpyAsync(d, host, bytes, cudaMemcpyHostToDevice, stream_));
  }
  return d;
}

absl::StatusOr<DeviceBuffer> CudaBackend::Alloc(int64_t count, DType dtype) {
  SetDevice();
  const size_t bytes = std::max<size_t>(static_cast<size_t>(count) * DTypeSize(dtype), 64);
  void* p = nullptr;
  const cudaError_t err = cudaMalloc(&p, bytes);
  if (err == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    return absl::ResourceExhaustedError(absl::StrCat(name_, ": out of GPU memory allocating ",
                                                     bytes, " bytes (", FreeMemory(), " free)"));
  }
  KVGATE_CUDA_RETURN_IF_ERROR(err);
  // Freshly allocated memory reads as zeros, as on the CPU backends.
  KVGATE_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(p, 0, bytes, stream_));
  return DeviceBuffer(this, p, count, dtype);
}

void CudaBackend::Free(void* data, size_t) {
  SetDevice();
  // cudaFree waits for the device; work queued on our stream that reads `data` finishes first.
  cudaFree(data);
}

absl::Status CudaBackend::CopyToDevice(void* dst, const void* host_src, size_t bytes) {
  SetDevice();
  KVGATE_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::CopyToHost(void* host_dst, const void* src, size_t bytes) {
  SetDevice();
  KVGATE_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, stream_));
  KVGATE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::CopyOnDevice(void* dst, const void* src, size_t bytes) {
  SetDevice();
  KVGATE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::Synchronize() {
  SetDevice();
  KVGATE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  return absl::OkStatus();
}

int64_t CudaBackend::FreeMemory() const {
  SetDevice();
  size_t free = 0, total = 0;
  if (cudaMemGetInfo(&free, &total) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return static_cast<int64_t>(free);
}

void CudaBackend::Embedding(const int32_t* ids, int64_t n, const WeightView& table, float* out) {
  if (n == 0) return;
  for (int64_t i = 0; i < n; ++i) KVGATE_CHECK(ids[i] >= 0 && ids[i] < table.rows);
  SetDevice();
  auto* dids = static_cast<int32_t*>(Stage(ids_, ids, static_cast<size_t>(n) * sizeof(int32_t)));
  KVGATE_CUDA_CHECK(
      cuda::Embedding(dids, n, table.data, table.dtype, table.rows, table.cols, out, stream_));
}

void CudaBackend::RmsNorm(const float* x, int64_t n, int64_t dim, const WeightView& weight,
                          double eps, float* out) {
  SetDevice();
  KVGATE_CUDA_CHECK(
      cuda::RmsNorm(x, weight.data, weight.dtype, n, dim, static_cast<float>(eps), out, stream_));
}

void CudaBackend::MatMul(const float* x, int64_t n, const WeightView& w, const WeightView* bias,
                         float* y) {
  SetDevice();
  const bool has_bias = bias != nullptr && !bias->empty();
  CheckOk(gemm_->MatMul(x, n, w.data, w.dtype, w.rows, w.cols, has_bias ? bias->data : nullptr,
                        has_bias ? bias->dtype : DType::kF32, y),
          "MatMul");
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

void CudaBackend::GatherRows(const float* src, int64_t width, const int64_t* rows, int64_t n,
                             float* dst) {
  SetDevice();
  auto* drows = static_cast<int64_t*>(Stage(rows_, rows, static_cast<size_t>(n) * 8));
  KVGATE_CUDA_CHECK(cuda::GatherRows(src, width, drows, n, dst, stream_));
}

void CudaBackend::Attention(const float* q, int64_t num_heads, int64_t num_kv_heads,
                            int64_t head_dim, std::span<const AttentionSeq> seqs, int64_t window,
                            float* out) {
  SetDevice();
  std::vector<KvHeadView> views(static_cast<size_t>(num_kv_heads));
  for (const AttentionSeq& seq : seqs) {
    int64_t max_len = 0;
    for (int64_t g = 0; g < num_kv_heads; ++g) max_len = std::max(max_len, seq.kv[g].len);
    const KvHeadView* kv = seq.kv;
    if (num_kv_heads > 0 && seq.kv[0].dtype != DType::kF32) {
      // Widen this sequence's 16-bit K/V heads to float32 rows the kernels read.
      const int64_t per_head = max_len * head_dim;
      auto* wide = static_cast<float*>(
          Ensure(widened_, static_cast<size_t>(2 * num_kv_heads * per_head) * sizeof(float)));
      for (int64_t g = 0; g < num_kv_heads; ++g) {
        const KvHeadView& src = seq.kv[g];
        KVGATE_CHECK(src.stride == head_dim);
        float* k = wide + (2 * g) * per_head;
        float* v = wide + (2 * g + 1) * per_head;
        KVGATE_CUDA_CHECK(WidenToF32(src.k, src.dtype, src.len * head_dim, k, stream_));
        KVGATE_CUDA_CHECK(WidenToF32(src.v, src.dtype, src.len * head_dim, v, stream_));
        views[static_cast<size_t>(g)] =
            KvHeadView{k, v, src.len, head_dim, src.new_visible, DType::kF32};
      }
      kv = views.data();
    }
    const size_t bytes = AttentionWorkspaceBytes(seq.n, num_heads, num_kv_heads, head_dim, max_len);
    void* ws = Ensure(attention_workspace_, bytes);
    const int64_t row = seq.offset * num_heads * head_dim;
    KVGATE_CUDA_CHECK(cuda::Attention(q + row, seq.n, num_heads, num_kv_heads, head_dim, kv, window,
                                      out + row, seq.mass, ws, attention_workspace_.bytes,
                                      stream_));
  }
}

void CudaBackend::AppendKv(const float* k, const float* v, int64_t n, int64_t num_kv_heads,
                           int64_t head_dim, const KvHeadSlot* slots) {
  SetDevice();
  std::vector<void*> ptrs(static_cast<size_t>(2 * num_kv_heads));
  for (int64_t g = 0; g < num_kv_heads; ++g) {
    ptrs[static_cast<size_t>(g)] = slots[g].k;
    ptrs[static_cast<size_t>(num_kv_heads + g)] = slots[g].v;
  }
  auto* d = static_cast<void**>(Stage(slots_, ptrs.data(), ptrs.size() * sizeof(void*)));
  KVGATE_CUDA_CHECK(cuda::AppendKv(k, v, n, num_kv_heads, head_dim, d, d + num_kv_heads,
                                   slots[0].dtype, stream_));
}

void CudaBackend::SelectTopK(const float* priorities, int64_t rows, int64_t stride,
                             const int32_t* lens, int64_t budget, int32_t* kept,
                             int32_t* kept_count) {
  if (rows == 0) return;
  SetDevice();
  // [rows] lens in, then [rows, budget] kept and [rows] counts out, in one scratch block.
  const size_t in = static_cast<size_t>(rows) * sizeof(int32_t);
  const size_t out = static_cast<size_t>(rows * budget) * sizeof(int32_t);
  auto* d = static_cast<uint8_t*>(Ensure(select_, in + out + in));
  KVGATE_CUDA_CHECK(cudaMemcpyAsync(d, lens, in, cudaMemcpyHostToDevice, stream_));
  auto* dkept = reinterpret_cast<int32_t*>(d + in);
  auto* dcount = reinterpret_cast<int32_t*>(d + in + out);
  KVGATE_CUDA_CHECK(cuda::SelectTopK(priorities, rows, stride, reinterpret_cast<int32_t*>(d),
                                     budget, dkept, dcount, stream_));
  KVGATE_CUDA_CHECK(cudaMemcpyAsync(kept, dkept, out, cudaMemcpyDeviceToHost, stream_));
  KVGATE_CUDA_CHECK(cudaMemcpyAsync(kept_count, dcount, in, cudaMemcpyDeviceToHost, stream_));
  KVGATE_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void CudaBackend::CompactKv(void* k, void* v, DType dtype, int64_t head_dim, const int64_t* keep,
                            int64_t count, int64_t rotary_dim, const float* cos, const float* sin) {
  if (count == 0) return;
  SetDevice();
  auto* dkeep = static_cast<int64_t*>(Stage(rows_, keep, static_cast<size_t>(count) * 8));
  const float* dcos = nullptr;
  const float* dsin = nullptr;
  if (cos != nullptr) {
    const size_t table = static_cast<size_t>(count * (rotary_dim / 2)) * sizeof(float);
    std::vector<float> both(2 * table / sizeof(float));
    std::copy_n(cos, table / sizeof(float), both.data());
    std::copy_n(sin, table / sizeof(float), both.data() + table / sizeof(float));
    auto* d = static_cast<float*>(Stage(tables_, both.data(), 2 * table));
    dcos = d;
    dsin = d + table / sizeof(float);
  }
  auto* staging = static_cast<float*>(
      Ensure(staging_, static_cast<size_t>(2 * count * head_dim) * sizeof(float)));
  KVGATE_CUDA_CHECK(cuda::CompactKv(k, v, dtype, head_dim, dkeep, count, rotary_dim, dcos, dsin,
                                    staging, stream_));
}

void CudaBackend::ExpectedAttention(const void* k, const void* v, DType dtype, int64_t len,
                                    int64_t head_dim, int64_t skip, const float* mu,
                                    const float* cov, int64_t group, float* out) {
  SetDevice();
  auto* scratch = static_cast<float*>(
      Ensure(scoring_, static_cast<size_t>(group * len + 2 * group) * sizeof(float)));
  CheckOk(cuda::ExpectedAttention(k, v, dtype, len, head_dim, skip, mu, cov, group, scratch, out,
                                  stream_),
          "ExpectedAttention");
}

void CudaBackend::LocretScore(const LocretLayerWeights& w, const float* q, const float* k,
                              const float* v, int64_t n, int64_t num_kv_heads, float* out) {
  SetDevice();
  const int64_t d_r = w.fc1.rows, din = w.fc1.cols, q_dim = din - 2 * w.kv_dim;
  auto* scratch =
      static_cast<float*>(Ensure(scoring_, static_cast<size_t>(n * (din + d_r)) * sizeof(float)));
  CheckOk(
      cuda::LocretScore(*gemm_, q, k, v, n, q_dim, w.kv_dim, static_cast<const float*>(w.fc1.data),
                        static_cast<const float*>(w.fc2.data), d_r, num_kv_heads, scratch, out),
      "LocretScore");
}

void CudaBackend::GateProbabilities(const GateLayerWeights& w, const float* x, int64_t n,
                                    int64_t hidden_size, int64_t num_kv_heads, float* gate_k,
                                    float* gate_v, int64_t past, float* p) {
  SetDevice();
  const int64_t width = w.heads * w.head_dim;
  auto* scratch =
      static_cast<float*>(Ensure(scoring_, static_cast<size_t>(n * 2 * width) * sizeof(float)));
  CheckOk(cuda::GateProbabilities(
              *gemm_, x, n, hidden_size, static_cast<const float*>(w.wq.data),
              static_cast<const float*>(w.wk.data), static_cast<const float*>(w.wv.data),
              static_cast<const float*>(w.wo.data), static_cast<const float*>(w.bo.data), w.heads,
              w.head_dim, num_kv_heads, gate_k, gate_v, past, scratch, p),
          "GateProbabilities");
}

}  // namespace kvgate::kernels::cuda

namespace kvgate::kernels {

absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(int device) {
  ASSIGN_OR_RETURN(std::unique_ptr<cuda::CudaBackend> backend, cuda::CudaBackend::Create(device));
  return std::unique_ptr<Backend>(std::move(backend));
}

}  // namespace kvgate::kernels
