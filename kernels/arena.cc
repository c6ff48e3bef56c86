#include "kernels/arena.h"

#include <cstdio>
#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/log.h"

namespace kvgate::kernels {
namespace {

constexpr size_t kAlign = 256;

}  // namespace

absl::StatusOr<std::unique_ptr<Arena>> Arena::Create(Backend* backend, size_t bytes) {
  const size_t capacity = std::max(kAlign, bytes / kAlign * kAlign);
  // Alloc counts elements: capacity / 2 two-byte elements.
  auto exact = backend->Alloc(static_cast<int64_t>(capacity / 2), DType::kBF16);
  if (!exact.ok()) return exact.status();
  return std::unique_ptr<Arena>(new Arena(*std::move(exact), capacity));
}

Arena::Arena(DeviceBuffer block, size_t capacity) : block_(std::move(block)), capacity_(capacity) {
  free_.Release(0, capacity_);
}

size_t Arena::used_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return used_bytes_;
}

absl::StatusOr<DeviceBuffer> Arena::Alloc(int64_t count, DType dtype) {
  const size_t raw = static_cast<size_t>(count) * DTypeSize(dtype);
  const size_t bytes = std::max(kAlign, (raw + kAlign - 1) / kAlign * kAlign);
  std::lock_guard<std::mutex> lock(mu_);
  if (const std::optional<size_t> offset = free_.Take(bytes)) {
    used_[*offset] = bytes;
    used_bytes_ += bytes;
    return DeviceBuffer(this, block_.as<uint8_t>() + *offset, count, dtype);
  }
  return absl::ResourceExhaustedError(absl::StrCat("KV arena: no free block of ", bytes, " bytes (",
                                                   used_bytes_, " of ", capacity_,
                                                   " bytes in use)"));
}

void Arena::Free(void* data, size_t) {
  std::lock_guard<std::mutex> lock(mu_);
  const size_t start = static_cast<size_t>(static_cast<uint8_t*>(data) - block_.as<uint8_t>());
  auto it = used_.find(start);
  if (it == used_.end()) {
    log::Error(absl::StrFormat("KV arena: free of unknown block %p", data));
    std::abort();
  }
  const size_t bytes = it->second;
  used_.erase(it);
  used_bytes_ -= bytes;
  free_.Release(start, bytes);
}

}  // namespace kvgate::kernels
