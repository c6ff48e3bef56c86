#include "coordinator/scheduler.h"

#include <algorithm>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/log.h"
#include "proto/grpc_status.h"

namespace kvgate::coordinator {

Scheduler::Admission Scheduler::Admit(const Job& job,
                                      std::chrono::system_clock::time_point now) const {
  Admission a;
  const model::GenerateOptions& opt = job.prepared.options;
  std::vector<int64_t> admitted;
  const std::vector<StageCapacity> caps = cluster_->Capacities(&admitted);
  absl::StatusOr<std::vector<StageGrant>> grants =
      GrantBudgets(opt.kv, static_cast<int64_t>(job.prepared.prompt_ids.size()) + opt.max_tokens,
                   max_context_, caps, max_batch_);
  if (!grants.ok()) {
    a.kind = Admission::kFail;
    a.error = ToGrpc(grants.status());
    return a;
  }
  int short_stage = -1;
  for (size_t s = 0; s < caps.size(); ++s) {
    if (admitted[s] + (*grants)[s].bytes > caps[s].kv_capacity_bytes) {
      short_stage = static_cast<int>(s);
    }
  }
  if (short_stage < 0) {
    a.kind = Admission::kAdmit;
    a.grants = *std::move(grants);
    return a;
  }
  if (job.deadline - now < kDeadlineMargin) {
    const size_t s = static_cast<size_t>(short_stage);
    a.kind = Admission::kFail;
    a.error = grpc::Status(
        grpc::StatusCode::RESOURCE_EXHAUSTED,
        absl::StrCat("kv: stage ", short_stage,
                     " had no room for the request's KV budget before its "
                     "deadline (",
                     admitted[s], " of ", caps[s].kv_capacity_bytes, " bytes admitted)"));
    return a;
  }
  a.kind = Admission::kWait;
  return a;
}

void Scheduler::Reserve(Job& job, std::vector<StageGrant> grants) {
  job.grants = std::move(grants);
  cluster_->Account(job.grants, 1);
}

void Scheduler::Release(Job& job) {
  cluster_->Account(job.grants, -1);
  job.grants.clear();
}

void Scheduler::ApplyCaps(const std::vector<std::shared_ptr<Job>>& active) {
  const uint64_t version = cluster_->CapsVersion();
  if (version == caps_seen_) return;
  caps_seen_ = version;
  const std::vector<std::vector<int64_t>> caps_by_stage = cluster_->LayerCaps();
  for (const auto& job : active) {
    if (!job->prepared.options.kv.evicts()) continue;
    job->lower.resize(job->grants.size());
    for (size_t s = 0; s < job->grants.size() && s < caps_by_stage.size(); ++s) {
      const std::vector<int64_t>& caps = caps_by_stage[s];
      std::vector<int64_t>& lb = job->grants[s].layer_budgets;
      bool lowered = false;
      const int64_t floor = MinBudget(job->prepared.options.kv);
      for (size_t l = 0; l < lb.size() && l < caps.size(); ++l) {
        const int64_t cap = std::max(caps[l], floor);
        if (caps[l] > 0 && cap < lb[l]) {
          lb[l] = cap;
          lowered = true;
        }
      }
      if (lowered) job->lower[s] = lb;
    }
  }
}

bool Scheduler::Relieve(const std::vector<std::shared_ptr<Job>>& active, bool ready) {
  const std::vector<int> pressed = cluster_->PressedStages();
  last_relief_.resize(static_cast<size_t>(stages_));
  const auto now = std::chrono::steady_clock::now();
  for (int s : pressed) {
    if (!ready || now - last_relief_[static_cast<size_t>(s)] < std::chrono::seconds(1)) continue;
    last_relief_[static_cast<size_t>(s)] = now;
    relief_events_.resize(static_cast<size_t>(stages_), 0);
    ++relief_events_[static_cast<size_t>(s)];
    int64_t lowered = 0, freed = 0;
    const std::vector<int64_t> bytes_per_token = cluster_->BytesPerToken(s);
    for (const auto& job : active) {
      const cache::EvictionParams& kv = job->prepared.options.kv;
      if (!kv.evicts() || job->run->done() || static_cast<size_t>(s) >= job->grants.size()) {
        continue;
      }
      StageGrant& g = job->grants[static_cast<size_t>(s)];
      const int64_t floor = std::max<int64_t>(16, MinBudget(kv));
      bool any = false;
      for (int64_t& b : g.layer_budgets) {
        const int64_t nb = std::max(floor, b - b / 4);
        if (nb < b) {
          b = nb;
          any = true;
        }
      }
      if (!any) continue;
      job->lower.resize(job->grants.size());
      job->lower[static_cast<size_t>(s)] = g.layer_budgets;
      // The slabs shrink to the lowered budgets once evicted down to (whole-prompt prefill:
      // once the prompt is compressed, which the grant keeps counting until the request ends).
      const int64_t bytes = GrantBytes(kv, g.layer_budgets, bytes_per_token);
      if (bytes < g.bytes) {
        cluster_->Unreserve(s, g.bytes - bytes);
        freed += g.bytes - bytes;
        g.bytes = bytes;
      }
      ++lowered;
    }
    log::Info(
        absl::StrFormat("relief for stage %d (memory pressure): %lld sequences lowered by a "
                        "quarter, %lld KV bytes to free",
                        s, static_cast<long long>(lowered), static_cast<long long>(freed)));
  }
  return !pressed.empty() && ready;
}

}  // namespace kvgate::coordinator
