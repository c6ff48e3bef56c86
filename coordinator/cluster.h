// The coordinator's view of its workers: membership (registration, heartbeats: the internal
// Coordinator service), the pipeline's stages (who holds which layers, their KV capacity,
// the operator's layer caps, the admission accounting). Shared by the engine thread, the
// registration reactions and the admin service, under one mutex.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "coordinator/planner.h"
#include "grpcpp/grpcpp.h"
#include "kvgate/v1/internal.grpc.pb.h"
#include "kvgate/v1/kvgate.pb.h"

namespace kvgate::coordinator {

// A worker's control stub and the token it accepts calls with (handed to it at registration).
struct WorkerClient {
  std::shared_ptr<v1::Worker::Stub> stub;
  std::string control_token;
  // A context for one call: its deadline and the control token.
  std::shared_ptr<grpc::ClientContext> Context(std::chrono::milliseconds timeout) const;
};

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
  StageCapacity capacity;
  int64_t weight_bytes = 0;
  int64_t admitted_bytes = 0;  // worst case of the sequences admitted here
};

class Cluster final : public v1::Coordinator::CallbackService {
 public:
  // `cluster_token`: what Register and Heartbeat must carry (empty: mutual TLS alone admits
  // workers); `worker_credentials`: the channel credentials to reach workers.
  Cluster(int heartbeat_ms, std::string cluster_token,
          std::shared_ptr<grpc::ChannelCredentials> worker_credentials)
      : heartbeat_ms_(heartbeat_ms),
        cluster_token_(std::move(cluster_token)),
        worker_credentials_(std::move(worker_credentials)) {}

  grpc::ServerUnaryReactor* Register(grpc::CallbackServerContext* ctx,
                                     const v1::RegisterRequest* req,
                                     v1::RegisterResponse* resp) override;
  grpc::ServerUnaryReactor* Heartbeat(grpc::CallbackServerContext* ctx,
                                      const v1::HeartbeatRequest* req,
                                      v1::HeartbeatResponse* resp) override;

  // A worker silent for this long is dead.
  std::chrono::milliseconds dead_after() const {
    return std::chrono::milliseconds(4 * heartbeat_ms_ + 200);
  }
  // The engine waits on this for membership changes.
  void set_on_change(std::function<void()> f) { on_change_ = std::move(f); }

  // The budgets and usage as the admin API reports them. REQUIRES: mu held.
  v1::Budgets BudgetsLocked() const;

  std::mutex mu;
  std::map<std::string, WorkerRecord> workers;  // guarded by mu
  std::vector<StageRecord> stages;              // guarded by mu; empty until planned
  bool ready = false;                           // guarded by mu
  int64_t max_batch = 32;                       // guarded by mu
  int64_t running = 0, queued = 0;              // guarded by mu (the engine's counts)
  uint64_t caps_version = 0;                    // guarded by mu; bumped when caps change

 private:
  const int heartbeat_ms_;
  const std::string cluster_token_;
  const std::shared_ptr<grpc::ChannelCredentials> worker_credentials_;
  uint64_t registrations_ = 0;  // guarded by mu
  std::function<void()> on_change_;
};

}  // namespace kvgate::coordinator
