#include "coordinator/engine.h"

#include <algorithm>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/log.h"
#include "proto/convert.h"
#include "proto/grpc_status.h"

namespace kvgate::coordinator {
namespace {

using Clock = std::chrono::steady_clock;

// Membership, the pipeline, caps and relief change on heartbeat time scales: the loop looks
// at them this often, not at every step.
constexpr auto kHousekeeping = std::chrono::milliseconds(10);

// A stage that answers so has lost its state or its link to this coordinator (a restarted
// worker refuses the old control token; a reloaded one no longer knows the sequences).
bool LosesPipeline(const absl::Status& s) {
  return absl::IsUnavailable(s) || absl::IsAborted(s) || absl::IsDeadlineExceeded(s) ||
         absl::IsDataLoss(s) || absl::IsInternal(s) || absl::IsUnauthenticated(s) ||
         absl::IsFailedPrecondition(s);
}

}  // namespace

Engine::Engine(model::Generator* frontend, Cluster* cluster, PipelineExecutor* executor,
               EngineOptions options)
    : frontend_(frontend),
      cluster_(cluster),
      executor_(executor),
      options_(std::move(options)),
      scheduler_(cluster, frontend->config().max_position_embeddings, options_.max_batch,
                 options_.stages),
      output_(frontend, options.metrics) {
  seconds_per_token_.assign(static_cast<size_t>(options_.stages), -1.0);
  // Every stage's series exists from the start (0 until something happens).
  counts_.relief_events.assign(static_cast<size_t>(options_.stages), 0);
  counts_.granted_budget_tokens.assign(static_cast<size_t>(options_.stages), 0);
  counts_.granted_sequences.assign(static_cast<size_t>(options_.stages), 0);
  cluster_->SetMaxBatch(options_.max_batch);
  cluster_->set_on_change([this] { Wake(); });
  executor_->SetCallbacks(
      [this](StepReply r) {
        {
          std::lock_guard<std::mutex> lock(mu_);
          step_replies_.push_back(std::move(r));
        }
        cv_.notify_all();
      },
      [this](FreeReply r) {
        {
          std::lock_guard<std::mutex> lock(mu_);
          free_replies_.push_back(std::move(r));
        }
        cv_.notify_all();
      });
  thread_ = std::thread([this] { Loop(); });
}

Engine::~Engine() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
    for (auto& [id, job] : live_) job->cancelled.store(true);
  }
  cv_.notify_all();
  thread_.join();
  executor_->SetCallbacks(nullptr, nullptr);
  cluster_->set_on_change(nullptr);
}

grpc::Status Engine::Submit(std::shared_ptr<Job> job) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_ || draining_) {
      return grpc::Status(grpc::StatusCode::UNAVAILABLE, "the server is shutting down");
    }
    if (live_.count(job->id) > 0) {
      return grpc::Status(grpc::StatusCode::ALREADY_EXISTS,
                          absl::StrCat("request_id: '", job->id, "' is in use"));
    }
    live_[job->id] = job;
    queue_.push_back(std::move(job));
    wake_ = true;
  }
  cv_.notify_all();
  return grpc::Status::OK;
}

bool Engine::Abort(const std::string& id, const std::function<bool(const Job&)>& allowed) {
  bool found = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = live_.find(id);
    found = it != live_.end() && allowed(*it->second);
    if (found) it->second->cancelled.store(true);
    wake_ = true;
  }
  cv_.notify_all();
  return found;
}

bool Engine::WaitReady(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  return cv_.wait_for(lock, timeout, [this] { return stopping_ || ready_.load(); }) &&
         ready_.load();
}

std::string Engine::load_error() {
  std::lock_guard<std::mutex> lock(mu_);
  return load_error_;
}

int64_t Engine::running() {
  std::lock_guard<std::mutex> lock(mu_);
  return running_;
}

int64_t Engine::queued() {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int64_t>(queue_.size());
}

int64_t Engine::served() {
  std::lock_guard<std::mutex> lock(mu_);
  return served_;
}

