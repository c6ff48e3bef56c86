// Soak load for a running kvgate server: --streams concurrent streams, each starting the next
// request as soon as the last one ends, for --seconds; a --cancel-fraction of the requests is
// cancelled by the client after a random number of tokens. Every failure is kept with the time
// it happened, so the caller can tell those a fault explains (a worker restart) from the rest.
// Prints one JSON object: counts, failures by code (with their times and first messages),
// p50/p99 time to first token and inter-token latency.
//
//   ./build/bench/soak_client --server 127.0.0.1:50051 --streams 1000 --seconds 600
//
// bench/serving/soak.sh starts the server, restarts a worker in the middle and reads this.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "bench/serving/percentile.h"
#include "grpcpp/grpcpp.h"
#include "kvgate/v1/kvgate.grpc.pb.h"
#include "nlohmann/json.hpp"

namespace {

using Clock = std::chrono::steady_clock;
using kvgate::bench::Percentile;
namespace v1 = kvgate::v1;

struct Totals {
  std::mutex mu;
  int64_t started = 0, completed = 0, cancelled = 0, tokens = 0;
  std::vector<double> ttft_ms, itl_ms;
  // Failures: code -> seconds since the start at which each happened; a few messages.
  std::map<std::string, std::vector<double>> failures;
  std::map<std::string, std::vector<std::string>> messages;
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"kvgate soak client (a client of a running server)"};
  std::string server = "127.0.0.1:50051";
  int streams = 1000;
  double seconds = 600, cancel_fraction = 0.1, request_timeout = 300;
  int64_t min_tokens = 8, max_tokens = 64, prompt_len = 24;
  uint32_t seed = 1;
  app.add_option("--server", server, "kvgate server (host:port)");
  app.add_option("--streams", streams, "Concurrent streams");
  app.add_option("--seconds", seconds, "How long to keep them going");
  app.add_option("--cancel-fraction", cancel_fraction,
                 "Share of requests the client cancels after a random number of tokens");
  app.add_option("--min-tokens", min_tokens, "Fewest tokens a request asks for");
  app.add_option("--max-tokens", max_tokens, "Most tokens a request asks for");
  app.add_option("--prompt-len", prompt_len, "Prompt tokens (random ids)");
  app.add_option("--request-timeout", request_timeout, "Each request's deadline, seconds");
  app.add_option("--seed", seed, "Random seed");
  CLI11_PARSE(app, argc, argv);

  grpc::ChannelArguments args;
  auto stub = v1::Kvgate::NewStub(
      grpc::CreateCustomChannel(server, grpc::InsecureChannelCredentials(), args));
  v1::ModelInfo info;
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    grpc::Status s = stub->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &info);
    if (!s.ok()) {
      std::fprintf(stderr, "soak_client: %s: %s\n", server.c_str(), s.error_message().c_str());
      return 1;
    }
  }
  Totals totals;
  const auto start = Clock::now();
  const auto end = start + std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
  auto since = [&] { return std::chrono::duration<double>(Clock::now() - start).count(); };
  std::vector<std::thread> threads;
  for (int t = 0; t < streams; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(seed * 7919u + static_cast<uint32_t>(t));
      while (Clock::now() < end) {
        v1::GenerateRequest req;
        for (int64_t i = 0; i < prompt_len; ++i) {
          req.mutable_token_ids()->add_ids(
              static_cast<int32_t>(3 + rng() % (info.vocab_size() - 3)));
        }
        const int64_t want =
            min_tokens +
            static_cast<int64_t>(rng() % static_cast<uint32_t>(max_tokens - min_tokens + 1));
        req.set_max_tokens(want);
        req.set_ignore_eos(true);
        req.mutable_sampling()->set_temperature(0.8f);
        req.mutable_sampling()->set_seed(rng());
        const bool cancel = std::uniform_real_distribution<double>(0, 1)(rng) < cancel_fraction;
        const int64_t cancel_after = cancel ? static_cast<int64_t>(rng() % want) : -1;
        grpc::ClientContext ctx;
        ctx.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::milliseconds(static_cast<int64_t>(request_timeout * 1000)));
        const auto t0 = Clock::now();
        auto reader = stub->Generate(&ctx, req);
        v1::GenerateResponse msg;
        int64_t got = 0;
        Clock::time_point last = t0;
        std::vector<double> itl;
        double ttft = -1;
        bool cancelled = false;
        while (reader->Read(&msg)) {
          if (!msg.has_chunk() || msg.chunk().token_ids_size() == 0) continue;
          const auto now = Clock::now();
          if (got == 0) {
            ttft = std::chrono::duration<double, std::milli>(now - t0).count();
          } else {
            itl.push_back(std::chrono::duration<double, std::milli>(now - last).count() /
                          msg.chunk().token_ids_size());
          }
          last = now;
          got += msg.chunk().token_ids_size();
          if (cancel && got >= cancel_after) {
            ctx.TryCancel();
            cancelled = true;
            break;
          }
        }
        grpc::Status s = reader->Finish();
        std::unique_lock<std::mutex> lock(totals.mu);
        ++totals.started;
        totals.tokens += got;
        if (ttft >= 0) totals.ttft_ms.push_back(ttft);
        totals.itl_ms.insert(totals.itl_ms.end(), itl.begin(), itl.end());
        if (cancelled) {
          ++totals.cancelled;
        } else if (s.ok()) {
          ++totals.completed;
        } else {
          const std::string code = std::to_string(static_cast<int>(s.error_code()));
          totals.failures[code].push_back(since());
          auto& m = totals.messages[code];
          if (m.size() < 3) m.push_back(s.error_message());
        }
        lock.unlock();
        // A client retries a failed request after a pause, as a real one would.
        if (!cancelled && !s.ok()) {
          std::this_thread::sleep_for(std::chrono::milliseconds(100 + rng() % 100));
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  nlohmann::json out = {{"seconds", since()},
                        {"streams", streams},
                        {"requests", totals.started},
                        {"completed", totals.completed},
                        {"cancelled", totals.cancelled},
                        {"tokens", totals.tokens},
                        {"ttft_ms_p50", Percentile(totals.ttft_ms, 50)},
                        {"ttft_ms_p99", Percentile(totals.ttft_ms, 99)},
                        {"itl_ms_p50", Percentile(totals.itl_ms, 50)},
                        {"itl_ms_p99", Percentile(totals.itl_ms, 99)},
                        {"failures", totals.failures},
                        {"messages", totals.messages}};
  std::printf("%s\n", out.dump().c_str());
  return 0;
}
