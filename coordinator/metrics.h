// Prometheus metrics of the coordinator (`GET /metrics` on the HTTP port), in the text
// exposition format 0.0.4. vLLM's names under the `kvgate:` prefix, for the dashboards users
// already have: latency histograms (time to first token, inter-token latency, end to end,
// queue time), running and waiting requests, KV cache usage, prompt and generation token
// counters, successes by finish reason; then what only kvgate has: per stage (worker) KV bytes
// used and capacity, retained and evicted tokens, the largest grant, operator caps per layer,
// memory pressure. Request figures are recorded by the output processor as tokens leave;
// worker figures are the heartbeats' (Cluster::Budgets).
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "kvgate/v1/kvgate.pb.h"

namespace kvgate::coordinator {

class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds);  // upper bounds, increasing; +Inf is added
  void Observe(double value);
  // `name`_bucket{le=...}, _sum, _count lines with `labels` ("a=\"b\"", may be empty).
  void Render(const std::string& name, const std::string& labels, std::string* out) const;

 private:
  std::vector<double> bounds_;
  std::vector<uint64_t> counts_;  // per bound, not cumulative; the last is +Inf
  double sum_ = 0;
  uint64_t count_ = 0;
};

// What the engine counts for the metrics: requests that waited for KV memory at admission,
// reliefs per stage, and per stage the budgets granted to running sequences.
struct EngineCounts {
  int64_t admission_waits = 0;
  std::vector<int64_t> relief_events;          // per stage
  std::vector<int64_t> granted_budget_tokens;  // per stage: sum of running sequences' budgets
  std::vector<int64_t> granted_sequences;      // per stage: running sequences with a budget
};

class Metrics {
 public:
  explicit Metrics(std::string model_name);

  void FirstToken(double seconds_since_queued);
  void InterToken(double seconds);
  void Finished(const std::string& finish_reason, int64_t prompt_tokens, int64_t generation_tokens,
                double e2e_seconds, double queue_seconds);
  void Failed();  // ended with an error (not counted as a success)

  // The whole exposition: the request figures, then `running`/`waiting` and the workers'.
  std::string Render(const v1::Budgets& budgets, int64_t running, int64_t waiting,
                     const EngineCounts& counts = {}) const;

 private:
  const std::string model_label_;  // model_name="..."
  mutable std::mutex mu_;
  Histogram ttft_, itl_, e2e_, queue_;                 // guarded by mu_
  int64_t prompt_tokens_ = 0, generation_tokens_ = 0;  // guarded by mu_
  std::map<std::string, int64_t> success_;             // by finish reason; guarded by mu_
  int64_t failed_ = 0;                                 // guarded by mu_
};

// A label value with \, " and newlines escaped.
std::string EscapeLabel(const std::string& value);

}  // namespace kvgate::coordinator
