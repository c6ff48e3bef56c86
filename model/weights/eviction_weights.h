// Loading the learned eviction policies' weights (EVICTION.md formats, written by kvgate's
// trainers in training/): Locret retaining heads and Attention-Gate gates. Every tensor is checked
// against the model, so a file made for another model is refused with a one-line error.
#pragma once

#include <map>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "cache/eviction/attention_gates.h"
#include "cache/eviction/device_weights.h"
#include "cache/eviction/locret_heads.h"
#include "cache/eviction/policy.h"
#include "kernels/backend.h"
#include "model/config/model_config.h"

namespace kvgate::model {

// `path`: safetensors with model.layers.{i}.retaining_head.fc1.weight [d_R, (h + 2 n_kv) d]
// and ...fc2.weight [n_kv, d_R] for every layer, metadata kvgate.kind = locret.
absl::StatusOr<std::shared_ptr<const cache::LocretHeads>> LoadLocretHeads(
    const std::string& path, const ModelConfig& config);

// `path`: safetensors with model.layers.{i}.attention_gate.{q,k,v}_proj.weight [H*d, D],
// ...o_proj.weight [n_kv, H*d] and optionally ...o_proj.bias [n_kv]; metadata
// kvgate.kind = attention-gate, kvgate.heads, kvgate.head_dim, kvgate.tau.
absl::StatusOr<std::shared_ptr<const cache::AttentionGates>> LoadAttentionGates(
    const std::string& path, const ModelConfig& config);

// The policy a learned-weights file holds: its metadata kvgate.kind ("locret" or
// "attention-gate"); INVALID_ARGUMENT when it is neither or the file is not safetensors.
absl::StatusOr<std::string> ReadEvictionWeightsKind(const std::string& path);

// The learned weights of every file used so far, loaded once and shared by all the caches that
// name it (a process serving many sequences reads each file once).
class EvictionWeightsCache {
 public:
  // Sets params->locret (locret) or params->gates (attention-gate) from params->weights,
  // loading the file on first use, and params->device_weights, their copy in `backend`'s
  // memory (uploaded once per file; one cache serves one backend). Other policies are left as
  // they are.
  absl::Status Resolve(cache::EvictionParams* params, const ModelConfig& config,
                       kernels::Backend* backend);
  void Clear() {
    device_.clear();
    locret_.clear();
    gates_.clear();
    sealed_ = false;
  }
  // From now on Resolve refuses a file it has not loaded yet (FAILED_PRECONDITION): a worker
  // loads the registered weights with its shard and never opens another file for a request.
  void Seal() { sealed_ = true; }

 private:
  struct Uploaded {
    std::shared_ptr<const cache::LocretHeads> locret;
    std::shared_ptr<const cache::AttentionGates> gates;
    std::shared_ptr<const cache::DeviceEvictionWeights> device;
  };
  std::map<const void*, Uploaded> device_;                                     // by host weights
  std::map<std::string, std::shared_ptr<const cache::LocretHeads>> locret_;    // by path
  std::map<std::string, std::shared_ptr<const cache::AttentionGates>> gates_;  // by path
  bool sealed_ = false;
};

}  // namespace kvgate::model
