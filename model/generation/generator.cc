#include "model/generation/generator.h"

#include <algorithm>
#include <chrono>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "cache/evicting_kv_cache.h"
#include "cache/kv_cache.h"
#include "common/status.h"
#include "model/weights/eviction_weights.h"
#include "model/weights/safetensors.h"

namespace kvgate::model {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// Length of the longest suffix of `text` that is a proper prefix of some stop string: text
// that must be held back because a stop string may be completing.
size_t HeldBackSuffix(std::string_view text, const std::vector<std::string>& stops) {
  size_t held = 0;
  for (const std::string& s : stops) {
    for (size_t len = std::min(s.size() - 1, text.size()); len > held; --len) {
      if (text.substr(text.size() - len) == std::string_view(s).substr(0, len)) {
        held = len;
        break;
      }
    }
  }
  return held;
}

}  // namespace

double GenerateResult::prefill_tokens_per_s() const {
  return prefill_seconds > 0 ? static_cast<double>(prompt_token_ids.size()) / prefill_seconds : 0;
}
double GenerateResult::decode_tokens_per_s() const {
  const double n = token_ids.size() > 1 ? static_cast<double>(token_ids.size() - 1) : 0.0;
  return decode_seconds > 0 ? n / decode_seconds : 0;
}

absl::StatusOr<std::unique_ptr<Generator>> Generator::Load(const std::string& model_dir,
                                                           const LoadOptions& options) {
  ASSIGN_OR_RETURN(ModelConfig config, ModelConfig::Load(model_dir));
  ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> ckpt, Checkpoint::Open(model_dir));
  std::shared_ptr<Checkpoint> shared(std::move(ckpt));
  ASSIGN_OR_RETURN(StageWeights weights,
                   LoadStageWeights(config, shared, 0, config.num_layers, options.progress));
  auto g = std::unique_ptr<Generator>(new Generator());
  // A checkpoint without tokenizer files still runs on token ids (--prompt-ids).
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::exists(model_dir + "/tokenizer.json", ec) ||
      fs::exists(model_dir + "/tokenizer.model", ec)) {
    ASSIGN_OR_RETURN(g->tokenizer_, LoadTokenizer(model_dir));
    g->eos_ids_ = g->tokenizer_->eos_ids();
  }
  g->backend_ = kernels::MakeCpuBackend(options.threads);
  if (g->eos_ids_.empty()) g->eos_ids_ = config.eos_token_ids;
  g->transformer_ = std::make_unique<Transformer>(config, std::move(weights), g->backend_.get());
  return g;
}

absl::StatusOr<std::unique_ptr<Generator>> Generator::Synthetic(const std::string& shape,
                                                                DType dtype,
                                                                const LoadOptions& options) {
  ASSIGN_OR_RETURN(ModelConfig config, SyntheticConfig(shape));
  auto g = std::unique_ptr<Generator>(new Generator());
  g->backend_ = kernels::MakeCpuBackend(options.threads);
  ASSIGN_OR_RETURN(StageWeights weights,
                   MakeSyntheticWeights(config, dtype, 0, config.num_layers, /*seed=*/1234));
  g->transformer_ = std::make_unique<Transformer>(config, std::move(weights), g->backend_.get());
  return g;
}

