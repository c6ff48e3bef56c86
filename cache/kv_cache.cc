#include "cache/kv_cache.h"

#include "common/status.h"

namespace kvgate::cache {

absl::StatusOr<const KvCache::StepContext*> KvCache::Prepare(const int32_t* positions, int64_t n) {
  RETURN_IF_ERROR(Reserve(n));
  const KvCacheShape& s = shape();
  ctx_.n = n;
  ctx_.rope_positions.resize(static_cast<size_t>(n));
  RopePositions(positions, n, ctx_.rope_positions.data());
  ctx_.head_deltas.resize(static_cast<size_t>(s.num_layers * s.num_kv_heads));
  bool any_delta = false;
  for (int64_t l = 0; l < s.num_layers; ++l) {
    for (int64_t h = 0; h < s.num_kv_heads; ++h) {
      const int32_t d = RopeHeadDelta(l, h);
      ctx_.head_deltas[static_cast<size_t>(l * s.num_kv_heads + h)] = d;
      any_delta |= d != 0;
    }
  }
  if (!any_delta) ctx_.head_deltas.clear();  // capacity kept for the next step
  ctx_.mass = mass_request(0, n);
  ctx_.views.resize(static_cast<size_t>(s.num_layers * s.num_kv_heads));
  for (int64_t l = 0; l < s.num_layers; ++l) {
    for (int64_t h = 0; h < s.num_kv_heads; ++h) {
      ctx_.views[static_cast<size_t>(l * s.num_kv_heads + h)] = AttentionView(l, h, n);
    }
  }
  return &ctx_;
}

}  // namespace kvgate::cache
