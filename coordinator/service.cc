#include "coordinator/service.h"

#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace kvgate::coordinator {

grpc::Status ToGrpc(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  // absl and gRPC share the canonical code numbering.
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

namespace {

absl::Status Field(absl::string_view field, const absl::Status& status) {
  if (status.ok()) return status;
  return absl::Status(status.code(), absl::StrCat(field, ": ", status.message()));
}

constexpr int64_t kDefaultMaxTokens = 256;
constexpr int64_t kDefaultPrefillChunk = 512;

}  // namespace

absl::StatusOr<PreparedRequest> PrepareRequest(const v1::GenerateRequest& request,
                                               const model::Generator& generator,
                                               const cache::EvictionParams& default_kv) {
  const model::ModelConfig& c = generator.config();
  PreparedRequest out;
  switch (request.prompt_case()) {
    case v1::GenerateRequest::kText: {
      if (generator.tokenizer() == nullptr) {
        return absl::InvalidArgumentError(
            "prompt.text: the model has no tokenizer; send prompt.token_ids");
      }
      auto ids = generator.tokenizer()->Encode(request.text(), /*add_special=*/true);
      if (!ids.ok()) return Field("prompt.text", ids.status());
      out.prompt_ids = *std::move(ids);
      if (out.prompt_ids.empty()) {
        return absl::InvalidArgumentError("prompt.text: the text gives no tokens");
      }
      break;
    }
    case v1::GenerateRequest::kTokenIds:
      out.prompt_ids.assign(request.token_ids().ids().begin(), request.token_ids().ids().end());
      if (out.prompt_ids.empty()) {
        return absl::InvalidArgumentError("prompt.token_ids: no token ids given");
      }
      for (int32_t id : out.prompt_ids) {
        if (id < 0 || id >= c.vocab_size) {
          return absl::InvalidArgumentError(absl::StrCat(
              "prompt.token_ids: id ", id, " is outside the vocabulary [0, ", c.vocab_size, ")"));
        }
      }
      break;
    case v1::GenerateRequest::PROMPT_NOT_SET:
      return absl::InvalidArgumentError("prompt: give prompt.text or prompt.token_ids");
  }
  if (static_cast<int64_t>(out.prompt_ids.size()) >= c.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat("prompt: ", out.prompt_ids.size(),
                                                   " tokens do not fit the model's context of ",
                                                   c.max_position_embeddings, " tokens"));
  }

  model::GenerateOptions& opt = out.options;
  if (request.max_tokens() < 0 || request.max_tokens() > c.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat("max_tokens: ", request.max_tokens(),
                                                   " is not in [1, ", c.max_position_embeddings,
                                                   "] (0 means ", kDefaultMaxTokens, ")"));
  }
  opt.max_tokens = request.max_tokens() == 0 ? kDefaultMaxTokens : request.max_tokens();
  if (request.prefill_chunk() < 0) {
    return absl::InvalidArgumentError("prefill_chunk: must be >= 0 (0: the default)");
  }
  opt.prefill_chunk = request.prefill_chunk() == 0 ? kDefaultPrefillChunk : request.prefill_chunk();

  const v1::SamplingParams& s = request.sampling();
  opt.sampling.temperature = s.has_temperature() ? s.temperature() : 1.0;
  opt.sampling.top_k = s.top_k();
  opt.sampling.top_p = s.has_top_p() ? s.top_p() : 1.0;
  opt.sampling.min_p = s.min_p();
  opt.sampling.repetition_penalty = s.has_repetition_penalty() ? s.repetition_penalty() : 1.0;
  opt.sampling.presence_penalty = s.presence_penalty();
  opt.sampling.frequency_penalty = s.frequency_penalty();
  if (s.has_seed()) opt.sampling.seed = s.seed();
  RETURN_IF_ERROR(Field("sampling", opt.sampling.Validate()));

  for (const std::string& stop : request.stop()) {
    if (stop.empty()) return absl::InvalidArgumentError("stop: a stop string must not be empty");
  }
  if (request.stop_size() > 0 && generator.tokenizer() == nullptr) {
    return absl::InvalidArgumentError("stop: stop strings need a model with a tokenizer");
  }
  opt.stop_strings.assign(request.stop().begin(), request.stop().end());
  opt.stop_token_ids.assign(request.stop_token_ids().begin(), request.stop_token_ids().end());
  opt.ignore_eos = request.ignore_eos();

  const v1::KvParams& kv = request.kv();
  if (kv.policy().empty()) {
    if (kv.budget() != 0 || !kv.weights().empty()) {
      return absl::InvalidArgumentError("kv.policy: a budget or weights need a policy");
    }
    opt.kv = default_kv;
  } else {
    cache::EvictionParams p;
    p.policy = kv.policy();
    p.budget = kv.budget();
    if (kv.chunk() < 0 || kv.sinks() < 0 || kv.window() < 0) {
      return absl::InvalidArgumentError("kv: chunk, sinks and window must be >= 0 (0: default)");
    }
    if (kv.chunk() > 0) p.chunk = kv.chunk();
    if (kv.sinks() > 0) p.sinks = kv.sinks();
    if (kv.window() > 0) p.window = kv.window();
    p.position = kv.position();
    p.weights = kv.weights();
    if (kv.has_stabilizers()) p.stabilizers = kv.stabilizers();
    if (kv.has_protected_tail()) p.protected_tail = kv.protected_tail();
    opt.kv = std::move(p);
  }
  RETURN_IF_ERROR(Field("kv", opt.kv.Validate()));
  return out;
}

