// The engine loop driven through a fake pipeline executor: no worker, no network. The fake
// "samples" a fixed function of the sequence's position, so every request's output is known;
// it records the plans each stage got and can fail a stage.
#include "coordinator/engine.h"

#include <gtest/gtest.h>

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>

namespace kvgate::coordinator {
namespace {

const char kModel[] = "models/kvgate-default";

// What the fake samples for a sequence whose step ends at position `pos`.
int32_t FakeToken(int64_t pos) { return static_cast<int32_t>(10 + pos % 7); }

class FakeExecutor final : public PipelineExecutor {
 public:
  explicit FakeExecutor(int stages) : stages_(stages) {
    thread_ = std::thread([this] { Run(); });
  }
  ~FakeExecutor() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

  void SetCallbacks(StepCallback on_step, FreeCallback on_free) override {
    std::lock_guard<std::mutex> lock(mu_);
    on_step_ = std::move(on_step);
    on_free_ = std::move(on_free);
  }
  absl::Status Load(const Cluster::Assignment& a, const v1::ShardAssignment& shard,
                    v1::ShardLoaded* loaded) override {
    loaded->set_weight_bytes(1000);
    loaded->set_kv_capacity_bytes(kv_capacity_);
    for (int l = shard.first_layer(); l < shard.last_layer(); ++l) {
      loaded->add_bytes_per_token(1024);
    }
    std::lock_guard<std::mutex> lock(mu_);
    ++loads_;
    return absl::OkStatus();
  }
  absl::Status Wire(const std::vector<StageView>& stages, uint64_t, const std::string&) override {
    std::lock_guard<std::mutex> lock(mu_);
    EXPECT_EQ(static_cast<int>(stages.size()), stages_);
    ++wirings_;
    return absl::OkStatus();
  }
  void Step(std::vector<std::shared_ptr<v1::StepPlan>> plans,
            std::chrono::milliseconds timeout) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      EXPECT_EQ(static_cast<int>(plans.size()), stages_);
      for (int s = 0; s < stages_; ++s) CheckPlan(s, *plans[static_cast<size_t>(s)]);
      pending_.push_back(std::move(plans));
      last_timeout_ = timeout;
      outstanding_ += 1;
      max_outstanding_ = std::max(max_outstanding_, outstanding_);
    }
    cv_.notify_all();
  }
  void Free(uint64_t batch, const std::vector<uint64_t>& seq_ids) override {
    std::vector<FreeReply> replies;
    for (int s = 0; s < stages_; ++s) {
      FreeReply r{batch, s, absl::OkStatus(), {}};
      for (uint64_t id : seq_ids) {
        v1::SequenceKvStats st;
        st.set_seq_id(id);
        st.set_budget(7);
        r.stats.push_back(st);
      }
      replies.push_back(std::move(r));
    }
    FreeCallback cb;
    {
      std::lock_guard<std::mutex> lock(mu_);
      cb = on_free_;
      freed_ += static_cast<int>(seq_ids.size());
    }
    for (auto& r : replies) cb(std::move(r));
  }
  void FreeAll(uint64_t) override {
    std::lock_guard<std::mutex> lock(mu_);
    ++free_alls_;
  }

  // The next `n` steps fail on stage `stage` with `status`.
  void FailNext(int stage, absl::Status status, int n) {
    std::lock_guard<std::mutex> lock(mu_);
    fail_stage_ = stage;
    fail_status_ = status;
    fail_count_ = n;
  }
  // Stage `stage` never answers the next step (a stage that stopped making progress while its
  // worker still heartbeats).
  void HangNext(int stage) {
    std::lock_guard<std::mutex> lock(mu_);
    hang_stage_ = stage;
  }
  std::chrono::milliseconds last_timeout() {
    std::lock_guard<std::mutex> lock(mu_);
    return last_timeout_;
  }
  void set_delay(std::chrono::milliseconds d) { delay_ = d; }
  void set_kv_capacity(int64_t bytes) { kv_capacity_ = bytes; }
  int max_outstanding() {
    std::lock_guard<std::mutex> lock(mu_);
    return max_outstanding_;
  }
  int loads() {
    std::lock_guard<std::mutex> lock(mu_);
    return loads_;
  }
  int wirings() {
    std::lock_guard<std::mutex> lock(mu_);
    return wirings_;
  }
  int freed() {
    std::lock_guard<std::mutex> lock(mu_);
    return freed_;
  }
  int free_alls() {
    std::lock_guard<std::mutex> lock(mu_);
    return free_alls_;
  }
  std::vector<std::string> plan_errors() {
    std::lock_guard<std::mutex> lock(mu_);
    return plan_errors_;
  }

