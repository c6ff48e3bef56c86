#include "cache/kv_pool.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace kvgate::cache {

KvPool::Lease& KvPool::Lease::operator=(Lease&& o) noexcept {
  if (this != &o) {
    if (pool_ != nullptr) (void)pool_->Change(bytes_, 0, slots_, 0, counted_ ? -1 : 0);
    pool_ = o.pool_;
    bytes_ = o.bytes_;
    slots_ = o.slots_;
    counted_ = o.counted_;
    o.pool_ = nullptr;
    o.bytes_ = 0;
    o.slots_ = 0;
    o.counted_ = false;
  }
  return *this;
}

KvPool::Lease::~Lease() {
  if (pool_ != nullptr) (void)pool_->Change(bytes_, 0, slots_, 0, counted_ ? -1 : 0);
}

absl::Status KvPool::Lease::Resize(size_t bytes, int64_t token_slots) {
  if (pool_ == nullptr) {
    bytes_ = bytes;
    slots_ = token_slots;
    return absl::OkStatus();
  }
  absl::Status s = pool_->Change(bytes_, bytes, slots_, token_slots, counted_ ? 0 : 1);
  if (s.ok()) {
    bytes_ = bytes;
    slots_ = token_slots;
    counted_ = true;
  }
  return s;
}

absl::Status KvPool::Change(size_t old_bytes, size_t new_bytes, int64_t old_slots,
                            int64_t new_slots, int lease_delta) {
  std::lock_guard<std::mutex> lock(mu_);
  const size_t after = used_ - old_bytes + new_bytes;
  if (new_bytes > old_bytes && capacity_ > 0 && after > capacity_) {
    return absl::ResourceExhaustedError(
        absl::StrCat("KV memory pool: ", new_bytes - old_bytes, " more bytes do not fit (", used_,
                     " of ", capacity_, " bytes in use by ", leases_, " caches)"));
  }
  used_ = after;
  peak_ = std::max(peak_, used_);
  slots_ += new_slots - old_slots;
  leases_ += lease_delta;
  return absl::OkStatus();
}

size_t KvPool::used_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return used_;
}
size_t KvPool::peak_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return peak_;
}
int64_t KvPool::used_token_slots() const {
  std::lock_guard<std::mutex> lock(mu_);
  return slots_;
}
int64_t KvPool::leases() const {
  std::lock_guard<std::mutex> lock(mu_);
  return leases_;
}

}  // namespace kvgate::cache
