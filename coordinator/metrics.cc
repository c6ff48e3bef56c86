#include "coordinator/metrics.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"

namespace kvgate::coordinator {
namespace {

// vLLM's buckets (seconds).
const std::vector<double> kTtftBuckets = {0.001, 0.005, 0.01, 0.02,  0.04,  0.06,  0.08, 0.1,
                                          0.25,  0.5,   0.75, 1.0,   2.5,   5.0,   7.5,  10.0,
                                          20.0,  40.0,  80.0, 160.0, 640.0, 2560.0};
const std::vector<double> kItlBuckets = {0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2,  0.3,  0.4, 0.5,
                                         0.75, 1.0,   2.5,  5.0,   7.5, 10.0, 20.0, 40.0, 80.0};
const std::vector<double> kRequestBuckets = {0.3,  0.5,   0.8,   1.0,   1.5,   2.0,    2.5,
                                             5.0,  10.0,  15.0,  20.0,  30.0,  40.0,   50.0,
                                             60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0};

std::string Num(double v) {
  std::string s = absl::StrCat(v);
  return s;
}

void Header(std::string* out, const std::string& name, const char* type, const char* help) {
  absl::StrAppend(out, "# HELP ", name, " ", help, "\n# TYPE ", name, " ", type, "\n");
}

void Sample(std::string* out, const std::string& name, const std::string& labels, double v) {
  absl::StrAppend(out, name, "{", labels, "} ", Num(v), "\n");
}

}  // namespace

std::string EscapeLabel(const std::string& value) {
  std::string out;
  for (char c : value) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '"') {
      out += "\\\"";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

Histogram::Histogram(std::vector<double> bounds)
    : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}

void Histogram::Observe(double value) {
  const size_t i = static_cast<size_t>(std::lower_bound(bounds_.begin(), bounds_.end(), value) -
                                       bounds_.begin());
  ++counts_[i];
  sum_ += value;
  ++count_;
}

void Histogram::Render(const std::string& name, const std::string& labels, std::string* out) const {
  const std::string sep = labels.empty() ? "" : ",";
  uint64_t cumulative = 0;
  for (size_t i = 0; i <= bounds_.size(); ++i) {
    cumulative += counts_[i];
    const std::string le = i < bounds_.size() ? Num(bounds_[i]) : "+Inf";
    absl::StrAppend(out, name, "_bucket{", labels, sep, "le=\"", le, "\"} ", cumulative, "\n");
  }
  absl::StrAppend(out, name, "_sum{", labels, "} ", Num(sum_), "\n");
  absl::StrAppend(out, name, "_count{", labels, "} ", count_, "\n");
}

Metrics::Metrics(std::string model_name)
    : model_label_(absl::StrCat("model_name=\"", EscapeLabel(model_name), "\"")),
      ttft_(kTtftBuckets),
      itl_(kItlBuckets),
      e2e_(kRequestBuckets),
      queue_(kRequestBuckets) {}

void Metrics::FirstToken(double seconds) {
  std::lock_guard<std::mutex> lock(mu_);
  ttft_.Observe(seconds);
}

void Metrics::InterToken(double seconds) {
  std::lock_guard<std::mutex> lock(mu_);
  itl_.Observe(seconds);
}

void Metrics::Finished(const std::string& finish_reason, int64_t prompt_tokens,
                       int64_t generation_tokens, double e2e_seconds, double queue_seconds) {
  std::lock_guard<std::mutex> lock(mu_);
  prompt_tokens_ += prompt_tokens;
  generation_tokens_ += generation_tokens;
  ++success_[finish_reason];
  e2e_.Observe(e2e_seconds);
  queue_.Observe(queue_seconds);
}

void Metrics::Failed() {
  std::lock_guard<std::mutex> lock(mu_);
  ++failed_;
}

std::string Metrics::Render(const v1::Budgets& budgets, int64_t running, int64_t waiting,
                            const EngineCounts& counts) const {
  std::string out;
  const std::string& m = model_label_;
  {
    std::lock_guard<std::mutex> lock(mu_);
    Header(&out, "kvgate:time_to_first_token_seconds", "histogram",
           "Time from a request's arrival to its first token.");
    ttft_.Render("kvgate:time_to_first_token_seconds", m, &out);
    Header(&out, "kvgate:inter_token_latency_seconds", "histogram",
           "Time between a request's consecutive tokens.");
    itl_.Render("kvgate:inter_token_latency_seconds", m, &out);
    Header(&out, "kvgate:e2e_request_latency_seconds", "histogram",
           "Time from a request's arrival to its end.");
    e2e_.Render("kvgate:e2e_request_latency_seconds", m, &out);
    Header(&out, "kvgate:request_queue_time_seconds", "histogram",
           "Time a request waited for admission.");
    queue_.Render("kvgate:request_queue_time_seconds", m, &out);
    Header(&out, "kvgate:prompt_tokens_total", "counter", "Prompt tokens of finished requests.");
    Sample(&out, "kvgate:prompt_tokens_total", m, static_cast<double>(prompt_tokens_));
    Header(&out, "kvgate:generation_tokens_total", "counter",
           "Generated tokens of finished requests.");
    Sample(&out, "kvgate:generation_tokens_total", m, static_cast<double>(generation_tokens_));
    Header(&out, "kvgate:request_success_total", "counter",
           "Requests that finished, by finish reason.");
    for (const char* reason : {"stop", "length", "abort"}) {
      auto it = success_.find(reason);
      Sample(&out, "kvgate:request_success_total",
             absl::StrCat(m, ",finished_reason=\"", reason, "\""),
             it == success_.end() ? 0.0 : static_cast<double>(it->second));
    }
    Header(&out, "kvgate:request_failure_total", "counter", "Requests that ended in an error.");
    Sample(&out, "kvgate:request_failure_total", m, static_cast<double>(failed_));
  }
  Header(&out, "kvgate:num_requests_running", "gauge", "Requests admitted and running.");
  Sample(&out, "kvgate:num_requests_running", m, static_cast<double>(running));
  Header(&out, "kvgate:num_requests_waiting", "gauge", "Requests waiting for admission.");
  Sample(&out, "kvgate:num_requests_waiting", m, static_cast<double>(waiting));

  int64_t used = 0, capacity = 0;
  for (const v1::NodeBudget& n : budgets.nodes()) {
    if (!n.alive()) continue;
    used += n.kv_used_bytes();
    capacity += n.kv_capacity_bytes();
  }
  Header(&out, "kvgate:kv_cache_usage_perc", "gauge",
         "KV cache memory reserved by live sequences, as a fraction of the workers' capacity.");
  Sample(&out, "kvgate:kv_cache_usage_perc", m,
         capacity > 0 ? static_cast<double>(used) / static_cast<double>(capacity) : 0.0);

  // Per worker (stage): the heartbeats' figures.
  struct Gauge {
    const char* name;
    const char* type;
    const char* help;
    double (*value)(const v1::NodeBudget&);
  };
  const Gauge gauges[] = {
      {"kvgate:worker_kv_used_bytes", "gauge", "KV bytes reserved by live sequences.",
       [](const v1::NodeBudget& n) { return static_cast<double>(n.kv_used_bytes()); }},
      {"kvgate:worker_kv_capacity_bytes", "gauge", "Memory for KV after weights and scratch.",
       [](const v1::NodeBudget& n) { return static_cast<double>(n.kv_capacity_bytes()); }},
      {"kvgate:worker_kv_peak_bytes", "gauge", "The most KV bytes ever reserved.",
       [](const v1::NodeBudget& n) { return static_cast<double>(n.kv_peak_bytes()); }},
      {"kvgate:worker_kv_admitted_bytes", "gauge",
       "KV bytes the coordinator's admission accounts for (worst case).",
       [](const v1::NodeBudget& n) { return static_cast<double>(n.kv_admitted_bytes()); }},
      {"kvgate:worker_sequences", "gauge", "Live sequences.",
       [](const v1::NodeBudget& n) { return static_cast<double>(n.sequences()); }},
      {"kvgate:worker_retained_tokens", "gauge",
       "Tokens retained by live sequences, summed over layers and KV heads.",
       [](const v1::NodeBudget& n) { return static_cast<double>(n.retained_tokens()); }},
      {"kvgate:worker_evicted_tokens_total", "counter",
       "Tokens evicted since the worker started, over layers and KV heads.",
       [](const v1::NodeBudget& n) { return static_cast<double>(n.evicted_tokens()); }},
      {"kvgate:worker_max_budget_tokens", "gauge",
       "The largest budget per (layer, KV head) one sequence is granted here.",
       [](const v1::NodeBudget& n) { return static_cast<double>(n.max_budget()); }},
      {"kvgate:worker_pressure", "gauge", "1 while the worker asks for memory relief.",
       [](const v1::NodeBudget& n) { return n.pressure() ? 1.0 : 0.0; }},
      {"kvgate:worker_busy_seconds_total", "counter", "Seconds spent computing steps.",
       [](const v1::NodeBudget& n) { return n.busy_seconds(); }},
      {"kvgate:worker_up", "gauge", "1 while the worker's heartbeats arrive.",
       [](const v1::NodeBudget& n) { return n.alive() ? 1.0 : 0.0; }},
  };
  for (const Gauge& g : gauges) {
    Header(&out, g.name, g.type, g.help);
    for (const v1::NodeBudget& n : budgets.nodes()) {
      Sample(&out, g.name,
             absl::StrCat(m, ",stage=\"", n.stage(), "\",node=\"", EscapeLabel(n.node_id()), "\""),
             g.value(n));
    }
  }
  // Per layer of each stage (from the heartbeats) and per stage (the engine's counts).
  using LayerField = const google::protobuf::RepeatedField<int64_t>& (v1::NodeBudget::*)() const;
  auto per_layer = [&](const char* name, const char* type, const char* help, LayerField field) {
    Header(&out, name, type, help);
    for (const v1::NodeBudget& n : budgets.nodes()) {
      const auto& values = (n.*field)();
      for (int i = 0; i < values.size(); ++i) {
        Sample(&out, name,
               absl::StrCat(m, ",stage=\"", n.stage(), "\",layer=\"", n.first_layer() + i, "\""),
               static_cast<double>(values[i]));
      }
    }
  };
  auto per_stage = [&](const char* name, const char* type, const char* help,
                       const std::vector<int64_t>& values) {
    Header(&out, name, type, help);
    for (size_t s = 0; s < values.size(); ++s) {
      Sample(&out, name, absl::StrCat(m, ",stage=\"", s, "\""), static_cast<double>(values[s]));
    }
  };
  per_layer("kvgate:layer_retained_tokens", "gauge",
            "Tokens live sequences retain in the layer, summed over its KV heads.",
            &v1::NodeBudget::layer_retained_tokens);
  per_layer("kvgate:layer_evicted_tokens_total", "counter",
            "Tokens the layer evicted since its worker started, summed over its KV heads.",
            &v1::NodeBudget::layer_evicted_tokens);
  Header(&out, "kvgate:admission_waits_total", "counter",
         "Requests that waited at admission for KV memory or a memory-pressed stage.");
  Sample(&out, "kvgate:admission_waits_total", m, static_cast<double>(counts.admission_waits));
  per_stage("kvgate:relief_events_total", "counter",
            "Times a stage under memory pressure lowered its running sequences' budgets.",
            counts.relief_events);
  per_stage("kvgate:stage_granted_budget_tokens", "gauge",
            "Budgets (tokens per layer and KV head) granted to the stage's running sequences, "
            "summed.",
            counts.granted_budget_tokens);
  per_stage("kvgate:stage_budgeted_sequences", "gauge",
            "Running sequences with an eviction budget on the stage.", counts.granted_sequences);
  per_layer("kvgate:layer_cap_tokens", "gauge",
            "The operator's cap per (layer, KV head) (kvgate budget set); 0: none.",
            &v1::NodeBudget::layer_caps);
  return out;
}

}  // namespace kvgate::coordinator