 private:
  // Token ids only on stage 0; every stage gets the count; sampling only on the last.
  void CheckPlan(int s, const v1::StepPlan& plan) {
    for (const v1::SequenceStep& q : plan.seqs()) {
      if (s == 0 && q.token_ids_size() != q.num_tokens()) {
        plan_errors_.push_back("stage 0 lacks token ids");
      }
      if (s > 0 && q.token_ids_size() != 0) plan_errors_.push_back("token ids past stage 0");
      if (q.has_init() && (s == stages_ - 1) != q.init().has_sampling()) {
        plan_errors_.push_back("sampler state off the last stage");
      }
      if (q.num_tokens() < 1) plan_errors_.push_back("a step without tokens");
    }
  }

  void Run() {
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      cv_.wait(lock, [this] { return stop_ || !pending_.empty(); });
      if (stop_) return;
      std::vector<std::shared_ptr<v1::StepPlan>> plans = std::move(pending_.front());
      pending_.pop_front();
      const bool fail = fail_count_ > 0;
      if (fail) --fail_count_;
      const int hang = hang_stage_;
      hang_stage_ = -1;
      StepCallback cb = on_step_;
      lock.unlock();
      std::this_thread::sleep_for(delay_);
      {
        std::lock_guard<std::mutex> relock(mu_);
        outstanding_ -= 1;  // answered: the engine may send the next one
      }
      for (int s = 0; s < stages_; ++s) {
        const v1::StepPlan& p = *plans[static_cast<size_t>(s)];
        StepReply r{p.step_id(), s, absl::OkStatus(), {}, delay_.count() / 1000.0, {}};
        if (fail && s == fail_stage_) r.status = fail_status_;
        if (s == hang) continue;
        if (s == stages_ - 1) {
          for (const v1::SequenceStep& q : p.seqs()) {
            r.tokens.push_back(q.sample() ? FakeToken(q.first_position() + q.num_tokens() - 1)
                                          : -1);
          }
        }
        if (cb) cb(std::move(r));
      }
      lock.lock();
    }
  }

  const int stages_;
  std::chrono::milliseconds delay_{1};
  int64_t kv_capacity_ = int64_t{1} << 30;
  std::mutex mu_;
  std::condition_variable cv_;
  StepCallback on_step_;
  FreeCallback on_free_;
  std::deque<std::vector<std::shared_ptr<v1::StepPlan>>> pending_;
  int outstanding_ = 0, max_outstanding_ = 0, loads_ = 0, wirings_ = 0, freed_ = 0;
  int free_alls_ = 0;
  int fail_stage_ = -1, fail_count_ = 0, hang_stage_ = -1;
  std::chrono::milliseconds last_timeout_{0};
  absl::Status fail_status_;
  std::vector<std::string> plan_errors_;
  bool stop_ = false;
  std::thread thread_;
};

// Collects a job's output.
class Sink final : public OutputSink {
 public:
  void Send(v1::GenerateResponse message) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (message.has_chunk()) {
      for (int32_t id : message.chunk().token_ids()) tokens_.push_back(id);
    } else if (message.has_final()) {
      final_ = message.final();
    }
  }
  void Complete(grpc::Status status) override {
    std::lock_guard<std::mutex> lock(mu_);
    status_ = status;
    done_ = true;
    cv_.notify_all();
  }
  bool Wait(std::chrono::milliseconds timeout = std::chrono::seconds(20)) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, timeout, [this] { return done_; });
  }
  std::vector<int32_t> tokens() {
    std::lock_guard<std::mutex> lock(mu_);
    return tokens_;
  }
  grpc::Status status() {
    std::lock_guard<std::mutex> lock(mu_);
    return status_;
  }
  v1::GenerateFinal final_message() {
    std::lock_guard<std::mutex> lock(mu_);
    return final_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<int32_t> tokens_;
  v1::GenerateFinal final_;
  grpc::Status status_;
  bool done_ = false;
};

class EngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto g = model::Generator::LoadFrontend(kModel);
    ASSERT_TRUE(g.ok()) << g.status();
    frontend_ = *std::move(g);
  }

  void Start(int stages, int64_t max_batch = 32, int64_t kv_capacity = int64_t{1} << 30,
             const std::function<void(EngineOptions&)>& tweak = nullptr) {
    cluster_ = std::make_unique<Cluster>(/*heartbeat_ms=*/60000, "", nullptr);
    executor_ = std::make_unique<FakeExecutor>(stages);
    executor_->set_kv_capacity(kv_capacity);
    for (int i = 0; i < stages; ++i) AddWorker();
    EngineOptions o;
    o.model_dir = kModel;
    o.stages = stages;
    o.max_batch = max_batch;
    o.retry_after = std::chrono::milliseconds(50);
    if (tweak) tweak(o);
    engine_ = std::make_unique<Engine>(frontend_.get(), cluster_.get(), executor_.get(), o);
    ASSERT_TRUE(engine_->WaitReady(std::chrono::seconds(10)));
  }

  // A worker registering from `address` (default: a new one each time).
  void AddWorker(std::string address = "") {
    v1::RegisterRequest r;
    r.set_address(address.empty() ? "127.0.0.1:" + std::to_string(1000 + workers_added_++)
                                  : address);
    r.set_data_address("127.0.0.1:2");
    r.set_memory_limit_bytes(int64_t{1} << 30);
    r.set_control_token(std::string(64, 'c'));
    cluster_->AddWorker(r);
  }

  // A job for prompt `ids` with `max_tokens`, its output to `sink`.
  std::shared_ptr<Job> Submit(Sink* sink, std::vector<int32_t> ids, int64_t max_tokens,
                              const std::string& id) {
    auto job = std::make_shared<Job>();
    job->id = id;
    job->output = sink;
    job->prepared.prompt_ids = std::move(ids);
    job->prepared.options.max_tokens = max_tokens;
    job->prepared.options.ignore_eos = true;
    job->prepared.options.sampling.temperature = 0;
    EXPECT_TRUE(engine_->Submit(job).ok());
    return job;
  }

  // The fake's tokens for a prompt of `n` tokens and `max_tokens` generated.
  static std::vector<int32_t> Expected(int64_t n, int64_t max_tokens) {
    std::vector<int32_t> out;
    for (int64_t i = 0; i < max_tokens; ++i) out.push_back(FakeToken(n - 1 + i));
    return out;
  }

  int workers_added_ = 0;
  std::unique_ptr<model::Generator> frontend_;
  std::unique_ptr<Cluster> cluster_;
  std::unique_ptr<FakeExecutor> executor_;
  std::unique_ptr<Engine> engine_;
};

// Whether `done` becomes true within 5 s (polled): for what the engine does right after the
// streams it ends have seen their end.
bool Eventually(const std::function<bool()>& done) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (!done()) {
    if (std::chrono::steady_clock::now() > until) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return true;
}

TEST_F(EngineTest, ServesConcurrentRequestsThroughTheStages) {
  Start(/*stages=*/3);
  std::vector<std::unique_ptr<Sink>> sinks;
  for (int i = 0; i < 12; ++i) {
    sinks.push_back(std::make_unique<Sink>());
    std::vector<int32_t> prompt(static_cast<size_t>(3 + i), 5);
    Submit(sinks.back().get(), prompt, 5 + i, "r" + std::to_string(i));
  }
  for (int i = 0; i < 12; ++i) {
    Sink& s = *sinks[static_cast<size_t>(i)];
    ASSERT_TRUE(s.Wait()) << i;
    ASSERT_TRUE(s.status().ok()) << s.status().error_message();
    EXPECT_EQ(s.tokens(), Expected(3 + i, 5 + i)) << i;
    const v1::GenerateFinal f = s.final_message();
    EXPECT_EQ(f.request_id(), "r" + std::to_string(i));
    EXPECT_EQ(f.finish_reason(), "length");
    EXPECT_EQ(f.usage().prompt_tokens(), 3 + i);
    EXPECT_EQ(f.usage().completion_tokens(), 5 + i);
    ASSERT_EQ(f.kv().stages_size(), 3);  // each stage's stats, from the frees
    EXPECT_EQ(f.kv().stages(2).budget(), 7);
  }
  EXPECT_TRUE(executor_->plan_errors().empty()) << executor_->plan_errors()[0];
  // Pipelining: more than one micro-batch in flight, never more than the stages.
  EXPECT_GT(executor_->max_outstanding(), 1);
  EXPECT_LE(executor_->max_outstanding(), 3);
  EXPECT_EQ(executor_->freed(), 12);  // every sequence freed on the stages
  EXPECT_EQ(engine_->running(), 0);
  EXPECT_EQ(engine_->served(), 12);
  EXPECT_EQ(cluster_->Budgets().nodes(0).kv_admitted_bytes(), 0);  // every grant released
}

