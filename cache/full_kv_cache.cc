#include <algorithm>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cache/kv_cache.h"
#include "common/status.h"

namespace kvgate::cache {
namespace {

class FullKvCache final : public KvCache {
 public:
  FullKvCache(const KvCacheShape& shape, int64_t max_tokens, KvPool* pool)
      : shape_(shape),
        max_tokens_(max_tokens),
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
      return static_cast<size_t>(2 * slots_per_token * cap * d) * 4;
    };
    if (!lease_.Resize(bytes(new_cap), slots_per_token * new_cap).ok()) {
      new_cap = need;  // no head room left in the pool: grow exactly
      RETURN_IF_ERROR(lease_.Resize(bytes(new_cap), slots_per_token * new_cap));
    }
    for (Layer& layer : layers_) {
      std::vector<float> k(static_cast<size_t>(h * new_cap * d));
      std::vector<float> v(k.size());
      std::vector<int32_t> pos(static_cast<size_t>(h * new_cap));
      for (int64_t head = 0; head < h; ++head) {
        if (len_ > 0) {
          std::memcpy(&k[head * new_cap * d], &layer.k[head * capacity_ * d], len_ * d * 4);
          std::memcpy(&v[head * new_cap * d], &layer.v[head * capacity_ * d], len_ * d * 4);
          std::memcpy(&pos[head * new_cap], &layer.pos[head * capacity_], len_ * 4);
        }
      }
      layer.k = std::move(k);
      layer.v = std::move(v);
      layer.pos = std::move(pos);
    }
    capacity_ = new_cap;
    return absl::OkStatus();
  }

  void Append(int64_t layer_idx, const float* k, const float* v, const int32_t* positions,
              int64_t n) override {
    Layer& layer = layers_[static_cast<size_t>(layer_idx)];
    KVGATE_CHECK(layer.len + n <= capacity_);
    const int64_t d = shape_.head_dim, h = shape_.num_kv_heads;
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t head = 0; head < h; ++head) {
        const int64_t slot = head * capacity_ + layer.len + i;
        std::memcpy(&layer.k[slot * d], k + (i * h + head) * d, d * 4);
        std::memcpy(&layer.v[slot * d], v + (i * h + head) * d, d * 4);
        layer.pos[slot] = positions[i];
      }
    }
    layer.len += n;
    // The sequence length advances when the last layer has its tokens.
    if (layer_idx == shape_.num_layers - 1) len_ = layer.len;
  }

  kernels::KvHeadView View(int64_t layer_idx, int64_t kv_head) const override {
    const Layer& layer = layers_[static_cast<size_t>(layer_idx)];
    const int64_t d = shape_.head_dim;
    const int64_t off = kv_head * capacity_ * d;
    return kernels::KvHeadView{layer.k.data() + off, layer.v.data() + off, layer.len, d};
  }

  const int32_t* Positions(int64_t layer_idx, int64_t kv_head) const override {
    return layers_[static_cast<size_t>(layer_idx)].pos.data() + kv_head * capacity_;
  }

  int64_t num_tokens_seen() const override { return len_; }
  size_t bytes_reserved() const override {
    return static_cast<size_t>(2 * shape_.num_layers * shape_.num_kv_heads * capacity_ *
                               shape_.head_dim * 4);
  }
  Stats stats() const override { return Stats{len_, len_, 0, bytes_reserved()}; }
  size_t bytes_used() const override {
    return static_cast<size_t>(2 * shape_.num_layers * shape_.num_kv_heads * len_ *
                               shape_.head_dim * 4);
  }

 private:
  struct Layer {
    std::vector<float> k, v;   // [num_kv_heads, capacity, head_dim]
    std::vector<int32_t> pos;  // [num_kv_heads, capacity]
    int64_t len = 0;
  };
  KvCacheShape shape_;
  int64_t max_tokens_;
  int64_t capacity_ = 0;
  KvPool::Lease lease_;
  int64_t len_ = 0;
  std::vector<Layer> layers_;
};

}  // namespace

std::unique_ptr<KvCache> MakeFullKvCache(const KvCacheShape& shape, int64_t max_tokens,
                                         KvPool* pool) {
  return std::make_unique<FullKvCache>(shape, max_tokens, pool);
}

}  // namespace kvgate::cache
