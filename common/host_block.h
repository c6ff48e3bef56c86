// A zero-filled block of host memory for weights the process makes itself (quantized blocks,
// synthetic or realigned tensors). Blocks of 2 MiB or more come straight from the kernel and
// are advised into transparent huge pages (MADV_HUGEPAGE), so that decode, which streams them
// every token, misses the TLB far less. Move-only; the data pointer never changes.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvgate {

class HostBlock {
 public:
  // `bytes` zero bytes; aborts (as std::vector does) when the memory cannot be had.
  explicit HostBlock(size_t bytes);
  ~HostBlock();
  HostBlock(HostBlock&& o) noexcept : data_(o.data_), size_(o.size_) {
    o.data_ = nullptr;
    o.size_ = 0;
  }
  HostBlock& operator=(HostBlock&& o) noexcept;
  HostBlock(const HostBlock&) = delete;
  HostBlock& operator=(const HostBlock&) = delete;

  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  void Release();
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace kvgate
