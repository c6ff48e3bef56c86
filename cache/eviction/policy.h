// Eviction policies: small strategy objects that score a (layer, KV head)'s retained tokens.
// The cache (cache/evicting_kv_cache.h) owns the memory, the "never exceed the budget" rule and
// the selection (keep the top `budget` priorities, stable in cache order); a policy only says
// what it needs from attention, how it updates its stored scores, and each token's priority.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "cache/eviction/attention_gates.h"
#include "cache/eviction/device_weights.h"
#include "cache/eviction/locret_heads.h"

namespace kvgate::cache {

// The policies of EVICTION.md, and what each needs and does: answered here, once, instead of
// by comparing policy names across the cache, the model and the coordinator.
enum class PolicyKind {
  kFull,
  kStreaming,
  kH2o,
  kSnapKv,
  kTova,
  kExpectedAttention,
  kLocret,
  kAttentionGate
};

struct PolicyTraits {
  PolicyKind kind;
  const char* name;          // as --kv-policy and the API spell it
  bool evicts;               // every policy but full
  bool needs_mass;           // reads the attention-mass side output (H2O, SnapKV, TOVA)
  bool learned;              // needs a weights file (--kv-weights)
  bool reassign_by_default;  // position re-assignment unless --kv-position says otherwise
};

// Every policy, in the order of the docs.
const std::vector<PolicyTraits>& AllPolicies();
// The traits of `name`, or nullptr when no policy has that name.
const PolicyTraits* FindPolicy(const std::string& name);

struct EvictionParams {
  // full, streaming, h2o, snapkv, tova, expected-attention, locret, attention-gate
  std::string policy = "full";
  int64_t budget = 0;         // retained tokens per (sequence, layer, KV head); 0: no limit
  int64_t chunk = 512;        // prefill chunk size B when a budget is set
  int64_t sinks = 4;          // streaming, expected-attention: attention sinks kept
  int64_t decode_slack = 16;  // decode evicts back to the budget at budget + slack
  int64_t window = 32;        // snapkv: observation window w (kept whole)
  int64_t pool_kernel = 5;    // snapkv: pooling kernel over cache order
  bool pool_max = true;       // snapkv: max pooling (false: average)
  // expected-attention: the future query positions averaged over (n_future) and whether the
  // queries' covariance enters the expected scores (as well as their mean).
  int64_t ea_future = 512;
  bool ea_covariance = true;
  // original (post-RoPE keys at their original positions) | reassign (contiguous positions
  // over the retained set) | "": the policy's default (reassign for streaming and locret).
  std::string position;
  // locret: stabilizers n_s (the most recent tokens kept at each prefill eviction; -1: 40% of
  // the budget, as EVICTION.md suggests for small budgets).
  int64_t stabilizers = -1;
  // The protected prompt tail: the prompt's last tokens, prefilled after the last eviction and
  // never evicted at prefill (locret's n_loc; for any policy, a question kept out of
  // compression, as kvpress's benchmarks do). -1: the policy's default (locret 100, else 0).
  int64_t protected_tail = -1;
  // locret / attention-gate: the weights file (--kv-weights) and, once loaded by the model
  // (model/weights/eviction_weights.h), the weights themselves.
  std::string weights;
  std::shared_ptr<const LocretHeads> locret;
  std::shared_ptr<const AttentionGates> gates;
  // The same weights in the cache's backend memory (uploaded once per file and backend).
  std::shared_ptr<const DeviceEvictionWeights> device_weights;
  // Per-layer budgets of the cache's layers (each <= budget, which sizes the slab); empty:
  // `budget` everywhere. Set by the coordinator's budget negotiation (operator layer caps).
  std::vector<int64_t> layer_budgets;
  // How the budget is spread (cache/budget_allocation.h): uniform | pyramid (more to lower
  // layers, PyramidKV) | adaptive (per KV head within a layer by score mass, Ada-KV).
  std::string allocation = "uniform";
  double pyramid_beta = 20;     // pyramid: the last layer keeps mean / beta (PyramidKV's 20)
  double adaptive_floor = 0.2;  // adaptive: each head keeps at least this share of the budget
  // chunked (evict after every prefill chunk: memory bounded by budget + chunk) | whole
  // (prefill the whole prompt with the full cache, then compress once to the budget: memory
  // that of the whole prompt until then).
  std::string prefill = "chunked";
  // whole: the prompt's length, which sizes the slab up front (it grows if a fill is longer).
  int64_t prompt_tokens = 0;

