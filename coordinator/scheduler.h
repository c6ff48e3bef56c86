// The scheduler: which queued request may start (admission by the stages' negotiated KV
// budgets), and the budgets of running ones (the operator's layer caps, relief under memory
// pressure). It decides; the engine loop applies its decisions between steps.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <vector>

#include "coordinator/cluster.h"
#include "coordinator/job.h"
#include "grpcpp/support/status.h"

namespace kvgate::coordinator {

// A request waiting for memory fails this long before its deadline, so the client sees why.
inline constexpr auto kDeadlineMargin = std::chrono::milliseconds(150);

class Scheduler {
 public:
  // `cluster` is borrowed.
  Scheduler(Cluster* cluster, int64_t max_context, int64_t max_batch, int stages)
      : cluster_(cluster), max_context_(max_context), max_batch_(max_batch), stages_(stages) {}

  struct Admission {
    enum Kind { kAdmit, kWait, kFail };
    Kind kind = kWait;
    std::vector<StageGrant> grants;  // kAdmit
    grpc::Status error;              // kFail
  };
  // The request at the head of the queue: admitted with its grants, waiting for memory, or
  // failed (it can never fit, or its deadline is near while it waits).
  Admission Admit(const Job& job, std::chrono::system_clock::time_point now) const;
  // Reserves an admitted job's grants on every stage; Release gives them back.
  void Reserve(Job& job, std::vector<StageGrant> grants);
  void Release(Job& job);

  // When the operator's caps changed since the last call: running sequences' layer budgets
  // come down to them (at their next step).
  void ApplyCaps(const std::vector<std::shared_ptr<Job>>& active);
  // A stage whose worker reports memory pressure lowers its running sequences' budgets by a
  // quarter (at most once a second per stage). Whether any stage is under pressure (admission
  // then waits).
  bool Relieve(const std::vector<std::shared_ptr<Job>>& active, bool ready);
  // Reliefs so far, per stage.
  const std::vector<int64_t>& relief_events() const { return relief_events_; }

 private:
  Cluster* cluster_;
  const int64_t max_context_, max_batch_;
  const int stages_;
  uint64_t caps_seen_ = 0;
  std::vector<std::chrono::steady_clock::time_point> last_relief_;  // per stage
  std::vector<int64_t> relief_events_;                              // per stage
};

}  // namespace kvgate::coordinator
