// Engine speed on the CPU: prefill and decode tokens/s of real and synthetic-weight models,
// beside the memory bandwidth measured in the same run (STREAM-like copy), and the fraction of
// the bandwidth bound that decode reaches: (weight bytes read per token / time per token) /
// measured copy bandwidth. Prints a markdown table.
//
//   build/bench/engine_bench --threads 2 --synthetic llama-3.2-1b --model
//   ../shared/models/stories260K
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "common/host_block.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/thread_pool.h"
#include "model/generation/generator.h"

namespace {

using Clock = std::chrono::steady_clock;

struct Bandwidth {
  double copy_gbs;  // STREAM copy: (bytes read + bytes written) / s
  double read_gbs;  // read-only reduction
};

// Best of several passes over buffers far larger than the last-level cache, on the threads of
// the ops' pool (each thread its contiguous share, first touched by that thread). The buffers
// are in transparent huge pages where the kernel allows them, as packed weights are, and each
// thread reads its share as 4 interleaved streams (as decode reads 8 panels at once): the bound
// is what the memory gives at its best, not what one stream with 4 KiB pages gets.
Bandwidth MeasureBandwidth(size_t bytes) {
  using kvgate::kernels::cpu::ParallelFor;
  using kvgate::kernels::cpu::Schedule;
  const auto n = static_cast<int64_t>(bytes / sizeof(float));
  kvgate::HostBlock block_a(static_cast<size_t>(n) * sizeof(float));
  kvgate::HostBlock block_b(static_cast<size_t>(n) * sizeof(float));
  auto* a = reinterpret_cast<float*>(block_a.data());
  auto* b = reinterpret_cast<float*>(block_b.data());
  ParallelFor(n, Schedule::kStatic, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) a[i] = static_cast<float>(i & 1023), b[i] = 0.f;
  });
  double best_copy = 1e30, best_read = 1e30;
  volatile float sink = 0;
  for (int rep = 0; rep < 5; ++rep) {
    auto t0 = Clock::now();
    ParallelFor(n, Schedule::kStatic, [&](int64_t begin, int64_t end) {
      std::memcpy(b + begin, a + begin, static_cast<size_t>(end - begin) * 4);
    });
    auto t1 = Clock::now();
    // Integer sum of the same bytes: vectorizes without reassociating float adds.
    const auto* words = reinterpret_cast<const uint64_t*>(b);
    std::atomic<uint64_t> total{0};
    ParallelFor(n / 2, Schedule::kStatic, [&](int64_t begin, int64_t end) {
      const int64_t quarter = (end - begin) / 4;
      const uint64_t* s0 = words + begin;
      uint64_t p0 = 0, p1 = 0, p2 = 0, p3 = 0;
      for (int64_t i = 0; i < quarter; ++i) {
        p0 += s0[i];
        p1 += s0[quarter + i];
        p2 += s0[2 * quarter + i];
        p3 += s0[3 * quarter + i];
      }
      for (int64_t i = begin + 4 * quarter; i < end; ++i) p0 += words[i];
      total.fetch_add(p0 + p1 + p2 + p3, std::memory_order_relaxed);
    });
    auto t2 = Clock::now();
    sink = sink + static_cast<float>(total.load() & 1);
    best_copy = std::min(best_copy, std::chrono::duration<double>(t1 - t0).count());
    best_read = std::min(best_read, std::chrono::duration<double>(t2 - t1).count());
  }
  return {2.0 * n * sizeof(float) / best_copy / 1e9, 1.0 * n * sizeof(float) / best_read / 1e9};
}

struct Row {
  std::string model;
  double weight_gb;
  std::vector<double> prefill_tps;  // per --prefill-tokens entry
  double decode_tps;
  double ms_per_token;
  double bound_fraction;       // of the copy bandwidth (the target's definition)
  double read_bound_fraction;  // of the read-only bandwidth
};

