// Output processing, off the engine's critical path (vLLM v1's OutputProcessor): a thread that
// turns the engine's sampled token ids into the client's stream: detokenizing them (unless the
// request has stop strings, which the engine matches itself because they decide when the
// sequence ends), building the final message, and writing both. Events of one job keep their
// order; the engine only queues them.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "coordinator/job.h"
#include "coordinator/metrics.h"
#include "coordinator/planner.h"
#include "grpcpp/support/status.h"
#include "model/generation/generator.h"
#include "model/tokenizer/tokenizer.h"

namespace kvgate::coordinator {

class OutputProcessor {
 public:
  // `frontend` (the tokenizer, the model's config and EOS ids) is borrowed.
  // `metrics` (optional) records latencies and counts as tokens leave.
  OutputProcessor(const model::Generator* frontend, Metrics* metrics = nullptr);
  ~OutputProcessor();  // writes everything queued first

  // Whether the engine should leave detokenization of `job` to this processor.
  static bool DetokenizesHere(const Job& job) { return job.prepared.options.stop_strings.empty(); }

  // A token the engine accepted for `job`, with the text the engine made of it (empty when
  // DetokenizesHere).
  void Token(std::shared_ptr<Job> job, int32_t token, std::string text,
             std::optional<v1::TokenLogprobs> logprobs = std::nullopt);
  // `job`'s run ended (finished, aborted or failed): its final message or status. `ranges`:
  // the stages' layer ranges, for the KV statistics.
  void Finish(std::shared_ptr<Job> job, std::vector<LayerRange> ranges);
  // A job that never ran ends with `status`.
  void Fail(std::shared_ptr<Job> job, grpc::Status status);

 private:
  struct Event {
    enum Kind { kToken, kFinish, kFail } kind;
    std::shared_ptr<Job> job;
    int32_t token = 0;
    std::string text;
    std::vector<LayerRange> ranges;
    grpc::Status status;
    std::optional<v1::TokenLogprobs> logprobs;
  };
  void Push(Event e);
  void Run();
  void Handle(Event& e);
  void Record(const Event& e);  // the metrics of `e`
  // The request's info line: id, status, tokens, times, finish reason, KV statistics (and the
  // prompt's text with --log-prompts).
  void LogRequest(const Job& job, const grpc::Status& status, const v1::GenerateFinal* final) const;
  static constexpr size_t kMaxLoggedPromptBytes = 16384;

  const model::Generator* frontend_;
  Metrics* const metrics_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Event> queue_;  // guarded by mu_
  bool stopping_ = false;    // guarded by mu_
  // The output thread's: a decoder per job that detokenizes here, by job.
  std::map<const Job*, std::unique_ptr<model::StreamingDecoder>> decoders_;
  // The output thread's: when each running job's last token left (for the latency metrics).
  std::map<const Job*, std::chrono::steady_clock::time_point> last_token_;
  std::thread thread_;
};

// The final message of a finished run (usage, timings, KV statistics summed over the stages).
v1::GenerateResponse FinalMessage(const Job& job, const model::ModelConfig& config,
                                  const std::vector<LayerRange>& ranges);

}  // namespace kvgate::coordinator
