#include "coordinator/service.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <random>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "grpcpp/grpcpp.h"
#include "proto/convert.h"
#include "security/key_ring.h"
#include "security/secrets.h"

namespace kvgate::coordinator {

namespace {

absl::Status Field(absl::string_view field, const absl::Status& status) {
  if (status.ok()) return status;
  return absl::Status(status.code(), absl::StrCat(field, ": ", status.message()));
}

constexpr int64_t kDefaultMaxTokens = 256;
constexpr int64_t kDefaultPrefillChunk = 512;
// Limits on request fields (validated once, here at the edge).
constexpr size_t kMaxRequestIdChars = 128;
constexpr int kMaxStopStrings = 16;
constexpr size_t kMaxStopStringBytes = 512;
constexpr int kMaxStopTokenIds = 64;
constexpr size_t kMaxPromptBytes = size_t{8} << 20;
constexpr int64_t kMaxKvParam = int64_t{1} << 31;  // budgets, chunks, sinks, windows, tails

// A server-made request id: 128 random bits, so no client can guess another's.
std::string RandomRequestId() {
  static std::mutex mu;
  static std::random_device device;
  std::lock_guard<std::mutex> lock(mu);
  const uint64_t a = (static_cast<uint64_t>(device()) << 32) | device();
  const uint64_t b = (static_cast<uint64_t>(device()) << 32) | device();
  return absl::StrCat("req-", absl::Hex(a, absl::kZeroPad16), absl::Hex(b, absl::kZeroPad16));
}

}  // namespace

absl::StatusOr<PreparedRequest> PrepareRequest(const v1::GenerateRequest& request,
                                               const model::Generator& generator,
                                               const cache::EvictionParams& default_kv,
                                               const WeightsRegistry& weights) {
  const model::ModelConfig& c = generator.config();
  PreparedRequest out;
  const std::string& id = request.request_id();
  if (id.size() > kMaxRequestIdChars) {
    return absl::InvalidArgumentError(
        absl::StrCat("request_id: ", id.size(), " characters; at most ", kMaxRequestIdChars));
  }
  for (char ch : id) {
    if (ch < 0x20 || ch > 0x7e) {
      return absl::InvalidArgumentError("request_id: only printable ASCII characters are allowed");
    }
  }
  if (request.prompt_case() == v1::GenerateRequest::kText &&
      request.text().size() > kMaxPromptBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt.text: ", request.text().size(), " bytes; at most ", kMaxPromptBytes));
  }
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

  if (request.stop_size() > kMaxStopStrings) {
    return absl::InvalidArgumentError(
        absl::StrCat("stop: ", request.stop_size(), " stop strings; at most ", kMaxStopStrings));
  }
  for (const std::string& stop : request.stop()) {
    if (stop.empty()) return absl::InvalidArgumentError("stop: a stop string must not be empty");
    if (stop.size() > kMaxStopStringBytes) {
      return absl::InvalidArgumentError(absl::StrCat("stop: a stop string of ", stop.size(),
                                                     " bytes; at most ", kMaxStopStringBytes));
    }
  }
  if (request.stop_token_ids_size() > kMaxStopTokenIds) {
    return absl::InvalidArgumentError(absl::StrCat(
        "stop_token_ids: ", request.stop_token_ids_size(), " ids; at most ", kMaxStopTokenIds));
  }
  for (int32_t stop_id : request.stop_token_ids()) {
    if (stop_id < 0 || stop_id >= c.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          "stop_token_ids: id ", stop_id, " is outside the vocabulary [0, ", c.vocab_size, ")"));
    }
  }
  if (request.stop_size() > 0 && generator.tokenizer() == nullptr) {
    return absl::InvalidArgumentError("stop: stop strings need a model with a tokenizer");
  }
  opt.stop_strings.assign(request.stop().begin(), request.stop().end());
  opt.stop_token_ids.assign(request.stop_token_ids().begin(), request.stop_token_ids().end());
  opt.ignore_eos = request.ignore_eos();

  const v1::KvParams& kv = request.kv();
  if (kv.policy().empty()) {
    if (kv.budget() != 0 || !kv.weights_name().empty()) {
      return absl::InvalidArgumentError("kv.policy: a budget or weights_name needs a policy");
    }
    opt.kv = default_kv;
  } else {
    cache::EvictionParams p;
    p.policy = kv.policy();
    p.budget = kv.budget();
    if (kv.chunk() < 0 || kv.sinks() < 0 || kv.window() < 0) {
      return absl::InvalidArgumentError("kv: chunk, sinks and window must be >= 0 (0: default)");
    }
    for (const auto& [name, value] :
         std::vector<std::pair<const char*, int64_t>>{{"kv.budget", kv.budget()},
                                                      {"kv.chunk", kv.chunk()},
                                                      {"kv.sinks", kv.sinks()},
                                                      {"kv.window", kv.window()}}) {
      if (value > kMaxKvParam) {
        return absl::InvalidArgumentError(
            absl::StrCat(name, ": ", value, " is larger than any context (at most 2^31)"));
      }
    }
    if (kv.has_stabilizers() && (kv.stabilizers() < 0 || kv.stabilizers() > kMaxKvParam)) {
      return absl::InvalidArgumentError(
          absl::StrCat("kv.stabilizers: ", kv.stabilizers(), " is not in [0, 2^31]"));
    }
    if (kv.has_protected_tail() && (kv.protected_tail() < 0 || kv.protected_tail() > kMaxKvParam)) {
      return absl::InvalidArgumentError(
          absl::StrCat("kv.protected_tail: ", kv.protected_tail(), " is not in [0, 2^31]"));
    }
    if (kv.chunk() > 0) p.chunk = kv.chunk();
    if (kv.sinks() > 0) p.sinks = kv.sinks();
    if (kv.window() > 0) p.window = kv.window();
    p.position = kv.position();
    if (kv.has_stabilizers()) p.stabilizers = kv.stabilizers();
    if (kv.has_protected_tail()) p.protected_tail = kv.protected_tail();
    opt.kv = std::move(p);
  }
  if (!kv.policy().empty()) {
    if (cache::FindPolicy(opt.kv.policy) == nullptr) return Field("kv", opt.kv.Validate());
    if (opt.kv.learned()) {
      ASSIGN_OR_RETURN(opt.kv.weights, weights.Resolve(opt.kv.policy, kv.weights_name()));
    } else if (!kv.weights_name().empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "kv.weights_name: applies to locret and attention-gate, not to ", opt.kv.policy));
    }
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
  std::string owner_key;  // the API key that started it ("" without keys)
  PreparedRequest prepared;
  std::atomic<bool> cancelled{false};
  GenerateReactor* reactor = nullptr;       // valid until reactor->Complete
  std::unique_ptr<model::SequenceRun> run;  // once admitted (engine thread only)
  std::chrono::steady_clock::time_point queued_at = std::chrono::steady_clock::now();
  std::chrono::steady_clock::time_point started;
  std::chrono::system_clock::time_point deadline = std::chrono::system_clock::time_point::max();
  // Engine thread only, once admitted.
  uint64_t seq_id = 0;
  std::vector<StageGrant> grants;           // per stage
  std::vector<std::vector<int64_t>> lower;  // per stage: layer budgets to lower at next step
  bool in_flight = false;
  bool freeing = false;
  std::map<int, v1::SequenceKvStats> stage_stats;
};

