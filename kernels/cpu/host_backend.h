// The ops of the backends that run the CPU kernels (kernels/cpu/ops.h): the CPU backend and
// the guarded backend. Every op and copy runs inside an access scope (Open / Close), which the
// guarded backend uses to make its memory readable only while its own code runs.
#pragma once

#include <string>

#include "kernels/backend.h"

namespace kvgate::kernels::cpu {

class HostBackend : public Backend {
 public:
  absl::Status CopyToDevice(void* dst, const void* host_src, size_t bytes) override;
  absl::Status CopyToHost(void* host_dst, const void* src, size_t bytes) override;
  absl::Status CopyOnDevice(void* dst, const void* src, size_t bytes) override;
  absl::Status Synchronize() override { return absl::OkStatus(); }
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

 protected:
  // Around every op: make this backend's memory accessible to the host, and take it back.
  virtual void Open() {}
  virtual void Close() {}

 private:
  class Scope;
};

// MemAvailable of /proc/meminfo in bytes (0 when unreadable).
int64_t AvailableHostMemory();

}  // namespace kvgate::kernels::cpu
