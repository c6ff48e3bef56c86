// kvgate generate: local generation on the CPU engine, or through a server (--server ADDR).
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "cli/client_connection.h"
#include "cli/commands.h"
#include "grpcpp/grpcpp.h"
#include "kernels/cpu/ops.h"
#include "kvgate/v1/kvgate.grpc.pb.h"
#include "model/generation/generator.h"
#include "nlohmann/json.hpp"

namespace kvgate::cli {
namespace {

struct GenerateFlags {
  std::string model;
  bool skip_weight_check = false;
  std::string synthetic;
  std::string dtype = "bf16";
  std::optional<std::string> prompt;
  std::optional<std::string> prompt_ids;
  int64_t max_tokens = 256;
  double temperature = 1.0;
  int64_t top_k = 0;
  double top_p = 1.0;
  double min_p = 0.0;
  double repetition_penalty = 1.0;
  double presence_penalty = 0.0;
  double frequency_penalty = 0.0;
  std::optional<uint64_t> seed;
  std::vector<std::string> stop;
  std::vector<int32_t> stop_token_ids;
  bool ignore_eos = false;
  int threads = 0;
  std::string device;    // "": $KVGATE_DEVICE, else cpu
  std::string kv_dtype;  // "": the device's default
  std::string quantize;  // --quantize
  bool quantize_all = false;
  bool bf16_products = false;
  int64_t prefill_chunk = 512;
  bool json = false;
  bool score_prompt = false;
  bool dump_retained = false;
  std::string kv_pool = "max";
  CLI::Option* kv_slack_option = nullptr;
  cache::EvictionParams kv;
  std::string kv_weights;       // local: a file
  std::string kv_weights_name;  // --server: weights the server registered
  int64_t kv_stabilizers = -1;
  ClientConnection conn;   // --server ADDR: generate through a kvgate server
  double timeout = 0;      // --timeout SECONDS (server mode; 0: none)
  double wait = 0;         // --wait SECONDS: retry while the server is starting
  std::string request_id;  // --request-id (server mode)
  CLI::Option* kv_policy_option = nullptr;
  CLI::Option* kv_allocation_option = nullptr;
  CLI::Option* kv_prefill_option = nullptr;
  CLI::Option* kv_protected_tail_option = nullptr;
};

absl::StatusOr<std::vector<int32_t>> ParseIds(absl::string_view text) {
  std::vector<int32_t> ids;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    int32_t id;
    if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(part), &id)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--prompt-ids: '", part, "' is not a token id"));
    }
    ids.push_back(id);
  }
  if (ids.empty()) return absl::InvalidArgumentError("--prompt-ids: no token ids given");
  return ids;
}

// The `kv` object of --json output.
nlohmann::json KvJson(const GenerateFlags& f, const model::GenerateOptions& opt,
                      const model::ModelConfig& cfg, const cache::KvCache::Stats& st,
                      int64_t tokens_seen) {
  nlohmann::json kv = {{"policy", f.kv.policy},
                       {"budget", f.kv.policy == "full" ? 0 : f.kv.budget},
                       {"chunk", f.kv.policy == "full" ? f.prefill_chunk : f.kv.chunk},
                       {"position", f.kv.policy == "full" ? "original" : f.kv.position_mode()},
                       {"allocation", f.kv.policy == "full" ? "" : f.kv.allocation},
                       {"prefill", f.kv.policy == "full" ? "" : f.kv.prefill},
                       {"max_retained_per_head", st.max_retained_per_head},
                       {"max_held_per_head", st.max_held_per_head},
                       {"evicted_tokens", st.evicted_tokens},
                       {"eviction_ratio", model::EvictionRatio(st, tokens_seen, cfg)},
                       {"peak_kv_bytes", st.peak_bytes}};
  if (f.kv.policy == "locret" || f.kv.policy == "attention-gate") kv["weights"] = f.kv_weights;
  if (f.kv.policy == "locret") kv["stabilizers"] = opt.kv.resolved_stabilizers();
  if (opt.kv.evicts()) kv["protected_tail"] = opt.kv.prompt_tail();
  return kv;
}