TEST_F(EngineTest, ALostStageFailsItsStreamsAndThePipelineIsRebuilt) {
  Start(/*stages=*/2);
  executor_->set_delay(std::chrono::milliseconds(5));
  Sink a, b;
  Submit(&a, {1, 2, 3}, 200, "a");
  Submit(&b, {1, 2, 3, 4}, 200, "b");
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  executor_->FailNext(1, absl::UnavailableError("worker gone"), 1);
  ASSERT_TRUE(a.Wait() && b.Wait());
  EXPECT_EQ(a.status().error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_NE(a.status().error_message().find("stage 1"), std::string::npos);
  EXPECT_EQ(b.status().error_code(), grpc::StatusCode::UNAVAILABLE);
  // The surviving stages drop everything (the streams may end just before that is sent).
  EXPECT_TRUE(Eventually([&] { return executor_->free_alls() >= 1; }));
  // Rebuilt from the same workers (still heartbeating), and serving again.
  ASSERT_TRUE(engine_->WaitReady(std::chrono::seconds(10)));
  EXPECT_GE(executor_->wirings(), 2);
  executor_->set_delay(std::chrono::milliseconds(1));
  Sink c;
  Submit(&c, {1, 2}, 6, "c");
  ASSERT_TRUE(c.Wait());
  EXPECT_TRUE(c.status().ok()) << c.status().error_message();
  EXPECT_EQ(c.tokens(), Expected(2, 6));
}

TEST_F(EngineTest, AStageThatStopsAnsweringLosesThePipelineWithinTheStepDeadline) {
  Start(/*stages=*/2, 32, int64_t{1} << 30, [](EngineOptions& o) {
    o.step_deadline_floor = std::chrono::milliseconds(300);
    o.first_step_deadline = std::chrono::milliseconds(300);
  });
  executor_->set_delay(std::chrono::milliseconds(2));
  Sink a, b;
  Submit(&a, {1, 2, 3}, 400, "a");
  Submit(&b, {1, 2, 3, 4}, 400, "b");
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  // Measured: a decode step's deadline is the floor plus a little.
  EXPECT_GE(executor_->last_timeout(), std::chrono::milliseconds(1300));
  EXPECT_LT(executor_->last_timeout(), std::chrono::milliseconds(3000));
  const auto t0 = std::chrono::steady_clock::now();
  executor_->HangNext(1);
  ASSERT_TRUE(a.Wait() && b.Wait());
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(2));
  for (Sink* s : {&a, &b}) {
    EXPECT_EQ(s->status().error_code(), grpc::StatusCode::UNAVAILABLE);
    EXPECT_NE(s->status().error_message().find("stage 1 stopped making progress"),
              std::string::npos)
        << s->status().error_message();
  }
  EXPECT_TRUE(Eventually([&] { return executor_->free_alls() >= 1; }));
  // Rewired (the workers still heartbeat) and serving again.
  ASSERT_TRUE(engine_->WaitReady(std::chrono::seconds(10)));
  EXPECT_GE(executor_->wirings(), 2);
  Sink c;
  Submit(&c, {1, 2}, 6, "c");
  ASSERT_TRUE(c.Wait());
  EXPECT_TRUE(c.status().ok()) << c.status().error_message();
  EXPECT_EQ(c.tokens(), Expected(2, 6));
}

TEST_F(EngineTest, AWorkerThatRegistersAgainReplacesItsOldSelfAtOnce) {
  Start(/*stages=*/2);
  executor_->set_delay(std::chrono::milliseconds(2));
  Sink a;
  Submit(&a, {1, 2, 3}, 100000, "a");
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  const auto t0 = std::chrono::steady_clock::now();
  AddWorker("127.0.0.1:1001");  // stage 1's address: that worker restarted
  ASSERT_TRUE(a.Wait());
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(1));
  EXPECT_EQ(a.status().error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_NE(a.status().error_message().find("stage 1"), std::string::npos);
  ASSERT_TRUE(engine_->WaitReady(std::chrono::seconds(10)));
  EXPECT_EQ(executor_->loads(), 3);  // the new incarnation loaded stage 1's layers
  Sink b;
  Submit(&b, {1, 2}, 6, "b");
  ASSERT_TRUE(b.Wait());
  EXPECT_TRUE(b.status().ok()) << b.status().error_message();
}

