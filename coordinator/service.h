// The coordinator's public gRPC service (proto/kvgate/v1/kvgate.proto) over the in-process
// engine: one engine thread owns the model and steps every running request together
// (continuous batching); gRPC's callback reactors only queue work and write what the engine
// produced, so they never block.
//
// This is the single-stage form of `kvgate serve`: the pipeline of worker processes (stages,
// activation transport, budget negotiation) builds on the same service.
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
#include "kvgate/v1/kvgate.grpc.pb.h"
#include "model/generation/generator.h"

namespace kvgate::coordinator {

struct ServiceOptions {
  std::string model_name;            // reported by GetModelInfo
  cache::EvictionParams default_kv;  // for requests that name no policy
  std::string backend = "cpu";
  int64_t max_batch = 32;  // sequences stepped together; more wait in the queue
};

// Turns a request into generation options and prompt ids (INVALID_ARGUMENT naming the field
// when something is wrong). Exposed for tests.
struct PreparedRequest {
  std::vector<int32_t> prompt_ids;
  model::GenerateOptions options;
};
absl::StatusOr<PreparedRequest> PrepareRequest(const v1::GenerateRequest& request,
                                               const model::Generator& generator,
                                               const cache::EvictionParams& default_kv);

class GenerationService final : public v1::Kvgate::CallbackService {
 public:
  // `generator` is borrowed and used only by the engine thread.
  GenerationService(model::Generator* generator, ServiceOptions options);
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

  class Job;

 private:
  // The engine thread: continuous batching. Each iteration admits queued requests (up to
  // max_batch running), advances every running sequence by one step in one forward pass
  // (prefill chunks and decode tokens together), and completes the finished ones.
  void EngineLoop();
  bool StartJob(Job& job);     // false: completed already (cancelled or invalid)
  void CompleteJob(Job& job);  // sends the final message and status of a finished run
  void Retire(Job& job);

  model::Generator* generator_;
  ServiceOptions options_;
  const std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Job>> queue_;            // guarded by mu_
  std::map<std::string, std::shared_ptr<Job>> live_;  // queued or running, by request id
  bool stopping_ = false;                             // guarded by mu_
  int64_t running_ = 0;                               // guarded by mu_
  int64_t served_ = 0;                                // guarded by mu_
  std::atomic<uint64_t> next_id_{1};
  std::thread engine_;
};

// Maps an absl::Status onto the gRPC status with the same code and message.
grpc::Status ToGrpc(const absl::Status& status);

}  // namespace kvgate::coordinator
