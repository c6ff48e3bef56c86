// How a sequence's KV budget is spread over layers and KV heads (ARCHITECTURE.md section 4.3):
// `uniform` (every layer and head the same budget), `pyramid` (PyramidKV: lower layers more,
// linearly, the mean unchanged) and `adaptive` (Ada-KV: within a layer, the heads share the
// layer's n_kv * budget slots by score mass, each keeping at least a floor). The layer budgets
// are computed here, once, for the cache and for the coordinator's grants alike; the per-head
// split happens at eviction time in the cache (cache/evicting_kv_cache.cc).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace kvgate::cache {

struct EvictionParams;

// The allocations, in the order of the docs.
const std::vector<std::string>& AllocationNames();

// PyramidKV's schedule over `num_layers` layers with mean `mean` tokens per (layer, KV head):
// linear from max = 2 mean - min at layer 0 down to min = mean / beta at the last layer, each
// at least `floor`, summing to at most num_layers * mean (exactly, unless `floor` forces more
// than the mean allows, in which case every layer gets `floor`).
std::vector<int64_t> PyramidBudgets(int64_t mean, int64_t num_layers, double beta, int64_t floor);

// The budget of each of `count` layers from the model's layer `first_layer` on (of
// `model_layers`), for `params` (its allocation, budget and policy minimum).
std::vector<int64_t> LayerBudgets(const EvictionParams& params, int64_t first_layer, int64_t count,
                                  int64_t model_layers);

}  // namespace kvgate::cache