void Engine::Wake() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    wake_ = true;
  }
  cv_.notify_all();
}

bool Engine::Drain(std::chrono::milliseconds grace) {
  std::unique_lock<std::mutex> lock(mu_);
  draining_ = true;
  drain_deadline_ = Clock::now() + grace;
  wake_ = true;
  cv_.notify_all();
  return cv_.wait_for(lock, grace + std::chrono::seconds(2), [this] { return live_.empty(); });
}

void Engine::SetReadyListener(std::function<void(bool)> listener) {
  std::lock_guard<std::mutex> lock(mu_);
  on_ready_ = std::move(listener);
}

void Engine::SetReady(bool ready) {
  cluster_->SetReady(ready);
  std::function<void(bool)> listener;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ready_.store(ready);
    listener = on_ready_;
  }
  cv_.notify_all();
  if (listener) listener(ready);
}

std::chrono::milliseconds Engine::StepTimeout(int64_t tokens, int64_t ahead) const {
  double seconds = 0;
  for (double rate : seconds_per_token_) {
    if (rate < 0) return options_.first_step_deadline;
    seconds += rate * static_cast<double>(tokens + ahead);
  }
  return options_.step_deadline_floor + std::chrono::milliseconds(static_cast<int64_t>(
                                            1000 * options_.step_deadline_factor * seconds));
}

void Engine::CheckStepDeadlines() {
  const auto now = Clock::now();
  for (const auto& [step_id, mb] : in_flight_) {
    if (now < mb.deadline) continue;
    int late = 0;
    while (late < options_.stages && mb.replied[static_cast<size_t>(late)]) ++late;
    log::Warn(absl::StrFormat("pipeline stage %d missed the deadline of step %llu (%d tokens)",
                              late, static_cast<unsigned long long>(step_id),
                              static_cast<int>(mb.tokens_in)));
    LosePipeline(absl::UnavailableError(
        absl::StrCat("pipeline stage ", late, " stopped making progress; retry shortly")));
    return;  // LosePipeline emptied in_flight_
  }
}

void Engine::DrainStep() {
  Clock::time_point deadline;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!draining_) return;
    deadline = drain_deadline_;
  }
  const grpc::Status stopping(grpc::StatusCode::UNAVAILABLE, "the server is shutting down");
  std::deque<std::shared_ptr<Job>> queued;
  {
    std::lock_guard<std::mutex> lock(mu_);
    queued.swap(queue_);
  }
  for (const auto& job : queued) FinishQueued(job, stopping);
  const auto now = Clock::now();
  if (now >= deadline && !drain_ended_streams_) {
    // The grace period is over: every stream ends at its next token, and is freed as usual.
    drain_ended_streams_ = true;
    for (const auto& job : active_) {
      if (!job->run->done()) {
        job->run->Fail(absl::UnavailableError(
            "the server is shutting down (the stream was ended after the grace period)"));
      }
    }
  }
  if (now >= deadline + std::chrono::seconds(1) && !active_.empty()) {
    // A step that outlasts the grace period is not waited for: the stages drop everything.
    std::vector<std::shared_ptr<Job>> jobs = active_;
    for (const auto& job : jobs) Retire(job);
    in_flight_.clear();
    freeing_.clear();
    executor_->FreeAll(wiring_);
  }
}

void Engine::Loop() {
  while (true) {
    std::deque<StepReply> step_replies;
    std::deque<FreeReply> free_replies;
    bool stopping = false;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait_for(lock, std::chrono::milliseconds(20), [&] {
        return stopping_ || wake_ || !step_replies_.empty() || !free_replies_.empty();
      });
      wake_ = false;
      step_replies.swap(step_replies_);
      free_replies.swap(free_replies_);
      stopping = stopping_;
    }
    if (stopping) {
      StopAll();
      return;
    }
    // Update: what the stages answered.
    HandleStepReplies(step_replies);
    HandleFreeReplies(free_replies);
    // Schedule: the pipeline's life, caps, relief; then admission.
    if (Clock::now() - last_housekeeping_ > kHousekeeping) {
      last_housekeeping_ = Clock::now();
      Housekeeping();
    }
    DrainStep();
    AdmitQueued();
    // Cancelled streams not in a step end now (not when their turn in a micro-batch comes).
    for (const auto& job : active_) {
      if (job->cancelled.load() && !job->in_flight && !job->freeing && !job->run->done()) {
        job->run->Fail(absl::CancelledError(absl::StrCat("request ", job->id, " was cancelled")));
      }
    }
    // Execute: the next micro-batches, then the output of the last step, then frees.
    DispatchMicroBatches();
    FlushWrites();
    FreeFinished();
  }
}