void GenerateReactor::OnCancel() { job_->cancelled.store(true); }

namespace {

using Clock = std::chrono::steady_clock;

}  // namespace

// The engine thread's state.
struct GenerationService::Engine {
  struct StepReply {
    uint64_t step_id;
    int stage;
    grpc::Status status;
    v1::StepResult result;
  };
  struct FreeReply {
    uint64_t batch;
    int stage;
    grpc::Status status;
    v1::FreeResponse response;
  };
  struct MicroBatch {
    std::vector<model::PlannedSequence> plan;
    std::vector<std::shared_ptr<Job>> jobs;
    int replies = 0;
    absl::Status status;
    int failed_stage = -1;
    std::vector<int32_t> tokens;
  };
  struct FreeBatch {
    std::vector<std::shared_ptr<Job>> jobs;
    int replies = 0;
  };
  struct StageConn {  // a copy of what the engine needs of a stage
    WorkerClient client;
    std::string worker_id, address;
  };

  // Filled by gRPC callbacks, guarded by the service's mu_.
  std::deque<StepReply> step_replies;
  std::deque<FreeReply> free_replies;

  // Engine thread only.
  std::vector<std::shared_ptr<Job>> active;  // admitted, not yet completed
  std::map<uint64_t, MicroBatch> in_flight;
  std::map<uint64_t, FreeBatch> freeing;
  std::vector<StageConn> conns;
  uint64_t next_step_id = 1, next_free_id = 1, next_seq_id = 1;
  uint64_t caps_seen = 0;
  Clock::time_point retry_at;
  std::vector<Clock::time_point> last_relief;  // per stage
  Clock::time_point last_housekeeping;
  bool pressure = false;       // some stage reported memory pressure
  std::string nccl_unique_id;  // from stage 0 of a GPU pipeline, for every stage
  // Token chunks produced by CompleteStep, written once the next plans are sent.
  std::vector<std::pair<GenerateReactor*, v1::GenerateResponse>> writes;
  std::atomic<bool> ready{false};
};

GenerationService::GenerationService(model::Generator* frontend, Cluster* cluster,
                                     ServiceOptions options)
    : frontend_(frontend), cluster_(cluster), options_(std::move(options)) {
  engine_state_ = std::make_unique<Engine>();
  {
    std::lock_guard<std::mutex> lock(cluster_->mu);
    cluster_->max_batch = options_.max_batch;
  }
  cluster_->set_on_change([this] { Wake(); });
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
  cluster_->set_on_change(nullptr);
}

void GenerationService::Wake() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    wake_ = true;
  }
  cv_.notify_all();
}

std::string GenerationService::load_error() {
  std::lock_guard<std::mutex> lock(mu_);
  return load_error_;
}

bool GenerationService::WaitReady(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  return cv_.wait_for(lock, timeout, [this] { return stopping_ || engine_state_->ready.load(); }) &&
         engine_state_->ready.load();
}