TEST_F(EngineTest, DrainRefusesNewWorkAndEndsStreamsAfterTheGrace) {
  Start(/*stages=*/2);
  executor_->set_delay(std::chrono::milliseconds(2));
  Sink long_one, short_one;
  Submit(&long_one, {1, 2, 3}, 100000, "long");
  Submit(&short_one, {1, 2}, 5, "short");
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  const auto t0 = std::chrono::steady_clock::now();
  bool drained = false;
  std::thread drain([&] { drained = engine_->Drain(std::chrono::milliseconds(400)); });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  Sink late;
  auto job = std::make_shared<Job>();
  job->id = "late";
  job->output = &late;
  EXPECT_EQ(engine_->Submit(job).error_code(), grpc::StatusCode::UNAVAILABLE);
  drain.join();
  const auto took = std::chrono::steady_clock::now() - t0;
  EXPECT_TRUE(drained);
  EXPECT_GE(took, std::chrono::milliseconds(400));
  EXPECT_LT(took, std::chrono::milliseconds(1500));
  ASSERT_TRUE(short_one.Wait() && long_one.Wait());
  EXPECT_TRUE(short_one.status().ok()) << short_one.status().error_message();
  EXPECT_EQ(long_one.status().error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_NE(long_one.status().error_message().find("shutting down"), std::string::npos);
  EXPECT_GT(long_one.tokens().size(), 10u);  // it ran during the grace period
  EXPECT_EQ(executor_->freed(), 2);          // both freed on the stages
  EXPECT_EQ(engine_->running(), 0);
}

TEST_F(EngineTest, AStageErrorFailsOnlyThatStepsRequests) {
  Start(/*stages=*/2);
  executor_->FailNext(0, absl::ResourceExhaustedError("KV full"), 1);
  Sink a;
  Submit(&a, {1, 2, 3}, 4, "a");
  ASSERT_TRUE(a.Wait());
  EXPECT_EQ(a.status().error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(a.status().error_message().find("stage 0: KV full"), std::string::npos);
  EXPECT_TRUE(engine_->ready());
  Sink b;
  Submit(&b, {1, 2, 3}, 4, "b");
  ASSERT_TRUE(b.Wait());
  EXPECT_TRUE(b.status().ok());
}

TEST_F(EngineTest, AbortCancelsOnlyWhenAllowed) {
  Start(/*stages=*/2);
  executor_->set_delay(std::chrono::milliseconds(5));
  Sink a;
  Submit(&a, {1, 2, 3}, 400, "long");
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  EXPECT_FALSE(engine_->Abort("long", [](const Job&) { return false; }));
  EXPECT_FALSE(engine_->Abort("nope", [](const Job&) { return true; }));
  EXPECT_TRUE(engine_->Abort("long", [](const Job& j) { return j.id == "long"; }));
  ASSERT_TRUE(a.Wait());
  EXPECT_EQ(a.status().error_code(), grpc::StatusCode::CANCELLED);
  // A request id in use is refused; once done it is free again.
  Sink b, c;
  Submit(&b, {1}, 50, "dup");
  auto dup = std::make_shared<Job>();
  dup->id = "dup";
  dup->output = &c;
  EXPECT_EQ(engine_->Submit(dup).error_code(), grpc::StatusCode::ALREADY_EXISTS);
  ASSERT_TRUE(b.Wait());
}

TEST_F(EngineTest, AdmissionHoldsMaxBatchAndRefusesWhatNeverFits) {
  Start(/*stages=*/2, /*max_batch=*/2);
  executor_->set_delay(std::chrono::milliseconds(2));
  Sink sinks[6];
  for (int i = 0; i < 6; ++i) Submit(&sinks[i], {1, 2, 3}, 20, "q" + std::to_string(i));
  int64_t most = 0;
  for (int i = 0; i < 6; ++i) {
    while (!sinks[i].Wait(std::chrono::seconds(0))) {
      most = std::max(most, engine_->running());
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    EXPECT_TRUE(sinks[i].status().ok());
    EXPECT_EQ(sinks[i].tokens(), Expected(3, 20));
  }
  EXPECT_LE(most, 2);
  EXPECT_GE(most, 1);
}

TEST_F(EngineTest, ARequestNoStageCanHoldIsResourceExhausted) {
  Start(/*stages=*/2, /*max_batch=*/32, /*kv_capacity=*/4096);
  Sink a;
  Submit(&a, std::vector<int32_t>(100, 1), 100, "big");
  ASSERT_TRUE(a.Wait());
  EXPECT_EQ(a.status().error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(a.status().error_message().find("stage"), std::string::npos);
}

}  // namespace
}  // namespace kvgate::coordinator