void Engine::StopAll() {
  std::vector<std::shared_ptr<Job>> jobs = active_;
  for (const auto& job : jobs) {
    if (!job->run->done()) job->run->Fail(absl::UnavailableError("the server is stopping"));
    Retire(job);
  }
  std::deque<std::shared_ptr<Job>> queued;
  {
    std::lock_guard<std::mutex> lock(mu_);
    queued.swap(queue_);
  }
  for (const auto& job : queued) {
    FinishQueued(job, grpc::Status(grpc::StatusCode::UNAVAILABLE, "the server is stopping"));
  }
}

void Engine::FlushWrites() {
  for (auto& [job, token, text, logprobs] : writes_) {
    output_.Token(std::move(job), token, std::move(text), std::move(logprobs));
  }
  writes_.clear();
}

void Engine::CountGrants(const Job& job, int sign) {
  if (!job.prepared.options.kv.evicts()) return;
  std::lock_guard<std::mutex> lock(counts_mu_);
  const size_t n = job.grants.size();
  if (counts_.granted_budget_tokens.size() < n) {
    counts_.granted_budget_tokens.resize(n, 0);
    counts_.granted_sequences.resize(n, 0);
  }
  for (size_t s = 0; s < n; ++s) {
    counts_.granted_budget_tokens[s] += sign * job.grants[s].budget;
    counts_.granted_sequences[s] += sign;
  }
}

EngineCounts Engine::counts() const {
  std::lock_guard<std::mutex> lock(counts_mu_);
  return counts_;
}

void Engine::Retire(const std::shared_ptr<Job>& job) {
  FlushWrites();  // a stream's chunks go before its final message
  CountGrants(*job, -1);
  scheduler_.Release(*job);
  active_.erase(std::find(active_.begin(), active_.end(), job));
  {
    // Counted before the client hears: its next GetServerInfo sees the request done.
    std::lock_guard<std::mutex> lock(mu_);
    --running_;
    ++served_;
    live_.erase(job->id);
  }
  cv_.notify_all();  // Drain waits for live_ to empty
  output_.Finish(job, ranges_);
}

void Engine::FinishQueued(const std::shared_ptr<Job>& job, grpc::Status status) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++served_;
    live_.erase(job->id);
  }
  cv_.notify_all();
  output_.Fail(job, std::move(status));
}

void Engine::LosePipeline(const absl::Status& status) {
  if (ready_.load()) {
    log::Error(absl::StrFormat("pipeline lost: %s", std::string(status.message()).c_str()));
  }
  SetReady(false);
  std::vector<std::shared_ptr<Job>> jobs = active_;
  for (const auto& job : jobs) {
    if (!job->run->done()) job->run->Fail(status);
    Retire(job);
  }
  in_flight_.clear();
  freeing_.clear();
  // The rebuilt pipeline may have other workers or another layer split: its speed is measured
  // afresh (a cold replacement is not held to its predecessor's deadlines).
  seconds_per_token_.assign(static_cast<size_t>(options_.stages), -1.0);
  // The surviving stages drop every sequence now (they are reset again when rewired).
  executor_->FreeAll(wiring_);
  retry_at_ = Clock::now() + (options_.retry_after.count() > 0
                                  ? options_.retry_after
                                  : cluster_->dead_after() + std::chrono::milliseconds(100));
}

