// One worker's KV memory pool: every cache of the worker takes its memory from it, accounted in
// bytes and token slots (one slot = one token's K and V in one (layer, KV head)). A pool with a
// capacity refuses a reservation that does not fit (RESOURCE_EXHAUSTED), so the sum over all
// sequences never exceeds what the worker offered. Thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>

#include "absl/status/status.h"
#include "kernels/backend.h"

namespace kvgate::cache {

class KvPool {
 public:
  // capacity_bytes 0: unlimited (accounting only). `memory`: where the caches' K/V slabs come
  // from (a worker's arena, kernels/arena.h; borrowed); nullptr: each cache's backend.
  explicit KvPool(size_t capacity_bytes = 0, kernels::Allocator* memory = nullptr)
      : capacity_(capacity_bytes), memory_(memory) {}
  KvPool(const KvPool&) = delete;
  KvPool& operator=(const KvPool&) = delete;

  // Memory held by one cache; returned to the pool when destroyed.
  class Lease {
   public:
    Lease() = default;
    Lease(Lease&& o) noexcept { *this = std::move(o); }
    Lease& operator=(Lease&& o) noexcept;
    ~Lease();
    // Grows or shrinks the lease; RESOURCE_EXHAUSTED (nothing changed) if growth does not fit.
    absl::Status Resize(size_t bytes, int64_t token_slots);
    size_t bytes() const { return bytes_; }
    int64_t token_slots() const { return slots_; }

   private:
    friend class KvPool;
    KvPool* pool_ = nullptr;
    size_t bytes_ = 0;
    int64_t slots_ = 0;
    bool counted_ = false;  // counted in leases()
  };

  // An empty lease of this pool (grow it with Resize).
  Lease NewLease() {
    Lease l;
    l.pool_ = this;
    return l;
  }

  size_t capacity_bytes() const { return capacity_; }
  kernels::Allocator* memory() const { return memory_; }
  size_t used_bytes() const;
  size_t peak_bytes() const;
  int64_t used_token_slots() const;
  int64_t leases() const;

 private:
  absl::Status Change(size_t old_bytes, size_t new_bytes, int64_t old_slots, int64_t new_slots,
                      int lease_delta);

  const size_t capacity_;
  kernels::Allocator* const memory_;
  mutable std::mutex mu_;
  size_t used_ = 0;
  size_t peak_ = 0;
  int64_t slots_ = 0;
  int64_t leases_ = 0;
};

}  // namespace kvgate::cache