// One request: its reactor writes the engine's output to the client one message at a time.
// The engine calls Send any number of times, then Complete once; after Complete it never
// touches the reactor again, and the reactor deletes itself when gRPC is done with it.
class GenerateReactor final : public grpc::ServerWriteReactor<v1::GenerateResponse> {
 public:
  explicit GenerateReactor(std::shared_ptr<GenerationService::Job> job) : job_(std::move(job)) {}

  void Send(v1::GenerateResponse message) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (dropped_) return;
      out_.push_back(std::move(message));
    }
    Pump();
  }
  void Complete(grpc::Status status) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      finish_ = std::move(status);
    }
    Pump();
  }

  void OnWriteDone(bool ok) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      writing_ = false;
      if (!ok) {  // the client is gone: drop what is left, keep the final status
        dropped_ = true;
        out_.clear();
      }
    }
    Pump();
  }
  void OnCancel() override;
  void OnDone() override {
    job_.reset();
    delete this;
  }

 private:
  void Pump() {
    const v1::GenerateResponse* write = nullptr;
    std::optional<grpc::Status> finish;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (writing_ || finished_) return;
      if (!out_.empty()) {
        current_ = std::move(out_.front());
        out_.pop_front();
        writing_ = true;
        write = &current_;
      } else if (finish_.has_value()) {
        finished_ = true;
        finish = finish_;
      }
    }
    if (write != nullptr) {
      StartWrite(write);
    } else if (finish.has_value()) {
      Finish(*finish);
    }
  }

  std::shared_ptr<GenerationService::Job> job_;
  std::mutex mu_;
  std::deque<v1::GenerateResponse> out_;  // guarded by mu_
  v1::GenerateResponse current_;          // the message being written
  std::optional<grpc::Status> finish_;    // guarded by mu_
  bool writing_ = false;                  // guarded by mu_
  bool finished_ = false;                 // guarded by mu_
  bool dropped_ = false;                  // guarded by mu_
};

class GenerationService::Job {
 public:
  std::string id;
  PreparedRequest prepared;
  std::atomic<bool> cancelled{false};
  GenerateReactor* reactor = nullptr;       // valid until reactor->Complete
  std::unique_ptr<model::SequenceRun> run;  // once started (engine thread only)
  std::chrono::steady_clock::time_point queued_at = std::chrono::steady_clock::now();
  std::chrono::steady_clock::time_point started;
};

void GenerateReactor::OnCancel() { job_->cancelled.store(true); }

GenerationService::GenerationService(model::Generator* generator, ServiceOptions options)
    : generator_(generator), options_(std::move(options)) {
  engine_ = std::thread([this] { EngineLoop(); });
}

GenerationService::~GenerationService() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
    for (auto& [id, job] : live_) job->cancelled.store(true);
  }
  cv_.notify_all();
  engine_.join();
}

