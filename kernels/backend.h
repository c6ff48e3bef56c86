// The backend-neutral op set, in the style of ggml-backend: the model, the KV cache and the
// eviction policies are written once against this interface and never learn where memory
// lives. A backend owns memory (Alloc: activations, uploaded weights, the KV arena) and runs
// every op the engine and the cache perform on it; the host keeps only metadata (lengths,
// positions, scores, offsets) and the small host arrays the ops take by pointer (token ids,
// row indices, per-row rotation tables), each marked "host" below.
//
// Backends: the CPU backend (always built; the reference), the CUDA backend (built when nvcc
// is found), and the guarded backend (the CPU kernels, with all its memory inaccessible to the
// host outside its own ops: any host code that touches device memory crashes under test).
//
// Every pointer argument not marked "host" is backend memory from Alloc (or an uploaded
// weight). Ops are ordered as issued; Copy*ToHost and Synchronize wait for them. Errors of
// memory management return absl::Status (RESOURCE_EXHAUSTED when memory runs out); an op given
// arguments that break its contract is a programmer error and aborts.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "absl/status/statusor.h"
#include "common/dtype.h"
#include "kernels/tensor.h"

namespace kvgate::kernels {

class DeviceBuffer;

// Where DeviceBuffers come from and go back to: a backend, or an Arena carved out of one.
class Allocator {
 public:
  virtual ~Allocator() = default;
  // `count` elements of `dtype`, 64-byte aligned. RESOURCE_EXHAUSTED when memory runs out.
  virtual absl::StatusOr<DeviceBuffer> Alloc(int64_t count, DType dtype) = 0;
  // Returns memory from Alloc (called by DeviceBuffer).
  virtual void Free(void* data, size_t bytes) = 0;
};

// Where a backend runs: "cpu", "cuda:N" or "guarded".
struct Device {
  enum class Type { kCpu, kCuda, kGuarded };
  Type type = Type::kCpu;
  int index = 0;  // the CUDA device

  std::string ToString() const;
  bool operator==(const Device&) const = default;
  // Parses "cpu", "cuda", "cuda:N" or "guarded"; INVALID_ARGUMENT naming the choices otherwise.
  static absl::StatusOr<Device> Parse(const std::string& text);
  // As Parse; "" names the default device (DefaultDeviceName).
  static absl::StatusOr<Device> ParseOrDefault(const std::string& text);
};

// A block of backend memory of `count` elements of `dtype`. Owning and move-only; freed by its
// allocator, which must outlive it.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(Allocator* owner, void* data, int64_t count, DType dtype)
      : owner_(owner), data_(data), count_(count), dtype_(dtype) {}
  DeviceBuffer(DeviceBuffer&& o) noexcept { *this = std::move(o); }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { Reset(); }

  void* data() const { return data_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  int64_t count() const { return count_; }
  DType dtype() const { return dtype_; }
  size_t bytes() const { return static_cast<size_t>(count_) * DTypeSize(dtype_); }
  bool empty() const { return data_ == nullptr; }
  void Reset();

 private:
  Allocator* owner_ = nullptr;
  void* data_ = nullptr;
  int64_t count_ = 0;
  DType dtype_ = DType::kF32;
};

class Backend : public Allocator {
 public:
  virtual std::string name() const = 0;
  virtual Device device() const = 0;
  // Whether host code may dereference this backend's memory (the CPU backend only).
  virtual bool host_accessible() const { return false; }

