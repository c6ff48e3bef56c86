// Engine speed on the CPU: prefill and decode tokens/s of real and synthetic-weight models,
// beside the memory bandwidth measured in the same run (STREAM-like copy), and the fraction of
// the bandwidth bound that decode reaches: (weight bytes read per token / time per token) /
// measured copy bandwidth. Prints a markdown table.
//
//   build/bench/engine_bench --threads 2 --synthetic llama-3.2-1b --model
//   ../shared/models/stories260K
#include <omp.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "kernels/cpu/ops.h"
#include "model/generation/generator.h"

namespace {

using Clock = std::chrono::steady_clock;

struct Bandwidth {
  double copy_gbs;  // STREAM copy: (bytes read + bytes written) / s
  double read_gbs;  // read-only reduction
};

// Best of several passes over buffers far larger than the last-level cache.
Bandwidth MeasureBandwidth(size_t bytes) {
  const size_t n = bytes / sizeof(float);
  std::vector<float> a(n), b(n);
#pragma omp parallel for schedule(static)
  for (size_t i = 0; i < n; ++i) a[i] = static_cast<float>(i & 1023), b[i] = 0.f;
  double best_copy = 1e30, best_read = 1e30;
  volatile float sink = 0;
  for (int rep = 0; rep < 5; ++rep) {
    auto t0 = Clock::now();
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; ++i) b[i] = a[i];
    auto t1 = Clock::now();
    // Integer sum of the same bytes: vectorizes without reassociating float adds.
    const uint64_t* words = reinterpret_cast<const uint64_t*>(b.data());
    uint64_t total = 0;
#pragma omp parallel for schedule(static) reduction(+ : total)
    for (size_t i = 0; i < n / 2; ++i) total += words[i];
    auto t2 = Clock::now();
    sink = sink + static_cast<float>(total & 1);
    best_copy = std::min(best_copy, std::chrono::duration<double>(t1 - t0).count());
    best_read = std::min(best_read, std::chrono::duration<double>(t2 - t1).count());
  }
  return {2.0 * n * sizeof(float) / best_copy / 1e9, 1.0 * n * sizeof(float) / best_read / 1e9};
}

struct Row {
  std::string model;
  double weight_gb;
  double prefill_tps;
  double decode_tps;
  double ms_per_token;
  double bound_fraction;       // of the copy bandwidth (the target's definition)
  double read_bound_fraction;  // of the read-only bandwidth
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"kvgate engine benchmark (CPU)"};
  int threads = 2;
  std::vector<std::string> synthetic = {"llama-3.2-1b"};
  std::vector<std::string> models;
  int64_t prefill_tokens = 128;
  int64_t decode_tokens = 32;
  std::string dtype_name = "bf16";
  std::string quantize;
  app.add_option("--threads", threads, "CPU threads");
  app.add_option("--quantize", quantize, "Layer matrices as q8_0 or q4_0 blocks (default: none)");
  app.add_option("--synthetic", synthetic, "Synthetic shapes (random weights)");
  app.add_option("--model", models, "Hugging Face model directories");
  app.add_option("--prefill-tokens", prefill_tokens, "Prompt length for the prefill measurement");
  app.add_option("--decode-tokens", decode_tokens, "Tokens generated for the decode measurement");
  app.add_option("--dtype", dtype_name, "Synthetic weight dtype: bf16, f16, f32");
  CLI11_PARSE(app, argc, argv);
  kvgate::DType dtype = dtype_name == "f32"   ? kvgate::DType::kF32
                        : dtype_name == "f16" ? kvgate::DType::kF16
                                              : kvgate::DType::kBF16;
  kvgate::kernels::cpu::SetNumThreads(threads);
  std::printf("CPU features: %s; threads: %d\n", kvgate::kernels::cpu::CpuFeatures().c_str(),
              threads);
  const Bandwidth bw = MeasureBandwidth(size_t{1} << 30);
  std::printf("Measured bandwidth (%d threads, 1 GiB buffers): copy %.1f GB/s, read %.1f GB/s\n\n",
              threads, bw.copy_gbs, bw.read_gbs);

  std::vector<Row> rows;
  auto run = [&](const std::string& label, kvgate::model::Generator& gen) {
    const auto& c = gen.config();
    const int64_t p =
        std::min<int64_t>(prefill_tokens, c.max_position_embeddings - decode_tokens - 1);
    std::vector<int32_t> prompt(static_cast<size_t>(p));
    for (int64_t i = 0; i < p; ++i)
      prompt[static_cast<size_t>(i)] = static_cast<int32_t>((i * 7919 + 3) % c.vocab_size);
    kvgate::model::GenerateOptions opt;
    opt.sampling.temperature = 0;
    opt.max_tokens = decode_tokens + 1;
    opt.ignore_eos = true;
    // Warm-up (page in the weights), then the measured run.
    auto warm = gen.Generate({prompt.begin(), prompt.begin() + 4}, opt, nullptr);
    if (!warm.ok()) {
      std::fprintf(stderr, "%s: %s\n", label.c_str(), std::string(warm.status().message()).c_str());
      return;
    }
    auto r = gen.Generate(prompt, opt, nullptr);
    if (!r.ok()) {
      std::fprintf(stderr, "%s: %s\n", label.c_str(), std::string(r.status().message()).c_str());
      return;
    }
    const double bytes = static_cast<double>(gen.transformer().weights().WeightBytesPerToken());
    const double s_per_token = 1.0 / r->decode_tokens_per_s();
    rows.push_back({label, bytes / 1e9, r->prefill_tokens_per_s(), r->decode_tokens_per_s(),
                    s_per_token * 1e3, bytes / s_per_token / 1e9 / bw.copy_gbs,
                    bytes / s_per_token / 1e9 / bw.read_gbs});
  };
  for (const std::string& dir : models) {
    kvgate::model::LoadOptions lo;
    lo.threads = threads;
    lo.quantize = quantize;
    auto g = kvgate::model::Generator::Load(dir, lo);
    if (!g.ok()) {
      std::fprintf(stderr, "%s: %s\n", dir.c_str(), std::string(g.status().message()).c_str());
      return 1;
    }
    run(quantize.empty() ? dir : dir + " (" + quantize + ")", **g);
  }
  for (const std::string& shape : synthetic) {
    kvgate::model::LoadOptions lo;
    lo.threads = threads;
    lo.quantize = quantize;
    auto g = kvgate::model::Generator::Synthetic(shape, dtype, lo);
    if (!g.ok()) {
      std::fprintf(stderr, "%s: %s\n", shape.c_str(), std::string(g.status().message()).c_str());
      return 1;
    }
    run(shape + " (synthetic " + dtype_name + (quantize.empty() ? "" : " -> " + quantize) + ")",
        **g);
  }
  std::printf(
      "| model | weight GB read/token | prefill tok/s (%lld-token prompt) | decode tok/s | "
      "ms/token | decode / copy-bandwidth bound | decode / read-bandwidth bound |\n",
      static_cast<long long>(prefill_tokens));
  std::printf("|---|---|---|---|---|---|---|\n");
  for (const Row& r : rows) {
    std::printf("| %s | %.4f | %.1f | %.2f | %.2f | %.0f%% | %.0f%% |\n", r.model.c_str(),
                r.weight_gb, r.prefill_tps, r.decode_tps, r.ms_per_token, 100 * r.bound_fraction,
                100 * r.read_bound_fraction);
  }
  return 0;
}