void Engine::HandleStepReplies(std::deque<StepReply>& replies) {
  for (StepReply& r : replies) {
    auto it = in_flight_.find(r.step_id);
    if (it == in_flight_.end()) continue;  // from before the pipeline was lost
    MicroBatch& mb = it->second;
    if (r.stage < 0 || r.stage >= options_.stages || mb.replied[static_cast<size_t>(r.stage)]) {
      continue;
    }
    mb.replied[static_cast<size_t>(r.stage)] = true;
    ++mb.replies;
    if (r.status.ok() && mb.tokens_in > 0) {
      // The stage's speed, for the next steps' deadlines.
      double& rate = seconds_per_token_[static_cast<size_t>(r.stage)];
      const double measured = r.compute_seconds / static_cast<double>(mb.tokens_in);
      rate = rate < 0 ? measured : 0.8 * rate + 0.2 * measured;
    }
    if (!r.status.ok() && mb.status.ok()) {
      mb.status = r.status;
      mb.failed_stage = r.stage;
    }
    if (r.status.ok() && r.stage == options_.stages - 1) {
      mb.tokens = std::move(r.tokens);
      mb.logprobs = std::move(r.logprobs);
    }
    if (mb.replies < options_.stages) continue;
    MicroBatch done = std::move(mb);
    in_flight_.erase(it);
    for (const auto& job : done.jobs) job->in_flight = false;
    if (done.status.ok() && done.tokens.size() == done.plan.size()) {
      // Each sampled token's logprobs wait on its job for the token's write (CompleteStep).
      for (size_t i = 0; i < done.logprobs.size() && i < done.plan.size(); ++i) {
        for (const auto& job : done.jobs) {
          if (job->run.get() == done.plan[i].run) job->next_logprobs = done.logprobs[i];
        }
      }
      frontend_->CompleteStep(done.plan, done.tokens);
    } else if (done.status.ok()) {
      LosePipeline(absl::InternalError("the last stage returned no tokens"));
    } else if (LosesPipeline(done.status)) {
      // The stage's own words may name hosts and ports: the log gets them, clients do not.
      log::Error(absl::StrFormat("pipeline stage %d failed: %s", done.failed_stage,
                                 std::string(done.status.message()).c_str()));
      LosePipeline(absl::UnavailableError(
          absl::StrCat("pipeline stage ", done.failed_stage, " failed; retry shortly")));
    } else {
      for (const model::PlannedSequence& p : done.plan) {
        if (!p.run->done()) {
          p.run->Fail(absl::Status(done.status.code(), absl::StrCat("stage ", done.failed_stage,
                                                                    ": ", done.status.message())));
        }
      }
    }
  }
}

void Engine::HandleFreeReplies(std::deque<FreeReply>& replies) {
  for (FreeReply& r : replies) {
    auto it = freeing_.find(r.batch);
    if (it == freeing_.end()) continue;
    for (const v1::SequenceKvStats& st : r.stats) {
      for (const auto& job : it->second.jobs) {
        if (job->seq_id == st.seq_id()) job->stage_stats[r.stage] = st;
      }
    }
    if (++it->second.replies < options_.stages) continue;
    std::vector<std::shared_ptr<Job>> jobs = std::move(it->second.jobs);
    freeing_.erase(it);
    for (const auto& job : jobs) Retire(job);
  }
}

void Engine::Housekeeping() {
  // Liveness: a stage whose worker stopped heartbeating is lost.
  const std::string lost = cluster_->ExpireWorkers();
  if (!lost.empty() && ready_.load()) LosePipeline(absl::UnavailableError(lost));
  // Liveness of the steps themselves: a stage that stopped making progress.
  if (ready_.load()) CheckStepDeadlines();
  // (Re)build the pipeline when it is not ready and workers are there.
  if (!ready_.load() && in_flight_.empty() && Clock::now() >= retry_at_) BuildPipeline();
  // Operator caps and relief lower running sequences' budgets at their next step.
  scheduler_.ApplyCaps(active_);
  pressure_ = scheduler_.Relieve(active_, ready_.load());
  {
    std::lock_guard<std::mutex> lock(counts_mu_);
    const std::vector<int64_t>& events = scheduler_.relief_events();
    for (size_t i = 0; i < events.size() && i < counts_.relief_events.size(); ++i) {
      counts_.relief_events[i] = events[i];
    }
  }
}

