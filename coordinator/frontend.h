// The coordinator's front end: the public gRPC service (proto/kvgate/v1/kvgate.proto) as
// callback reactions that never block. A request is converted and validated once, here at the
// edge (request.h), checked against the API keys, and handed to the engine as a Job; the
// engine's output (token chunks, written after the next step plans are out, and the final
// message) goes back through the job's stream. The engine (engine.h) owns everything else.
#pragma once

#include <memory>
#include <string>

#include "cache/eviction/policy.h"
#include "coordinator/cluster.h"
#include "coordinator/engine.h"
#include "coordinator/metrics.h"
#include "coordinator/pipeline_executor.h"
#include "coordinator/request.h"
#include "coordinator/weights_registry.h"
#include "kvgate/v1/kvgate.grpc.pb.h"
#include "model/generation/generator.h"
#include "security/key_ring.h"

namespace kvgate::coordinator {

struct ServiceOptions {
  std::string model_name;            // reported by GetModelInfo
  std::string model_dir;             // sent to workers (LoadShard)
  cache::EvictionParams default_kv;  // for requests that name no policy
  std::string backend = "cpu";
  int64_t max_batch = 32;          // sequences running at once; more wait in the queue
  int64_t max_step_tokens = 2048;  // tokens per micro-batch; no prefill chunk may exceed it
  int stages = 1;                  // pipeline stages (one worker each)
  std::string layers;              // the operator's split ("0-2,2-4"); empty: planned by memory
  int worker_threads = 0;          // CPU threads per worker (0: the worker's own default)
  bool skip_weight_check = false;  // workers skip the sampled NaN/Inf weight check
  std::string quantize;            // workers' weights as q8_0 / q4_0 ("": as stored)
  bool quantize_all = false;       // --quantize-all: their embedding and LM head too
  WeightsRegistry weights;         // learned eviction weights requests may name
  // Renders chat prompts (the model's tokenizer_config.json chat_template or --chat-template);
  // null: chat prompts are refused.
  std::shared_ptr<const model::chat::ChatTemplate> chat_template;
  // Keys of the public API and of the admin API; null: none required.
  std::shared_ptr<security::KeyRing> api_keys, admin_keys;
};

class GenerationService final : public v1::Kvgate::CallbackService {
 public:
  // `frontend` (config and tokenizer), `cluster` and `executor` are borrowed. Starts the
  // engine.
  GenerationService(model::Generator* frontend, Cluster* cluster, PipelineExecutor* executor,
                    ServiceOptions options);
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

  // The edge both front ends share: validates `request` (PrepareRequest), fills `job` (its
  // `output` and `owner_key` set by the caller, whose key was checked) and submits it. On an
  // error nothing was submitted and `job->output` was not called.
  grpc::Status Start(const v1::GenerateRequest& request, const std::shared_ptr<Job>& job);

  Engine& engine() { return *engine_; }
  const ServiceOptions& options() const { return options_; }
  // GET /metrics: the request figures, the engine's queue and the workers' heartbeats.
  std::string RenderMetrics();
  int64_t max_context() const;
  int64_t started_unix() const { return started_unix_; }

 private:
  model::Generator* frontend_;
  Cluster* cluster_;
  const ServiceOptions options_;
  const std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();
  const int64_t started_unix_ = std::chrono::duration_cast<std::chrono::seconds>(
                                    std::chrono::system_clock::now().time_since_epoch())
                                    .count();
  Metrics metrics_;
  std::unique_ptr<Engine> engine_;
};

}  // namespace kvgate::coordinator
