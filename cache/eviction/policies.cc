// The policies of EVICTION.md: streaming (StreamingLLM), h2o, snapkv, tova, expected-attention,
// locret and attention-gate.
#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cache/budget_allocation.h"
#include "cache/eviction/policy.h"
#include "common/status.h"

namespace kvgate::cache {
namespace {

constexpr float kKeep = std::numeric_limits<float>::infinity();

// Sinks and the most recent tokens.
class StreamingPolicy final : public EvictionPolicy {
 public:
  explicit StreamingPolicy(int64_t sinks) : sinks_(sinks) {}
  std::string name() const override { return "streaming"; }
  void Priorities(const HeadTokens& head, int64_t budget, float* priority) const override {
    for (int64_t j = 0; j < head.len; ++j) priority[j] = j < sinks_ ? kKeep : static_cast<float>(j);
  }

 private:
  int64_t sinks_;
};

// Heavy hitters by accumulated attention, plus a recent window: heavy = recent = budget / 2.
class H2oPolicy final : public EvictionPolicy {
 public:
  std::string name() const override { return "h2o"; }
  std::optional<int64_t> MassFirstQuery(int64_t n_new) const override { return 0; }
  void Observe(HeadTokens& head) const override {
    for (int64_t j = 0; j < head.len; ++j) head.scores[j] += head.mass[j];
  }
  void Priorities(const HeadTokens& head, int64_t budget, float* priority) const override {
    const int64_t recent = budget - budget / 2;
    for (int64_t j = 0; j < head.len; ++j) {
      priority[j] = j >= head.len - recent ? kKeep : head.scores[j];
    }
  }
};

// Votes of the last `window` queries of each prefill chunk (accumulated over decode queries),
// pooled over neighbouring tokens outside the window (as SnapKV's code and kvpress pool the
// prefix only, the window's own scores do not leak into its neighbours); the window is kept.
class SnapKvPolicy final : public EvictionPolicy {
 public:
  SnapKvPolicy(int64_t window, int64_t kernel, bool max_pool)
      : window_(window), kernel_(kernel), max_pool_(max_pool) {}
  std::string name() const override { return "snapkv"; }
  std::optional<int64_t> MassFirstQuery(int64_t n_new) const override {
    return std::max<int64_t>(0, n_new - window_);
  }
  void Observe(HeadTokens& head) const override {
    for (int64_t j = 0; j < head.len; ++j) {
      head.scores[j] = head.n_new > 1 ? head.mass[j] : head.scores[j] + head.mass[j];
    }
  }
  void Priorities(const HeadTokens& head, int64_t budget, float* priority) const override {
    const int64_t half = kernel_ / 2;
    for (int64_t j = 0; j < head.len; ++j) {
      if (j >= head.len - window_) {
        priority[j] = kKeep;
        continue;
      }
      float acc = max_pool_ ? -std::numeric_limits<float>::infinity() : 0.f;
      for (int64_t t = j - half; t <= j + half; ++t) {
        if (t < 0 || t >= head.len - window_) continue;  // padding: -inf for max, 0 for average
        acc = max_pool_ ? std::max(acc, head.scores[t]) : acc + head.scores[t];
      }
      priority[j] = max_pool_ ? acc : acc / static_cast<float>(kernel_);
    }
  }

 private:
  int64_t window_, kernel_;
  bool max_pool_;
};

// The last query's attention averaged over all heads of the layer; one set per layer.
class TovaPolicy final : public EvictionPolicy {
 public:
  std::string name() const override { return "tova"; }
  std::optional<int64_t> MassFirstQuery(int64_t n_new) const override { return n_new - 1; }
  void Observe(HeadTokens& head) const override {
    std::copy(head.mass, head.mass + head.len, head.scores);
  }
  void Priorities(const HeadTokens& head, int64_t budget, float* priority) const override {
    std::copy(head.scores, head.scores + head.len, priority);
  }
  bool layer_wise() const override { return true; }
  bool evict_every_step() const override { return true; }
};

// Expected Attention: the cache fills each retained token's stored score with the attention
// future queries are expected to pay it (KvCache computes it from the queries' statistics
// right before an eviction); the sinks are kept.
class ExpectedAttentionPolicy final : public EvictionPolicy {
 public:
  explicit ExpectedAttentionPolicy(int64_t sinks) : sinks_(sinks) {}
  std::string name() const override { return "expected-attention"; }
  void Priorities(const HeadTokens& head, int64_t budget, float* priority) const override {
    for (int64_t j = 0; j < head.len; ++j) {
      priority[j] = head.positions[j] < sinks_ ? kKeep : head.scores[j];
    }
  }

