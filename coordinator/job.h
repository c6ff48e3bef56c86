// One generation request as the coordinator carries it: made by the front end (validated, its
// output sink the client's stream), run by the engine.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "coordinator/planner.h"
#include "coordinator/request.h"
#include "grpcpp/support/status.h"
#include "kvgate/v1/internal.pb.h"
#include "kvgate/v1/kvgate.pb.h"
#include "model/generation/generator.h"

namespace kvgate::coordinator {

// Where a request's output goes (the front end's stream). Send any number of times, then
// Complete once; thread-safe.
class OutputSink {
 public:
  virtual ~OutputSink() = default;
  virtual void Send(v1::GenerateResponse message) = 0;
  virtual void Complete(grpc::Status status) = 0;
};

struct Job {
  std::string id;
  std::string owner_key;  // the API key that started it ("" without keys)
  PreparedRequest prepared;
  std::atomic<bool> cancelled{false};
  OutputSink* output = nullptr;              // valid until output->Complete
  std::shared_ptr<OutputSink> output_owner;  // keeps `output` alive where the job owns it (HTTP)
  std::chrono::steady_clock::time_point queued_at = std::chrono::steady_clock::now();
  std::chrono::system_clock::time_point deadline = std::chrono::system_clock::time_point::max();

  // The engine's, once admitted.
  std::unique_ptr<model::SequenceRun> run;
  std::chrono::steady_clock::time_point started;
  std::chrono::steady_clock::time_point first_token_at;  // set by the output processor
  uint64_t seq_id = 0;
  std::vector<StageGrant> grants;           // per stage
  std::vector<std::vector<int64_t>> lower;  // per stage: layer budgets to lower at next step
  bool in_flight = false;
  bool waited = false;  // admission made it wait at least once (counted once)
  // The logprobs of the token the engine is about to write (requests with sampling.logprobs).
  std::optional<v1::TokenLogprobs> next_logprobs;
  bool freeing = false;
  std::map<int, v1::SequenceKvStats> stage_stats;
};

}  // namespace kvgate::coordinator