// Prompt ids of length `p` spread over the vocabulary (the same prompt every run).
std::vector<int32_t> Prompt(int64_t p, int64_t vocab) {
  std::vector<int32_t> prompt(static_cast<size_t>(p));
  for (int64_t i = 0; i < p; ++i)
    prompt[static_cast<size_t>(i)] = static_cast<int32_t>((i * 7919 + 3) % vocab);
  return prompt;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"kvgate engine benchmark (CPU)"};
  int threads = 2;
  std::vector<std::string> synthetic;
  std::vector<std::string> models;
  std::vector<int64_t> prefill_tokens = {128};
  int64_t decode_tokens = 32;
  int64_t decode_context = -1;
  std::string dtype_name = "bf16";
  std::string quantize;
  bool quantize_all = false;
  bool json = false;
  std::string simd;
  app.add_option("--threads", threads, "CPU threads");
  app.add_option("--quantize", quantize, "Layer matrices as q8_0 or q4_0 blocks (default: none)");
  app.add_flag("--quantize-all", quantize_all, "With --quantize: the embedding and LM head too");
  app.add_option("--synthetic", synthetic,
                 "Synthetic shapes (random weights); llama-3.2-1b when neither this nor --model");
  app.add_option("--model", models, "Hugging Face model directories");
  app.add_option("--prefill-tokens", prefill_tokens,
                 "Prompt lengths for the prefill measurements (each its own run)");
  app.add_option("--decode-tokens", decode_tokens, "Tokens generated for the decode measurement");
  app.add_option("--decode-context", decode_context,
                 "Prompt length before the decode measurement (default: the first prefill "
                 "length; 1 matches llama-bench's tg, which starts from an empty context)");
  app.add_option("--dtype", dtype_name, "Synthetic weight dtype: bf16, f16, f32");
  app.add_option(
      "--simd", simd,
      "Force a SIMD level below the CPU's best: scalar, avx2, avx512, avx512vnni, avx512bf16");
  bool bf16_products = false;
  app.add_flag("--bf16-products", bf16_products,
               "bf16 weights times bf16-rounded activations (AVX512-BF16; see SetBf16Products)");
  app.add_flag("--json", json, "One JSON object per model instead of the markdown table");
  CLI11_PARSE(app, argc, argv);
  if (synthetic.empty() && models.empty()) synthetic = {"llama-3.2-1b"};
  if (prefill_tokens.empty() || decode_tokens < 1) {
    std::fprintf(stderr, "--prefill-tokens needs a length and --decode-tokens at least 1\n");
    return 2;
  }
  if (decode_context < 1) decode_context = prefill_tokens.front();
  kvgate::DType dtype = dtype_name == "f32"   ? kvgate::DType::kF32
                        : dtype_name == "f16" ? kvgate::DType::kF16
                                              : kvgate::DType::kBF16;
  kvgate::kernels::cpu::SetNumThreads(threads);
  if (bf16_products) kvgate::kernels::cpu::SetBf16Products(true);
  if (!simd.empty()) {
    using kvgate::kernels::cpu::SimdLevel;
    const std::map<std::string, SimdLevel> levels = {{"scalar", SimdLevel::kScalar},
                                                     {"avx2", SimdLevel::kAvx2},
                                                     {"avx512", SimdLevel::kAvx512},
                                                     {"avx512vnni", SimdLevel::kAvx512Vnni},
                                                     {"avx512bf16", SimdLevel::kAvx512Bf16}};
    if (!levels.contains(simd)) {
      std::fprintf(stderr, "--simd: unknown level '%s'\n", simd.c_str());
      return 2;
    }
    kvgate::kernels::cpu::SetSimdLevel(levels.at(simd));
  }
  const Bandwidth bw = MeasureBandwidth(size_t{1} << 30);
  if (!json) {
    std::printf("CPU features: %s; threads: %d\n", kvgate::kernels::cpu::CpuFeatures().c_str(),
                threads);
    std::printf(
        "Measured bandwidth (%d threads, 1 GiB buffers): copy %.1f GB/s, read %.1f GB/s\n\n",
        threads, bw.copy_gbs, bw.read_gbs);
  }

  std::vector<Row> rows;
  auto run = [&](const std::string& label, kvgate::model::Generator& gen) {
    const auto& c = gen.config();
    kvgate::model::GenerateOptions opt;
    opt.sampling.temperature = 0;
    opt.ignore_eos = true;
    auto generate = [&](int64_t p,
                        int64_t max_tokens) -> std::optional<kvgate::model::GenerateResult> {
      opt.max_tokens = max_tokens;
      p = std::max<int64_t>(1, std::min<int64_t>(p, c.max_position_embeddings - max_tokens - 1));
      auto r = gen.Generate(Prompt(p, c.vocab_size), opt, nullptr);
      if (!r.ok()) {
        std::fprintf(stderr, "%s: %s\n", label.c_str(), std::string(r.status().message()).c_str());
        return std::nullopt;
      }
      return *std::move(r);
    };
    // Warm-up (page in the weights), then the measured runs.
    if (!generate(4, 2)) return;
    Row row{label, static_cast<double>(gen.transformer().weights().WeightBytesPerToken()) / 1e9};
    for (int64_t p : prefill_tokens) {
      const auto r = generate(p, 1);
      if (!r) return;
      row.prefill_tps.push_back(r->prefill_tokens_per_s());
    }
    const auto r = generate(decode_context, decode_tokens + 1);
    if (!r) return;
    row.decode_tps = r->decode_tokens_per_s();
    const double s_per_token = 1.0 / row.decode_tps;
    row.ms_per_token = s_per_token * 1e3;
    row.bound_fraction = row.weight_gb / s_per_token / bw.copy_gbs;
    row.read_bound_fraction = row.weight_gb / s_per_token / bw.read_gbs;
    rows.push_back(row);
  };
  for (const std::string& dir : models) {
    kvgate::model::LoadOptions lo;
    lo.threads = threads;
    lo.quantize = quantize;
    lo.quantize_all = quantize_all;
    auto g = kvgate::model::Generator::Load(dir, lo);
    if (!g.ok()) {
      std::fprintf(stderr, "%s: %s\n", dir.c_str(), std::string(g.status().message()).c_str());
      return 1;
    }
    run(quantize.empty() ? dir : dir + " (" + quantize + (quantize_all ? ", all" : "") + ")", **g);
  }
  for (const std::string& shape : synthetic) {
    kvgate::model::LoadOptions lo;
    lo.threads = threads;
    lo.quantize = quantize;
    lo.quantize_all = quantize_all;
    auto g = kvgate::model::Generator::Synthetic(shape, dtype, lo);
    if (!g.ok()) {
      std::fprintf(stderr, "%s: %s\n", shape.c_str(), std::string(g.status().message()).c_str());
      return 1;
    }
    run(shape + " (synthetic " + dtype_name +
            (quantize.empty() ? "" : " -> " + quantize + (quantize_all ? ", all" : "")) + ")",
        **g);
  }
  if (json) {
    for (const Row& r : rows) {
      std::string prefill;
      for (size_t i = 0; i < r.prefill_tps.size(); ++i) {
        prefill += (i ? ", " : "") + std::string("\"") + std::to_string(prefill_tokens[i]) +
                   "\": " + std::to_string(r.prefill_tps[i]);
      }
      std::printf(
          "{\"model\": \"%s\", \"threads\": %d, \"copy_gbs\": %.3f, \"read_gbs\": %.3f, "
          "\"weight_gb_per_token\": %.6f, \"prefill_tps\": {%s}, \"decode_context\": %lld, "
          "\"decode_tokens\": %lld, \"decode_tps\": %.3f, \"decode_copy_bound_fraction\": "
          "%.4f}\n",
          r.model.c_str(), threads, bw.copy_gbs, bw.read_gbs, r.weight_gb, prefill.c_str(),
          static_cast<long long>(decode_context), static_cast<long long>(decode_tokens),
          r.decode_tps, r.bound_fraction);
    }
    return rows.size() == models.size() + synthetic.size() ? 0 : 1;
  }
  std::printf("| model | weight GB read/token |");
  for (int64_t p : prefill_tokens)
    std::printf(" prefill tok/s (%lld-token prompt) |", static_cast<long long>(p));
  std::printf(
      " decode tok/s (after %lld) | ms/token | decode / copy-bandwidth bound | decode / "
      "read-bandwidth bound |\n|---|---|",
      static_cast<long long>(decode_context));
  for (size_t i = 0; i < prefill_tokens.size(); ++i) std::printf("---|");
  std::printf("---|---|---|---|\n");
  for (const Row& r : rows) {
    std::printf("| %s | %.4f |", r.model.c_str(), r.weight_gb);
    for (double t : r.prefill_tps) std::printf(" %.1f |", t);
    std::printf(" %.2f | %.2f | %.0f%% | %.0f%% |\n", r.decode_tps, r.ms_per_token,
                100 * r.bound_fraction, 100 * r.read_bound_fraction);
  }
  return rows.size() == models.size() + synthetic.size() ? 0 : 1;
}