 private:
  int64_t sinks_;
};

// Locret: the retaining head's score of each token, computed once when the token arrives
// (the cache stores it at Append); the most recent `protect_recent` tokens (stabilizers) are
// kept, except after the last prefill chunk.
class LocretPolicy final : public EvictionPolicy {
 public:
  std::string name() const override { return "locret"; }
  void Priorities(const HeadTokens& head, int64_t budget, float* priority) const override {
    for (int64_t j = 0; j < head.len; ++j) {
      priority[j] = j >= head.len - head.protect_recent ? kKeep : head.scores[j];
    }
  }
};

// Attention-Gate: tokens flagged 0 by their gate are dropped by the cache right after their
// step; when a head still holds more than the budget, the highest keep probabilities stay,
// the sequence's first token first.
class AttentionGatePolicy final : public EvictionPolicy {
 public:
  std::string name() const override { return "attention-gate"; }
  void Priorities(const HeadTokens& head, int64_t budget, float* priority) const override {
    for (int64_t j = 0; j < head.len; ++j) {
      priority[j] = head.positions[j] == 0 ? kKeep : head.scores[j];
    }
  }
};

}  // namespace

const std::vector<PolicyTraits>& AllPolicies() {
  static const std::vector<PolicyTraits> all = {
      // kind                       name              evicts mass   learned reassign
      {PolicyKind::kFull, "full", false, false, false, false},
      {PolicyKind::kStreaming, "streaming", true, false, false, true},
      {PolicyKind::kH2o, "h2o", true, true, false, false},
      {PolicyKind::kSnapKv, "snapkv", true, true, false, false},
      {PolicyKind::kTova, "tova", true, true, false, false},
      {PolicyKind::kExpectedAttention, "expected-attention", true, false, false, false},
      {PolicyKind::kLocret, "locret", true, false, true, true},
      {PolicyKind::kAttentionGate, "attention-gate", true, false, true, false},
  };
  return all;
}

const PolicyTraits* FindPolicy(const std::string& name) {
  for (const PolicyTraits& t : AllPolicies()) {
    if (name == t.name) return &t;
  }
  return nullptr;
}

const PolicyTraits& EvictionParams::traits() const {
  const PolicyTraits* t = FindPolicy(policy);
  KVGATE_CHECK(t != nullptr);  // validated at the edge
  return *t;
}

int64_t EvictionParams::min_budget() const {
  switch (kind()) {
    case PolicyKind::kStreaming:
    case PolicyKind::kExpectedAttention:
      return sinks + 1;
    case PolicyKind::kSnapKv:
      return window + 1;
    case PolicyKind::kH2o:
      return 2;
    default:
      return 1;
  }
}

std::vector<std::string> EvictionPolicyNames() {
  std::vector<std::string> names;
  for (const PolicyTraits& t : AllPolicies()) names.push_back(t.name);
  return names;
}

absl::Status EvictionParams::Validate() const {
  const PolicyTraits* t = FindPolicy(policy);
  if (t == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown --kv-policy '", policy,
                     "' (known: ", absl::StrJoin(EvictionPolicyNames(), ", "), ")"));
  }
  const PolicyKind k = t->kind;
  if (budget < 0) return absl::InvalidArgumentError("--kv-budget must be >= 0");
  if (budget > (int64_t{1} << 31)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--kv-budget ", budget, " is larger than any context (at most 2^31 tokens)"));
  }
  if (t->evicts && budget == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--kv-policy ", policy, " needs --kv-budget TOKENS (> 0)"));
  }
  if (chunk < 1) return absl::InvalidArgumentError("--kv-chunk must be >= 1");
  if (decode_slack < 1) return absl::InvalidArgumentError("decode slack must be >= 1");
  if (sinks < 0) return absl::InvalidArgumentError("--kv-sinks must be >= 0");
  if (k == PolicyKind::kStreaming && sinks >= budget) {
    return absl::InvalidArgumentError(
        absl::StrCat("--kv-budget ", budget, " must exceed --kv-sinks ", sinks));
  }
  if (k == PolicyKind::kExpectedAttention) {
    if (sinks >= budget) {
      return absl::InvalidArgumentError(
          absl::StrCat("--kv-budget ", budget, " must exceed --kv-sinks ", sinks));
    }
    if (ea_future < 1 || ea_future > (int64_t{1} << 20)) {
      return absl::InvalidArgumentError("--kv-ea-future must be in [1, 2^20]");
    }
  }
  if (k == PolicyKind::kSnapKv) {
    if (window < 1) return absl::InvalidArgumentError("snapkv window must be >= 1");
    if (window >= budget) {
      return absl::InvalidArgumentError(
          absl::StrCat("--kv-budget ", budget, " must exceed the snapkv window ", window));
    }
    if (pool_kernel < 1 || pool_kernel % 2 == 0) {
      return absl::InvalidArgumentError("snapkv pooling kernel must be odd and >= 1");
    }
  }
  if (k == PolicyKind::kH2o && budget < 2) {
    return absl::InvalidArgumentError("--kv-budget must be >= 2 for h2o (heavy + recent)");
  }
  if (!position.empty() && position != "original" && position != "reassign") {
    return absl::InvalidArgumentError(
        absl::StrCat("--kv-position '", position, "' is not one of original, reassign"));
  }
  if (k == PolicyKind::kLocret) {
    if (weights.empty() && locret == nullptr) {
      return absl::InvalidArgumentError(
          "--kv-policy locret needs --kv-weights FILE (retaining heads, e.g. "
          "models/kvgate-default/locret.safetensors, made by python -m kvgate_train.locret)");
    }
    if (budget <= resolved_stabilizers()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--kv-budget ", budget, " must exceed --kv-stabilizers ", resolved_stabilizers()));
    }
  }
  if (protected_tail < -1) return absl::InvalidArgumentError("--kv-protected-tail must be >= 0");
  if (stabilizers < -1) return absl::InvalidArgumentError("--kv-stabilizers must be >= 0");
  if (k == PolicyKind::kAttentionGate && weights.empty() && gates == nullptr) {
    return absl::InvalidArgumentError(
        "--kv-policy attention-gate needs --kv-weights FILE (gates, e.g. "
        "models/kvgate-default/attention_gate.safetensors, made by python -m "
        "kvgate_train.gates)");
  }
  const std::vector<std::string>& allocations = AllocationNames();
  if (std::find(allocations.begin(), allocations.end(), allocation) == allocations.end()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--kv-allocation '", allocation, "' is not one of ", absl::StrJoin(allocations, ", ")));
  }
  if (allocation == "adaptive" && k == PolicyKind::kStreaming) {
    return absl::InvalidArgumentError(
        "--kv-allocation adaptive shares a layer's budget between heads by score; streaming "
        "scores by position alone (use uniform or pyramid)");
  }
  if (!(pyramid_beta >= 1)) return absl::InvalidArgumentError("pyramid beta must be >= 1");
  if (!(adaptive_floor >= 0 && adaptive_floor <= 1)) {
    return absl::InvalidArgumentError("adaptive floor must be in [0, 1]");
  }
  if (prefill != "chunked" && prefill != "whole") {
    return absl::InvalidArgumentError(
        absl::StrCat("--kv-prefill '", prefill, "' is not one of chunked, whole"));
  }
  if (prompt_tokens < 0 || prompt_tokens > (int64_t{1} << 31)) {
    return absl::InvalidArgumentError("prompt tokens must be in [0, 2^31]");
  }
  if (!weights.empty() && !t->learned) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--kv-weights applies to locret and attention-gate, not to --kv-policy ", policy));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<EvictionPolicy>> MakeEvictionPolicy(const EvictionParams& p) {
  if (absl::Status s = p.Validate(); !s.ok()) return s;
  switch (p.kind()) {
    case PolicyKind::kFull:
      return std::unique_ptr<EvictionPolicy>();
    case PolicyKind::kStreaming:
      return std::unique_ptr<EvictionPolicy>(new StreamingPolicy(p.sinks));
    case PolicyKind::kH2o:
      return std::unique_ptr<EvictionPolicy>(new H2oPolicy());
    case PolicyKind::kSnapKv:
      return std::unique_ptr<EvictionPolicy>(new SnapKvPolicy(p.window, p.pool_kernel, p.pool_max));
    case PolicyKind::kTova:
      return std::unique_ptr<EvictionPolicy>(new TovaPolicy());
    case PolicyKind::kExpectedAttention:
      return std::unique_ptr<EvictionPolicy>(new ExpectedAttentionPolicy(p.sinks));
    case PolicyKind::kLocret:
      if (p.locret == nullptr) {
        return absl::FailedPreconditionError(
            absl::StrCat("locret: the retaining heads of ", p.weights, " are not loaded"));
      }
      return std::unique_ptr<EvictionPolicy>(new LocretPolicy());
    case PolicyKind::kAttentionGate:
      if (p.gates == nullptr) {
        return absl::FailedPreconditionError(
            absl::StrCat("attention-gate: the gates of ", p.weights, " are not loaded"));
      }
      return std::unique_ptr<EvictionPolicy>(new AttentionGatePolicy());
  }
  return absl::UnimplementedError(absl::StrCat("--kv-policy ", p.policy, " is not implemented"));
}

}  // namespace kvgate::cache
