// The guarded backend: the CPU kernels over memory that the host cannot touch outside the
// backend's own ops. All its memory is carved out of one reserved address range that stays
// PROT_NONE except while one of this backend's ops or copies runs; host code that dereferences
// a "device" pointer (a K/V row, an activation, an uploaded weight) therefore dies with
// SIGSEGV. CPU-only CI runs the engine on it to prove that nothing but the backend reads or
// writes device memory.
//
// One range (rather than a mapping per buffer) keeps opening and closing it to one mprotect
// each, and the range asks for transparent huge pages and grows in 2 MiB steps, so that
// mprotect changes one entry per 2 MiB rather than per 4 KiB page (24x faster on the default
// model). Blocks are page-granular, first fit, coalesced when freed, and given back to the system
// (MADV_DONTNEED) when freed, so they read as zeros when reused, as a fresh Alloc promises.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/log.h"
#include "kernels/backend.h"
#include "kernels/cpu/host_backend.h"
#include "kernels/cpu/ops.h"
#include "kernels/free_list.h"

namespace kvgate::kernels {
namespace {

constexpr size_t kReserve = size_t{1} << 37;  // 128 GiB of address space, none committed
constexpr size_t kStep = size_t{2} << 20;     // the range in use grows by whole huge pages

class GuardedBackend final : public cpu::HostBackend {
 public:
  // One thread: every mprotect of a multi-threaded process interrupts the other threads' cores
  // to flush their TLBs, which made the ops on a busy 2-core machine ~50x slower.
  explicit GuardedBackend(int) : page_(static_cast<size_t>(sysconf(_SC_PAGESIZE))) {
    cpu::SetNumThreads(1);
    void* p =
        mmap(nullptr, kReserve, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      std::perror("guarded backend: cannot reserve its address range");
      std::abort();
    }
    base_ = static_cast<uint8_t*>(p);
    madvise(base_, kReserve, MADV_HUGEPAGE);  // best effort: slower without, still correct
  }
  ~GuardedBackend() override { munmap(base_, kReserve); }
  std::string name() const override { return "guarded"; }
  Device device() const override { return Device{Device::Type::kGuarded, 0}; }

  absl::StatusOr<DeviceBuffer> Alloc(int64_t count, DType dtype) override {
    const size_t raw = static_cast<size_t>(count) * DTypeSize(dtype);
    if (count < 0 || raw > kReserve) return OutOfMemory(raw);
    const size_t bytes = std::max(page_, (raw + page_ - 1) / page_ * page_);
    std::lock_guard<std::mutex> lock(mu_);
    size_t offset = free_.Take(bytes).value_or(kReserve);
    if (offset == kReserve) {
      const size_t grow = (bytes + kStep - 1) / kStep * kStep;
      if (top_ + grow > kReserve) return OutOfMemory(raw);
      offset = top_;
      top_ += grow;
      if (depth_ > 0) Protect(offset, grow, PROT_READ | PROT_WRITE);
      if (grow > bytes) free_.Release(offset + bytes, grow - bytes);
    }
    used_[offset] = bytes;
    return DeviceBuffer(this, base_ + offset, count, dtype);
  }

  void Free(void* data, size_t) override {
    std::lock_guard<std::mutex> lock(mu_);
    const size_t offset = static_cast<size_t>(static_cast<uint8_t*>(data) - base_);
    auto it = used_.find(offset);
    if (it == used_.end()) {
      log::Error(absl::StrFormat("guarded backend: free of unknown pointer %p", data));
      std::abort();
    }
    const size_t bytes = it->second;
    used_.erase(it);
    // Give the pages back: private anonymous pages read as zeros after this (as fresh memory
    // must), and the process no longer holds them, as a device's freed memory is its own again.
    if (madvise(base_ + offset, bytes, MADV_DONTNEED) != 0) {
      std::perror("guarded backend: madvise");
      std::abort();
    }
    free_.Release(offset, bytes);
  }

 protected:
  void Open() override {
    std::lock_guard<std::mutex> lock(mu_);
    if (depth_++ == 0 && top_ > 0) Protect(0, top_, PROT_READ | PROT_WRITE);
  }
  void Close() override {
    std::lock_guard<std::mutex> lock(mu_);
    if (--depth_ == 0 && top_ > 0) Protect(0, top_, PROT_NONE);
  }

 private:
  absl::Status OutOfMemory(size_t bytes) const {
    return absl::ResourceExhaustedError(absl::StrCat("guarded: cannot allocate ", bytes, " bytes (",
                                                     kReserve >> 30,
                                                     " GiB of address space reserved)"));
  }
  void Protect(size_t offset, size_t bytes, int prot) {
    if (mprotect(base_ + offset, bytes, prot) != 0) {
      std::perror("guarded backend: mprotect");
      std::abort();
    }
  }

  const size_t page_;
  uint8_t* base_ = nullptr;
  std::mutex mu_;
  size_t top_ = 0;                 // guarded by mu_: the end of the range in use (never shrinks)
  std::map<size_t, size_t> used_;  // guarded by mu_: offset -> bytes
  FreeList free_;                  // guarded by mu_: free blocks below top_
  int depth_ = 0;                  // guarded by mu_: ops in progress
};

}  // namespace

std::unique_ptr<Backend> MakeGuardedBackend(int threads) {
  return std::make_unique<GuardedBackend>(threads);
}

}  // namespace kvgate::kernels