void Engine::BuildPipeline() {
  const int num_layers = static_cast<int>(frontend_->config().num_layers);
  bool complete = false;
  absl::StatusOr<std::vector<Cluster::Assignment>> loads = cluster_->AssignStages(
      options_.stages,
      [&](std::vector<int64_t> memories) {
        return options_.layers.empty()
                   ? PlanLayers(num_layers, memories)
                   : ParseLayerSplit(options_.layers, num_layers, options_.stages);
      },
      &complete);
  if (!loads.ok()) {
    log::Error(absl::StrFormat("cannot plan the pipeline: %s",
                               std::string(loads.status().message()).c_str()));
    retry_at_ = Clock::now() + std::chrono::seconds(3600);
    return;
  }
  bool ok = complete;
  for (const Cluster::Assignment& l : *loads) {
    v1::ShardAssignment a;
    a.set_model_dir(options_.model_dir);
    a.set_stage(l.stage);
    a.set_num_stages(options_.stages);
    a.set_first_layer(l.range.first);
    a.set_last_layer(l.range.second);
    a.set_threads(options_.worker_threads);
    a.set_skip_weight_check(options_.skip_weight_check);
    a.set_quantize(options_.quantize);
    a.set_quantize_all(options_.quantize_all);
    a.set_max_step_tokens(options_.max_step_tokens);
    a.set_max_batch(options_.max_batch);
    for (const auto& [policy, path] : options_.kv_weights) {
      v1::EvictionWeightsFile* f = a.add_kv_weights();
      f->set_policy(policy);
      f->set_path(path);
    }
    v1::ShardLoaded loaded;
    absl::Status s = executor_->Load(l, a, &loaded);
    if (!s.ok()) {
      log::Error(absl::StrFormat("worker %s could not load layers [%d, %d): %s",
                                 l.worker_id.c_str(), l.range.first, l.range.second,
                                 std::string(s.message()).c_str()));
      {
        std::lock_guard<std::mutex> lock(mu_);
        load_error_ = absl::StrCat("worker ", l.worker_id, " could not load layers [",
                                   l.range.first, ", ", l.range.second, "): ", s.message());
      }
      cluster_->StageFailed(l.stage, l.worker_id);
      ok = false;
      continue;
    }
    if (l.stage == 0) nccl_unique_id_ = loaded.nccl_unique_id();
    cluster_->StageLoaded(l.stage, loaded);
  }
  if (!ok) return;
  // Wire the stages to one another; every worker starts afresh at the next step id.
  const std::vector<StageView> stages = cluster_->Pipeline();
  ranges_.clear();
  for (const StageView& st : stages) ranges_.push_back(st.range);
  if (absl::Status s = executor_->Wire(stages, next_step_id_, nccl_unique_id_); !s.ok()) {
    log::Error(absl::StrFormat("wiring the pipeline failed: %s", std::string(s.message()).c_str()));
    retry_at_ = Clock::now() + std::chrono::milliseconds(500);
    return;
  }
  wiring_ = next_step_id_;
  log::Info(absl::StrFormat("pipeline ready: %s", cluster_->Layout().c_str()));
  SetReady(true);
}