grpc::ServerWriteReactor<v1::GenerateResponse>* GenerationService::Generate(
    grpc::CallbackServerContext* context, const v1::GenerateRequest* request) {
  auto job = std::make_shared<Job>();
  auto* reactor = new GenerateReactor(job);
  job->reactor = reactor;
  if (grpc::Status s = security::CheckKey(options_.api_keys.get(), *context, &job->owner_key);
      !s.ok()) {
    reactor->Complete(s);
    return reactor;
  }
  absl::StatusOr<PreparedRequest> prepared =
      PrepareRequest(*request, *frontend_, options_.default_kv, options_.weights);
  if (!prepared.ok()) {
    reactor->Complete(ToGrpc(prepared.status()));
    return reactor;
  }
  job->prepared = *std::move(prepared);
  job->deadline = context->deadline();
  job->id = request->request_id().empty() ? RandomRequestId() : request->request_id();
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
    wake_ = true;
  }
  cv_.notify_all();
  return reactor;
}

namespace {

// Sends the final message and status of a finished run.
void CompleteJob(GenerationService::Job& job, const model::ModelConfig& c,
                 const std::vector<LayerRange>& ranges);

}  // namespace

void GenerationService::EngineLoop() {
  Engine& e = *engine_state_;
  const model::ModelConfig& c = frontend_->config();
  std::vector<LayerRange> ranges;  // of the stages, for the final messages

  auto retire = [this](Job& job) {
    std::lock_guard<std::mutex> lock(mu_);
    --running_;
    ++served_;
    live_.erase(job.id);
  };
  auto finish_now = [&](const std::shared_ptr<Job>& job, const grpc::Status& status) {
    job->reactor->Complete(status);
    std::lock_guard<std::mutex> lock(mu_);
    ++served_;
    live_.erase(job->id);
  };
  auto release = [&](Job& job) {
    std::lock_guard<std::mutex> lock(cluster_->mu);
    for (size_t s = 0; s < job.grants.size() && s < cluster_->stages.size(); ++s) {
      cluster_->stages[s].admitted_bytes -= job.grants[s].bytes;
    }
    job.grants.clear();
  };
  auto flush_writes = [&] {
    for (auto& [reactor, message] : e.writes) reactor->Send(std::move(message));
    e.writes.clear();
  };
  auto complete_active = [&](const std::shared_ptr<Job>& job) {
    flush_writes();  // a stream's chunks go before its final message
    release(*job);
    CompleteJob(*job, c, ranges);
    retire(*job);
    e.active.erase(std::find(e.active.begin(), e.active.end(), job));
  };
  // Every running sequence fails with `status`; the stages forget them when rewired.
  auto lose_pipeline = [&](const absl::Status& status) {
    if (e.ready.load()) {
      std::fprintf(stderr, "kvgate: pipeline lost: %s\n", std::string(status.message()).c_str());
    }
    e.ready.store(false);
    {
      std::lock_guard<std::mutex> lock(cluster_->mu);
      cluster_->ready = false;
    }
    std::vector<std::shared_ptr<Job>> jobs = e.active;
    for (const auto& job : jobs) {
      if (!job->run->done()) job->run->Fail(status);
      complete_active(job);
    }
    e.in_flight.clear();
    e.freeing.clear();
    // The surviving stages drop every sequence now (they are reset again when rewired).
    for (const Engine::StageConn& conn : e.conns) {
      if (conn.client.stub == nullptr) continue;
      auto ctx = conn.client.Context(std::chrono::seconds(2));
      auto req = std::make_shared<v1::FreeRequest>();
      auto resp = std::make_shared<v1::FreeResponse>();
      req->set_all(true);
      conn.client.stub->async()->Free(ctx.get(), req.get(), resp.get(),
                                      [ctx, req, resp](grpc::Status) {});
    }
    e.retry_at = Clock::now() + cluster_->dead_after() + std::chrono::milliseconds(100);
  };

  while (true) {
    std::deque<Engine::StepReply> step_replies;
    std::deque<Engine::FreeReply> free_replies;
    bool stopping = false;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait_for(lock, std::chrono::milliseconds(20), [&] {
        return stopping_ || wake_ || !e.step_replies.empty() || !e.free_replies.empty();
      });
      wake_ = false;
      step_replies.swap(e.step_replies);
      free_replies.swap(e.free_replies);
      stopping = stopping_;
    }
    if (stopping) {
      std::vector<std::shared_ptr<Job>> jobs = e.active;
      for (const auto& job : jobs) {
        if (!job->run->done()) job->run->Fail(absl::UnavailableError("the server is stopping"));
        complete_active(job);
      }
      std::deque<std::shared_ptr<Job>> queued;
      {
        std::lock_guard<std::mutex> lock(mu_);
        queued.swap(queue_);
      }
      for (const auto& job : queued) {
        finish_now(job, grpc::Status(grpc::StatusCode::UNAVAILABLE, "the server is stopping"));
      }
      return;
    }

    // 1. Results of micro-batches.
    for (Engine::StepReply& r : step_replies) {
      auto it = e.in_flight.find(r.step_id);
      if (it == e.in_flight.end()) continue;  // from before the pipeline was lost
      Engine::MicroBatch& mb = it->second;
      ++mb.replies;
      if (!r.status.ok() && mb.status.ok()) {
        mb.status = FromGrpc(r.status);
        mb.failed_stage = r.stage;
      }
      if (r.status.ok() && r.stage == options_.stages - 1) {
        mb.tokens.assign(r.result.tokens().begin(), r.result.tokens().end());
      }
      if (mb.replies < options_.stages) continue;
      Engine::MicroBatch done = std::move(mb);
      e.in_flight.erase(it);
      for (const auto& job : done.jobs) job->in_flight = false;
      if (done.status.ok() && done.tokens.size() == done.plan.size()) {
        frontend_->CompleteStep(done.plan, done.tokens);
      } else if (done.status.ok()) {
        lose_pipeline(absl::InternalError("the last stage returned no tokens"));
      } else if (absl::IsUnavailable(done.status) || absl::IsAborted(done.status) ||
                 absl::IsDeadlineExceeded(done.status) || absl::IsDataLoss(done.status) ||
                 absl::IsInternal(done.status)) {
        lose_pipeline(absl::UnavailableError(absl::StrCat("pipeline stage ", done.failed_stage,
                                                          " failed: ", done.status.message())));
      } else {
        for (const model::PlannedSequence& p : done.plan) {
          if (!p.run->done()) {
            p.run->Fail(absl::Status(
                done.status.code(),
                absl::StrCat("stage ", done.failed_stage, ": ", done.status.message())));
          }
        }
      }
    }

    // 2. Freed sequences: their KV is back on every stage; complete them.
    for (Engine::FreeReply& r : free_replies) {
      auto it = e.freeing.find(r.batch);
      if (it == e.freeing.end()) continue;
      for (const v1::SequenceKvStats& st : r.response.stats()) {
        for (const auto& job : it->second.jobs) {
          if (job->seq_id == st.seq_id()) job->stage_stats[r.stage] = st;
        }
      }
      if (++it->second.replies < options_.stages) continue;
      std::vector<std::shared_ptr<Job>> jobs = std::move(it->second.jobs);
      e.freeing.erase(it);
      for (const auto& job : jobs) complete_active(job);
    }

    // 3-5. Membership, pipeline, caps and relief change on heartbeat time scales: look at
    // them every 10 ms, not at every step.
    const bool housekeeping = Clock::now() - e.last_housekeeping > std::chrono::milliseconds(10);
    if (housekeeping) e.last_housekeeping = Clock::now();
    // 3. Liveness: a stage whose worker stopped heartbeating is lost.
    if (housekeeping) {
      std::string lost;
      {
        std::lock_guard<std::mutex> lock(cluster_->mu);
        const auto now = Clock::now();
        for (auto& [id, w] : cluster_->workers) {
          if (w.alive && now - w.last_seen > cluster_->dead_after()) {
            w.alive = false;
            std::fprintf(stderr, "kvgate: worker %s (%s) stopped answering\n", id.c_str(),
                         w.address.c_str());
          }
        }
        for (size_t s = 0; s < cluster_->stages.size(); ++s) {
          StageRecord& st = cluster_->stages[s];
          if (st.worker_id.empty()) continue;
          auto w = cluster_->workers.find(st.worker_id);
          if (w == cluster_->workers.end() || !w->second.alive) {
            lost = absl::StrCat("stage ", s, "'s worker ", st.worker_id,
                                w != cluster_->workers.end() ? " at " + w->second.address : "",
                                " stopped answering");
            if (w != cluster_->workers.end()) w->second.stage = -1;
            st.worker_id.clear();
          }
        }
      }
      if (!lost.empty() && e.ready.load()) lose_pipeline(absl::UnavailableError(lost));
    }

    // 4. (Re)build the pipeline when it is not ready and workers are there.
    if (housekeeping && !e.ready.load() && e.in_flight.empty() && Clock::now() >= e.retry_at) {
      struct ToLoad {
        int stage;
        std::string worker_id;
        WorkerClient client;
        LayerRange range;
      };
      std::vector<ToLoad> loads;
      bool complete = false;
      {
        std::lock_guard<std::mutex> lock(cluster_->mu);
        std::vector<WorkerRecord*> spare;
        for (auto& [id, w] : cluster_->workers) {
          if (w.alive && w.stage < 0) spare.push_back(&w);
        }
        // In the order they registered.
        std::sort(spare.begin(), spare.end(),
                  [](WorkerRecord* a, WorkerRecord* b) { return a->registered < b->registered; });
        if (cluster_->stages.empty() && static_cast<int>(spare.size()) >= options_.stages) {
          std::vector<int64_t> memories;
          for (int s = 0; s < options_.stages; ++s) {
            memories.push_back(spare[static_cast<size_t>(s)]->memory_limit);
          }
          absl::StatusOr<std::vector<LayerRange>> plan =
              options_.layers.empty()
                  ? PlanLayers(static_cast<int>(c.num_layers), memories)
                  : ParseLayerSplit(options_.layers, static_cast<int>(c.num_layers),
                                    options_.stages);
          if (!plan.ok()) {
            std::fprintf(stderr, "kvgate: cannot plan the pipeline: %s\n",
                         std::string(plan.status().message()).c_str());
            e.retry_at = Clock::now() + std::chrono::seconds(3600);
          } else {
            cluster_->stages.resize(static_cast<size_t>(options_.stages));
            for (size_t s = 0; s < plan->size(); ++s) {
              cluster_->stages[s].first_layer = (*plan)[s].first;
              cluster_->stages[s].last_layer = (*plan)[s].second;
            }
          }
        }
        if (!cluster_->stages.empty()) {
          size_t next_spare = 0;
          complete = true;
          for (size_t s = 0; s < cluster_->stages.size(); ++s) {
            StageRecord& st = cluster_->stages[s];
            if (!st.worker_id.empty()) continue;
            if (next_spare >= spare.size()) {
              complete = false;
              continue;
            }
            WorkerRecord* w = spare[next_spare++];
            w->stage = static_cast<int>(s);
            st.worker_id = w->id;
            loads.push_back(
                ToLoad{static_cast<int>(s), w->id, w->client, {st.first_layer, st.last_layer}});
          }
        }
      }
      bool ok = complete;
      for (const ToLoad& l : loads) {
        v1::ShardAssignment a;
        a.set_model_dir(options_.model_dir);
        a.set_stage(l.stage);
        a.set_num_stages(options_.stages);
        a.set_first_layer(l.range.first);
        a.set_last_layer(l.range.second);
        a.set_threads(options_.worker_threads);
        v1::ShardLoaded loaded;
        auto ctx = l.client.Context(std::chrono::seconds(600));
        grpc::Status s = l.client.stub->LoadShard(ctx.get(), a, &loaded);
        std::lock_guard<std::mutex> lock(cluster_->mu);
        StageRecord& st = cluster_->stages[static_cast<size_t>(l.stage)];
        if (!s.ok()) {
          std::fprintf(stderr, "kvgate: worker %s could not load layers [%d, %d): %s\n",
                       l.worker_id.c_str(), l.range.first, l.range.second,
                       s.error_message().c_str());
          {
            std::lock_guard<std::mutex> lock2(mu_);
            load_error_ =
                absl::StrCat("worker ", l.worker_id, " could not load layers [", l.range.first,
                             ", ", l.range.second, "): ", s.error_message());
          }
          auto w = cluster_->workers.find(l.worker_id);
          if (w != cluster_->workers.end()) {
            w->second.alive = false;
            w->second.stage = -1;
          }
          st.worker_id.clear();
          ok = false;
          continue;
        }
        st.weight_bytes = loaded.weight_bytes();
        if (l.stage == 0) e.nccl_unique_id = loaded.nccl_unique_id();
        st.capacity.first_layer = st.first_layer;
        st.capacity.kv_capacity_bytes = loaded.kv_capacity_bytes();
        st.capacity.bytes_per_token.assign(loaded.bytes_per_token().begin(),
                                           loaded.bytes_per_token().end());
        st.capacity.layer_caps.resize(st.capacity.bytes_per_token.size(), 0);
        st.admitted_bytes = 0;
      }
      if (ok) {
        // Wire the stages to one another; every worker starts afresh at the next step id.
        std::vector<std::pair<WorkerClient, std::string>> wiring;
        const std::string data_token = security::RandomHex(32);
        {
          std::lock_guard<std::mutex> lock(cluster_->mu);
          e.conns.clear();
          ranges.clear();
          for (size_t s = 0; s < cluster_->stages.size(); ++s) {
            StageRecord& st = cluster_->stages[s];
            st.admitted_bytes = 0;
            const WorkerRecord& w = cluster_->workers.at(st.worker_id);
            std::string next;
            if (s + 1 < cluster_->stages.size()) {
              next = cluster_->workers.at(cluster_->stages[s + 1].worker_id).data_address;
            }
            wiring.push_back({w.client, next});
            e.conns.push_back(Engine::StageConn{w.client, w.id, w.address});
            ranges.push_back({st.first_layer, st.last_layer});
          }
        }
        for (auto& [client, next] : wiring) {
          v1::PipelineWiring wire;
          wire.set_next_data_address(next);
          wire.set_first_step_id(e.next_step_id);
          wire.set_nccl_unique_id(e.nccl_unique_id);
          wire.set_num_stages(options_.stages);
          wire.set_data_token(data_token);
          v1::WiringDone done;
          auto ctx = client.Context(std::chrono::seconds(15));
          grpc::Status s = client.stub->Connect(ctx.get(), wire, &done);
          if (!s.ok()) {
            std::fprintf(stderr, "kvgate: wiring the pipeline failed: %s\n",
                         s.error_message().c_str());
            ok = false;
            break;
          }
        }
        if (ok) {
          std::string layout;
          {
            std::lock_guard<std::mutex> lock(cluster_->mu);
            cluster_->ready = true;
            for (size_t s = 0; s < cluster_->stages.size(); ++s) {
              const StageRecord& st = cluster_->stages[s];
              absl::StrAppend(&layout, s ? ", " : "", st.worker_id, " [", st.first_layer, ", ",
                              st.last_layer, ")");
            }
          }
          std::fprintf(stderr, "kvgate: pipeline ready: %s\n", layout.c_str());
          {
            std::lock_guard<std::mutex> lock(mu_);
            e.ready.store(true);
          }
          cv_.notify_all();
        } else {
          e.retry_at = Clock::now() + std::chrono::milliseconds(500);
        }
      }
    }

    // 5. Operator caps lower the budgets of running sequences at their next step.
    if (housekeeping) {
      std::lock_guard<std::mutex> lock(cluster_->mu);
      if (cluster_->caps_version != e.caps_seen) {
        e.caps_seen = cluster_->caps_version;
        for (const auto& job : e.active) {
          if (!job->prepared.options.kv.evicts()) continue;
          job->lower.resize(job->grants.size());
          for (size_t s = 0; s < job->grants.size() && s < cluster_->stages.size(); ++s) {
            const std::vector<int64_t>& caps = cluster_->stages[s].capacity.layer_caps;
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
    }

    // 5b. Relief: a stage whose worker reports memory pressure lowers the budgets of its running
    // sequences by a quarter (at most once a second; they evict down and their slabs shrink
    // at their next step), and admission waits while any stage is under pressure.
    if (housekeeping) {
      e.pressure = false;
      std::vector<int> pressed;
      {
        std::lock_guard<std::mutex> lock(cluster_->mu);
        for (size_t s = 0; s < cluster_->stages.size(); ++s) {
          auto w = cluster_->workers.find(cluster_->stages[s].worker_id);
          if (w != cluster_->workers.end() && w->second.usage.pressure()) {
            pressed.push_back(static_cast<int>(s));
          }
        }
      }
      e.pressure = !pressed.empty() && e.ready.load();
      e.last_relief.resize(static_cast<size_t>(options_.stages));
      for (int s : pressed) {
        if (!e.ready.load() ||
            Clock::now() - e.last_relief[static_cast<size_t>(s)] < std::chrono::seconds(1)) {
          continue;
        }
        e.last_relief[static_cast<size_t>(s)] = Clock::now();
        int64_t lowered = 0, freed = 0;
        std::lock_guard<std::mutex> lock(cluster_->mu);
        StageRecord& st = cluster_->stages[static_cast<size_t>(s)];
        for (const auto& job : e.active) {
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
          const int64_t top = *std::max_element(g.layer_budgets.begin(), g.layer_budgets.end());
          const int64_t bytes = (top + kv.slab_extra()) * st.capacity.bytes_per_slot();
          if (bytes < g.bytes) {
            st.admitted_bytes -= g.bytes - bytes;
            freed += g.bytes - bytes;
            g.bytes = bytes;
            g.budget = top;
          }
          ++lowered;
        }
        std::fprintf(stderr,
                     "kvgate: relief for stage %d (memory pressure): %lld sequences lowered by "
                     "a quarter, %lld KV bytes to free\n",
                     s, static_cast<long long>(lowered), static_cast<long long>(freed));
      }
    }

    // 6. Admission: new requests join between steps, while every stage can hold their budget
    // (and none is under memory pressure).
    const auto now_sys = std::chrono::system_clock::now();
    while (!e.pressure && static_cast<int64_t>(e.active.size()) < options_.max_batch) {
      std::shared_ptr<Job> job;
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (queue_.empty()) break;
        job = queue_.front();
      }
      auto pop = [&] {
        std::lock_guard<std::mutex> lock(mu_);
        queue_.pop_front();
      };
      if (job->cancelled.load()) {
        pop();
        finish_now(job, grpc::Status(grpc::StatusCode::CANCELLED,
                                     absl::StrCat("request ", job->id, " was cancelled")));
        continue;
      }
      if (!e.ready.load()) {
        std::string why;
        {
          std::lock_guard<std::mutex> lock(cluster_->mu);
          int have = 0;
          for (const StageRecord& st : cluster_->stages) have += st.worker_id.empty() ? 0 : 1;
          why = absl::StrCat("the pipeline is not ready (", have, " of ", options_.stages,
                             " stages have a worker); retry shortly");
        }
        pop();
        finish_now(job, grpc::Status(grpc::StatusCode::UNAVAILABLE, why));
        continue;
      }
      const model::GenerateOptions& opt = job->prepared.options;
      std::vector<StageCapacity> caps;
      std::vector<int64_t> admitted;
      {
        std::lock_guard<std::mutex> lock(cluster_->mu);
        for (const StageRecord& st : cluster_->stages) {
          caps.push_back(st.capacity);
          admitted.push_back(st.admitted_bytes);
        }
      }
      absl::StatusOr<std::vector<StageGrant>> grants = GrantBudgets(
          opt.kv, static_cast<int64_t>(job->prepared.prompt_ids.size()) + opt.max_tokens,
          c.max_position_embeddings, caps, options_.max_batch);
      if (!grants.ok()) {
        pop();
        finish_now(job, ToGrpc(grants.status()));
        continue;
      }
      int short_stage = -1;
      for (size_t s = 0; s < caps.size(); ++s) {
        if (admitted[s] + (*grants)[s].bytes > caps[s].kv_capacity_bytes) {
          short_stage = static_cast<int>(s);
        }
      }
      if (short_stage >= 0) {
        // Waits for memory; fails just before its deadline so the client sees why.
        if (job->deadline - now_sys < std::chrono::milliseconds(150)) {
          pop();
          finish_now(job, grpc::Status(
                              grpc::StatusCode::RESOURCE_EXHAUSTED,
                              absl::StrCat("kv: stage ", short_stage,
                                           " had no room for the request's KV budget "
                                           "before its deadline (",
                                           admitted[static_cast<size_t>(short_stage)], " of ",
                                           caps[static_cast<size_t>(short_stage)].kv_capacity_bytes,
                                           " bytes admitted)")));
          continue;
        }
        break;
      }
      pop();
      Job* j = job.get();
      GenerateReactor* reactor = job->reactor;
      model::GenerateOptions run_opt = opt;
      Engine* engine = &e;
      run_opt.on_token = [j, reactor, engine](int32_t token, std::string_view text) {
        // Written after the next step plans are out (off the pipeline's critical path).
        v1::GenerateResponse message;
        v1::TokenChunk* chunk = message.mutable_chunk();
        chunk->add_token_ids(token);
        chunk->set_text(std::string(text));
        engine->writes.emplace_back(reactor, std::move(message));
        return !j->cancelled.load();
      };
      run_opt.keep_going = [j] { return !j->cancelled.load(); };
      absl::StatusOr<std::unique_ptr<model::SequenceRun>> run =
          frontend_->StartRemote(job->prepared.prompt_ids, run_opt);
      if (!run.ok()) {
        finish_now(job, ToGrpc(run.status()));
        continue;
      }
      job->run = *std::move(run);
      job->started = Clock::now();
      job->seq_id = e.next_seq_id++;
      job->grants = *std::move(grants);
      {
        std::lock_guard<std::mutex> lock(cluster_->mu);
        for (size_t s = 0; s < job->grants.size(); ++s) {
          cluster_->stages[s].admitted_bytes += job->grants[s].bytes;
        }
      }
      {
        std::lock_guard<std::mutex> lock(mu_);
        ++running_;
      }
      e.active.push_back(job);
    }
    // Queued requests that wait for memory past their deadline fail with RESOURCE_EXHAUSTED.
    {
      std::vector<std::shared_ptr<Job>> expired;
      {
        std::lock_guard<std::mutex> lock(mu_);
        for (auto it = queue_.begin(); it != queue_.end();) {
          if ((*it)->deadline - now_sys < std::chrono::milliseconds(150) ||
              (*it)->cancelled.load()) {
            expired.push_back(*it);
            it = queue_.erase(it);
          } else {
            ++it;
          }
        }
      }
      for (const auto& job : expired) {
        finish_now(job, job->cancelled.load()
                            ? grpc::Status(grpc::StatusCode::CANCELLED,
                                           absl::StrCat("request ", job->id, " was cancelled"))
                            : grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                                           "kv: no stage room for the request's KV budget "
                                           "before its deadline"));
      }
    }
    {
      std::lock_guard<std::mutex> lock(cluster_->mu);
      cluster_->running = static_cast<int64_t>(e.active.size());
      std::lock_guard<std::mutex> lock2(mu_);
      cluster_->queued = static_cast<int64_t>(queue_.size());
    }

    // 7. Micro-batches: up to `stages` in flight, a sequence in at most one.
    if (e.ready.load()) {
      std::vector<std::shared_ptr<Job>> idle;
      for (const auto& job : e.active) {
        if (!job->in_flight && !job->freeing && !job->run->done()) idle.push_back(job);
      }
      // Micro-batches of equal size, ceil(running / stages): a stage's share of the work stays
      // even as sequences come and go (sequences beyond it wait for the next free slot).
      size_t running = 0;
      for (const auto& job : e.active) running += job->run->done() || job->freeing ? 0 : 1;
      const size_t target = (running + static_cast<size_t>(options_.stages) - 1) /
                            static_cast<size_t>(options_.stages);
      size_t taken = 0;
      while (static_cast<int>(e.in_flight.size()) < options_.stages && taken < idle.size()) {
        const size_t n = std::min(idle.size() - taken, std::max<size_t>(target, 1));
        std::vector<std::shared_ptr<Job>> group(idle.begin() + static_cast<long>(taken),
                                                idle.begin() + static_cast<long>(taken + n));
        taken += n;
        std::vector<model::SequenceRun*> runs;
        for (const auto& job : group) runs.push_back(job->run.get());
        std::vector<model::PlannedSequence> plan = frontend_->PlanStep(runs);
        if (plan.empty()) continue;
        const uint64_t step_id = e.next_step_id++;
        Engine::MicroBatch mb;
        for (const model::PlannedSequence& p : plan) {
          for (const auto& job : group) {
            if (job->run.get() == p.run) {
              mb.jobs.push_back(job);
              job->in_flight = true;
            }
          }
        }
        for (int s = 0; s < options_.stages; ++s) {
          auto req = std::make_shared<v1::StepPlan>();
          req->set_step_id(step_id);
          for (size_t i = 0; i < plan.size(); ++i) {
            const model::PlannedSequence& p = plan[i];
            Job& job = *mb.jobs[i];
            v1::SequenceStep* q = req->add_seqs();
            q->set_seq_id(job.seq_id);
            if (s == 0) q->mutable_token_ids()->Add(p.tokens.begin(), p.tokens.end());
            q->set_num_tokens(static_cast<int32_t>(p.tokens.size()));
            q->set_first_position(p.first_position);
            q->set_kind(static_cast<int32_t>(p.kind));
            q->set_rope_seq_len(p.rope_seq_len);
            q->set_sample(p.sample);
            q->set_new_cache(p.new_cache);
            const StageGrant& g = job.grants[static_cast<size_t>(s)];
            if (p.first_step) {
              v1::SequenceInit* init = q->mutable_init();
              const cache::EvictionParams& kv = job.prepared.options.kv;
              *init->mutable_kv() = proto::ToProto(kv, kv.evicts() ? g.budget : kv.budget);
              if (job.prepared.options.kv.evicts()) {
                init->mutable_layer_budgets()->Add(g.layer_budgets.begin(), g.layer_budgets.end());
              }
              init->set_max_tokens(c.max_position_embeddings);
              if (s == options_.stages - 1) {
                *init->mutable_sampling() = proto::ToProto(job.prepared.options.sampling);
                init->mutable_prompt_ids()->Add(job.prepared.prompt_ids.begin(),
                                                job.prepared.prompt_ids.end());
              }
            }
            if (static_cast<size_t>(s) < job.lower.size() &&
                !job.lower[static_cast<size_t>(s)].empty()) {
              q->mutable_layer_budgets()->Add(job.lower[static_cast<size_t>(s)].begin(),
                                              job.lower[static_cast<size_t>(s)].end());
              job.lower[static_cast<size_t>(s)].clear();
            }
          }
          auto ctx = e.conns[static_cast<size_t>(s)].client.Context(std::chrono::seconds(600));
          auto resp = std::make_shared<v1::StepResult>();
          e.conns[static_cast<size_t>(s)].client.stub->async()->Step(
              ctx.get(), req.get(), resp.get(), [this, ctx, req, resp, s](grpc::Status status) {
                {
                  std::lock_guard<std::mutex> lock(mu_);
                  engine_state_->step_replies.push_back(
                      Engine::StepReply{req->step_id(), s, status, std::move(*resp)});
                }
                cv_.notify_all();
              });
        }
        mb.plan = std::move(plan);
        e.in_flight[step_id] = std::move(mb);
      }
    }

    flush_writes();

    // 8. Finished runs: free their KV on every stage, then complete them.
    {
      std::vector<std::shared_ptr<Job>> done;
      for (const auto& job : e.active) {
        if (job->run->done() && !job->in_flight && !job->freeing) done.push_back(job);
      }
      if (!done.empty() &&
          (!e.ready.load() || e.conns.size() != static_cast<size_t>(options_.stages))) {
        for (const auto& job : done) complete_active(job);
      } else if (!done.empty()) {
        const uint64_t batch = e.next_free_id++;
        auto req = std::make_shared<v1::FreeRequest>();
        for (const auto& job : done) {
          job->freeing = true;
          req->add_seq_ids(job->seq_id);
        }
        e.freeing[batch] = Engine::FreeBatch{done, 0};
        for (int s = 0; s < options_.stages; ++s) {
          auto ctx = e.conns[static_cast<size_t>(s)].client.Context(std::chrono::seconds(10));
          auto resp = std::make_shared<v1::FreeResponse>();
          e.conns[static_cast<size_t>(s)].client.stub->async()->Free(
              ctx.get(), req.get(), resp.get(),
              [this, ctx, req, resp, s, batch](grpc::Status status) {
                {
                  std::lock_guard<std::mutex> lock(mu_);
                  engine_state_->free_replies.push_back(
                      Engine::FreeReply{batch, s, status, std::move(*resp)});
                }
                cv_.notify_all();
              });
        }
      }
    }
  }
}

