// The learned eviction weights (Locret retaining heads, Attention-Gate gates) in a backend's
// memory, as the backend's scoring ops read them. Uploaded once per weights file and backend
// (model::EvictionWeightsCache); on a backend that reads host memory the views point at the
// host copies and nothing is copied.
#pragma once

#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "cache/eviction/attention_gates.h"
#include "cache/eviction/locret_heads.h"
#include "kernels/backend.h"

namespace kvgate::cache {

struct DeviceEvictionWeights {
  std::vector<kernels::LocretLayerWeights> locret;  // [model layers], locret only
  std::vector<kernels::GateLayerWeights> gates;     // [model layers], attention-gate only
  std::vector<kernels::DeviceBuffer> storage;       // what the views point at, when copied
};

// `locret` or `gates` (either may be null) in `backend` memory. The host weights must outlive
// the result (views may point at them); `backend` must too.
absl::StatusOr<std::shared_ptr<const DeviceEvictionWeights>> UploadEvictionWeights(
    std::shared_ptr<const LocretHeads> locret, std::shared_ptr<const AttentionGates> gates,
    kernels::Backend* backend);

}  // namespace kvgate::cache
