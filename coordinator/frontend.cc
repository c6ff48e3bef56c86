#include "coordinator/frontend.h"

#include <deque>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "grpcpp/grpcpp.h"
#include "proto/grpc_status.h"
#include "security/key_ring.h"
#include "security/secrets.h"

namespace kvgate::coordinator {
namespace {

// One request: its reactor writes the engine's output to the client one message at a time.
// The engine calls Send any number of times, then Complete once; after Complete it never
// touches the reactor again, and the reactor deletes itself when gRPC is done with it.
class GenerateReactor final : public grpc::ServerWriteReactor<v1::GenerateResponse>,
                              public OutputSink {
 public:
  explicit GenerateReactor(std::shared_ptr<Job> job) : job_(std::move(job)) {}

  void Send(v1::GenerateResponse message) override {
    std::unique_lock<std::mutex> lock(mu_);
    if (dropped_) return;
    out_.push_back(std::move(message));
    Pump(std::move(lock));
  }
  // Decides under the same lock hold that stores the status: once it is released, a write
  // that completes on a gRPC thread may finish the call and delete this reactor.
  void Complete(grpc::Status status) override {
    std::unique_lock<std::mutex> lock(mu_);
    finish_ = std::move(status);
    Pump(std::move(lock));
  }

  void OnWriteDone(bool ok) override {
    std::unique_lock<std::mutex> lock(mu_);
    writing_ = false;
    if (!ok) {  // the client is gone: drop what is left, keep the final status
      dropped_ = true;
      out_.clear();
    }
    Pump(std::move(lock));
  }
  void OnCancel() override { job_->cancelled.store(true); }
  void OnDone() override {
    job_.reset();
    delete this;
  }

 private:
  // Starts the next write or the finish, if any, with `lock` held on mu_; it is released
  // before gRPC is called, and nothing of this reactor is touched after that call (the reactor
  // may be gone by the time it returns).
  void Pump(std::unique_lock<std::mutex> lock) {
    if (writing_ || finished_) return;
    if (!out_.empty()) {
      current_ = std::move(out_.front());
      out_.pop_front();
      writing_ = true;
      const v1::GenerateResponse* write = &current_;
      lock.unlock();
      StartWrite(write);
    } else if (finish_.has_value()) {
      finished_ = true;
      const grpc::Status finish = *finish_;
      lock.unlock();
      Finish(finish);
    }
  }

  std::shared_ptr<Job> job_;
  std::mutex mu_;
  std::deque<v1::GenerateResponse> out_;  // guarded by mu_
  v1::GenerateResponse current_;          // the message being written
  std::optional<grpc::Status> finish_;    // guarded by mu_
  bool writing_ = false;                  // guarded by mu_
  bool finished_ = false;                 // guarded by mu_
  bool dropped_ = false;                  // guarded by mu_
};

}  // namespace

GenerationService::GenerationService(model::Generator* frontend, Cluster* cluster,
                                     PipelineExecutor* executor, ServiceOptions options)
    : frontend_(frontend),
      cluster_(cluster),
      options_(std::move(options)),
      metrics_(options_.model_name) {
  cluster_->SetAllocation(options_.default_kv.allocation);
  EngineOptions e;
  e.model_dir = options_.model_dir;
  e.stages = options_.stages;
  e.max_batch = options_.max_batch;
  e.max_step_tokens = options_.max_step_tokens;
  e.layers = options_.layers;
  e.worker_threads = options_.worker_threads;
  e.skip_weight_check = options_.skip_weight_check;
  e.quantize = options_.quantize;
  e.quantize_all = options_.quantize_all;
  e.metrics = &metrics_;
  for (const WeightsRegistry::Entry& f : options_.weights.Files()) {
    e.kv_weights.emplace_back(f.policy, f.path);
  }
  engine_ = std::make_unique<Engine>(frontend, cluster, executor, e);
}

GenerationService::~GenerationService() = default;

grpc::ServerWriteReactor<v1::GenerateResponse>* GenerationService::Generate(
    grpc::CallbackServerContext* context, const v1::GenerateRequest* request) {
  auto job = std::make_shared<Job>();
  auto* reactor = new GenerateReactor(job);
  job->output = reactor;
  if (grpc::Status s = security::CheckKey(options_.api_keys.get(), *context, &job->owner_key);
      !s.ok()) {
    reactor->Complete(s);
    return reactor;
  }
  job->deadline = context->deadline();
  if (grpc::Status s = Start(*request, job); !s.ok()) reactor->Complete(s);
  return reactor;
}

grpc::Status GenerationService::Start(const v1::GenerateRequest& request,
                                      const std::shared_ptr<Job>& job) {
  // Converted and validated once, here at the edge.
  cache::EvictionParams default_kv = options_.default_kv;
  default_kv.allocation = cluster_->Allocation();  // the operator's, at run time
  absl::StatusOr<PreparedRequest> prepared = PrepareRequest(
      request, *frontend_, default_kv, options_.weights, options_.chat_template.get());
  if (!prepared.ok()) return ToGrpc(prepared.status());
  // A step's tokens are bounded (the workers reserved scratch for that many).
  const model::GenerateOptions& o = prepared->options;
  if (const int64_t chunk = o.kv.evicts() ? o.kv.chunk : o.prefill_chunk;
      chunk > options_.max_step_tokens) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        absl::StrCat(o.kv.evicts() ? "kv.chunk" : "prefill_chunk", ": ", chunk,
                                     " is more than the server's --max-step-tokens (",
                                     options_.max_step_tokens, ")"));
  }
  job->prepared = *std::move(prepared);
  job->id = request.request_id().empty() ? RandomRequestId() : request.request_id();
  return engine_->Submit(job);
}