// --score-prompt: the mean negative log-likelihood of each prompt token after the first,
// given the tokens before it, with the prompt prefilled under the KV policy (chunked; each
// chunk sees only what the cache retained).
int ScorePrompt(const GenerateFlags& f, const model::GenerateOptions& opt, model::Generator& gen,
                const std::vector<int32_t>& prompt) {
  const auto& cfg = gen.config();
  if (prompt.size() < 2) return Fail("--score-prompt needs at least 2 prompt tokens");
  if (static_cast<int64_t>(prompt.size()) > cfg.max_position_embeddings) {
    return Fail(absl::StrCat("the prompt has ", prompt.size(),
                             " tokens but the model's context is ", cfg.max_position_embeddings));
  }
  for (int32_t id : prompt) {
    if (id < 0 || id >= cfg.vocab_size) {
      return Fail(absl::StrCat("prompt token id ", id, " is outside the vocabulary"));
    }
  }
  cache::EvictionParams kv = opt.kv;
  kv.prompt_tokens = static_cast<int64_t>(prompt.size());  // whole-prompt prefill's slab
  auto cache = gen.NewCache(kv);
  if (!cache.ok()) return Fail(cache.status());
  const int64_t vocab = cfg.vocab_size;
  std::vector<float> logits(prompt.size() * static_cast<size_t>(vocab));
  const int64_t chunk = f.kv.policy == "full" ? f.prefill_chunk : f.kv.chunk;
  if (absl::Status s = gen.Prefill(cache->get(), prompt, chunk, logits.data(), nullptr); !s.ok()) {
    return Fail(s);
  }
  double total = 0;
  for (size_t i = 0; i + 1 < prompt.size(); ++i) {
    const float* row = logits.data() + i * static_cast<size_t>(vocab);
    double mx = row[0];
    for (int64_t t = 1; t < vocab; ++t) mx = std::max(mx, static_cast<double>(row[t]));
    double sum = 0;
    for (int64_t t = 0; t < vocab; ++t) sum += std::exp(row[t] - mx);
    total += mx + std::log(sum) - row[prompt[i + 1]];
  }
  const double mean = total / static_cast<double>(prompt.size() - 1);
  if (f.json) {
    nlohmann::json j;
    j["prompt_tokens"] = prompt.size();
    j["scored_tokens"] = prompt.size() - 1;
    j["nll_mean"] = mean;
    j["nll_sum"] = total;
    j["peak_kv_bytes"] = (*cache)->stats().peak_bytes;
    j["kv"] = KvJson(f, opt, cfg, (*cache)->stats(), (*cache)->num_tokens_seen());
    if (f.dump_retained) {
      nlohmann::json layers = nlohmann::json::array();
      const cache::KvCacheShape& shape = (*cache)->shape();
      for (int64_t l = 0; l < shape.num_layers; ++l) {
        nlohmann::json heads = nlohmann::json::array();
        for (int64_t h = 0; h < shape.num_kv_heads; ++h) {
          const int32_t* pos = (*cache)->Positions(l, h);
          heads.push_back(std::vector<int32_t>(pos, pos + (*cache)->View(l, h).len));
        }
        layers.push_back(std::move(heads));
      }
      j["retained_positions"] = std::move(layers);
    }
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::printf("mean NLL %.6f nats/token over %zu tokens (perplexity %.3f)\n", mean,
                prompt.size() - 1, std::exp(mean));
  }
  return 0;
}

