// KV memory against prompt length: peak KV bytes and process peak RSS while the prompt grows
// (default 1K to 64K tokens) on a synthetic long-context shape, for `full` and `locret`
// (budget 1024, chunk 512, seeded random retaining heads: memory does not depend on what the
// heads score). Each run is a fresh child process, so its peak RSS (VmHWM) is its own.
// Prints a markdown table.
//
//   build/bench/kv_memory_bench --threads 2
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "model/generation/generator.h"

namespace {

using Clock = std::chrono::steady_clock;

struct Result {
  double peak_kv_bytes = 0;
  double peak_rss_bytes = 0;
  double prefill_tps = 0;
  double decode_tps = 0;
  int64_t max_retained = 0;
  int ok = 0;
};

double PeakRssBytes() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) * 1024.0;
  }
  return 0;
}

std::shared_ptr<const kvgate::cache::LocretHeads> RandomHeads(const kvgate::model::ModelConfig& c,
                                                              int64_t d_r) {
  auto h = std::make_shared<kvgate::cache::LocretHeads>();
  h->num_layers = c.num_layers;
  h->num_heads = c.num_heads;
  h->num_kv_heads = c.num_kv_heads;
  h->head_dim = c.head_dim;
  h->d_r = d_r;
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.f, 0.05f);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    std::vector<float> fc1(static_cast<size_t>(d_r * h->d_in())),
        fc2(static_cast<size_t>(c.num_kv_heads * d_r));
    for (float& x : fc1) x = nd(rng);
    for (float& x : fc2) x = nd(rng);
    h->fc1.push_back(std::move(fc1));
    h->fc2.push_back(std::move(fc2));
  }
  return h;
}

Result RunOne(const std::string& shape, const std::string& policy, int64_t length, int64_t budget,
              int64_t chunk, int threads, int64_t decode) {
  Result r;
  kvgate::model::LoadOptions lo;
  lo.threads = threads;
  auto gen = kvgate::model::Generator::Synthetic(shape, kvgate::DType::kBF16, lo);
  if (!gen.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(gen.status().message()).c_str());
    return r;
  }
  const auto& c = (*gen)->config();
  std::mt19937 rng(static_cast<uint32_t>(length));
  std::uniform_int_distribution<int32_t> tok(3, static_cast<int32_t>(c.vocab_size) - 1);
  std::vector<int32_t> ids(static_cast<size_t>(length));
  for (auto& t : ids) t = tok(rng);
  kvgate::model::GenerateOptions opt;
  opt.sampling.temperature = 0;
  opt.max_tokens = decode;
  opt.ignore_eos = true;
  opt.prefill_chunk = chunk;
  opt.kv.policy = policy;
  if (policy != "full") {
    opt.kv.budget = budget;
    opt.kv.chunk = chunk;
    opt.kv.locret = RandomHeads(c, 64);
  }
  auto res = (*gen)->Generate(ids, opt, nullptr);
  if (!res.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(res.status().message()).c_str());
    return r;
  }
  r.peak_kv_bytes = static_cast<double>(res->peak_kv_bytes);
  r.peak_rss_bytes = PeakRssBytes();
  r.prefill_tps = res->prefill_tokens_per_s();
  r.decode_tps = res->decode_tokens_per_s();
  r.max_retained = res->kv_stats.max_retained_per_head;
  r.ok = 1;
  return r;
}

// Runs RunOne in a child process and reads its result back through a pipe.
Result InChild(const std::string& shape, const std::string& policy, int64_t length, int64_t budget,
               int64_t chunk, int threads, int64_t decode) {
  int fd[2];
  if (pipe(fd) != 0) return {};
  const pid_t pid = fork();
  if (pid == 0) {
    close(fd[0]);
    Result r = RunOne(shape, policy, length, budget, chunk, threads, decode);
    const ssize_t n = write(fd[1], &r, sizeof(r));
    _exit(n == static_cast<ssize_t>(sizeof(r)) ? 0 : 1);
  }
  close(fd[1]);
  Result r;
  if (read(fd[0], &r, sizeof(r)) != static_cast<ssize_t>(sizeof(r))) r = Result{};
  close(fd[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Peak KV bytes and process RSS against prompt length, full vs locret"};
  std::string shape = "tiny-long";
  std::vector<int64_t> lengths = {1024, 2048, 4096, 8192, 16384, 32768, 65536};
  std::vector<std::string> policies = {"locret", "full"};
  int64_t budget = 1024, chunk = 512, decode = 16, full_max = 16384;
  int threads = 0;
  app.add_option("--shape", shape, "synthetic shape (default tiny-long: 128K positions)");
  app.add_option("--lengths", lengths, "prompt lengths");
  app.add_option("--policies", policies, "policies (full, locret)");
  app.add_option("--budget", budget, "locret budget per (layer, KV head)");
  app.add_option("--chunk", chunk, "prefill chunk");
  app.add_option("--decode", decode, "tokens decoded after the prompt");
  app.add_option("--threads", threads, "CPU threads (0: all cores)");
  app.add_option("--full-max", full_max,
                 "longest prompt run with full (its prefill time grows quadratically)");
  CLI11_PARSE(app, argc, argv);

  std::printf(
      "Shape %s (bf16 synthetic weights), locret budget %lld, chunk %lld, %lld decoded "
      "tokens; one process per row.\n\n",
      shape.c_str(), static_cast<long long>(budget), static_cast<long long>(chunk),
      static_cast<long long>(decode));
  std::printf(
      "| policy | prompt tokens | peak KV bytes | peak KV MiB | process peak RSS MiB | "
      "max retained per head | prefill tok/s | decode tok/s |\n");
  std::printf("|---|---|---|---|---|---|---|---|\n");
  for (const std::string& policy : policies) {
    for (int64_t n : lengths) {
      if (policy == "full" && n > full_max) {
        std::printf("| %s | %lld | not run (--full-max %lld) | | | | | |\n", policy.c_str(),
                    static_cast<long long>(n), static_cast<long long>(full_max));
        continue;
      }
      const auto t0 = Clock::now();
      Result r = InChild(shape, policy, n, budget, chunk, threads, decode);
      const double s = std::chrono::duration<double>(Clock::now() - t0).count();
      if (!r.ok) {
        std::printf("| %s | %lld | failed | | | | | |\n", policy.c_str(),
                    static_cast<long long>(n));
        continue;
      }
      std::printf("| %s | %lld | %.0f | %.1f | %.1f | %lld | %.0f | %.1f |\n", policy.c_str(),
                  static_cast<long long>(n), r.peak_kv_bytes, r.peak_kv_bytes / 1048576.0,
                  r.peak_rss_bytes / 1048576.0, static_cast<long long>(r.max_retained),
                  r.prefill_tps, r.decode_tps);
      std::fflush(stdout);
      std::fprintf(stderr, "%s %lld: %.1f s\n", policy.c_str(), static_cast<long long>(n), s);
    }
  }
  return 0;
}
