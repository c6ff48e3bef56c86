// One block of a backend's memory, allocated once, handed out in pieces: a worker's KV arena.
// Its caches take their K/V slabs from it (the KvPool keeps the byte and slot accounting), so
// serving allocates nothing from the device per sequence. First fit over 256-byte-aligned
// blocks, coalesced when freed. Thread-safe.
#pragma once

#include <cstddef>
#include <map>
#include <memory>
#include <mutex>

#include "absl/status/statusor.h"
#include "kernels/backend.h"
#include "kernels/free_list.h"

namespace kvgate::kernels {

class Arena final : public Allocator {
 public:
  // `bytes` of `backend` memory (RESOURCE_EXHAUSTED when the backend cannot give them).
  static absl::StatusOr<std::unique_ptr<Arena>> Create(Backend* backend, size_t bytes);
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  absl::StatusOr<DeviceBuffer> Alloc(int64_t count, DType dtype) override;
  void Free(void* data, size_t bytes) override;

  size_t capacity() const { return capacity_; }
  size_t used_bytes() const;

 private:
  Arena(DeviceBuffer block, size_t capacity);

  DeviceBuffer block_;
  const size_t capacity_;
  mutable std::mutex mu_;
  FreeList free_;                  // guarded by mu_
  std::map<size_t, size_t> used_;  // guarded by mu_: offset -> bytes
  size_t used_bytes_ = 0;          // guarded by mu_
};

}  // namespace kvgate::kernels
