// The pipeline executor: how the engine's step plans reach the stages and their results come
// back. The engine decides what runs; the executor only carries it. The gRPC executor drives
// real workers (internal.proto's Worker service, with each worker's control token); the
// engine's tests use a fake one.
//
// Threads: Load and Wire block (the engine calls them while no step is in flight); Step and
// Free return at once and report each stage's reply through the callbacks given at
// construction, from any thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "coordinator/cluster.h"
#include "kvgate/v1/internal.pb.h"

namespace kvgate::coordinator {

// One stage's answer to a step plan.
struct StepReply {
  uint64_t step_id = 0;
  int stage = 0;
  absl::Status status;
  std::vector<int32_t> tokens;  // the last stage's: one per sequence, -1 where none was sampled
  double compute_seconds = 0;   // the stage's own time on the step (not waiting for the previous)
  std::vector<v1::TokenLogprobs> logprobs;  // the last stage's, when asked: one per sequence
};

// One stage's answer to a Free.
struct FreeReply {
  uint64_t batch = 0;
  int stage = 0;
  absl::Status status;
  std::vector<v1::SequenceKvStats> stats;
};

class PipelineExecutor {
 public:
  using StepCallback = std::function<void(StepReply)>;
  using FreeCallback = std::function<void(FreeReply)>;
  virtual ~PipelineExecutor() = default;

  // The callbacks every later reply goes to; empty ones drop replies (an engine that stops
  // clears them: a reply that comes later goes nowhere).
  virtual void SetCallbacks(StepCallback on_step, FreeCallback on_free) = 0;
  // Loads a stage's layers on its worker.
  virtual absl::Status Load(const Cluster::Assignment& assignment, const v1::ShardAssignment& shard,
                            v1::ShardLoaded* loaded) = 0;
  // Wires the stages to one another; every stage starts afresh at `first_step_id`.
  virtual absl::Status Wire(const std::vector<StageView>& stages, uint64_t first_step_id,
                            const std::string& nccl_unique_id) = 0;
  // Sends plans[s] to stage s (one plan per stage, the same step id); a stage that has not
  // answered within `timeout` replies DEADLINE_EXCEEDED.
  virtual void Step(std::vector<std::shared_ptr<v1::StepPlan>> plans,
                    std::chrono::milliseconds timeout) = 0;
  // Frees `seq_ids` on every stage (batch: echoed in the replies).
  virtual void Free(uint64_t batch, const std::vector<uint64_t>& seq_ids) = 0;
  // Every stage drops every sequence of the wiring that began at step `wiring` (a stage rewired
  // since keeps its own); no replies.
  virtual void FreeAll(uint64_t wiring) = 0;
};

// Real workers over gRPC.
class GrpcPipelineExecutor final : public PipelineExecutor {
 public:
  void SetCallbacks(StepCallback on_step, FreeCallback on_free) override;
  absl::Status Load(const Cluster::Assignment& assignment, const v1::ShardAssignment& shard,
                    v1::ShardLoaded* loaded) override;
  absl::Status Wire(const std::vector<StageView>& stages, uint64_t first_step_id,
                    const std::string& nccl_unique_id) override;
  void Step(std::vector<std::shared_ptr<v1::StepPlan>> plans,
            std::chrono::milliseconds timeout) override;
  void Free(uint64_t batch, const std::vector<uint64_t>& seq_ids) override;
  void FreeAll(uint64_t wiring) override;

 private:
  // Shared with the calls in flight, which may end after the engine and the executor.
  struct Callbacks {
    std::mutex mu;
    StepCallback on_step;  // guarded by mu
    FreeCallback on_free;  // guarded by mu
  };
  std::shared_ptr<Callbacks> callbacks_ = std::make_shared<Callbacks>();
  std::vector<StageView> stages_;  // engine thread only (set by Wire)
};

}  // namespace kvgate::coordinator
