// The guarded backend: the CPU kernels over memory that the host cannot touch outside the
// backend's own ops. Every Alloc is its own mapping, kept PROT_NONE except while one of this
// backend's ops or copies runs; host code that dereferences a "device" pointer (a K/V row, an
// activation, an uploaded weight) therefore dies with SIGSEGV. CPU-only CI runs the engine on
// it to prove that nothing but the backend reads or writes device memory.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "kernels/backend.h"
#include "kernels/cpu/host_backend.h"
#include "kernels/cpu/ops.h"

namespace kvgate::kernels {
namespace {

class GuardedBackend final : public cpu::HostBackend {
 public:
  explicit GuardedBackend(int threads) : page_(static_cast<size_t>(sysconf(_SC_PAGESIZE))) {
    if (threads > 0) cpu::SetNumThreads(threads);
  }
  ~GuardedBackend() override {
    for (const auto& [p, bytes] : maps_) munmap(p, bytes);
  }
  std::string name() const override { return "guarded"; }
  Device device() const override { return Device{Device::Type::kGuarded, 0}; }

  absl::StatusOr<DeviceBuffer> Alloc(int64_t count, DType dtype) override {
    const size_t raw = static_cast<size_t>(count) * DTypeSize(dtype);
    const size_t bytes = std::max(page_, (raw + page_ - 1) / page_ * page_);
    // Zero-filled by the kernel, inaccessible until an op opens it.
    void* p = mmap(nullptr, bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      return absl::ResourceExhaustedError(
          absl::StrCat("guarded: cannot map ", bytes, " bytes"));
    }
    std::lock_guard<std::mutex> lock(mu_);
    maps_[p] = bytes;
    if (depth_ > 0) Protect(p, bytes, PROT_READ | PROT_WRITE);
    return DeviceBuffer(this, p, count, dtype);
  }
  void Free(void* data, size_t) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = maps_.find(data);
    if (it == maps_.end()) {
      std::fprintf(stderr, "guarded backend: free of unknown pointer %p\n", data);
      std::abort();
    }
    munmap(it->first, it->second);
    maps_.erase(it);
  }

 protected:
  void Open() override {
    std::lock_guard<std::mutex> lock(mu_);
    if (depth_++ > 0) return;
    for (const auto& [p, bytes] : maps_) Protect(p, bytes, PROT_READ | PROT_WRITE);
  }
  void Close() override {
    std::lock_guard<std::mutex> lock(mu_);
    if (--depth_ > 0) return;
    for (const auto& [p, bytes] : maps_) Protect(p, bytes, PROT_NONE);
  }

 private:
  static void Protect(void* p, size_t bytes, int prot) {
    if (mprotect(p, bytes, prot) != 0) {
      std::perror("guarded backend: mprotect");
      std::abort();
    }
  }

  const size_t page_;
  std::mutex mu_;
  std::map<void*, size_t> maps_;  // guarded by mu_
  int depth_ = 0;                 // guarded by mu_: ops in progress
};

}  // namespace

std::unique_ptr<Backend> MakeGuardedBackend(int threads) {
  return std::make_unique<GuardedBackend>(threads);
}

}  // namespace kvgate::kernels