  // ---- Memory (Alloc and Free: see Allocator) ---------------------------------------------
  // Host <-> backend and backend <-> backend copies of `bytes` bytes. CopyToHost waits until
  // the copy (and every op before it) is done.
  virtual absl::Status CopyToDevice(void* dst, const void* host_src, size_t bytes) = 0;
  virtual absl::Status CopyToHost(void* host_dst, const void* src, size_t bytes) = 0;
  virtual absl::Status CopyOnDevice(void* dst, const void* src, size_t bytes) = 0;
  // Waits until every op issued so far has finished.
  virtual absl::Status Synchronize() = 0;
  // Memory the backend can still allocate (the GPU's free memory; the machine's available
  // memory for the CPU backends). 0 when unknown.
  virtual int64_t FreeMemory() const = 0;
  // A weight in this backend's memory: `host` itself when the backend reads host memory,
  // else a copy in `storage` (uploaded once, at load).
  absl::StatusOr<WeightView> Upload(const WeightView& host, DeviceBuffer* storage);
  // A matrix that only MatMul reads (not an embedding table), already in this backend's memory,
  // in the layout this backend's MatMul reads fastest: a new copy in `storage`, or `w` itself
  // where it is stored that way already (the default). The CPU backend packs float32 matrices
  // into panels (kernels/cpu/ops.h, PackPanels).
  virtual absl::StatusOr<WeightView> PrepareMatMulWeight(const WeightView& w,
                                                         DeviceBuffer* /*storage*/) {
    return w;
  }

  // ---- The model's ops ---------------------------------------------------------------------
  virtual void Embedding(const int32_t* ids,  // [n] host
                         int64_t n,
                         const WeightView& table,  // [vocab_size, hidden_size]
                         float* out) = 0;          // [n, hidden_size]
  virtual void RmsNorm(const float* x,             // [n, dim]
                       int64_t n, int64_t dim,
                       const WeightView& weight,  // [dim]
                       double eps,
                       float* out) = 0;  // [n, dim]; may alias x
  virtual void MatMul(const float* x,    // [n, k]
                      int64_t n,
                      const WeightView& w,     // [m, k]
                      const WeightView* bias,  // [m] or null (host struct)
                      float* y) = 0;           // [n, m]
  // Rotate-half RoPE over the first rotary_dim dims of every head, row i by cos/sin row i.
  // The same op re-rotates keys by a position delta (tables of the delta's angles).
  virtual void Rope(float* x,  // [n, num_heads, head_dim], in place
                    int64_t n, int64_t num_heads, int64_t head_dim, int64_t rotary_dim,
                    const float* cos,       // [n, rotary_dim / 2]
                    const float* sin) = 0;  // [n, rotary_dim / 2]
  virtual void SiluMul(const float* gate,   // [count]
                       const float* up,     // [count]
                       size_t count,
                       float* out) = 0;                          // [count]; may alias gate or up
  virtual void Add(float* x, const float* y, size_t count) = 0;  // [count] each
  // dst[i, :] = src[rows[i], :].
  virtual void GatherRows(const float* src,  // [.., width]
                          int64_t width,
                          const int64_t* rows,  // [n] host
                          int64_t n,
                          float* dst) = 0;  // [n, width]; must not alias src
  // Causal attention of every sequence of a step in one call. Sequence s's queries are rows
  // [offset, offset + n) of q; the new tokens' keys are already the last n entries of every
  // one of its KV heads; query i sees entries [0, len - n + i + 1), restricted to the last
  // `window` of them when window > 0. See kernels/cpu/ops.h Attention.
  virtual void Attention(const float* q,  // [total, num_heads, head_dim]
                         int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                         std::span<const AttentionSeq> seqs,  // host
                         int64_t window,
                         float* out) = 0;  // [total, num_heads, head_dim]