void Engine::AdmitQueued() {
  const auto now = std::chrono::system_clock::now();
  while (!pressure_ && static_cast<int64_t>(active_.size()) < options_.max_batch) {
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
      FinishQueued(job, grpc::Status(grpc::StatusCode::CANCELLED,
                                     absl::StrCat("request ", job->id, " was cancelled")));
      continue;
    }
    if (!ready_.load()) {
      pop();
      FinishQueued(job, grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                     absl::StrCat("the pipeline is not ready: ",
                                                  cluster_->NotReadyReason(), "; retry shortly")));
      continue;
    }
    Scheduler::Admission admission = scheduler_.Admit(*job, now);
    if (admission.kind == Scheduler::Admission::kWait) {
      if (!job->waited) {
        job->waited = true;
        std::lock_guard<std::mutex> lock(counts_mu_);
        ++counts_.admission_waits;
      }
      break;
    }
    pop();
    if (admission.kind == Scheduler::Admission::kFail) {
      FinishQueued(job, admission.error);
      continue;
    }
    Job* j = job.get();
    std::weak_ptr<Job> weak = job;
    model::GenerateOptions run_opt = job->prepared.options;
    // The output processor detokenizes, unless stop strings need the text here.
    run_opt.detokenize = !OutputProcessor::DetokenizesHere(*job);
    run_opt.on_token = [this, j, weak](int32_t token, std::string_view text) {
      // Handed to the output processor after the next step plans are out.
      std::optional<v1::TokenLogprobs> logprobs;
      if (j->next_logprobs.has_value()) {
        logprobs = std::move(j->next_logprobs);
        j->next_logprobs.reset();
      }
      writes_.push_back(Write{weak.lock(), token, std::string(text), std::move(logprobs)});
      return !j->cancelled.load();
    };
    run_opt.keep_going = [j] { return !j->cancelled.load(); };
    absl::StatusOr<std::unique_ptr<model::SequenceRun>> run =
        frontend_->StartRemote(job->prepared.prompt_ids, run_opt);
    if (!run.ok()) {
      FinishQueued(job, ToGrpc(run.status()));
      continue;
    }
    job->run = *std::move(run);
    job->started = Clock::now();
    job->seq_id = next_seq_id_++;
    scheduler_.Reserve(*job, std::move(admission.grants));
    CountGrants(*job, +1);
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++running_;
    }
    active_.push_back(job);
  }
  // Queued requests that wait for memory past their deadline fail with RESOURCE_EXHAUSTED.
  std::vector<std::shared_ptr<Job>> expired;
  int64_t queued = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = queue_.begin(); it != queue_.end();) {
      if ((*it)->deadline - now < kDeadlineMargin || (*it)->cancelled.load()) {
        expired.push_back(*it);
        it = queue_.erase(it);
      } else {
        ++it;
      }
    }
    queued = static_cast<int64_t>(queue_.size());
  }
  for (const auto& job : expired) {
    FinishQueued(job, job->cancelled.load()
                          ? grpc::Status(grpc::StatusCode::CANCELLED,
                                         absl::StrCat("request ", job->id, " was cancelled"))
                          : grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                                         "kv: no stage room for the request's KV budget before "
                                         "its deadline"));
  }
  cluster_->SetCounts(static_cast<int64_t>(active_.size()), queued);
}

std::vector<std::shared_ptr<v1::StepPlan>> Engine::StagePlans(uint64_t step_id, MicroBatch& mb) {
  const model::ModelConfig& c = frontend_->config();
  std::vector<std::shared_ptr<v1::StepPlan>> plans;
  for (int s = 0; s < options_.stages; ++s) {
    auto req = std::make_shared<v1::StepPlan>();
    req->set_step_id(step_id);
    const bool last = s == options_.stages - 1;
    for (size_t i = 0; i < mb.plan.size(); ++i) {
      const model::PlannedSequence& p = mb.plan[i];
      Job& job = *mb.jobs[i];
      v1::SequenceStep* q = req->add_seqs();
      q->set_seq_id(job.seq_id);
      // Token ids go to stage 0 only (later stages receive activations).
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
        if (kv.evicts()) {
          init->mutable_layer_budgets()->Add(g.layer_budgets.begin(), g.layer_budgets.end());
        }
        init->set_max_tokens(c.max_position_embeddings);
        // The sampler's state lives on the last stage only.
        if (last) {
          *init->mutable_sampling() = proto::ToProto(job.prepared.options.sampling);
          init->mutable_prompt_ids()->Add(job.prepared.prompt_ids.begin(),
                                          job.prepared.prompt_ids.end());
        }
      }
      if (static_cast<size_t>(s) < job.lower.size() && !job.lower[static_cast<size_t>(s)].empty()) {
        q->mutable_layer_budgets()->Add(job.lower[static_cast<size_t>(s)].begin(),
                                        job.lower[static_cast<size_t>(s)].end());
        job.lower[static_cast<size_t>(s)].clear();
      }
    }
    plans.push_back(std::move(req));
  }
  return plans;
}

