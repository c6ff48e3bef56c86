// The coordinator's public gRPC service (proto/kvgate/v1/kvgate.proto) over a pipeline of
// worker processes (proto/kvgate/v1/internal.proto). One engine thread owns scheduling:
// continuous batching (requests join between steps), up to `stages` micro-batches in flight
// (a sequence in at most one), admission by the stages' negotiated KV budgets, and the
// pipeline's life (planning layer ranges, loading shards, wiring, losing and regaining
// workers). gRPC's callback reactions only queue work and write what the engine produced, so
// they never block.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "cache/eviction/policy.h"
#include "coordinator/cluster.h"
#include "coordinator/weights_registry.h"
#include "kvgate/v1/kvgate.grpc.pb.h"
#include "model/generation/generator.h"
#include "proto/grpc_status.h"
#include "security/key_ring.h"

namespace kvgate::coordinator {

struct ServiceOptions {
  std::string model_name;            // reported by GetModelInfo
  std::string model_dir;             // sent to workers (LoadShard)
  cache::EvictionParams default_kv;  // for requests that name no policy
  std::string backend = "cpu";
  int64_t max_batch = 32;   // sequences running at once; more wait in the queue
  int stages = 1;           // pipeline stages (one worker each)
  std::string layers;       // the operator's split ("0-2,2-4"); empty: planned by memory
  int worker_threads = 0;   // CPU threads per worker (0: the worker's own default)
  WeightsRegistry weights;  // learned eviction weights requests may name
  // Keys of the public API and of the admin API; null: none required.
  std::shared_ptr<security::KeyRing> api_keys, admin_keys;
};

// Turns a request into generation options and prompt ids (INVALID_ARGUMENT naming the field
// when something is wrong). Exposed for tests.
struct PreparedRequest {
  std::vector<int32_t> prompt_ids;
  model::GenerateOptions options;
};
absl::StatusOr<PreparedRequest> PrepareRequest(const v1::GenerateRequest& request,
                                               const model::Generator& generator,
                                               const cache::EvictionParams& default_kv,
                                               const WeightsRegistry& weights);

class GenerationService final : public v1::Kvgate::CallbackService {
 public:
  // `frontend` (config and tokenizer) and `cluster` are borrowed.
  GenerationService(model::Generator* frontend, Cluster* cluster, ServiceOptions options);
  ~GenerationService() override;  // stops the engine; call after the server has shut down

  grpc::ServerWriteReactor<v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* context, const v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* Abort(grpc::CallbackServerContext* context,
                                  const v1::AbortRequest* request,
                                  v1::AbortResponse* response) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context,
                                         const v1::GetModelInfoRequest* request,
                                         v1::ModelInfo* response) override;
  grpc::ServerUnaryReactor* GetServerInfo(grpc::CallbackServerContext* context,
                                          const v1::GetServerInfoRequest* request,
                                          v1::ServerInfo* response) override;

  // Blocks until every stage has a worker with its shard loaded, or `timeout` passes.
  bool WaitReady(std::chrono::milliseconds timeout);
  // The last failure of a worker to load its layers ("" if none).
  std::string load_error();
  // Wakes the engine (membership changed).
  void Wake();

  class Job;
  struct Engine;

 private:
  void EngineLoop();

  model::Generator* frontend_;
  Cluster* cluster_;
  ServiceOptions options_;
  const std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Job>> queue_;            // guarded by mu_
  std::map<std::string, std::shared_ptr<Job>> live_;  // queued or running, by request id
  bool stopping_ = false;                             // guarded by mu_
  bool wake_ = false;                                 // guarded by mu_
  int64_t running_ = 0;                               // guarded by mu_
  int64_t served_ = 0;                                // guarded by mu_
  std::string load_error_;                            // guarded by mu_
  std::unique_ptr<Engine> engine_state_;
  std::thread engine_;
};

}  // namespace kvgate::coordinator