  // ---- The KV cache's ops ------------------------------------------------------------------
  // Stores n new tokens' keys and values: token i of KV head g goes to row i of slots[g]
  // (converted to the slot's dtype).
  virtual void AppendKv(const float* k,  // [n, num_kv_heads, head_dim]
                        const float* v,  // [n, num_kv_heads, head_dim]
                        int64_t n, int64_t num_kv_heads, int64_t head_dim,
                        const KvHeadSlot* slots) = 0;  // [num_kv_heads] host
  // Eviction's selection, per row g of `rows`: the indices of the min(lens[g], budget)
  // highest priorities among entries [0, lens[g]) of row g, ties going to the larger index (the
  // more recent token), ascending, to kept[g * budget ...], their count to kept_count[g].
  virtual void SelectTopK(const float* priorities,  // [rows, stride]
                          int64_t rows, int64_t stride,
                          const int32_t* lens,  // [rows] host
                          int64_t budget,
                          int32_t* kept,             // [rows, budget] host
                          int32_t* kept_count) = 0;  // [rows] host
  // Compacts one KV head in place: row keep[i] moves to row i (keep ascending, so keep[i] >=
  // i). With rotation tables, the moved key row i is then rotated by cos/sin row i (position
  // re-assignment: by its new index minus its old one).
  virtual void CompactKv(void* k, void* v,  // [len, head_dim] of dtype each
                         DType dtype, int64_t head_dim,
                         const int64_t* keep,  // [count] host
                         int64_t count, int64_t rotary_dim,
                         const float* cos,       // [count, rotary_dim / 2] host, or null
                         const float* sin) = 0;  // [count, rotary_dim / 2] host, or null
  // Expected Attention (arXiv 2510.00636): the attention the `group` query heads of one KV head
  // are expected to pay each of its keys, given the statistics of their future queries (mean
  // mu and covariance cov, already rotated to the future positions): per head g,
  // s_g[j] = mu_g . k_j / sqrt(d) + k_j^T cov_g k_j / (2 d), a softmax over j in [skip, len),
  // then out[j] = mean over g of it, times ||v_j||; out[j] = 0 for j < skip (sink rows).
  virtual void ExpectedAttention(const void* k, const void* v,  // [len, head_dim] of dtype each
                                 DType dtype, int64_t len, int64_t head_dim, int64_t skip,
                                 const float* mu,   // [group, head_dim]
                                 const float* cov,  // [group, head_dim, head_dim], or null
                                 int64_t group,
                                 float* out) = 0;  // [len]
  // Locret: one score per KV head for each of n tokens from their pre-RoPE q, k, v.
  virtual void LocretScore(const LocretLayerWeights& w,
                           const float* q,  // [n, num_heads * head_dim]
                           const float* k,  // [n, num_kv_heads * head_dim]
                           const float* v,  // [n, num_kv_heads * head_dim]
                           int64_t n, int64_t num_kv_heads,
                           float* out) = 0;  // [n, num_kv_heads]
  // Attention-Gate: keep probabilities of n new tokens. The gate's keys and values of the
  // `past` earlier tokens are rows [0, past) of gate_k / gate_v; the new tokens' rows are
  // written after them.
  virtual void GateProbabilities(const GateLayerWeights& w,
                                 const float* x,  // [n, hidden_size], normalized layer input
                                 int64_t n, int64_t hidden_size, int64_t num_kv_heads,
                                 float* gate_k,  // [past + n, heads * head_dim]
                                 float* gate_v,  // [past + n, heads * head_dim]
                                 int64_t past,
                                 float* p) = 0;  // [n, num_kv_heads]
};

// The CPU backend (kernels/cpu). `threads` <= 0 keeps the current OpenMP setting.
std::unique_ptr<Backend> MakeCpuBackend(int threads);
// The guarded backend (kernels/guarded): the CPU kernels over memory the host cannot touch
// outside the backend's own ops (mprotect PROT_NONE between ops).
std::unique_ptr<Backend> MakeGuardedBackend(int threads);
// The backend for `device`: CPU threads as MakeCpuBackend. A CUDA device in a build without
// CUDA, or one that does not exist, is a one-line FAILED_PRECONDITION / NOT_FOUND error.
absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(const Device& device, int threads);
// The device used where none is named: $KVGATE_DEVICE when set (CI runs the test suites once
// more with KVGATE_DEVICE=guarded), else "cpu".
std::string DefaultDeviceName();
// Number of usable CUDA devices (0 in a CPU-only build or without a GPU).
int CudaDeviceCount();

}  // namespace kvgate::kernels
