// The kvgate binary as a user runs it: golden output through `generate --json`, and every bad
// input answered with exactly one line on stderr and a non-zero exit, never a crash.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "nlohmann/json.hpp"

namespace {

struct RunResult {
  int exit_code = -1;
  bool signaled = false;
  std::string out;
  std::string err;
};

RunResult RunKvgate(const std::string& args) {
  static int counter = 0;
  const std::string err_path = std::filesystem::temp_directory_path().string() +
                               "/kvgate_cli_err_" + std::to_string(::getpid()) + "_" +
                               std::to_string(counter++);
  const std::string cmd = std::string(KVGATE_BINARY) + " " + args + " 2>" + err_path;
  RunResult r;
  FILE* p = ::popen(cmd.c_str(), "r");
  std::array<char, 4096> buf;
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
  const int status = ::pclose(p);
  r.signaled = WIFSIGNALED(status);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream in(err_path);
  r.err.assign(std::istreambuf_iterator<char>(in), {});
  std::filesystem::remove(err_path);
  return r;
}

const std::string kStories = "../shared/models/stories260K";

TEST(Cli, GenerateJsonReproducesGoldenGreedy) {
  RunResult r = RunKvgate("generate --model " + kStories +
                          " --prompt \"\" --max-tokens 300 --temperature 0 --json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out, nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << r.out;
  std::ifstream g(kStories + "/golden_greedy.json");
  auto golden = nlohmann::json::parse(g, nullptr, false);
  ASSERT_FALSE(golden.is_discarded());
  std::vector<int32_t> all = j["prompt_token_ids"].get<std::vector<int32_t>>();
  EXPECT_EQ(all, std::vector<int32_t>{1});  // "" is BOS alone
  for (int32_t t : j["token_ids"].get<std::vector<int32_t>>()) all.push_back(t);
  EXPECT_EQ(all, golden["greedy_token_ids"].get<std::vector<int32_t>>());
  EXPECT_EQ(j["text"].get<std::string>(), golden["text"].get<std::string>());
  EXPECT_EQ(j["finish_reason"], "length");
  EXPECT_GT(j["prefill_tokens_per_s"].get<double>(), 0);
  EXPECT_GT(j["decode_tokens_per_s"].get<double>(), 0);
}

TEST(Cli, StreamsTextAndHonoursStopStringsAndSeeds) {
  RunResult r = RunKvgate("generate --model " + kStories +
                          " --prompt-ids 1 --max-tokens 60 --temperature 0 --stop \"park\"");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(
      r.out,
      "Once upon a time, there was a little girl named Lily. She loved to play outside in the \n");
  RunResult a = RunKvgate("generate --model " + kStories +
                          " --prompt \"Once\" --max-tokens 40 --seed 7 --top-p 0.9 --json");
  RunResult b = RunKvgate("generate --model " + kStories +
                          " --prompt \"Once\" --max-tokens 40 --seed 7 --top-p 0.9 --json");
  ASSERT_EQ(a.exit_code, 0) << a.err;
  auto ja = nlohmann::json::parse(a.out), jb = nlohmann::json::parse(b.out);
  EXPECT_EQ(ja["token_ids"], jb["token_ids"]);
  RunResult s =
      RunKvgate("generate --model " + kStories +
                " --prompt-ids 1 --max-tokens 50 --temperature 0 --stop-token-id 261 --json");
  ASSERT_EQ(s.exit_code, 0) << s.err;
  auto js = nlohmann::json::parse(s.out);
  EXPECT_EQ(js["finish_reason"], "stop");
  EXPECT_EQ(js["token_ids"].back(), 261);
}

TEST(Cli, KvPolicyReportsBoundedCache) {
  for (const std::string policy : {"streaming", "h2o", "snapkv", "tova", "locret"}) {
    const std::string weights =
        policy == "locret"
            ? " --kv-weights tests/testdata/eviction/stories260K-random-locret.safetensors"
            : "";
    RunResult r = RunKvgate("generate --model " + kStories +
                            " --prompt-ids 1 --max-tokens 200 --temperature 0 --kv-policy " +
                            policy + " --kv-budget 48 --kv-chunk 16 --json" + weights);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    auto kv = nlohmann::json::parse(r.out)["kv"];
    EXPECT_EQ(kv["policy"], policy);
    EXPECT_LE(kv["max_retained_per_head"].get<int64_t>(), 48);
    EXPECT_GT(kv["evicted_tokens"].get<int64_t>(), 0);
    EXPECT_GT(kv["eviction_ratio"].get<double>(), 0.5);
    EXPECT_LT(kv["eviction_ratio"].get<double>(), 1.0);
  }
}

TEST(Cli, ScorePromptGivesTheSameNllWholeChunkedAndUnderABudgetAboveTheContext) {
  const nlohmann::json golden =
      nlohmann::json::parse(std::ifstream(kStories + "/golden_greedy.json"), nullptr, false);
  ASSERT_FALSE(golden.is_discarded());
  std::string ids;
  for (int32_t t : golden["greedy_token_ids"].get<std::vector<int32_t>>()) {
    ids += (ids.empty() ? "" : ",") + std::to_string(t);
  }
  auto nll = [&](const std::string& extra) {
    RunResult r = RunKvgate("generate --model " + kStories + " --prompt-ids " + ids +
                            " --score-prompt --json " + extra);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return nlohmann::json::parse(r.out);
  };
  const auto whole = nll("");
  const double full = whole["nll_mean"].get<double>();
  EXPECT_GT(full, 0.0);
  EXPECT_LT(full, 3.0);  // the model's own greedy text is likely under it
  EXPECT_NEAR(nll("--prefill-chunk 7")["nll_mean"].get<double>(), full, 1e-5);
  EXPECT_NEAR(nll("--kv-policy h2o --kv-budget 600 --kv-chunk 16")["nll_mean"].get<double>(), full,
              1e-5);
  const auto evicted = nll("--kv-policy streaming --kv-budget 16 --kv-chunk 16");
  EXPECT_GT(evicted["kv"]["evicted_tokens"].get<int64_t>(), 0);
  EXPECT_NE(evicted["nll_mean"].get<double>(), full);
}

// The guarded device (the CPU kernels over memory the host cannot touch outside them) gives
// exactly the CPU's tokens and cache statistics, every policy; bf16 KV halves the KV bytes.
TEST(Cli, GuardedDeviceGivesExactlyTheCpuTokens) {
  const std::string m = "models/kvgate-default";
  std::string prompt;
  for (int i = 0; i < 25; ++i) prompt += "And God said, Let there be light: and there was light. ";
  const std::vector<std::string> policies = {
      "",
      "--kv-policy streaming --kv-budget 64 --kv-chunk 48",
      "--kv-policy h2o --kv-budget 64 --kv-chunk 48",
      "--kv-policy snapkv --kv-budget 64 --kv-chunk 48",
      "--kv-policy tova --kv-budget 64 --kv-chunk 48",
      "--kv-policy locret --kv-budget 64 --kv-chunk 48 --kv-weights " + m + "/locret.safetensors",
      "--kv-policy attention-gate --kv-budget 64 --kv-chunk 48 --kv-weights " + m +
          "/attention_gate.safetensors",
  };
  for (const std::string& kv : policies) {
    nlohmann::json got[2];
    const char* devices[2] = {"cpu", "guarded"};
    for (int d = 0; d < 2; ++d) {
      RunResult r =
          RunKvgate("generate --model " + m + " --prompt \"" + prompt +
                    "\" --max-tokens 40 --temperature 0 --json " + kv + " --device " + devices[d]);
      ASSERT_EQ(r.exit_code, 0) << kv << ": " << r.err;
      got[d] = nlohmann::json::parse(r.out, nullptr, false);
      ASSERT_FALSE(got[d].is_discarded()) << r.out;
    }
    EXPECT_EQ(got[0]["token_ids"], got[1]["token_ids"]) << kv;
    for (const char* key : {"evicted_tokens", "max_retained_per_head", "peak_kv_bytes"}) {
      EXPECT_EQ(got[0]["kv"][key], got[1]["kv"][key]) << kv << " " << key;
    }
    if (!kv.empty()) {
      EXPECT_GT(got[0]["kv"]["evicted_tokens"].get<int64_t>(), 0) << kv;
    }
  }
  // --kv-dtype bf16: the same cache in half the bytes, on both devices.
  for (const char* device : {"cpu", "guarded"}) {
    int64_t peak[2];
    const char* dtypes[2] = {"f32", "bf16"};
    for (int i = 0; i < 2; ++i) {
      RunResult r = RunKvgate("generate --model " + m +
                              " --prompt \"And God said\" --max-tokens 30 --temperature 0 --json "
                              "--kv-policy h2o --kv-budget 16 --kv-chunk 8 --device " +
                              device + " --kv-dtype " + dtypes[i]);
      ASSERT_EQ(r.exit_code, 0) << r.err;
      auto j = nlohmann::json::parse(r.out, nullptr, false);
      EXPECT_EQ(j["token_ids"].size(), 30u);
      peak[i] = j["peak_kv_bytes"].get<int64_t>();
    }
    EXPECT_EQ(peak[1] * 2, peak[0]) << device;
  }
}

TEST(Cli, TokenizePrintsIds) {
  RunResult r = RunKvgate("tokenize --model " + kStories + " --json \"Once upon a time\"");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto ids = nlohmann::json::parse(r.out).get<std::vector<int32_t>>();
  ASSERT_GE(ids.size(), 2u);
  EXPECT_EQ(ids[0], 1);  // BOS
}

TEST(Cli, BadInputIsOneLineOnStderrAndNonZeroExit) {
  const std::string tmp = std::filesystem::temp_directory_path().string() + "/kvgate_cli_bad";
  std::filesystem::create_directories(tmp);
  std::ofstream(tmp + "/config.json") << "{\"architectures\": [\"BertModel\"]}";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"generate --model /nonexistent --prompt hi", "/nonexistent"},
      {"generate --model " + tmp + " --prompt hi", "BertModel"},
      {"generate --model " + kStories + " --prompt hi --temperature -1", "temperature"},
      {"generate --model " + kStories + " --prompt hi --top-p 0", "top_p"},
      {"generate --model " + kStories + " --prompt hi --min-p 2", "min_p"},
      {"generate --model " + kStories + " --prompt hi --max-tokens 0", "max_tokens"},
      {"generate --model " + kStories + " --prompt-ids 1,x,3", "'x'"},
      {"generate --model " + kStories + " --prompt-ids 1,99999", "99999"},
      {"generate --model " + kStories + " --prompt-ids 1 --stop \"\"", "stop string"},
      {"generate --model " + kStories, "--prompt"},
      {"generate --model " + kStories + " --prompt hi --temperature abc", "temperature"},
      {"generate --model " + kStories + " --prompt hi --no-such-flag", "no-such-flag"},
      {"tokenize --tokenizer /nonexistent.model hi", "/nonexistent.model"},
      {"frobnicate", "frobnicate"},
      {"generate --model " + kStories + " --prompt hi --kv-policy lru --kv-budget 8", "'lru'"},
      {"generate --model " + kStories +
           " --prompt hi --kv-policy streaming --kv-budget 4 --kv-sinks 4",
       "--kv-sinks"},
      {"generate --model " + kStories + " --prompt hi --kv-policy h2o", "--kv-budget"},
      {"generate --model " + kStories + " --prompt hi --quantize q3_k", "--quantize q3_k"},
      {"generate --model " + kStories + " --prompt hi --quantize-all", "--quantize-all needs"},
      {"generate --model " + kStories + " --prompt hi --kv-policy locret --kv-budget 64", "locret"},
      {"generate --model " + kStories +
           " --prompt hi --kv-policy h2o --kv-budget 64 --kv-weights x",
       "--kv-weights"},
      {"generate --model " + kStories +
           " --prompt hi --kv-policy locret --kv-budget 64 --kv-weights "
           "tests/testdata/hf_models/llama-f16/model.safetensors",
       "not Locret retaining heads"},
      {"generate --model " + kStories +
           " --prompt hi --kv-policy locret --kv-budget 8 --kv-stabilizers 8 --kv-weights "
           "tests/testdata/eviction/stories260K-random-locret.safetensors",
       "must exceed --kv-stabilizers"},
      {"generate --model " + kStories +
           " --prompt hi --kv-policy locret --kv-budget 64 --kv-weights /nonexistent.safetensors",
       "/nonexistent.safetensors"},
      {"generate --model " + kStories + " --prompt hi --kv-policy attention-gate --kv-budget 64",
       "needs --kv-weights"},
      {"generate --model " + kStories + " --prompt hi --device tpu", "cpu, cuda, cuda:N, guarded"},
      {"generate --model " + kStories + " --prompt hi --device cuda:7", "--device cuda:7"},
      {"generate --model " + kStories + " --prompt hi --kv-dtype f8", "f32, bf16, f16"},
      {"generate --model " + kStories + " --prompt hi --kv-policy h2o --kv-budget 100000000000",
       "larger than any context"},
      // A budget no memory can hold: an error naming the allocation, never a crash.
      {"generate --model " + kStories +
           " --prompt hi --kv-policy h2o --kv-budget 1000000000 --device guarded",
       "cannot allocate"},
      {"generate --model " + kStories +
           " --prompt hi --kv-policy attention-gate --kv-budget 64 --kv-weights "
           "tests/testdata/eviction/stories260K-random-locret.safetensors",
       "not Attention-Gate gates"},
  };
  for (const auto& [args, needle] : cases) {
    RunResult r = RunKvgate(args);
    EXPECT_FALSE(r.signaled) << args;
    EXPECT_NE(r.exit_code, 0) << args;
    EXPECT_NE(r.err.find(needle), std::string::npos) << args << " -> " << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << args << " -> " << r.err;
  }
  // A prompt longer than the context (512 tokens for stories260K).
  std::string ids = "1";
  for (int i = 0; i < 600; ++i) ids += ",300";
  RunResult r = RunKvgate("generate --model " + kStories + " --prompt-ids " + ids);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("context"), std::string::npos) << r.err;
  std::filesystem::remove_all(tmp);
}

}  // namespace
