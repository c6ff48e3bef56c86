#include <cstdlib>
#include <new>

#include "kernels/backend.h"
#include "kernels/cpu/ops.h"

namespace kvgate::kernels {
namespace {

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int threads) {
    if (threads > 0) cpu::SetNumThreads(threads);
  }
  std::string name() const override { return "cpu"; }
  Buffer Alloc(size_t count) override {
    const size_t bytes = ((count * sizeof(float) + 63) / 64) * 64;
    float* p = static_cast<float*>(std::aligned_alloc(64, bytes == 0 ? 64 : bytes));
    if (p == nullptr) throw std::bad_alloc();
    return Buffer(p, [](float* q) { std::free(q); });
  }
  void Embedding(const int32_t* ids, int64_t n, const WeightView& table, float* out) override {
    cpu::Embedding(ids, n, table, out);
  }
  void RmsNorm(const float* x, int64_t n, int64_t dim, const WeightView& weight, double eps,
               float* out) override {
    cpu::RmsNorm(x, n, dim, weight, eps, out);
  }
  void MatMul(const float* x, int64_t n, const WeightView& w, const WeightView* bias,
              float* y) override {
    cpu::MatMul(x, n, w, bias, y);
  }
  void Rope(float* x, int64_t n, int64_t num_heads, int64_t head_dim, int64_t rotary_dim,
            const float* cos, const float* sin) override {
    cpu::Rope(x, n, num_heads, head_dim, rotary_dim, cos, sin);
  }
  void SiluMul(const float* gate, const float* up, size_t count, float* out) override {
    cpu::SiluMul(gate, up, count, out);
  }
  void Add(float* x, const float* y, size_t count) override { cpu::Add(x, y, count); }
  void Attention(const float* q, int64_t n, int64_t num_heads, int64_t num_kv_heads,
                 int64_t head_dim, const KvHeadView* kv, int64_t window, float* out,
                 const AttentionMass* mass) override {
    cpu::Attention(q, n, num_heads, num_kv_heads, head_dim, kv, window, out, mass);
  }
};

}  // namespace

std::unique_ptr<Backend> MakeCpuBackend(int threads) {
  return std::make_unique<CpuBackend>(threads);
}

}  // namespace kvgate::kernels
