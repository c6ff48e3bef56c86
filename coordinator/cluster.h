// Cluster membership: the coordinator's view of its workers (registration and heartbeats: the
// internal Coordinator service on the cluster listener) and of the pipeline's stages (who
// holds which layers, their KV capacity, the operator's layer caps, the admission accounting).
// Shared by the engine thread, the registration reactions and the admin service; its lock is
// private, and every method takes it for one consistent step.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "coordinator/planner.h"
#include "grpcpp/grpcpp.h"
#include "kvgate/v1/internal.grpc.pb.h"
#include "kvgate/v1/kvgate.pb.h"

namespace kvgate::coordinator {

// A worker's control stub and the token it accepts calls with (its own secret, given to this
// coordinator when it registered).
struct WorkerClient {
  std::shared_ptr<v1::Worker::Stub> stub;
  std::string control_token;
  // A context for one call: its deadline and the control token.
  std::shared_ptr<grpc::ClientContext> Context(std::chrono::milliseconds timeout) const;
};

// A stage of the pipeline as the engine drives it.
struct StageView {
  int stage = 0;
  std::string worker_id, address, data_address;
  WorkerClient client;
  LayerRange range;
};

class Cluster final : public v1::Coordinator::CallbackService {
 public:
  // `cluster_token`: what Register and Heartbeat must carry (empty: mutual TLS alone admits
  // workers); `worker_credentials`: the channel credentials to reach workers (null: none, for
  // tests that drive no real worker).
  Cluster(int heartbeat_ms, std::string cluster_token,
          std::shared_ptr<grpc::ChannelCredentials> worker_credentials);

  grpc::ServerUnaryReactor* Register(grpc::CallbackServerContext* ctx,
                                     const v1::RegisterRequest* req,
                                     v1::RegisterResponse* resp) override;
  grpc::ServerUnaryReactor* Heartbeat(grpc::CallbackServerContext* ctx,
                                      const v1::HeartbeatRequest* req,
                                      v1::HeartbeatResponse* resp) override;

  // Membership, as the services above change it (also for tests).
  // A new worker (already validated); its id.
  std::string AddWorker(const v1::RegisterRequest& req);
  // A heartbeat: whether the worker is known and alive.
  bool Touch(const std::string& worker_id, const v1::WorkerUsage& usage);

  // A worker silent for this long is dead.
  std::chrono::milliseconds dead_after() const {
    return std::chrono::milliseconds(4 * heartbeat_ms_ + 200);
  }
  // Called (outside the lock) when a worker joins.
  void set_on_change(std::function<void()> f);

  // --- The engine's view ---
  // Marks workers silent past dead_after() dead and takes them off their stages; describes the
  // first stage so lost ("" if none).
  std::string ExpireWorkers();
  // Plans the stages' layer ranges once (`plan` maps the first `stages` spare workers'
  // memories to ranges) and puts spare workers, in registration order, on the stages without
  // one. The assignments to load; `complete`: every stage has a worker now.
  using PlanFn = std::function<absl::StatusOr<std::vector<LayerRange>>(std::vector<int64_t>)>;
  struct Assignment {
    int stage = 0;
    std::string worker_id;
    WorkerClient client;
    LayerRange range;
  };
  absl::StatusOr<std::vector<Assignment>> AssignStages(int stages, const PlanFn& plan,
                                                       bool* complete);
  // A stage's worker loaded its layers.
  void StageLoaded(int stage, const v1::ShardLoaded& loaded);
  // A stage's worker failed to load: it is taken off the stage and not used again.
  void StageFailed(int stage, const std::string& worker_id);
  // Every stage with its worker (all stages have one), admission accounting reset: the
  // pipeline being wired.
  std::vector<StageView> Pipeline();
  void SetReady(bool ready);
  // "w-.. [0, 3), w-.. [3, 5)".
  std::string Layout() const;
  // Why the pipeline cannot serve, for clients: "stage 1 has no worker (1 of 2 stages
  // loaded)", "stage 0's worker is loading its layers", "the stages are being wired".
  std::string NotReadyReason() const;

  // Admission accounting.
  std::vector<StageCapacity> Capacities(std::vector<int64_t>* admitted) const;
  // Adds (sign 1) or removes (sign -1) a sequence's grants.
  void Account(const std::vector<StageGrant>& grants, int sign);
  // A grant lowered by relief: `freed` bytes of stage `stage` are no longer reserved.
  void Unreserve(int stage, int64_t freed);
  // Operator caps per stage and layer, and their version (bumped when they change).
  uint64_t CapsVersion() const;
  std::vector<std::vector<int64_t>> LayerCaps() const;
  // Stages whose worker reports memory pressure.
  std::vector<int> PressedStages() const;
  // The allocation requests that name none get (serve's --kv-allocation, then `kvgate budget
  // set --allocation`).
  std::string Allocation() const;
  void SetAllocation(std::string allocation);
  // Per layer of the stage: one token's K and V over all KV heads.
  std::vector<int64_t> BytesPerToken(int stage) const;
  // The engine's counts, for the admin API.
  void SetCounts(int64_t running, int64_t queued);

  // --- The admin API ---
  void SetMaxBatch(int64_t max_batch);
  v1::Budgets Budgets() const;
  // Caps a node's (or every node's) layers; the budgets in force either way.
  grpc::Status SetBudget(const v1::SetBudgetRequest& req, v1::Budgets* out);

 private:
  struct WorkerRecord {
    std::string id;           // 128 random bits
    uint64_t registered = 0;  // registration order
    std::string address, data_address, hostname, backend;
    int32_t pid = 0;
    int64_t memory_limit = 0;
    std::chrono::steady_clock::time_point last_seen;
    bool alive = true;
    int stage = -1;  // -1: not in the pipeline (spare)
    v1::WorkerUsage usage;
    WorkerClient client;
  };
  struct StageRecord {
    int first_layer = 0, last_layer = 0;
    std::string worker_id;  // empty: no live worker
    bool loaded = false;    // its worker holds its layers
    StageCapacity capacity;
    int64_t weight_bytes = 0;
    int64_t admitted_bytes = 0;  // worst case of the sequences admitted here
  };

  v1::Budgets BudgetsLocked() const;

  const int heartbeat_ms_;
  const std::string cluster_token_;
  const std::shared_ptr<grpc::ChannelCredentials> worker_credentials_;

  mutable std::mutex mu_;
  std::map<std::string, WorkerRecord> workers_;  // guarded by mu_
  std::vector<StageRecord> stages_;              // guarded by mu_; empty until planned
  bool ready_ = false;                           // guarded by mu_
  int64_t max_batch_ = 32;                       // guarded by mu_
  int64_t running_ = 0, queued_ = 0;             // guarded by mu_
  uint64_t caps_version_ = 0;                    // guarded by mu_
  std::string allocation_ = "uniform";           // guarded by mu_
  uint64_t registrations_ = 0;                   // guarded by mu_
  std::function<void()> on_change_;              // guarded by mu_
};

}  // namespace kvgate::coordinator
