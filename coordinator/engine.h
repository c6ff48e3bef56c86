// The engine loop (vLLM v1's EngineCore, over a pipeline): one thread that, between steps,
// schedules (the pipeline's life, admission, caps and relief: Scheduler), executes (step plans
// of up to `stages` micro-batches in flight, a sequence in at most one: PipelineExecutor) and
// updates (sampled tokens into each sequence, finished ones freed on every stage and completed).
// Continuous batching: requests join between steps. The front end submits jobs and reads the
// counts; everything else is the engine thread's.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "coordinator/cluster.h"
#include "coordinator/job.h"
#include "coordinator/metrics.h"
#include "coordinator/output_processor.h"
#include "coordinator/pipeline_executor.h"
#include "coordinator/scheduler.h"
#include "grpcpp/support/status.h"
#include "model/generation/generator.h"

namespace kvgate::coordinator {

struct EngineOptions {
  std::string model_dir;   // sent to workers (LoadShard)
  int stages = 1;          // pipeline stages (one worker each)
  int64_t max_batch = 32;  // sequences running at once; more wait in the queue
  // The most tokens one micro-batch carries (workers reserve scratch for it; a sequence's
  // prefill chunk is at most this).
  int64_t max_step_tokens = 2048;
  std::string layers;              // the operator's split ("0-2,2-4"); empty: planned by memory
  int worker_threads = 0;          // CPU threads per worker (0: the worker's own default)
  bool skip_weight_check = false;  // workers skip the sampled NaN/Inf check of the weights
  std::string quantize;            // --quantize for the workers' weights ("": none)
  bool quantize_all = false;       // --quantize-all: their embedding and LM head too
  // The registered eviction weights (policy, path): workers load them with their shard.
  std::vector<std::pair<std::string, std::string>> kv_weights;
  // How long a stage's loss keeps the pipeline down before it is rebuilt from spare workers
  // (0: the cluster's dead_after() + 100 ms).
  std::chrono::milliseconds retry_after{0};
  // Step deadlines: a micro-batch must come back within floor + factor x its predicted time
  // (each stage's measured seconds per token, times the tokens of this micro-batch and of those
  // ahead of it); a stage that misses it loses the pipeline (its streams fail UNAVAILABLE) and
  // the stages are rewired. Before a stage is measured: first_step_deadline.
  std::chrono::milliseconds step_deadline_floor{5000};
  double step_deadline_factor = 10;
  std::chrono::milliseconds first_step_deadline{120000};
  Metrics* metrics = nullptr;  // borrowed; request figures are recorded here when set
};

class Engine {
 public:
  // `frontend` (the model's config, tokenizer and sequence bookkeeping), `cluster` and
  // `executor` are borrowed. Starts the engine thread.
  Engine(model::Generator* frontend, Cluster* cluster, PipelineExecutor* executor,
         EngineOptions options);
  ~Engine();  // stops the thread; every job still queued or running completes UNAVAILABLE

  // Queues a job (its output sink set). UNAVAILABLE when stopping, ALREADY_EXISTS when its id
  // is in use.
  grpc::Status Submit(std::shared_ptr<Job> job);
  // Cancels the queued or running job `id` when `allowed(job)`; whether it did.
  bool Abort(const std::string& id, const std::function<bool(const Job&)>& allowed);

  // Blocks until every stage has a worker with its shard loaded, or `timeout` passes.
  bool WaitReady(std::chrono::milliseconds timeout);
  bool ready() const { return ready_.load(); }
  // The last failure of a worker to load its layers ("" if none).
  std::string load_error();
  int64_t running();
  int64_t queued();
  int64_t served();
  // Admission waits, reliefs and granted budgets, for the metrics.
  EngineCounts counts() const;
  // Wakes the loop (membership changed).
  void Wake();
  // A graceful stop: admission stops (new requests and queued ones fail UNAVAILABLE), running
  // streams go on for up to `grace` and are then ended UNAVAILABLE at their next token; their
  // KV is freed on every stage. Blocks until every request is done, or grace + 2 s; whether
  // all were.
  bool Drain(std::chrono::milliseconds grace);
  // Told (from the engine thread) each time the pipeline becomes ready or stops being ready.
  void SetReadyListener(std::function<void(bool)> listener);

