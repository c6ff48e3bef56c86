// Load generator for a running kvgate server: for each concurrency level, that many streams
// generate at once (each a fixed random prompt and a fixed number of tokens, EOS ignored);
// prints throughput and time to first token / time per output token (p50, p99) per level.
//
//   ./build/bench/serving_bench --server 127.0.0.1:50051 --concurrency 1,4,16,64 --tokens 64
//
// bench/serving/run.sh starts servers of 1 and 2 stages and compares them with this.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "bench/serving/percentile.h"
#include "grpcpp/grpcpp.h"
#include "kvgate/v1/kvgate.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "security/tls.h"

namespace {

using Clock = std::chrono::steady_clock;
using kvgate::bench::Percentile;

struct StreamResult {
  bool ok = false;
  std::string error;
  int64_t tokens = 0;
  double ttft = 0;  // seconds to the first token
  double tpot = 0;  // seconds per later token
};

StreamResult RunStream(kvgate::v1::Kvgate::Stub* stub, const std::vector<int32_t>& prompt,
                       int64_t tokens, const std::string& policy, int64_t budget) {
  kvgate::v1::GenerateRequest req;
  req.mutable_token_ids()->mutable_ids()->Add(prompt.begin(), prompt.end());
  req.set_max_tokens(tokens);
  req.set_ignore_eos(true);
  req.mutable_sampling()->set_temperature(0);
  if (!policy.empty()) {
    req.mutable_kv()->set_policy(policy);
    req.mutable_kv()->set_budget(budget);
  }
  grpc::ClientContext ctx;
  const auto t0 = Clock::now();
  auto reader = stub->Generate(&ctx, req);
  kvgate::v1::GenerateResponse msg;
  StreamResult r;
  Clock::time_point first, last;
  while (reader->Read(&msg)) {
    if (!msg.has_chunk()) continue;
    last = Clock::now();
    if (r.tokens == 0) first = last;
    r.tokens += msg.chunk().token_ids_size();
  }
  grpc::Status s = reader->Finish();
  r.ok = s.ok();
  r.error = s.error_message();
  r.ttft = std::chrono::duration<double>(first - t0).count();
  r.tpot = r.tokens > 1 ? std::chrono::duration<double>(last - first).count() / (r.tokens - 1) : 0;
  return r;
}

}  // namespace

namespace v1 = kvgate::v1;

int main(int argc, char** argv) {
  CLI::App app{"kvgate serving benchmark (a client of a running server)"};
  std::string server = "127.0.0.1:50051";
  std::vector<int> levels = {1, 2, 4, 8, 16, 32, 64};
  int64_t tokens = 64, prompt_len = 32, budget = 0;
  int rounds = 1;
  std::string policy;
  bool json = false;
  std::string tls_ca;
  app.add_option("--server", server, "kvgate server (host:port)");
  app.add_option("--tls-ca", tls_ca, "The server speaks TLS: its CA certificate (PEM)");
  app.add_option("--concurrency", levels, "Concurrent streams per level")->delimiter(',');
  app.add_option("--tokens", tokens, "Tokens generated per stream");
  app.add_option("--prompt-len", prompt_len, "Prompt tokens per stream (random ids)");
  app.add_option("--rounds", rounds, "Waves of streams per level (throughput over all)");
  app.add_option("--kv-policy", policy, "KV policy of the requests (default: the server's)");
  app.add_option("--kv-budget", budget, "KV budget of the requests");
  app.add_flag("--json", json, "One JSON object per level");
  CLI11_PARSE(app, argc, argv);

  kvgate::security::TlsFiles files;
  files.ca = tls_ca;
  auto credentials = kvgate::security::MakeChannelCredentials(files);
  if (!credentials.ok()) {
    std::fprintf(stderr, "serving_bench: %s\n",
                 std::string(credentials.status().message()).c_str());
    return 1;
  }
  auto channel = grpc::CreateChannel(server, *credentials);
  auto stub = v1::Kvgate::NewStub(channel);
  v1::ModelInfo info;
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    grpc::Status s = stub->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &info);
    if (!s.ok()) {
      std::fprintf(stderr, "serving_bench: %s: %s\n", server.c_str(), s.error_message().c_str());
      return 1;
    }
  }
  std::mt19937 rng(1);
  if (!json) {
    std::printf("%6s %8s %10s %10s %10s %10s %10s\n", "conc", "tokens", "tok/s", "ttft p50",
                "ttft p99", "tpot p50", "tpot p99");
  }
  for (int level : levels) {
    std::vector<std::vector<int32_t>> prompts(static_cast<size_t>(level));
    for (auto& p : prompts) {
      p.resize(static_cast<size_t>(prompt_len));
      for (int32_t& id : p) id = static_cast<int32_t>(3 + rng() % (info.vocab_size() - 3));
    }
    std::vector<StreamResult> results;
    const auto t0 = Clock::now();
    for (int round = 0; round < rounds; ++round) {
      std::vector<StreamResult> wave(static_cast<size_t>(level));
      std::vector<std::thread> threads;
      for (int i = 0; i < level; ++i) {
        threads.emplace_back([&, i] {
          wave[static_cast<size_t>(i)] =
              RunStream(stub.get(), prompts[static_cast<size_t>(i)], tokens, policy, budget);
        });
      }
      for (auto& t : threads) t.join();
      results.insert(results.end(), wave.begin(), wave.end());
    }
    const double wall = std::chrono::duration<double>(Clock::now() - t0).count();
    std::vector<double> ttft, tpot;
    int64_t total = 0;
    for (const StreamResult& r : results) {
      if (!r.ok) {
        std::fprintf(stderr, "serving_bench: a stream failed: %s\n", r.error.c_str());
        return 1;
      }
      total += r.tokens;
      ttft.push_back(r.ttft * 1e3);
      tpot.push_back(r.tpot * 1e3);
    }
    const double tps = total / wall;
    if (json) {
      nlohmann::json j = {{"concurrency", level},
                          {"tokens", total},
                          {"seconds", wall},
                          {"tokens_per_s", tps},
                          {"ttft_ms_p50", Percentile(ttft, 50)},
                          {"ttft_ms_p99", Percentile(ttft, 99)},
                          {"tpot_ms_p50", Percentile(tpot, 50)},
                          {"tpot_ms_p99", Percentile(tpot, 99)}};
      std::printf("%s\n", j.dump().c_str());
    } else {
      std::printf("%6d %8lld %10.1f %10.2f %10.2f %10.3f %10.3f\n", level,
                  static_cast<long long>(total), tps, Percentile(ttft, 50), Percentile(ttft, 99),
                  Percentile(tpot, 50), Percentile(tpot, 99));
    }
    std::fflush(stdout);
  }
  return 0;
}