std::string GenerationService::RenderMetrics() {
  return metrics_.Render(cluster_->Budgets(), engine_->running(), engine_->queued(),
                         engine_->counts());
}

int64_t GenerationService::max_context() const {
  return frontend_->config().max_position_embeddings;
}

grpc::ServerUnaryReactor* GenerationService::Abort(grpc::CallbackServerContext* context,
                                                   const v1::AbortRequest* request,
                                                   v1::AbortResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  // With keys, only the key that started a request (or an admin key) aborts it; another
  // key is told there is no such request.
  const std::string key = security::BearerKey(*context);
  const bool admin =
      options_.admin_keys != nullptr && !key.empty() && options_.admin_keys->Contains(key);
  if (grpc::Status s = security::CheckKey(options_.api_keys.get(), *context); !s.ok() && !admin) {
    reactor->Finish(s);
    return reactor;
  }
  response->set_found(engine_->Abort(request->request_id(), [&](const Job& job) {
    return options_.api_keys == nullptr || admin ||
           security::ConstantTimeEquals(job.owner_key, key);
  }));
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* GenerationService::GetModelInfo(grpc::CallbackServerContext* context,
                                                          const v1::GetModelInfoRequest*,
                                                          v1::ModelInfo* response) {
  if (grpc::Status s = security::CheckKey(options_.api_keys.get(), *context); !s.ok()) {
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(s);
    return reactor;
  }
  const model::ModelConfig& c = frontend_->config();
  response->set_name(options_.model_name);
  response->set_architecture(c.architecture_name);
  response->set_num_layers(c.num_layers);
  response->set_hidden_size(c.hidden_size);
  response->set_num_heads(c.num_heads);
  response->set_num_kv_heads(c.num_kv_heads);
  response->set_head_dim(c.head_dim);
  response->set_vocab_size(c.vocab_size);
  response->set_max_context(c.max_position_embeddings);
  response->set_has_tokenizer(frontend_->tokenizer() != nullptr);
  for (int32_t id : c.eos_token_ids) response->add_eos_token_ids(id);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* GenerationService::GetServerInfo(grpc::CallbackServerContext* context,
                                                           const v1::GetServerInfoRequest*,
                                                           v1::ServerInfo* response) {
  if (grpc::Status s = security::CheckKey(options_.api_keys.get(), *context); !s.ok()) {
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(s);
    return reactor;
  }
  response->set_version("kvgate 0.1.0");
  response->set_stages(options_.stages);
  response->set_backend(options_.backend);
  response->set_ready(engine_->ready());
  response->set_requests_running(engine_->running());
  response->set_requests_queued(engine_->queued());
  response->set_requests_served(engine_->served());
  v1::KvParams* kv = response->mutable_default_kv();
  kv->set_policy(options_.default_kv.policy);
  kv->set_budget(options_.default_kv.budget);
  kv->set_chunk(options_.default_kv.chunk);
  kv->set_allocation(cluster_->Allocation());
  kv->set_prefill(options_.default_kv.prefill);
  if (options_.default_kv.learned()) kv->set_weights_name(options_.default_kv.policy);
  response->set_uptime_seconds(
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count());
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace kvgate::coordinator