  // What the named policy is and does. REQUIRES: Validate() passed (a known name).
  const PolicyTraits& traits() const;
  PolicyKind kind() const { return traits().kind; }
  bool evicts() const { return traits().evicts; }
  bool learned() const { return traits().learned; }
  bool needs_mass() const { return traits().needs_mass; }
  // The smallest budget the policy works with (its fixed parts: sinks, window, heavy+recent).
  int64_t min_budget() const;
  // The prompt tail prefill runs after the last evicting chunk (locret's n_loc; 0 otherwise).
  int64_t prompt_tail() const {
    if (protected_tail >= 0) return evicts() ? protected_tail : 0;
    return kind() == PolicyKind::kLocret ? 100 : 0;
  }
  // Token slots per (layer, KV head) the evicting cache holds beyond the budget: a prefill
  // chunk, or the protected tail plus the decode slack.
  int64_t slab_extra() const { return std::max(chunk, prompt_tail() + decode_slack); }
  // Token slots per KV head of a layer with budget `layer_budget` when the cache is made (the
  // whole prompt, for whole-prompt prefill).
  int64_t slab_slots(int64_t layer_budget) const {
    return (whole_prefill() ? std::max(layer_budget, prompt_tokens) : layer_budget) + slab_extra();
  }
  bool whole_prefill() const { return prefill == "whole"; }
  bool adaptive() const { return allocation == "adaptive"; }

  // The stabilizers in force (for a layer with budget `layer_budget`).
  int64_t resolved_stabilizers() const { return resolved_stabilizers(budget); }
  int64_t resolved_stabilizers(int64_t layer_budget) const {
    return stabilizers >= 0 ? stabilizers : (layer_budget * 2) / 5;
  }
  // The position mode in force: `position`, or the policy's default.
  std::string position_mode() const {
    if (!position.empty()) return position;
    return traits().reassign_by_default ? "reassign" : "original";
  }
  // INVALID_ARGUMENT naming the flag when values are inconsistent.
  absl::Status Validate() const;
};

// All policy names, in the order of the docs.
std::vector<std::string> EvictionPolicyNames();

// One (layer, KV head)'s retained tokens, as the cache shows them to a policy.
struct HeadTokens {
  int64_t len = 0;                     // retained tokens, this step's new ones last
  int64_t n_new = 0;                   // tokens appended this step
  const int32_t* positions = nullptr;  // [len] original positions
  float* scores = nullptr;             // [len] the policy's stored scores (new ones start at 0)
  const float* mass = nullptr;         // [len] this step's attention mass, or nullptr
  int64_t protect_recent = 0;          // locret: the most recent tokens that count as kept
};

class EvictionPolicy {
 public:
  virtual ~EvictionPolicy() = default;
  virtual std::string name() const = 0;
  // The first query of a step of `n_new` tokens whose attention mass the policy reads;
  // nullopt: it needs none (the attention fast path).
  virtual std::optional<int64_t> MassFirstQuery(int64_t n_new) const { return std::nullopt; }
  // Updates the stored scores after every step's attention, evicting or not.
  virtual void Observe(HeadTokens& head) const {}
  // Fills priority [len] for an eviction down to `budget`: the cache keeps the `budget`
  // highest (infinity: always kept if room), ties going to the more recent token.
  virtual void Priorities(const HeadTokens& head, int64_t budget, float* priority) const = 0;
  // One kept set for all KV heads of a layer (priorities summed over heads), as TOVA.
  virtual bool layer_wise() const { return false; }
  // Evict at every step over budget, not only after prefill chunks and at budget + slack.
  virtual bool evict_every_step() const { return false; }
};

// The policy named in `params` (validated). `full` has no policy object: returns nullptr.
absl::StatusOr<std::unique_ptr<EvictionPolicy>> MakeEvictionPolicy(const EvictionParams& params);

}  // namespace kvgate::cache