 private:
  struct MicroBatch {
    std::vector<model::PlannedSequence> plan;
    std::vector<std::shared_ptr<Job>> jobs;
    int replies = 0;
    absl::Status status;
    int failed_stage = -1;
    std::vector<int32_t> tokens;
    std::vector<v1::TokenLogprobs> logprobs;  // empty unless a sequence asked for them
    std::vector<bool> replied;                // by stage
    int64_t tokens_in = 0;                    // tokens the step carries
    std::chrono::steady_clock::time_point deadline;
  };
  struct FreeBatch {
    std::vector<std::shared_ptr<Job>> jobs;
    int replies = 0;
  };

  void Loop();
  // The loop's parts, engine thread only.
  void HandleStepReplies(std::deque<StepReply>& replies);
  void HandleFreeReplies(std::deque<FreeReply>& replies);
  void Housekeeping();
  void BuildPipeline();
  void AdmitQueued();
  void DispatchMicroBatches();
  void FreeFinished();
  void LosePipeline(const absl::Status& status);
  void StopAll();
  void Retire(const std::shared_ptr<Job>& job);  // an active job
  void CountGrants(const Job& job, int sign);    // its budgets into (+1) or out of (-1) counts_
  void FinishQueued(const std::shared_ptr<Job>& job, grpc::Status status);  // never admitted
  void FlushWrites();
  void SetReady(bool ready);
  // Drain: queued requests fail, then running ones at the grace deadline, then any left.
  void DrainStep();
  // A micro-batch of `tokens` with `ahead` tokens in flight before it: its deadline.
  std::chrono::milliseconds StepTimeout(int64_t tokens, int64_t ahead) const;
  // The first in-flight micro-batch past its deadline loses the pipeline.
  void CheckStepDeadlines();
  std::vector<std::shared_ptr<v1::StepPlan>> StagePlans(uint64_t step_id, MicroBatch& mb);

  model::Generator* frontend_;
  Cluster* cluster_;
  PipelineExecutor* executor_;
  const EngineOptions options_;
  Scheduler scheduler_;

  std::mutex mu_;
  mutable std::mutex counts_mu_;
  EngineCounts counts_;  // guarded by counts_mu_
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Job>> queue_;                // guarded by mu_
  std::map<std::string, std::shared_ptr<Job>> live_;      // queued or running, by id; mu_
  std::deque<StepReply> step_replies_;                    // guarded by mu_
  std::deque<FreeReply> free_replies_;                    // guarded by mu_
  bool stopping_ = false;                                 // guarded by mu_
  bool wake_ = false;                                     // guarded by mu_
  int64_t running_ = 0, served_ = 0;                      // guarded by mu_
  std::string load_error_;                                // guarded by mu_
  bool draining_ = false;                                 // guarded by mu_
  std::chrono::steady_clock::time_point drain_deadline_;  // guarded by mu_
  std::function<void(bool)> on_ready_;                    // guarded by mu_
  std::atomic<bool> ready_{false};

  // Engine thread only.
  std::vector<std::shared_ptr<Job>> active_;  // admitted, not yet completed
  std::map<uint64_t, MicroBatch> in_flight_;
  std::map<uint64_t, FreeBatch> freeing_;
  std::vector<LayerRange> ranges_;  // of the wired stages, for the final messages
  uint64_t next_step_id_ = 1, next_free_id_ = 1, next_seq_id_ = 1;
  std::chrono::steady_clock::time_point retry_at_, last_housekeeping_;
  bool pressure_ = false;       // some stage reported memory pressure
  std::string nccl_unique_id_;  // from stage 0 of a GPU pipeline, for every stage
  uint64_t wiring_ = 0;         // the first step id of the current wiring
  // Each stage's measured compute seconds per token (an average; < 0: not measured yet).
  std::vector<double> seconds_per_token_;
  bool drain_ended_streams_ = false;
  // Tokens CompleteStep accepted, handed to the output processor once the next plans are out.
  struct Write {
    std::shared_ptr<Job> job;
    int32_t token;
    std::string text;  // empty when the output processor detokenizes
    std::optional<v1::TokenLogprobs> logprobs;
  };
  std::vector<Write> writes_;

  OutputProcessor output_;  // outlives the loop: destroyed after the thread joins
  std::thread thread_;
};

}  // namespace kvgate::coordinator