grpc::ServerWriteReactor<v1::GenerateResponse>* GenerationService::Generate(
    grpc::CallbackServerContext* context, const v1::GenerateRequest* request) {
  auto job = std::make_shared<Job>();
  auto* reactor = new GenerateReactor(job);
  job->reactor = reactor;
  absl::StatusOr<PreparedRequest> prepared =
      PrepareRequest(*request, *generator_, options_.default_kv);
  if (!prepared.ok()) {
    reactor->Complete(ToGrpc(prepared.status()));
    return reactor;
  }
  job->prepared = *std::move(prepared);
  job->id = request->request_id().empty() ? absl::StrCat("req-", next_id_.fetch_add(1))
                                          : request->request_id();
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) {
      reactor->Complete(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the server is stopping"));
      return reactor;
    }
    if (live_.count(job->id) > 0) {
      reactor->Complete(grpc::Status(grpc::StatusCode::ALREADY_EXISTS,
                                     absl::StrCat("request_id: '", job->id, "' is in use")));
      return reactor;
    }
    live_[job->id] = job;
    queue_.push_back(job);
  }
  cv_.notify_one();
  return reactor;
}

void GenerationService::EngineLoop() {
  std::vector<std::shared_ptr<Job>> active;
  std::vector<model::SequenceRun*> runs;
  while (true) {
    std::vector<std::shared_ptr<Job>> incoming;
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (active.empty()) cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (stopping_ && queue_.empty() && active.empty()) return;
      // New requests join between steps, up to the batch limit.
      while (!queue_.empty() &&
             static_cast<int64_t>(active.size() + incoming.size()) < options_.max_batch) {
        incoming.push_back(std::move(queue_.front()));
        queue_.pop_front();
      }
      running_ += static_cast<int64_t>(incoming.size());
    }
    for (std::shared_ptr<Job>& job : incoming) {
      if (StartJob(*job)) {
        active.push_back(std::move(job));
      } else {
        Retire(*job);
      }
    }
    runs.clear();
    for (const auto& job : active) runs.push_back(job->run.get());
    if (!runs.empty()) generator_->Step(runs);
    for (auto it = active.begin(); it != active.end();) {
      if ((*it)->run->done()) {
        CompleteJob(**it);
        Retire(**it);
        it = active.erase(it);
      } else {
        ++it;
      }
    }
  }
}

void GenerationService::Retire(Job& job) {
  std::lock_guard<std::mutex> lock(mu_);
  --running_;
  ++served_;
  live_.erase(job.id);
}

bool GenerationService::StartJob(Job& job) {
  GenerateReactor* reactor = job.reactor;
  job.started = std::chrono::steady_clock::now();
  if (job.cancelled.load()) {
    reactor->Complete(grpc::Status(grpc::StatusCode::CANCELLED,
                                   absl::StrCat("request ", job.id, " was cancelled")));
    return false;
  }
  model::GenerateOptions opt = job.prepared.options;
  Job* j = &job;
  opt.on_token = [j, reactor](int32_t token, std::string_view text) {
    v1::GenerateResponse message;
    v1::TokenChunk* chunk = message.mutable_chunk();
    chunk->add_token_ids(token);
    chunk->set_text(std::string(text));
    reactor->Send(std::move(message));
    return !j->cancelled.load();
  };
  opt.keep_going = [j] { return !j->cancelled.load(); };
  absl::StatusOr<std::unique_ptr<model::SequenceRun>> run =
      generator_->Start(job.prepared.prompt_ids, opt);
  if (!run.ok()) {
    reactor->Complete(ToGrpc(run.status()));
    return false;
  }
  job.run = *std::move(run);
  return true;
}

