// The pipeline planner and the KV budget arithmetic of the coordinator (ARCHITECTURE.md
// sections 2 and 4): which worker holds which layers, and what KV budget each stage grants a
// request. Pure functions; the coordinator's engine applies them.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "cache/budget_allocation.h"
#include "cache/eviction/policy.h"

namespace kvgate::coordinator {

using LayerRange = std::pair<int, int>;  // [first, last)

// Contiguous layer ranges for memories.size() stages, balanced by each worker's memory for
// weights plus KV: stage i gets a share of the layers proportional to memories[i], at least one.
absl::StatusOr<std::vector<LayerRange>> PlanLayers(int num_layers,
                                                   const std::vector<int64_t>& memories);
// The operator's split, "0-2,2-4": `stages` contiguous ranges covering [0, num_layers).
absl::StatusOr<std::vector<LayerRange>> ParseLayerSplit(const std::string& text, int num_layers,
                                                        int stages);

// The most token slots per (layer, KV head) the plain cache grows to for a sequence of
// `tokens` tokens (it grows geometrically from 64, capped at the context).
int64_t FullCacheTokens(int64_t tokens, int64_t max_context);

// The smallest budget `kv`'s policy works with (streaming: its sinks + 1; snapkv: its window +
// 1; h2o: 2; else 1): operator caps and relief never go below it.
int64_t MinBudget(const cache::EvictionParams& kv);

// A stage as the budget negotiation sees it (from the worker's ShardLoaded).
struct StageCapacity {
  int first_layer = 0;
  int64_t kv_capacity_bytes = 0;
  std::vector<int64_t> bytes_per_token;  // per layer of the range, all KV heads, K and V
  std::vector<int64_t> layer_caps;       // operator caps per layer (0: none)
  int64_t bytes_per_slot() const;        // one token slot in every layer of the range
};

// Token slots per (layer, KV head) each of `max_batch` concurrent sequences may reserve on a
// stage: its KV memory shared evenly.
int64_t SlotsPerSequence(const StageCapacity& stage, int64_t max_batch);

struct StageGrant {
  // The stage's mean budget (tokens per layer and KV head, before operator caps); 0: full.
  int64_t budget = 0;
  // Per layer of the range: the allocation's budgets for that mean (uniform: all equal;
  // pyramid: PyramidKV's schedule over the whole model), capped by operator caps.
  std::vector<int64_t> layer_budgets;
  int64_t bytes = 0;  // the most KV bytes the sequence can reserve there
};

// The KV bytes a cache with `kv` and these per-layer budgets reserves (each layer's slab:
// budget + chunk or slack per KV head, or the whole prompt under whole-prompt prefill).
int64_t GrantBytes(const cache::EvictionParams& kv, const std::vector<int64_t>& layer_budgets,
                   const std::vector<int64_t>& bytes_per_token);

// What a request with `kv` and `tokens` = prompt + max_tokens gets on every stage. Evicting
// policies: the requested budget spread over the layers by the allocation, capped by what the
// stage can give one of max_batch sequences and by the operator's layer caps, so a roomy
// stage keeps more than a tight one. Whole-prompt prefill also counts the kv.prompt_tokens
// held until the prompt is compressed. Full: the plain cache's worst-case growth.
// RESOURCE_EXHAUSTED (naming the stage) when a stage can never hold the request.
absl::StatusOr<std::vector<StageGrant>> GrantBudgets(const cache::EvictionParams& kv,
                                                     int64_t tokens, int64_t max_context,
                                                     const std::vector<StageCapacity>& stages,
                                                     int64_t max_batch);

}  // namespace kvgate::coordinator
