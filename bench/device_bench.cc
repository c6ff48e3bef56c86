// The engine on a device (cpu, guarded or cuda:N), as the GPU issue asks for it, printing
// markdown tables:
//   1. the device's copy bandwidth measured in this run (a 1 GiB device-to-device copy);
//   2. decode tokens/s at each --batch against that roofline: every decode step reads the
//      weights once and each sequence's KV, so the bound is copy bandwidth / bytes per step;
//   3. with --long: prompts of those lengths under --kv-policy (default locret at budget 4096,
//      with random retaining heads when no --kv-weights is given) against full: peak device
//      memory, prefill and decode tokens/s, and the eviction machinery's share of the time.
//
//   build/bench/device_bench --device cuda:0 --synthetic llama-3.1-8b --dtype bf16
//       --batch 1,8,32 --long 32768,128000
//   build/bench/device_bench --device cpu --synthetic llama-3.2-1b --batch 1,4 --long 2048
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "cache/eviction/locret_heads.h"
#include "model/generation/generator.h"

namespace {

using Clock = std::chrono::steady_clock;
using kvgate::model::Generator;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// Copy bandwidth (bytes read + written per second) of `bytes` on the device, best of 5.
double CopyBandwidth(kvgate::kernels::Backend& b, size_t bytes) {
  auto src = b.Alloc(static_cast<int64_t>(bytes / 4), kvgate::DType::kF32);
  auto dst = b.Alloc(static_cast<int64_t>(bytes / 4), kvgate::DType::kF32);
  if (!src.ok() || !dst.ok()) return 0;
  double best = 1e30;
  for (int rep = 0; rep < 6; ++rep) {
    (void)b.Synchronize();
    const auto t0 = Clock::now();
    (void)b.CopyOnDevice(dst->data(), src->data(), bytes);
    (void)b.Synchronize();
    if (rep > 0) best = std::min(best, Seconds(t0, Clock::now()));  // rep 0 warms up
  }
  return 2.0 * static_cast<double>(bytes) / best;
}

std::vector<int32_t> Prompt(int64_t n, int64_t vocab, int64_t salt) {
  std::vector<int32_t> p(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    p[static_cast<size_t>(i)] = static_cast<int32_t>((i * 7919 + salt * 104729 + 3) % vocab);
  }
  return p;
}

// Random retaining heads of the model's shape (the bench measures cost, not quality).
std::shared_ptr<const kvgate::cache::LocretHeads> RandomHeads(const kvgate::model::ModelConfig& c) {
  auto h = std::make_shared<kvgate::cache::LocretHeads>();
  h->num_layers = c.num_layers;
  h->num_heads = c.num_heads;
  h->num_kv_heads = c.num_kv_heads;
  h->head_dim = c.head_dim;
  h->d_r = 256;
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.f, 0.02f);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    std::vector<float> fc1(static_cast<size_t>(h->d_r * h->d_in())),
        fc2(static_cast<size_t>(c.num_kv_heads * h->d_r));
    for (float& x : fc1) x = normal(rng);
    for (float& x : fc2) x = normal(rng);
    h->fc1.push_back(std::move(fc1));
    h->fc2.push_back(std::move(fc2));
  }
  return h;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"kvgate engine on a device: decode vs the copy roofline, long prompts"};
  std::string device = "cpu", synthetic = "llama-3.2-1b", model_dir, dtype_name = "bf16";
  std::string kv_dtype, policy = "locret", kv_weights;
  std::vector<int64_t> batches = {1};
  std::vector<int64_t> long_prompts;
  int64_t prompt_tokens = 128, decode_tokens = 32, budget = 4096, long_decode = 16;
  int64_t full_up_to = 32768;
  int threads = 0;
  app.add_option("--device", device, "cpu, guarded, cuda, cuda:N");
  app.add_option("--synthetic", synthetic, "Synthetic shape (random weights)");
  app.add_option("--model", model_dir, "A model directory instead of --synthetic");
  app.add_option("--dtype", dtype_name, "Synthetic weight dtype: bf16, f16, f32");
  app.add_option("--kv-dtype", kv_dtype, "KV storage (default: the device's)");
  app.add_option("--threads", threads, "CPU threads");
  app.add_option("--batch", batches, "Decode batch sizes")->delimiter(',');
  app.add_option("--prompt-tokens", prompt_tokens, "Prompt length of the decode runs");
  app.add_option("--decode-tokens", decode_tokens, "Tokens decoded per measurement");
  app.add_option("--long", long_prompts, "Long prompt lengths to run under --kv-policy and full")
      ->delimiter(',');
  app.add_option("--kv-policy", policy, "Policy of the long runs (default locret)");
  app.add_option("--kv-budget", budget, "Budget of the long runs (default 4096)");
  app.add_option("--kv-weights", kv_weights, "Learned weights (default: random locret heads)");
  app.add_option("--long-decode", long_decode, "Tokens decoded after each long prompt");
  app.add_option("--full-up-to", full_up_to,
                 "Run full only for long prompts up to this length (its prefill attention grows "
                 "quadratically; default 32768)");
  CLI11_PARSE(app, argc, argv);

  kvgate::model::LoadOptions lo;
  lo.device = device;
  lo.kv_dtype = kv_dtype;
  lo.threads = threads;
  const kvgate::DType dtype = dtype_name == "f32"   ? kvgate::DType::kF32
                              : dtype_name == "f16" ? kvgate::DType::kF16
                                                    : kvgate::DType::kBF16;
  const auto t_load = Clock::now();
  auto made = model_dir.empty() ? Generator::Synthetic(synthetic, dtype, lo)
                                : Generator::Load(model_dir, lo);
  if (!made.ok()) {
    std::fprintf(stderr, "device_bench: %s\n", made.status().ToString().c_str());
    return 1;
  }
  Generator& gen = **made;
  kvgate::kernels::Backend& backend = *gen.backend();
  const auto& c = gen.config();
  const std::string label =
      model_dir.empty() ? synthetic + " (synthetic " + dtype_name + ")" : model_dir;
  std::printf("device: %s; model: %s; loaded in %.1f s; KV dtype: %s\n", backend.name().c_str(),
              label.c_str(), Seconds(t_load, Clock::now()),
              std::string(kvgate::DTypeName(gen.transformer().cache_shape().dtype)).c_str());
  const double bw = CopyBandwidth(backend, size_t{1} << 30);
  std::printf("copy bandwidth (1 GiB device-to-device, read + write): %.1f GB/s\n\n", bw / 1e9);

  const double weight_bytes =
      static_cast<double>(gen.transformer().weights().WeightBytesPerToken());
  const double kv_row = static_cast<double>(c.num_layers * c.num_kv_heads *
                                            gen.transformer().cache_shape().slot_bytes());
  std::printf(
      "| batch | decode tok/s | ms/step | bytes/step (GB) | roofline tok/s | of roofline |\n");
  std::printf("|---:|---:|---:|---:|---:|---:|\n");
  for (int64_t b : batches) {
    kvgate::model::GenerateOptions opt;
    opt.sampling.temperature = 0;
    opt.max_tokens = decode_tokens + 1;
    opt.ignore_eos = true;
    std::vector<std::unique_ptr<kvgate::model::SequenceRun>> runs;
    std::vector<kvgate::model::SequenceRun*> ptrs;
    for (int64_t i = 0; i < b; ++i) {
      auto r = gen.Start(Prompt(prompt_tokens, c.vocab_size, i), opt);
      if (!r.ok()) {
        std::fprintf(stderr, "batch %lld: %s\n", static_cast<long long>(b),
                     r.status().ToString().c_str());
        return 1;
      }
      ptrs.push_back(r->get());
      runs.push_back(*std::move(r));
    }
    gen.Step(ptrs);  // the prefill of every sequence, then one warm decode step
    gen.Step(ptrs);
    (void)backend.Synchronize();
    const auto t0 = Clock::now();
    int64_t steps = 0;
    while (std::any_of(ptrs.begin(), ptrs.end(), [](auto* r) { return !r->done(); })) {
      gen.Step(ptrs);
      ++steps;
    }
    (void)backend.Synchronize();
    const double s = Seconds(t0, Clock::now());
    for (auto* r : ptrs) {
      if (!r->status().ok()) {
        std::fprintf(stderr, "batch %lld: %s\n", static_cast<long long>(b),
                     r->status().ToString().c_str());
        return 1;
      }
    }
    const double per_step = s / static_cast<double>(std::max<int64_t>(1, steps));
    const double bytes = weight_bytes + static_cast<double>(b) *
                                            static_cast<double>(prompt_tokens + decode_tokens) *
                                            kv_row;
    const double roof = bw / bytes * static_cast<double>(b);
    const double tps = static_cast<double>(b) / per_step;
    std::printf("| %lld | %.1f | %.2f | %.3f | %.1f | %.0f%% |\n", static_cast<long long>(b), tps,
                per_step * 1e3, bytes / 1e9, roof, 100.0 * tps / roof);
  }

  if (long_prompts.empty()) return 0;
  std::printf(
      "\n| prompt | policy | peak device memory (GB) | peak KV (GB) | prefill tok/s | "
      "decode tok/s | eviction share of time | evicted tokens |\n");
  std::printf("|---:|---|---:|---:|---:|---:|---:|---:|\n");
  const int64_t free0 = backend.FreeMemory();
  for (int64_t n : long_prompts) {
    if (n + long_decode >= c.max_position_embeddings) {
      std::fprintf(stderr, "skipping %lld: beyond the model's context\n",
                   static_cast<long long>(n));
      continue;
    }
    for (const std::string& p : {policy, std::string("full")}) {
      if (p == "full" && n > full_up_to) {
        std::printf("| %lld | full | (skipped: longer than --full-up-to %lld) |  |  |  |  |  |\n",
                    static_cast<long long>(n), static_cast<long long>(full_up_to));
        continue;
      }
      kvgate::model::GenerateOptions opt;
      opt.sampling.temperature = 0;
      opt.max_tokens = long_decode;
      opt.ignore_eos = true;
      opt.kv.policy = p;
      if (p != "full") {
        opt.kv.budget = budget;
        opt.kv.chunk = 1024;
        if (!kv_weights.empty()) {
          opt.kv.weights = kv_weights;
        } else if (p == "locret") {
          opt.kv.locret = RandomHeads(c);
        }
      }
      int64_t min_free = free0;
      auto poll = [&] {
        min_free = std::min(min_free, backend.FreeMemory());
        return true;
      };
      opt.keep_going = poll;
      opt.on_token = [&](int32_t, std::string_view) { return poll(); };
      auto r = gen.Generate(Prompt(n, c.vocab_size, 99), opt, nullptr);
      if (!r.ok()) {
        std::printf("| %lld | %s | %s |  |  |  |  |  |\n", static_cast<long long>(n), p.c_str(),
                    r.status().ToString().c_str());
        continue;
      }
      const double total = r->prefill_seconds + r->decode_seconds;
      std::printf("| %lld | %s | %.2f | %.3f | %.1f | %.2f | %.1f%% | %lld |\n",
                  static_cast<long long>(n), p.c_str(), static_cast<double>(free0 - min_free) / 1e9,
                  static_cast<double>(r->peak_kv_bytes) / 1e9, r->prefill_tokens_per_s(),
                  r->decode_tokens_per_s(),
                  total > 0 ? 100.0 * r->kv_stats.eviction_seconds / total : 0.0,
                  static_cast<long long>(r->kv_stats.evicted_tokens));
    }
  }
  std::printf(
      "\n(peak device memory: the fall of the device's free memory during the run, "
      "beyond the weights already loaded; on the CPU backends this is the machine's "
      "available memory and noisy)\n");
  return 0;
}