void GenerationService::CompleteJob(Job& job) {
  GenerateReactor* reactor = job.reactor;
  if (!job.run->status().ok()) {
    reactor->Complete(ToGrpc(job.run->status()));
    return;
  }
  const model::GenerateResult& result = job.run->result();
  if (result.finish_reason == "abort") {
    reactor->Complete(grpc::Status(grpc::StatusCode::CANCELLED,
                                   absl::StrCat("request ", job.id, " was cancelled")));
    return;
  }
  const model::ModelConfig& c = generator_->config();
  const model::GenerateOptions& opt = job.prepared.options;
  v1::GenerateResponse message;
  v1::GenerateFinal* f = message.mutable_final();
  f->set_request_id(job.id);
  f->set_finish_reason(result.finish_reason);
  f->mutable_usage()->set_prompt_tokens(static_cast<int64_t>(result.prompt_token_ids.size()));
  f->mutable_usage()->set_completion_tokens(static_cast<int64_t>(result.token_ids.size()));
  for (int32_t id : result.prompt_token_ids) f->add_prompt_token_ids(id);
  f->set_prefill_tokens_per_s(result.prefill_tokens_per_s());
  f->set_decode_tokens_per_s(result.decode_tokens_per_s());
  f->set_prefill_seconds(result.prefill_seconds);
  f->set_decode_seconds(result.decode_seconds);
  f->set_queue_seconds(std::chrono::duration<double>(job.started - job.queued_at).count());
  const cache::EvictionParams& kv = opt.kv;
  const bool full = kv.policy == "full";
  v1::KvStats* k = f->mutable_kv();
  k->set_policy(kv.policy);
  k->set_budget(full ? 0 : kv.budget);
  k->set_chunk(full ? opt.prefill_chunk : kv.chunk);
  k->set_position(full ? "original" : kv.position_mode());
  const cache::KvCache::Stats& st = result.kv_stats;
  k->set_max_retained_per_head(st.max_retained_per_head);
  k->set_max_held_per_head(st.max_held_per_head);
  k->set_evicted_tokens(st.evicted_tokens);
  k->set_eviction_ratio(model::EvictionRatio(st, result.kv_tokens_seen, c));
  k->set_peak_kv_bytes(static_cast<int64_t>(st.peak_bytes));
  k->set_retained_tokens(result.kv_tokens_seen * c.num_layers * c.num_kv_heads - st.evicted_tokens);
  v1::StageBudget* stage = k->add_stages();
  stage->set_stage(0);
  stage->set_first_layer(0);
  stage->set_last_layer(static_cast<int32_t>(c.num_layers));
  stage->set_budget(full ? 0 : kv.budget);
  reactor->Send(std::move(message));
  reactor->Complete(grpc::Status::OK);
}

grpc::ServerUnaryReactor* GenerationService::Abort(grpc::CallbackServerContext* context,
                                                   const v1::AbortRequest* request,
                                                   v1::AbortResponse* response) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = live_.find(request->request_id());
    response->set_found(it != live_.end());
    if (it != live_.end()) it->second->cancelled.store(true);
  }
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* GenerationService::GetModelInfo(grpc::CallbackServerContext* context,
                                                          const v1::GetModelInfoRequest*,
                                                          v1::ModelInfo* response) {
  const model::ModelConfig& c = generator_->config();
  response->set_name(options_.model_name);
  response->set_architecture(c.architecture_name);
  response->set_num_layers(c.num_layers);
  response->set_hidden_size(c.hidden_size);
  response->set_num_heads(c.num_heads);
  response->set_num_kv_heads(c.num_kv_heads);
  response->set_head_dim(c.head_dim);
  response->set_vocab_size(c.vocab_size);
  response->set_max_context(c.max_position_embeddings);
  response->set_has_tokenizer(generator_->tokenizer() != nullptr);
  for (int32_t id : c.eos_token_ids) response->add_eos_token_ids(id);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* GenerationService::GetServerInfo(grpc::CallbackServerContext* context,
                                                           const v1::GetServerInfoRequest*,
                                                           v1::ServerInfo* response) {
  response->set_version("kvgate 0.1.0");
  response->set_stages(1);
  response->set_backend(options_.backend);
  {
    std::lock_guard<std::mutex> lock(mu_);
    response->set_requests_running(running_);
    response->set_requests_queued(static_cast<int64_t>(queue_.size()));
    response->set_requests_served(served_);
  }
  v1::KvParams* kv = response->mutable_default_kv();
  kv->set_policy(options_.default_kv.policy);
  kv->set_budget(options_.default_kv.budget);
  kv->set_chunk(options_.default_kv.chunk);
  kv->set_weights(options_.default_kv.weights);
  response->set_uptime_seconds(
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count());
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace kvgate::coordinator