void Engine::DispatchMicroBatches() {
  if (!ready_.load()) return;
  std::vector<std::shared_ptr<Job>> idle;
  size_t running = 0;
  for (const auto& job : active_) {
    if (!job->in_flight && !job->freeing && !job->run->done()) idle.push_back(job);
    running += job->run->done() || job->freeing ? 0 : 1;
  }
  // Micro-batches of equal size, ceil(running / stages): a stage's share of the work stays
  // even as sequences come and go (sequences beyond it wait for the next free slot).
  const size_t stages = static_cast<size_t>(options_.stages);
  const size_t target = std::max<size_t>((running + stages - 1) / stages, 1);
  size_t taken = 0;
  while (in_flight_.size() < stages && taken < idle.size()) {
    const size_t n = std::min(idle.size() - taken, target);
    std::vector<std::shared_ptr<Job>> group(idle.begin() + static_cast<long>(taken),
                                            idle.begin() + static_cast<long>(taken + n));
    taken += n;
    std::vector<model::SequenceRun*> runs;
    for (const auto& job : group) runs.push_back(job->run.get());
    std::vector<model::PlannedSequence> plan = frontend_->PlanStep(runs);
    // At most max_step_tokens tokens (the scratch the workers reserved); the sequences past
    // that go in the next micro-batch.
    int64_t step_tokens = 0;
    for (size_t i = 0; i < plan.size(); ++i) {
      step_tokens += static_cast<int64_t>(plan[i].tokens.size());
      if (i > 0 && step_tokens > options_.max_step_tokens) {
        size_t kept = 0;
        while (group[kept]->run.get() != plan[i].run) ++kept;
        taken -= n - kept;
        plan.resize(i);
        break;
      }
    }
    if (plan.empty()) continue;
    const uint64_t step_id = next_step_id_++;
    MicroBatch mb;
    for (const model::PlannedSequence& p : plan) {
      for (const auto& job : group) {
        if (job->run.get() == p.run) {
          mb.jobs.push_back(job);
          job->in_flight = true;
        }
      }
    }
    mb.plan = std::move(plan);
    mb.replied.assign(stages, false);
    for (const model::PlannedSequence& p : mb.plan) {
      mb.tokens_in += static_cast<int64_t>(p.tokens.size());
    }
    int64_t ahead = 0;
    for (const auto& [id, other] : in_flight_) ahead += other.tokens_in;
    const std::chrono::milliseconds timeout = StepTimeout(mb.tokens_in, ahead);
    mb.deadline = Clock::now() + timeout;
    std::vector<std::shared_ptr<v1::StepPlan>> plans = StagePlans(step_id, mb);
    in_flight_[step_id] = std::move(mb);
    // The call itself gets a little longer: the engine's own check names the late stage.
    executor_->Step(std::move(plans), timeout + std::chrono::seconds(1));
  }
}

void Engine::FreeFinished() {
  std::vector<std::shared_ptr<Job>> done;
  for (const auto& job : active_) {
    if (job->run->done() && !job->in_flight && !job->freeing) done.push_back(job);
  }
  if (done.empty()) return;
  if (!ready_.load()) {
    for (const auto& job : done) Retire(job);
    return;
  }
  const uint64_t batch = next_free_id_++;
  std::vector<uint64_t> ids;
  for (const auto& job : done) {
    job->freeing = true;
    ids.push_back(job->seq_id);
  }
  freeing_[batch] = FreeBatch{done, 0};
  executor_->Free(batch, ids);
}

}  // namespace kvgate::coordinator
