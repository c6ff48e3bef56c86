#include <algorithm>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cache/kv_cache.h"
#include "common/status.h"

namespace kvgate::cache {
namespace {

class FullKvCache final : public KvCache {
 public:
  FullKvCache(const KvCacheShape& shape, int64_t max_tokens, kernels::Backend* backend,
              KvPool* pool)
      : shape_(shape),
        max_tokens_(max_tokens),
        backend_(backend),
        memory_(pool != nullptr && pool->memory() != nullptr ? pool->memory() : backend),
        layers_(static_cast<size_t>(shape.num_layers)),
        lease_(pool != nullptr ? pool->NewLease() : KvPool::Lease()) {}

  const KvCacheShape& shape() const override { return shape_; }

  absl::Status Reserve(int64_t n) override {
    const int64_t need = len_ + n;
    if (need > max_tokens_) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "KV cache full: ", need, " tokens needed, at most ", max_tokens_, " allowed"));
    }
    if (need <= capacity_) return absl::OkStatus();
    int64_t new_cap = std::min(max_tokens_, std::max(need, std::max<int64_t>(64, 2 * capacity_)));
    const int64_t d = shape_.head_dim, h = shape_.num_kv_heads;
    const int64_t slots_per_token = shape_.num_layers * h;
    auto bytes = [&](int64_t cap) {
      return static_cast<size_t>(slots_per_token * cap) * shape_.slot_bytes();
    };
    if (!lease_.Resize(bytes(new_cap), slots_per_token * new_cap).ok()) {
      new_cap = need;  // no head room left in the pool: grow exactly
      RETURN_IF_ERROR(lease_.Resize(bytes(new_cap), slots_per_token * new_cap));
    }
    const size_t row_bytes = static_cast<size_t>(d) * DTypeSize(shape_.dtype);
    absl::Status grew = Grow(new_cap, row_bytes);
    if (!grew.ok()) {  // out of device memory: the lease goes back to what is held
      lease_.Resize(bytes(capacity_), slots_per_token * capacity_).IgnoreError();
      return grew;
    }
    return absl::OkStatus();
  }

  absl::Status Grow(int64_t new_cap, size_t row_bytes) {
    const int64_t d = shape_.head_dim, h = shape_.num_kv_heads;
    std::vector<Layer> grown(layers_.size());
    for (size_t l = 0; l < layers_.size(); ++l) {
      Layer& old = layers_[l];
      Layer& g = grown[l];
      ASSIGN_OR_RETURN(g.k, memory_->Alloc(h * new_cap * d, shape_.dtype));
      ASSIGN_OR_RETURN(g.v, memory_->Alloc(h * new_cap * d, shape_.dtype));
      g.pos.resize(static_cast<size_t>(h * new_cap));
      g.len = old.len;
      for (int64_t head = 0; head < h && old.len > 0; ++head) {
        const size_t from = static_cast<size_t>(head * capacity_) * row_bytes;
        const size_t to = static_cast<size_t>(head * new_cap) * row_bytes;
        const size_t count = static_cast<size_t>(old.len) * row_bytes;
        RETURN_IF_ERROR(
            backend_->CopyOnDevice(g.k.as<uint8_t>() + to, old.k.as<uint8_t>() + from, count));
        RETURN_IF_ERROR(
            backend_->CopyOnDevice(g.v.as<uint8_t>() + to, old.v.as<uint8_t>() + from, count));
        std::copy_n(&old.pos[static_cast<size_t>(head * capacity_)], old.len,
                    &g.pos[static_cast<size_t>(head * new_cap)]);
      }
    }
    layers_ = std::move(grown);
    capacity_ = new_cap;
    return absl::OkStatus();
  }

  void Append(int64_t layer_idx, const float* k, const float* v, const int32_t* positions,
              int64_t n) override {
    Layer& layer = layers_[static_cast<size_t>(layer_idx)];
    KVGATE_CHECK(layer.len + n <= capacity_);
    const int64_t h = shape_.num_kv_heads;
    slots_.resize(static_cast<size_t>(h));
    for (int64_t head = 0; head < h; ++head) {
      const size_t row = static_cast<size_t>(head * capacity_ + layer.len);
      slots_[static_cast<size_t>(head)] =
          kernels::KvHeadSlot{RowPtr(layer.k, row), RowPtr(layer.v, row), shape_.dtype};
      std::copy_n(positions, n, &layer.pos[row]);
    }
    backend_->AppendKv(k, v, n, h, shape_.head_dim, slots_.data());
    layer.len += n;
    // The sequence length advances when the last layer has its tokens.
    if (layer_idx == shape_.num_layers - 1) len_ = layer.len;
  }

  kernels::KvHeadView View(int64_t layer_idx, int64_t kv_head) const override {
    const Layer& layer = layers_[static_cast<size_t>(layer_idx)];
    const size_t row = static_cast<size_t>(kv_head * capacity_);
    return kernels::KvHeadView{
        RowPtr(layer.k, row), RowPtr(layer.v, row), layer.len, shape_.head_dim, nullptr,
        shape_.dtype};
  }

  const int32_t* Positions(int64_t layer_idx, int64_t kv_head) const override {
    return layers_[static_cast<size_t>(layer_idx)].pos.data() + kv_head * capacity_;
  }

  int64_t num_tokens_seen() const override { return len_; }
  size_t bytes_reserved() const override {
    return static_cast<size_t>(shape_.num_layers * shape_.num_kv_heads * capacity_) *
           shape_.slot_bytes();
  }
  Stats stats() const override { return Stats{len_, len_, 0, bytes_reserved()}; }
  size_t bytes_used() const override {
    return static_cast<size_t>(shape_.num_layers * shape_.num_kv_heads * len_) *
           shape_.slot_bytes();
  }

 private:
  struct Layer {
    kernels::DeviceBuffer k, v;  // [num_kv_heads, capacity, head_dim] of dtype, backend memory
    std::vector<int32_t> pos;    // [num_kv_heads, capacity], host
    int64_t len = 0;
  };
  void* RowPtr(const kernels::DeviceBuffer& b, size_t row) const {
    return b.as<uint8_t>() + row * static_cast<size_t>(shape_.head_dim) * DTypeSize(shape_.dtype);
  }

  KvCacheShape shape_;
  int64_t max_tokens_;
  kernels::Backend* backend_;
  kernels::Allocator* memory_;  // K/V slabs: the pool's arena, or the backend
  int64_t capacity_ = 0;
  std::vector<Layer> layers_;
  KvPool::Lease lease_;
  int64_t len_ = 0;
  std::vector<kernels::KvHeadSlot> slots_;
};

}  // namespace

std::unique_ptr<KvCache> MakeFullKvCache(const KvCacheShape& shape, int64_t max_tokens,
                                         kernels::Backend* backend, KvPool* pool) {
  return std::make_unique<FullKvCache>(shape, max_tokens, backend, pool);
}

}  // namespace kvgate::cache
