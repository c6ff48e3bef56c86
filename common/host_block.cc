#include "common/host_block.h"

#include <sys/mman.h>

#include <cstdio>
#include <cstdlib>
#include <new>

namespace kvgate {
namespace {

constexpr size_t kMapped = size_t{2} << 20;

}  // namespace

HostBlock::HostBlock(size_t bytes) : size_(bytes) {
  if (bytes >= kMapped) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    madvise(p, bytes, MADV_HUGEPAGE);  // advice only: 4 KiB pages where refused
    data_ = static_cast<uint8_t*>(p);
  } else {
    data_ = static_cast<uint8_t*>(std::calloc(bytes > 0 ? bytes : 1, 1));
    if (data_ == nullptr) throw std::bad_alloc();
  }
}

HostBlock::~HostBlock() { Release(); }

HostBlock& HostBlock::operator=(HostBlock&& o) noexcept {
  if (this != &o) {
    Release();
    data_ = o.data_;
    size_ = o.size_;
    o.data_ = nullptr;
    o.size_ = 0;
  }
  return *this;
}

void HostBlock::Release() {
  if (data_ == nullptr) return;
  if (size_ >= kMapped) {
    munmap(data_, size_);
  } else {
    std::free(data_);
  }
  data_ = nullptr;
}

}  // namespace kvgate