absl::Status Generator::CheckPrompt(const std::vector<int32_t>& prompt_ids) const {
  const ModelConfig& c = config();
  if (prompt_ids.empty()) return absl::InvalidArgumentError("the prompt has no tokens");
  if (static_cast<int64_t>(prompt_ids.size()) >= c.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat("the prompt has ", prompt_ids.size(),
                                                   " tokens but the model's context "
                                                   "(max_position_embeddings) is ",
                                                   c.max_position_embeddings, " tokens"));
  }
  for (int32_t id : prompt_ids) {
    if (id < 0 || id >= c.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          "prompt token id ", id, " is outside the vocabulary [0, ", c.vocab_size, ")"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<cache::KvCache>> Generator::NewCache(
    const cache::EvictionParams& kv) {
  RETURN_IF_ERROR(kv.Validate());
  cache::EvictionParams params = kv;
  if (params.policy == "locret" && params.locret == nullptr) {
    auto it = locret_heads_.find(params.weights);
    if (it == locret_heads_.end()) {
      ASSIGN_OR_RETURN(auto heads, LoadLocretHeads(params.weights, config()));
      it = locret_heads_.emplace(params.weights, std::move(heads)).first;
    }
    params.locret = it->second;
  }
  if (params.policy == "attention-gate" && params.gates == nullptr) {
    auto it = gates_.find(params.weights);
    if (it == gates_.end()) {
      ASSIGN_OR_RETURN(auto gates, LoadAttentionGates(params.weights, config()));
      it = gates_.emplace(params.weights, std::move(gates)).first;
    }
    params.gates = it->second;
  }
  return cache::MakeKvCache(transformer_->cache_shape(), params, config().max_position_embeddings,
                            transformer_->Rerotator(), kv_pool_);
}

absl::Status Generator::Prefill(cache::KvCache* cache, const std::vector<int32_t>& ids,
                                int64_t chunk, float* all_logits, float* last_logits,
                                const std::function<bool()>& keep_going) {
  const ModelConfig& c = config();
  const int64_t total = static_cast<int64_t>(ids.size());
  // Evicting chunks over [0, prefix), then the protected tail [prefix, total) (no eviction).
  const int64_t prefix = std::max<int64_t>(0, total - cache->protected_tail());
  std::vector<float> hidden;
  std::vector<int32_t> positions;
  std::vector<int64_t> rows;
  for (int64_t start = 0; start < total;) {
    const int64_t end =
        start < prefix ? std::min(start + chunk, prefix) : std::min(start + chunk, total);
    const int64_t len = end - start;
    cache->BeginStep(start >= prefix ? cache::StepKind::kPrefillKeep
                     : end < prefix  ? cache::StepKind::kPrefill
                                     : cache::StepKind::kPrefillLast);
    hidden.assign(static_cast<size_t>(len * c.hidden_size), 0.f);
    positions.resize(static_cast<size_t>(len));
    rows.resize(static_cast<size_t>(len));
    for (int64_t i = 0; i < len; ++i) {
      positions[static_cast<size_t>(i)] = static_cast<int32_t>(start + i);
      rows[static_cast<size_t>(i)] = i;
    }
    // Every chunk uses the whole sequence's length for longrope, as Hugging Face does.
    SequenceStep step{cache, positions.data(), len, total};
    RETURN_IF_ERROR(transformer_->Forward({&step, 1}, ids.data() + start, hidden.data()));
    if (all_logits != nullptr) {
      RETURN_IF_ERROR(transformer_->Logits(hidden.data(), rows, all_logits + start * c.vocab_size));
    } else if (end == total) {
      const int64_t last_row = len - 1;
      RETURN_IF_ERROR(transformer_->Logits(hidden.data(), {&last_row, 1}, last_logits));
    }
    start = end;
    if (keep_going && start < total && !keep_going()) {
      return absl::CancelledError(
          absl::StrCat("cancelled during prefill, after ", start, " of ", total, " prompt tokens"));
    }
  }
  cache->BeginStep(cache::StepKind::kDecode);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<float>> Generator::PromptLogits(const std::vector<int32_t>& prompt_ids,
                                                           int64_t chunk) {
  const ModelConfig& c = config();
  if (prompt_ids.empty()) return absl::InvalidArgumentError("the prompt has no tokens");
  if (static_cast<int64_t>(prompt_ids.size()) > c.max_position_embeddings) {
    return absl::InvalidArgumentError("the prompt is longer than the model's context");
  }
  auto cache = cache::MakeFullKvCache(transformer_->cache_shape(), c.max_position_embeddings);
  std::vector<float> logits(prompt_ids.size() * static_cast<size_t>(c.vocab_size));
  RETURN_IF_ERROR(Prefill(cache.get(), prompt_ids, chunk, logits.data(), nullptr));
  return logits;
}

absl::StatusOr<GenerateResult> Generator::Generate(
    const std::vector<int32_t>& prompt_ids, const GenerateOptions& options,
    const std::function<void(std::string_view)>& on_text) {
  RETURN_IF_ERROR(options.sampling.Validate());
  RETURN_IF_ERROR(CheckPrompt(prompt_ids));
  if (options.max_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("invalid max_tokens ", options.max_tokens, ": must be >= 1"));
  }
  if (options.prefill_chunk < 1) {
    return absl::InvalidArgumentError("invalid prefill chunk: must be >= 1");
  }
  RETURN_IF_ERROR(options.kv.Validate());
  for (const std::string& s : options.stop_strings) {
    if (s.empty()) return absl::InvalidArgumentError("a stop string must not be empty");
  }
  if (!options.stop_strings.empty() && tokenizer_ == nullptr) {
    return absl::InvalidArgumentError("stop strings need a tokenizer");
  }
  const ModelConfig& c = config();
  GenerateResult result;
  result.prompt_token_ids = prompt_ids;
  std::unique_ptr<cache::KvCache> cache;
  Sampler sampler(options.sampling);
  std::vector<int32_t> stop_ids = options.stop_token_ids;
  if (!options.ignore_eos) stop_ids.insert(stop_ids.end(), eos_ids_.begin(), eos_ids_.end());

  std::unique_ptr<StreamingDecoder> decoder;
  if (tokenizer_) decoder = std::make_unique<StreamingDecoder>(tokenizer_.get(), prompt_ids);
  std::string pending;    // decoded text not yet emitted (held back for stop strings)
  std::string step_text;  // what this token made final (for on_token)
  bool stopped_by_string = false;
  bool flushed = false;
  auto emit = [&](std::string text, bool final_flush) {
    pending += text;
    if (!options.stop_strings.empty()) {
      // Search the new text plus enough of what came before to catch a stop string spanning it.
      size_t first = std::string::npos;
      for (const std::string& s : options.stop_strings) first = std::min(first, pending.find(s));
      if (first != std::string::npos) {
        pending.resize(first);
        stopped_by_string = true;
        final_flush = true;
      }
    }
    const size_t held = final_flush ? 0 : HeldBackSuffix(pending, options.stop_strings);
    const std::string out = pending.substr(0, pending.size() - held);
    pending.erase(0, pending.size() - held);
    result.text += out;
    step_text += out;
    if (on_text && !out.empty()) on_text(out);
  };
  auto flush = [&] {
    if (decoder && !stopped_by_string && !flushed) emit(decoder->Flush(), true);
    flushed = true;
  };

  const int64_t vocab = c.vocab_size;
  std::vector<float> logits(static_cast<size_t>(vocab));
  std::vector<float> hidden;
  // Chunked prefill of `ids` into a fresh cache; leaves the last position's logits.
  const int64_t chunk = options.kv.policy == "full" ? options.prefill_chunk : options.kv.chunk;
  auto prefill = [&](const std::vector<int32_t>& ids) -> absl::Status {
    ASSIGN_OR_RETURN(cache, NewCache(options.kv));
    return Prefill(cache.get(), ids, chunk, nullptr, logits.data(), options.keep_going);
  };
  // longrope switches from short to long factors once the sequence outgrows the original
  // context; like Hugging Face, recompute the whole sequence with the long factors then.
  const int64_t longrope_switch = c.rope_scaling.type == RopeType::kLongRope
                                      ? c.rope_scaling.original_max_position_embeddings
                                      : -1;
  const int64_t n = static_cast<int64_t>(prompt_ids.size());
  const auto t0 = Clock::now();
  RETURN_IF_ERROR(prefill(prompt_ids));
  int32_t token = sampler.Sample(logits, prompt_ids, result.token_ids);
  const auto t1 = Clock::now();
  result.prefill_seconds = Seconds(t0, t1);
  result.finish_reason = "length";
  int64_t position = n;
  while (true) {
    result.token_ids.push_back(token);
    step_text.clear();
    bool done = false;
    if (std::find(stop_ids.begin(), stop_ids.end(), token) != stop_ids.end()) {
      result.finish_reason = "stop";
      done = true;
    } else {
      if (decoder) emit(decoder->Push(token), false);
      if (stopped_by_string) {
        result.finish_reason = "stop";
        done = true;
      } else if (static_cast<int64_t>(result.token_ids.size()) >= options.max_tokens ||
                 position >= c.max_position_embeddings) {  // or the context is full
        done = true;
      }
    }
    if (done) flush();
    if (options.on_token && !options.on_token(token, step_text)) {
      if (!done) result.finish_reason = "abort";
      break;
    }
    if (done) break;
    if (position == longrope_switch) {
      std::vector<int32_t> all = prompt_ids;
      all.insert(all.end(), result.token_ids.begin(), result.token_ids.end());
      RETURN_IF_ERROR(prefill(all));
      ++position;
    } else {
      // Decode one token.
      hidden.assign(static_cast<size_t>(c.hidden_size), 0.f);
      const int32_t pos = static_cast<int32_t>(position++);
      SequenceStep step{cache.get(), &pos, 1};
      RETURN_IF_ERROR(transformer_->Forward({&step, 1}, &token, hidden.data()));
      const int64_t row = 0;
      RETURN_IF_ERROR(transformer_->Logits(hidden.data(), {&row, 1}, logits.data()));
    }
    token = sampler.Sample(logits, prompt_ids, result.token_ids);
  }
  if (result.finish_reason != "abort") flush();
  result.decode_seconds = Seconds(t1, Clock::now());
  result.kv_stats = cache->stats();
  result.peak_kv_bytes = result.kv_stats.peak_bytes;
  result.kv_tokens_seen = cache->num_tokens_seen();
  return result;
}

}  // namespace kvgate::model
