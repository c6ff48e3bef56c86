#include "kernels/cpu/host_backend.h"

#include <cstring>
#include <fstream>

#include "kernels/cpu/ops.h"

namespace kvgate::kernels::cpu {

class HostBackend::Scope {
 public:
  explicit Scope(HostBackend* b) : b_(b) { b_->Open(); }
  ~Scope() { b_->Close(); }
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

 private:
  HostBackend* b_;
};

int64_t AvailableHostMemory() {
  std::ifstream in("/proc/meminfo");
  std::string key, unit;
  int64_t kb = 0;
  while (in >> key >> kb >> unit) {
    if (key == "MemAvailable:") return kb * 1024;
  }
  return 0;
}

absl::Status HostBackend::CopyToDevice(void* dst, const void* host_src, size_t bytes) {
  Scope s(this);
  std::memcpy(dst, host_src, bytes);
  return absl::OkStatus();
}
absl::Status HostBackend::CopyToHost(void* host_dst, const void* src, size_t bytes) {
  Scope s(this);
  std::memcpy(host_dst, src, bytes);
  return absl::OkStatus();
}
absl::Status HostBackend::CopyOnDevice(void* dst, const void* src, size_t bytes) {
  Scope s(this);
  std::memmove(dst, src, bytes);
  return absl::OkStatus();
}
int64_t HostBackend::FreeMemory() const { return AvailableHostMemory(); }

void HostBackend::Embedding(const int32_t* ids, int64_t n, const WeightView& table, float* out) {
  Scope s(this);
  cpu::Embedding(ids, n, table, out);
}
void HostBackend::RmsNorm(const float* x, int64_t n, int64_t dim, const WeightView& weight,
                          double eps, float* out) {
  Scope s(this);
  cpu::RmsNorm(x, n, dim, weight, eps, out);
}
void HostBackend::MatMul(const float* x, int64_t n, const WeightView& w, const WeightView* bias,
                         float* y) {
  Scope s(this);
  cpu::MatMul(x, n, w, bias, y);
}
void HostBackend::Rope(float* x, int64_t n, int64_t num_heads, int64_t head_dim, int64_t rotary_dim,
                       const float* cos, const float* sin) {
  Scope s(this);
  cpu::Rope(x, n, num_heads, head_dim, rotary_dim, cos, sin);
}
void HostBackend::SiluMul(const float* gate, const float* up, size_t count, float* out) {
  Scope s(this);
  cpu::SiluMul(gate, up, count, out);
}
void HostBackend::Add(float* x, const float* y, size_t count) {
  Scope s(this);
  cpu::Add(x, y, count);
}
void HostBackend::GatherRows(const float* src, int64_t width, const int64_t* rows, int64_t n,
                             float* dst) {
  Scope s(this);
  cpu::GatherRows(src, width, rows, n, dst);
}
void HostBackend::Attention(const float* q, int64_t num_heads, int64_t num_kv_heads,
                            int64_t head_dim, std::span<const AttentionSeq> seqs, int64_t window,
                            float* out) {
  Scope s(this);
  for (const AttentionSeq& seq : seqs) {
    const int64_t row = seq.offset * num_heads * head_dim;
    cpu::Attention(q + row, seq.n, num_heads, num_kv_heads, head_dim, seq.kv, window, out + row,
                   seq.mass);
  }
}
void HostBackend::AppendKv(const float* k, const float* v, int64_t n, int64_t num_kv_heads,
                           int64_t head_dim, const KvHeadSlot* slots) {
  Scope s(this);
  cpu::AppendKv(k, v, n, num_kv_heads, head_dim, slots);
}
void HostBackend::SelectTopK(const float* priorities, int64_t rows, int64_t stride,
                             const int32_t* lens, int64_t budget, int32_t* kept,
                             int32_t* kept_count) {
  Scope s(this);
  cpu::SelectTopK(priorities, rows, stride, lens, budget, kept, kept_count);
}
void HostBackend::CompactKv(void* k, void* v, DType dtype, int64_t head_dim, const int64_t* keep,
                            int64_t count, int64_t rotary_dim, const float* cos, const float* sin) {
  Scope s(this);
  cpu::CompactKv(k, v, dtype, head_dim, keep, count, rotary_dim, cos, sin);
}
void HostBackend::ExpectedAttention(const void* k, const void* v, DType dtype, int64_t len,
                                    int64_t head_dim, int64_t skip, const float* mu,
                                    const float* cov, int64_t group, float* out) {
  Scope s(this);
  cpu::ExpectedAttention(k, v, dtype, len, head_dim, skip, mu, cov, group, out);
}
void HostBackend::LocretScore(const LocretLayerWeights& w, const float* q, const float* k,
                              const float* v, int64_t n, int64_t num_kv_heads, float* out) {
  Scope s(this);
  cpu::LocretScore(w, q, k, v, n, num_kv_heads, out);
}
void HostBackend::GateProbabilities(const GateLayerWeights& w, const float* x, int64_t n,
                                    int64_t hidden_size, int64_t num_kv_heads, float* gate_k,
                                    float* gate_v, int64_t past, float* p) {
  Scope s(this);
  cpu::GateProbabilities(w, x, n, hidden_size, num_kv_heads, gate_k, gate_v, past, p);
}

}  // namespace kvgate::kernels::cpu
