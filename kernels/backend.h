// The backend-neutral op set. The model definition is written once against this interface and
// runs on any backend: the CPU backend (always built; the reference) or the CUDA backend (built
// when nvcc is found). Pointers passed to a backend's ops live in that backend's memory
// (Alloc); weights are views the backend can read (host mappings for the CPU backend).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "kernels/tensor.h"

namespace kvgate::kernels {

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;

  // Memory for activations, in this backend's address space. Freed by the deleter.
  using Buffer = std::unique_ptr<float[], void (*)(float*)>;
  virtual Buffer Alloc(size_t count) = 0;

  virtual void Embedding(const int32_t* ids, int64_t n, const WeightView& table,
                         float* out) = 0;  // ids [n] (host), table [vocab, hidden], out [n, hidden]
  virtual void RmsNorm(const float* x, int64_t n, int64_t dim, const WeightView& weight, double eps,
                       float* out) = 0;  // x, out [n, dim]; weight [dim]
  virtual void MatMul(const float* x, int64_t n, const WeightView& w, const WeightView* bias,
                      float* y) = 0;  // x [n, k], w [m, k], bias [m] or null, y [n, m]
  virtual void Rope(float* x, int64_t n, int64_t num_heads, int64_t head_dim, int64_t rotary_dim,
                    const float* cos, const float* sin) = 0;  // x [n, heads, d]; cos/sin [n, rot/2]
  virtual void SiluMul(const float* gate, const float* up, size_t count, float* out) = 0;
  virtual void Add(float* x, const float* y, size_t count) = 0;
  // See kernels/cpu/ops.h Attention for the causal rule.
  virtual void Attention(const float* q, int64_t n, int64_t num_heads, int64_t num_kv_heads,
                         int64_t head_dim, const KvHeadView* kv, int64_t window,
                         float* out,                      // q, out [n, heads, d]; kv [num_kv_heads]
                         const AttentionMass* mass) = 0;  // nullptr: no side output
};

// The CPU backend (kernels/cpu). `threads` <= 0 keeps the current OpenMP setting.
std::unique_ptr<Backend> MakeCpuBackend(int threads);

}  // namespace kvgate::kernels