// --server: the same request through kvgate's gRPC API; streams or prints the same JSON.
int RunRemote(const GenerateFlags& f) {
  if (!f.model.empty() || !f.synthetic.empty()) {
    return Fail("--server uses the server's model: drop --model / --synthetic");
  }
  if (f.score_prompt) return Fail("--score-prompt runs locally only: drop --server");
  if (f.kv_pool != "max" || f.kv_slack_option->count() > 0) {
    return Fail("--kv-pool and --kv-decode-slack apply to local runs: drop them with --server");
  }
  if (!f.kv_weights.empty()) {
    return Fail(
        "--kv-weights names a file here; a server offers the weights it registered at start: "
        "--kv-weights-name NAME (default: the policy's own)");
  }
  if (f.prompt.has_value() == f.prompt_ids.has_value()) {
    return Fail("give exactly one of --prompt TEXT or --prompt-ids 1,2,3");
  }
  v1::GenerateRequest req;
  if (f.prompt_ids) {
    auto ids = ParseIds(*f.prompt_ids);
    if (!ids.ok()) return Fail(ids.status());
    for (int32_t id : *ids) req.mutable_token_ids()->add_ids(id);
  } else {
    req.set_text(*f.prompt);
  }
  v1::SamplingParams* s = req.mutable_sampling();
  s->set_temperature(f.temperature);
  s->set_top_k(f.top_k);
  s->set_top_p(f.top_p);
  s->set_min_p(f.min_p);
  s->set_repetition_penalty(f.repetition_penalty);
  s->set_presence_penalty(f.presence_penalty);
  s->set_frequency_penalty(f.frequency_penalty);
  if (f.seed) s->set_seed(*f.seed);
  if (f.max_tokens < 1) return Fail(absl::StrCat("--max-tokens ", f.max_tokens, ": must be >= 1"));
  req.set_max_tokens(f.max_tokens);
  for (const std::string& stop : f.stop) req.add_stop(stop);
  for (int32_t id : f.stop_token_ids) req.add_stop_token_ids(id);
  req.set_ignore_eos(f.ignore_eos);
  req.set_prefill_chunk(f.prefill_chunk);
  req.set_request_id(f.request_id);
  if (f.kv_policy_option != nullptr && f.kv_policy_option->count() > 0) {
    v1::KvParams* kv = req.mutable_kv();
    kv->set_policy(f.kv.policy);
    kv->set_budget(f.kv.budget);
    kv->set_chunk(f.kv.chunk);
    kv->set_sinks(f.kv.sinks);
    kv->set_window(f.kv.window);
    kv->set_ea_future(f.kv.ea_future);
    kv->set_position(f.kv.position);
    kv->set_weights_name(f.kv_weights_name);
    if (f.kv_allocation_option->count() > 0) kv->set_allocation(f.kv.allocation);
    if (f.kv_prefill_option->count() > 0) kv->set_prefill(f.kv.prefill);
    if (f.kv_stabilizers >= 0) kv->set_stabilizers(f.kv_stabilizers);
    if (f.kv_protected_tail_option->count() > 0) kv->set_protected_tail(f.kv.protected_tail);
  } else if (!f.kv_weights_name.empty() || f.kv.budget != 0 ||
             f.kv_allocation_option->count() > 0 || f.kv_prefill_option->count() > 0) {
    return Fail(
        "--kv-budget / --kv-weights-name / --kv-allocation / --kv-prefill need --kv-policy");
  }

  auto channel = f.conn.Channel();
  if (!channel.ok()) return Fail(channel.status());
  auto stub = v1::Kvgate::NewStub(*channel);
  // --wait: a server that is starting (not listening yet, or its pipeline not ready) answers
  // UNAVAILABLE before any token; retry until it serves or the wait is over.
  const auto wait_until = std::chrono::steady_clock::now() +
                          std::chrono::milliseconds(static_cast<int64_t>(f.wait * 1000));
  std::vector<int32_t> ids;
  std::string text;
  std::optional<v1::GenerateFinal> final_msg;
  grpc::Status status;
  while (true) {
    grpc::ClientContext ctx;
    f.conn.Authorize(&ctx);
    if (f.timeout > 0) {
      ctx.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::milliseconds(static_cast<int64_t>(f.timeout * 1000)));
    }
    auto reader = stub->Generate(&ctx, req);
    v1::GenerateResponse resp;
    while (reader->Read(&resp)) {
      if (resp.has_chunk()) {
        ids.insert(ids.end(), resp.chunk().token_ids().begin(), resp.chunk().token_ids().end());
        text += resp.chunk().text();
        if (!f.json) {
          std::fwrite(resp.chunk().text().data(), 1, resp.chunk().text().size(), stdout);
          std::fflush(stdout);
        }
      } else if (resp.has_final()) {
        final_msg = resp.final();
      }
    }
    status = reader->Finish();
    if (status.error_code() != grpc::StatusCode::UNAVAILABLE || !ids.empty() ||
        std::chrono::steady_clock::now() >= wait_until) {
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  if (!f.json) std::printf("\n");
  if (!status.ok()) {
    return Fail(ServerError(f.conn.server, status));
  }
  if (!final_msg) return Fail(absl::StrCat("server ", f.conn.server, ": the stream ended early"));
  if (f.json) {
    const v1::GenerateFinal& fm = *final_msg;
    const v1::KvStats& k = fm.kv();
    nlohmann::json stages = nlohmann::json::array();
    for (const v1::StageBudget& sb : k.stages()) {
      stages.push_back({{"stage", sb.stage()},
                        {"first_layer", sb.first_layer()},
                        {"last_layer", sb.last_layer()},
                        {"budget", sb.budget()},
                        {"layer_budgets", std::vector<int64_t>(sb.layer_budgets().begin(),
                                                               sb.layer_budgets().end())}});
    }
    nlohmann::json j;
    j["request_id"] = fm.request_id();
    j["prompt_token_ids"] =
        std::vector<int32_t>(fm.prompt_token_ids().begin(), fm.prompt_token_ids().end());
    j["token_ids"] = ids;
    j["text"] = text;
    j["finish_reason"] = fm.finish_reason();
    j["prefill_tokens_per_s"] = fm.prefill_tokens_per_s();
    j["decode_tokens_per_s"] = fm.decode_tokens_per_s();
    j["prefill_seconds"] = fm.prefill_seconds();
    j["decode_seconds"] = fm.decode_seconds();
    j["queue_seconds"] = fm.queue_seconds();
    j["usage"] = {{"prompt_tokens", fm.usage().prompt_tokens()},
                  {"completion_tokens", fm.usage().completion_tokens()}};
    j["peak_kv_bytes"] = k.peak_kv_bytes();
    j["kv"] = {{"policy", k.policy()},
               {"budget", k.budget()},
               {"chunk", k.chunk()},
               {"position", k.position()},
               {"allocation", k.allocation()},
               {"prefill", k.prefill()},
               {"max_retained_per_head", k.max_retained_per_head()},
               {"max_held_per_head", k.max_held_per_head()},
               {"evicted_tokens", k.evicted_tokens()},
               {"eviction_ratio", k.eviction_ratio()},
               {"peak_kv_bytes", k.peak_kv_bytes()},
               {"retained_tokens", k.retained_tokens()},
               {"stages", stages}};
    std::printf("%s\n", j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  }
  return 0;
}

int Run(const GenerateFlags& f) {
  if (!f.conn.server.empty()) return RunRemote(f);
  if (!f.kv_weights_name.empty()) {
    return Fail(
        "--kv-weights-name picks a server's registered weights (--server); locally give "
        "--kv-weights FILE");
  }
  if (f.model.empty() == f.synthetic.empty())
    return Fail("give exactly one of --model DIR or --synthetic SHAPE");
  if (f.prompt.has_value() == f.prompt_ids.has_value()) {
    return Fail("give exactly one of --prompt TEXT or --prompt-ids 1,2,3");
  }
  if (f.bf16_products) kernels::cpu::SetBf16Products(true);
  model::LoadOptions load;
  load.threads = f.threads;
  load.device = f.device;
  load.kv_dtype = f.kv_dtype;
  load.quantize = f.quantize;
  load.quantize_all = f.quantize_all;
  load.check_weights = !f.skip_weight_check;
  const bool tty = ::isatty(STDERR_FILENO);
  load.progress = [tty](int64_t done, int64_t total) {
    if (total < 8) return;  // tiny models load instantly
    std::fprintf(stderr,
                 tty ? "\rkvgate: loading layers %lld/%lld" : "kvgate: loading layers %lld/%lld\n",
                 static_cast<long long>(done), static_cast<long long>(total));
    if (tty && done == total) std::fputc('\n', stderr);
  };
  std::unique_ptr<model::Generator> gen;
  if (!f.synthetic.empty()) {
    DType dtype;
    if (f.dtype == "bf16") {
      dtype = DType::kBF16;
    } else if (f.dtype == "f16") {
      dtype = DType::kF16;
    } else if (f.dtype == "f32") {
      dtype = DType::kF32;
    } else {
      return Fail(absl::StrCat("--dtype: '", f.dtype, "' is not one of bf16, f16, f32"));
    }
    auto g = model::Generator::Synthetic(f.synthetic, dtype, load);
    if (!g.ok()) return Fail(g.status());
    gen = std::move(*g);
  } else {
    auto g = model::Generator::Load(f.model, load);
    if (!g.ok()) return Fail(g.status());
    gen = std::move(*g);
  }
  std::vector<int32_t> prompt;
  if (f.prompt_ids) {
    auto ids = ParseIds(*f.prompt_ids);
    if (!ids.ok()) return Fail(ids.status());
    prompt = *ids;
  } else {
    if (gen->tokenizer() == nullptr) return Fail("--prompt needs a tokenizer; use --prompt-ids");
    auto ids = gen->tokenizer()->Encode(*f.prompt, /*add_special=*/true);
    if (!ids.ok()) return Fail(ids.status());
    prompt = *ids;
    if (prompt.empty()) {
      return Fail("the prompt is empty and the tokenizer adds no BOS token; give some text");
    }
  }
  model::GenerateOptions opt;
  opt.sampling.temperature = f.temperature;
  opt.sampling.top_k = f.top_k;
  opt.sampling.top_p = f.top_p;
  opt.sampling.min_p = f.min_p;
  opt.sampling.repetition_penalty = f.repetition_penalty;
  opt.sampling.presence_penalty = f.presence_penalty;
  opt.sampling.frequency_penalty = f.frequency_penalty;
  opt.sampling.seed = f.seed;
  opt.max_tokens = f.max_tokens;
  opt.stop_strings = f.stop;
  opt.stop_token_ids = f.stop_token_ids;
  opt.ignore_eos = f.ignore_eos;
  opt.prefill_chunk = f.prefill_chunk;
  opt.kv = f.kv;
  if (f.kv_stabilizers >= 0 && f.kv.policy != "locret") {
    return Fail(
        absl::StrCat("--kv-stabilizers applies to locret, not to --kv-policy ", f.kv.policy));
  }
  opt.kv.weights = f.kv_weights;
  if (f.kv_stabilizers >= 0) opt.kv.stabilizers = f.kv_stabilizers;
  if (f.kv_pool != "max" && f.kv_pool != "avg") {
    return Fail(absl::StrCat("--kv-pool '", f.kv_pool, "' is not one of max, avg"));
  }
  opt.kv.pool_max = f.kv_pool == "max";
  if (f.dump_retained && (!f.score_prompt || !f.json)) {
    return Fail("--dump-retained needs --score-prompt --json");
  }
  if (absl::Status s = opt.kv.Validate(); !s.ok()) return Fail(s);
  if (f.score_prompt) return ScorePrompt(f, opt, *gen, prompt);
  std::function<void(std::string_view)> on_text;
  if (!f.json) {
    on_text = [](std::string_view text) {
      std::fwrite(text.data(), 1, text.size(), stdout);
      std::fflush(stdout);
    };
  }
  auto result = gen->Generate(prompt, opt, on_text);
  if (!result.ok()) return Fail(result.status());
  if (f.json) {
    nlohmann::json j;
    j["prompt_token_ids"] = result->prompt_token_ids;
    j["token_ids"] = result->token_ids;
    j["text"] = result->text;
    j["finish_reason"] = result->finish_reason;
    j["prefill_tokens_per_s"] = result->prefill_tokens_per_s();
    j["decode_tokens_per_s"] = result->decode_tokens_per_s();
    j["prefill_seconds"] = result->prefill_seconds;
    j["decode_seconds"] = result->decode_seconds;
    j["usage"] = {{"prompt_tokens", result->prompt_token_ids.size()},
                  {"completion_tokens", result->token_ids.size()}};
    j["peak_kv_bytes"] = result->peak_kv_bytes;
    j["kv"] = KvJson(f, opt, gen->config(), result->kv_stats, result->kv_tokens_seen);
    // Replace invalid UTF-8 rather than failing: the text is already valid by construction.
    std::printf("%s\n", j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  } else {
    std::printf("\n");
  }
  return 0;
}

}  // namespace

Runner AddGenerateCommand(CLI::App& app) {
  auto f = std::make_shared<GenerateFlags>();
  CLI::App* cmd = app.add_subcommand(
      "generate", "Generate text from a prompt on the CPU engine, or through a server (--server)");
  cmd->add_option("--model", f->model,
                  "Hugging Face model directory (config.json, *.safetensors, tokenizer)");
  cmd->add_option(
      "--synthetic", f->synthetic,
      "Random weights of a real shape instead of --model (llama-3.2-1b, llama-3.1-8b, ...)");
  cmd->add_option("--dtype", f->dtype, "Weight dtype of --synthetic: bf16, f16 or f32");
  cmd->add_option("--prompt", f->prompt,
                  "Prompt text (\"\" means BOS alone where the tokenizer adds BOS)");
  cmd->add_option("--prompt-ids", f->prompt_ids,
                  "Prompt token ids, comma-separated, used exactly as given");
  cmd->add_option("--max-tokens", f->max_tokens, "Most tokens to generate");
  cmd->add_option("--temperature", f->temperature, "Sampling temperature; 0 is greedy");
  cmd->add_option("--top-k", f->top_k, "Keep the k most likely tokens (0: off)");
  cmd->add_option("--top-p", f->top_p, "Nucleus sampling mass (1: off)");
  cmd->add_option("--min-p", f->min_p,
                  "Drop tokens below min-p times the top probability (0: off)");
  cmd->add_option("--repetition-penalty", f->repetition_penalty,
                  "Hugging Face repetition penalty (1: off)");
  cmd->add_option("--presence-penalty", f->presence_penalty, "OpenAI presence penalty in [-2, 2]");
  cmd->add_option("--frequency-penalty", f->frequency_penalty,
                  "OpenAI frequency penalty in [-2, 2]");
  cmd->add_option("--seed", f->seed, "Random seed (same seed, same output)");
  cmd->add_option("--stop", f->stop, "Stop string (repeatable); not included in the output");
  cmd->add_option("--stop-token-id", f->stop_token_ids, "Stop token id (repeatable)");
  cmd->add_flag("--ignore-eos", f->ignore_eos, "Do not stop at the model's EOS tokens");
  cmd->add_option("--threads", f->threads, "CPU threads (default: all cores)");
  cmd->add_option("--device", f->device,
                  "Where the model runs: cpu, cuda, cuda:N, or guarded (the CPU kernels over "
                  "memory the host cannot touch; for tests) (default: cpu)");
  cmd->add_option("--quantize", f->quantize,
                  "Weights of the layers' matrices as q8_0 or q4_0 blocks (CPU; the embedding, "
                  "norms and LM head stay as stored)");
  cmd->add_flag("--bf16-products", f->bf16_products,
                "CPU with AVX512-BF16: bf16 weights (and quantized prefill) times bf16-rounded "
                "activations, llama.cpp's and PyTorch's bf16 numerics (logits move by ~1e-2); "
                "also KVGATE_BF16_PRODUCTS=1, which serve's workers inherit");
  cmd->add_flag("--quantize-all", f->quantize_all,
                "With --quantize: the embedding and the LM head as blocks too");
  cmd->add_option("--kv-dtype", f->kv_dtype,
                  "KV cache storage: f32, bf16 or f16 (default: f32 on the CPU, bf16 on a GPU)");
  cmd->add_flag("--skip-weight-check", f->skip_weight_check,
                "Skip the sampled NaN/Inf check of the first and last layers' weights");
  cmd->add_option("--prefill-chunk", f->prefill_chunk, "Prompt tokens per prefill step");
  cmd->add_flag("--json", f->json, "Print one JSON object at the end instead of streaming text");
  cmd->add_flag("--dump-retained", f->dump_retained,
                "With --score-prompt --json: the original positions every (layer, KV head) "
                "retains after the prompt (retained_positions[layer][head])");
  cmd->add_flag("--score-prompt", f->score_prompt,
                "Instead of generating, print the mean NLL of the prompt's tokens under the KV "
                "policy (evaluation)");
  AddClientFlags(cmd, &f->conn);
  cmd->add_option("--server", f->conn.server,
                  "Generate through a kvgate server (host:port) instead of loading a model");
  cmd->add_option("--timeout", f->timeout, "With --server: deadline in seconds (0: none)");
  cmd->add_option("--wait", f->wait,
                  "With --server: retry for this many seconds while the server is starting");
  cmd->add_option("--request-id", f->request_id,
                  "With --server: the request's id (for kvgate abort; default: the server's)");
  f->kv_policy_option = cmd->add_option("--kv-policy", f->kv.policy,
                                        "KV eviction policy: full, streaming, h2o, snapkv, tova, "
                                        "expected-attention, locret, attention-gate");
  cmd->add_option("--kv-budget", f->kv.budget, "Retained tokens per (layer, KV head)");
  cmd->add_option("--kv-chunk", f->kv.chunk, "Prefill chunk when a policy evicts");
  f->kv_allocation_option = cmd->add_option(
      "--kv-allocation", f->kv.allocation,
      "How the budget is spread: uniform | pyramid (more to lower layers) | adaptive (per KV "
      "head by score mass; --server default: the server's)");
  f->kv_prefill_option = cmd->add_option(
      "--kv-prefill", f->kv.prefill,
      "chunked (evict after each chunk) | whole (prefill the whole prompt, then compress once; "
      "memory of the whole prompt until then)");
  cmd->add_option("--kv-sinks", f->kv.sinks,
                  "streaming, expected-attention: attention sinks kept (default 4)");
  cmd->add_option("--kv-window", f->kv.window, "snapkv: observation window");
  cmd->add_option("--kv-pool", f->kv_pool,
                  "snapkv: pooling of the votes, max or avg (default max; local runs)");
  f->kv_slack_option = cmd->add_option(
      "--kv-decode-slack", f->kv.decode_slack,
      "Decode evicts back to the budget when a head reaches budget + this (default 16; local "
      "runs)");
  cmd->add_option("--kv-ea-future", f->kv.ea_future,
                  "expected-attention: future query positions averaged over (default 512)");
  cmd->add_option(
      "--kv-position", f->kv.position,
      "original | reassign (default: reassign for streaming and locret, else original)");
  cmd->add_option("--kv-weights", f->kv_weights,
                  "Retaining heads or gates file (locret, attention-gate; local runs)");
  cmd->add_option("--kv-weights-name", f->kv_weights_name,
                  "--server: learned weights the server registered (default: the policy's own)");
  cmd->add_option("--kv-stabilizers", f->kv_stabilizers,
                  "locret: stabilizers n_s (default: 40% of the budget)");
  f->kv_protected_tail_option =
      cmd->add_option("--kv-protected-tail", f->kv.protected_tail,
                      "Prompt tail prefilled after the last eviction, never evicted at prefill "
                      "(e.g. the question; locret's n_loc: default 100 there, else 0)");
  return [f]() { return Run(*f); };
}

}  // namespace kvgate::cli