namespace {

void CompleteJob(GenerationService::Job& job, const model::ModelConfig& c,
                 const std::vector<LayerRange>& ranges) {
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
  const bool full = !kv.evicts();
  v1::KvStats* k = f->mutable_kv();
  k->set_policy(kv.policy);
  k->set_budget(full ? 0 : kv.budget);
  k->set_chunk(full ? opt.prefill_chunk : kv.chunk);
  k->set_position(full ? "original" : kv.position_mode());
  int64_t evicted = 0, retained = 0, peak = 0, max_retained = 0, max_held = 0, seen = 0;
  for (size_t s = 0; s < ranges.size(); ++s) {
    auto it = job.stage_stats.find(static_cast<int>(s));
    const int64_t layers = ranges[s].second - ranges[s].first;
    v1::StageBudget* stage = k->add_stages();
    stage->set_stage(static_cast<int32_t>(s));
    stage->set_first_layer(ranges[s].first);
    stage->set_last_layer(ranges[s].second);
    if (it == job.stage_stats.end()) continue;
    const v1::SequenceKvStats& st = it->second;
    stage->set_budget(st.budget());
    stage->mutable_layer_budgets()->CopyFrom(st.layer_budgets());
    evicted += st.evicted_tokens();
    peak += st.peak_bytes();
    max_retained = std::max(max_retained, st.max_retained_per_head());
    max_held = std::max(max_held, st.max_held_per_head());
    seen = std::max(seen, st.tokens_seen());
    retained += st.tokens_seen() * layers * c.num_kv_heads - st.evicted_tokens();
  }
  k->set_max_retained_per_head(max_retained);
  k->set_max_held_per_head(max_held);
  k->set_evicted_tokens(evicted);
  cache::KvCache::Stats total;
  total.evicted_tokens = evicted;
  k->set_eviction_ratio(model::EvictionRatio(total, seen, c));
  k->set_peak_kv_bytes(peak);
  k->set_retained_tokens(retained);
  reactor->Send(std::move(message));
  reactor->Complete(grpc::Status::OK);
}

}  // namespace

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
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = live_.find(request->request_id());
    const bool mine =
        it != live_.end() && (options_.api_keys == nullptr || admin ||
                              security::ConstantTimeEquals(it->second->owner_key, key));
    response->set_found(mine);
    if (mine) it->second->cancelled.store(true);
    wake_ = true;
  }
  cv_.notify_all();
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
  response->set_ready(engine_state_->ready.load());
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
  if (options_.default_kv.learned()) kv->set_weights_name(options_.default_kv.policy);
  response->set_uptime_seconds(
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count());
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace kvgate::coordinator
