#include <sys/mman.h>

#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kernels/backend.h"
#include "kernels/cpu/host_backend.h"
#include "kernels/cpu/ops.h"

namespace kvgate::kernels {
namespace {

// Memory is the process's own heap: host code may read it directly.
class CpuBackend final : public cpu::HostBackend {
 public:
  explicit CpuBackend(int threads) {
    if (threads > 0) cpu::SetNumThreads(threads);
  }
  std::string name() const override { return "cpu"; }
  Device device() const override { return Device{Device::Type::kCpu, 0}; }
  bool host_accessible() const override { return true; }

  absl::StatusOr<DeviceBuffer> Alloc(int64_t count, DType dtype) override {
    const size_t raw = static_cast<size_t>(count) * DTypeSize(dtype);
    if (raw >= kMapped) {
      // Large blocks (a worker's KV arena, packed weights) straight from the kernel: zero
      // pages, committed as they are touched, so a 20 GB arena costs nothing until sequences
      // fill it.
      void* p = mmap(nullptr, raw, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) {
        return absl::ResourceExhaustedError(
            absl::StrCat("cpu: cannot map ", raw, " bytes of host memory"));
      }
      return DeviceBuffer(this, p, count, dtype);
    }
    const size_t bytes = std::max<size_t>(64, (raw + 63) / 64 * 64);
    void* p = std::aligned_alloc(64, bytes);
    if (p == nullptr) {
      return absl::ResourceExhaustedError(
          absl::StrCat("cpu: cannot allocate ", bytes, " bytes of host memory"));
    }
    std::memset(p, 0, bytes);
    return DeviceBuffer(this, p, count, dtype);
  }
  absl::StatusOr<WeightView> PrepareMatMulWeight(const WeightView& w,
                                                 DeviceBuffer* storage) override {
    // bf16 products (opt-in, set before the model loads) read bf16 rows.
    if (w.empty() || w.quant != Quant::kNone || w.layout != Layout::kRows ||
        (w.dtype == DType::kBF16 && cpu::Bf16Products())) {
      return w;
    }
    auto buf = Alloc(cpu::PanelElements(w.rows, w.cols), w.dtype);
    if (!buf.ok()) return buf.status();
    *storage = *std::move(buf);
    // Mapped (untouched) blocks in 2 MiB pages where the kernel has them (transparent huge
    // pages, "madvise" mode included): far fewer page faults while packing and TLB misses
    // while decode streams the panels. Only advice: no error if refused.
    if (storage->bytes() >= kMapped) madvise(storage->data(), storage->bytes(), MADV_HUGEPAGE);
    return cpu::PackPanels(w, storage->data());
  }
  void Free(void* data, size_t bytes) override {
    if (bytes >= kMapped) {
      munmap(data, bytes);
    } else {
      std::free(data);
    }
  }

 private:
  static constexpr size_t kMapped = size_t{2} << 20;
};

}  // namespace

std::unique_ptr<Backend> MakeCpuBackend(int threads) {
  return std::make_unique<CpuBackend>(threads);
}

}  // namespace kvgate::kernels
