#include "coordinator/planner.h"

#include <algorithm>
#include <numeric>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace kvgate::coordinator {

absl::StatusOr<std::vector<LayerRange>> PlanLayers(int num_layers,
                                                   const std::vector<int64_t>& memories) {
  const int n = static_cast<int>(memories.size());
  if (n < 1) return absl::InvalidArgumentError("no workers to plan for");
  if (n > num_layers) {
    return absl::InvalidArgumentError(absl::StrCat(n, " stages for a model of ", num_layers,
                                                   " layers: every stage needs a layer"));
  }
  double total = 0;
  for (int64_t m : memories) total += static_cast<double>(std::max<int64_t>(m, 1));
  // Largest remainder over the proportional shares, at least one layer each.
  std::vector<int> count(static_cast<size_t>(n), 1);
  int left = num_layers - n;
  std::vector<std::pair<double, int>> rest;
  for (int i = 0; i < n; ++i) {
    const double share =
        static_cast<double>(std::max<int64_t>(memories[static_cast<size_t>(i)], 1)) / total *
            num_layers -
        1.0;
    const int whole = std::clamp(static_cast<int>(share), 0, left);
    count[static_cast<size_t>(i)] += whole;
    left -= whole;
    rest.push_back({share - whole, -i});
  }
  std::sort(rest.rbegin(), rest.rend());
  for (size_t k = 0; left > 0; k = (k + 1) % rest.size(), --left) {
    ++count[static_cast<size_t>(-rest[k].second)];
  }
  std::vector<LayerRange> out;
  int first = 0;
  for (int c : count) {
    out.push_back({first, first + c});
    first += c;
  }
  return out;
}

absl::StatusOr<std::vector<LayerRange>> ParseLayerSplit(const std::string& text, int num_layers,
                                                        int stages) {
  std::vector<LayerRange> out;
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    std::vector<std::string> ends = absl::StrSplit(part, '-');
    int a = 0, b = 0;
    if (ends.size() != 2 || !absl::SimpleAtoi(ends[0], &a) || !absl::SimpleAtoi(ends[1], &b)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--layers: '", part, "' is not a range like 0-12 (first-last, exclusive)"));
    }
    out.push_back({a, b});
  }
  if (static_cast<int>(out.size()) != stages) {
    return absl::InvalidArgumentError(
        absl::StrCat("--layers: ", out.size(), " ranges for ", stages, " stages"));
  }
  int expect = 0;
  for (const LayerRange& r : out) {
    if (r.first != expect || r.second <= r.first) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--layers: ranges must be contiguous and non-empty from 0; '", text, "' is not"));
    }
    expect = r.second;
  }
  if (expect != num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("--layers: '", text, "' ends at ", expect, ", the model has ", num_layers));
  }
  return out;
}

int64_t FullCacheTokens(int64_t tokens, int64_t max_context) {
  return std::min(max_context, std::max<int64_t>(64, 2 * tokens));
}

int64_t MinBudget(const cache::EvictionParams& kv) { return kv.min_budget(); }

int64_t StageCapacity::bytes_per_slot() const {
  return std::accumulate(bytes_per_token.begin(), bytes_per_token.end(), int64_t{0});
}

int64_t SlotsPerSequence(const StageCapacity& stage, int64_t max_batch) {
  const int64_t per_slot = stage.bytes_per_slot();
  if (per_slot <= 0 || max_batch <= 0) return 0;
  return stage.kv_capacity_bytes / (max_batch * per_slot);
}

int64_t GrantBytes(const cache::EvictionParams& kv, const std::vector<int64_t>& layer_budgets,
                   const std::vector<int64_t>& bytes_per_token) {
  int64_t bytes = 0;
  for (size_t l = 0; l < layer_budgets.size() && l < bytes_per_token.size(); ++l) {
    bytes += kv.slab_slots(layer_budgets[l]) * bytes_per_token[l];
  }
  return bytes;
}

absl::StatusOr<std::vector<StageGrant>> GrantBudgets(const cache::EvictionParams& kv,
                                                     int64_t tokens, int64_t max_context,
                                                     const std::vector<StageCapacity>& stages,
                                                     int64_t max_batch) {
  std::vector<StageGrant> out;
  const bool full = !kv.evicts();
  int64_t model_layers = 0;
  for (const StageCapacity& s : stages) {
    model_layers = std::max<int64_t>(
        model_layers, s.first_layer + static_cast<int64_t>(s.bytes_per_token.size()));
  }
  const cache::EvictionParams& want = kv;
  for (size_t i = 0; i < stages.size(); ++i) {
    const StageCapacity& s = stages[i];
    const int64_t count = static_cast<int64_t>(s.bytes_per_token.size());
    StageGrant g;
    if (full) {
      g.bytes = FullCacheTokens(tokens, max_context) * s.bytes_per_slot();
      if (g.bytes > s.kv_capacity_bytes) {
        return absl::ResourceExhaustedError(
            absl::StrCat("kv: a full cache of ", tokens, " tokens needs ", g.bytes,
                         " bytes on stage ", i, ", which has ", s.kv_capacity_bytes,
                         " bytes for KV; use an evicting policy with a "
                         "budget, or fewer max_tokens"));
      }
      g.layer_budgets.assign(s.bytes_per_token.size(), 0);
      out.push_back(std::move(g));
      continue;
    }
    // The largest mean budget (<= the request's) whose layer budgets fit what the stage can
    // give one of max_batch sequences: bytes grow with it, so a binary search.
    const int64_t room = max_batch > 0 ? s.kv_capacity_bytes / max_batch : 0;
    auto layers_for = [&](int64_t mean) {
      cache::EvictionParams p = want;
      p.budget = mean;
      return cache::LayerBudgets(p, s.first_layer, count, model_layers);
    };
    int64_t lo = 0, hi = kv.budget;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo + 1) / 2;
      if (GrantBytes(want, layers_for(mid), s.bytes_per_token) <= room) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    g.budget = lo;
    cache::EvictionParams granted = want;
    granted.budget = g.budget;
    if (g.budget < 1 || !granted.Validate().ok()) {
      const int64_t slots = SlotsPerSequence(s, max_batch);
      return absl::ResourceExhaustedError(absl::StrCat(
          "kv: stage ", i, " can give each of ", max_batch, " sequences ", slots,
          " token slots per layer and KV head; the policy's chunk and slack take ", kv.slab_extra(),
          want.whole_prefill() ? absl::StrCat(", whole-prompt prefill holds the ",
                                              want.prompt_tokens, " prompt tokens")
                               : "",
          " and it needs a budget of at least ", MinBudget(kv),
          "; lower kv.chunk, the server's --max-batch",
          want.whole_prefill() ? ", or use chunked prefill" : ""));
    }
    for (int64_t b : layers_for(g.budget)) {
      const size_t l = g.layer_budgets.size();
      const int64_t cap = l < s.layer_caps.size() ? s.layer_caps[l] : 0;
      g.layer_budgets.push_back(cap > 0 ? std::max(std::min(b, cap), MinBudget(kv)) : b);
    }
    g.bytes = GrantBytes(want, g.layer_budgets, s.bytes_per_token);
    out.push_back(std::move(g));
  }
  return out;
}

}  // namespace kvgate::coordinator
