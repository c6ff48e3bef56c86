// A KV cache that never holds more than its budget per (layer, KV head) after an eviction
// step. Memory layout (see docs/kv_cache.md): per layer, one fixed slab per KV head of
// `budget + slab_extra` token slots for K and V ([slots, head_dim] of the shape's dtype, in
// backend memory), with the original positions and policy scores as host metadata, all
// reserved up front, so a sequence's memory is bounded by its budget whatever the prompt
// length. Eviction selects on the host (scores are metadata) and compacts each head's slab in
// place with the backend's CompactKv, keeping cache order, so attention reads every head's
// retained tokens contiguously; lengths are ragged per head.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "cache/eviction/policy.h"
#include "cache/kv_cache.h"

namespace kvgate::cache {

// `params.policy` must not be "full" and `params.budget` must be > 0 (validated).
// `rotation` (the model's key re-rotation) is required under position re-assignment.
// Learned policies need params.device_weights (model::EvictionWeightsCache sets them).
// With a pool, the whole slab is leased from it up front (RESOURCE_EXHAUSTED if it does not
// fit) and returned when the cache is destroyed. `backend` is borrowed; it must outlive the
// cache.
absl::StatusOr<std::unique_ptr<KvCache>> MakeEvictingKvCache(const KvCacheShape& shape,
                                                             const EvictionParams& params,
                                                             kernels::Backend* backend,
                                                             const KeyRotation& rotation = {},
                                                             KvPool* pool = nullptr);

// The cache for `params`: the plain cache (up to `max_tokens`) for "full" without a budget,
// else the evicting cache.
absl::StatusOr<std::unique_ptr<KvCache>> MakeKvCache(const KvCacheShape& shape,
                                                     const EvictionParams& params,
                                                     int64_t max_tokens, kernels::Backend* backend,
                                                     const KeyRotation& rotation = {},
                                                     KvPool* pool = nullptr);

}  // namespace kvgate::cache
