#include "model/generation/generator.h"

#include <algorithm>
#include <chrono>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "cache/evicting_kv_cache.h"
#include "cache/kv_cache.h"
#include "common/status.h"
#include "model/weights/eviction_weights.h"
#include "model/weights/quantize.h"
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

// The prefill chunk at `start` of a `total`-token fill: evicting chunks over [0, prefix), then
// the protected tail [prefix, total) (locret's n_loc, never evicted at prefill). Returns the
// chunk's end and sets `kind`, the step kind the cache must be told. Whole-prompt prefill
// (`whole`): the chunks of the prefix keep everything but the last, which compresses once;
// the first chunk is the short one, so the last is whole (SnapKV's window lies in it).
int64_t PrefillChunk(int64_t protected_tail, bool whole, int64_t start, int64_t total,
                     int64_t chunk, cache::StepKind* kind) {
  const int64_t prefix = std::max<int64_t>(0, total - protected_tail);
  int64_t end = std::min(start + chunk, start < prefix ? prefix : total);
  if (whole && start == 0 && prefix % chunk != 0) end = prefix % chunk;
  *kind = start >= prefix ? cache::StepKind::kPrefillKeep
          : end < prefix  ? (whole ? cache::StepKind::kPrefillKeep : cache::StepKind::kPrefill)
                          : cache::StepKind::kPrefillLast;
  return end;
}

// PrefillChunk for a local cache: also tells the cache the step kind.
int64_t BeginPrefillChunk(cache::KvCache* cache, int64_t start, int64_t total, int64_t chunk) {
  cache::StepKind kind;
  const int64_t end =
      PrefillChunk(cache->protected_tail(), cache->whole_prefill(), start, total, chunk, &kind);
  cache->BeginStep(kind);
  return end;
}

// The backend LoadOptions name (threads for the CPU kernels).
absl::StatusOr<std::unique_ptr<kernels::Backend>> MakeBackendFor(const LoadOptions& options) {
  ASSIGN_OR_RETURN(const kernels::Device device, kernels::Device::ParseOrDefault(options.device));
  return kernels::MakeBackend(device, options.threads);
}

}  // namespace

absl::StatusOr<DType> ResolveKvDType(const std::string& name, const kernels::Device& device) {
  if (name.empty()) return device.type == kernels::Device::Type::kCuda ? DType::kBF16 : DType::kF32;
  if (name == "f32") return DType::kF32;
  if (name == "bf16") return DType::kBF16;
  if (name == "f16") return DType::kF16;
  return absl::InvalidArgumentError(
      absl::StrCat("--kv-dtype '", name, "' is not one of f32, bf16, f16"));
}

double EvictionRatio(const cache::KvCache::Stats& stats, int64_t tokens_seen,
                     const ModelConfig& config) {
  const double slots = static_cast<double>(tokens_seen) *
                       static_cast<double>(config.num_layers * config.num_kv_heads);
  return slots > 0 ? static_cast<double>(stats.evicted_tokens) / slots : 0.0;
}

double GenerateResult::prefill_tokens_per_s() const {
  return prefill_seconds > 0 ? static_cast<double>(prompt_token_ids.size()) / prefill_seconds : 0;
}
double GenerateResult::decode_tokens_per_s() const {
  const double n = token_ids.size() > 1 ? static_cast<double>(token_ids.size() - 1) : 0.0;
  return decode_seconds > 0 ? n / decode_seconds : 0;
}

namespace {

// --quantize: the stage's matrices into blocks, where the backend has kernels for them.
absl::Status Quantize(const LoadOptions& options, const kernels::Backend& backend,
                      StageWeights* weights) {
  ASSIGN_OR_RETURN(const kernels::Quant quant, ParseQuant(options.quantize, options.quantize_all));
  RETURN_IF_ERROR(CheckQuantizedBackend(quant, backend));
  return QuantizeStageWeights(quant, options.quantize_all, weights).status();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Generator>> Generator::Load(const std::string& model_dir,
                                                           const LoadOptions& options) {
  ASSIGN_OR_RETURN(ModelConfig config, ModelConfig::Load(model_dir));
  ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> ckpt, Checkpoint::Open(model_dir));
  std::shared_ptr<Checkpoint> shared(std::move(ckpt));
  ASSIGN_OR_RETURN(StageWeights weights, LoadStageWeights(config, shared, 0, config.num_layers,
                                                          options.progress, options.check_weights));
  auto g = std::unique_ptr<Generator>(new Generator());
  ASSIGN_OR_RETURN(g->backend_, MakeBackendFor(options));
  ASSIGN_OR_RETURN(const DType kv_dtype, ResolveKvDType(options.kv_dtype, g->backend_->device()));
  RETURN_IF_ERROR(Quantize(options, *g->backend_, &weights));
  // A checkpoint without tokenizer files still runs on token ids (--prompt-ids).
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::exists(model_dir + "/tokenizer.json", ec) ||
      fs::exists(model_dir + "/tokenizer.model", ec)) {
    ASSIGN_OR_RETURN(g->tokenizer_, LoadTokenizer(model_dir));
    g->eos_ids_ = g->tokenizer_->eos_ids();
  }
  if (g->eos_ids_.empty()) g->eos_ids_ = config.eos_token_ids;
  g->config_ = config;
  ASSIGN_OR_RETURN(g->transformer_,
                   Transformer::Create(config, std::move(weights), g->backend_.get(), kv_dtype));
  return g;
}

absl::StatusOr<std::unique_ptr<Generator>> Generator::LoadFrontend(const std::string& model_dir) {
  ASSIGN_OR_RETURN(ModelConfig config, ModelConfig::Load(model_dir));
  auto g = std::unique_ptr<Generator>(new Generator());
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::exists(model_dir + "/tokenizer.json", ec) ||
      fs::exists(model_dir + "/tokenizer.model", ec)) {
    ASSIGN_OR_RETURN(g->tokenizer_, LoadTokenizer(model_dir));
    g->eos_ids_ = g->tokenizer_->eos_ids();
  }
  if (g->eos_ids_.empty()) g->eos_ids_ = config.eos_token_ids;
  g->config_ = config;
  return g;
}

absl::StatusOr<std::unique_ptr<Generator>> Generator::Synthetic(const std::string& shape,
                                                                DType dtype,
                                                                const LoadOptions& options) {
  ASSIGN_OR_RETURN(ModelConfig config, SyntheticConfig(shape));
  auto g = std::unique_ptr<Generator>(new Generator());
  ASSIGN_OR_RETURN(g->backend_, MakeBackendFor(options));
  ASSIGN_OR_RETURN(const DType kv_dtype, ResolveKvDType(options.kv_dtype, g->backend_->device()));
  ASSIGN_OR_RETURN(StageWeights weights,
                   MakeSyntheticWeights(config, dtype, 0, config.num_layers, /*seed=*/1234));
  RETURN_IF_ERROR(Quantize(options, *g->backend_, &weights));
  g->config_ = config;
  ASSIGN_OR_RETURN(g->transformer_,
                   Transformer::Create(config, std::move(weights), g->backend_.get(), kv_dtype));
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
  if (transformer_ == nullptr) {
    return absl::FailedPreconditionError("a front end without weights holds no KV cache");
  }
  cache::EvictionParams params = kv;
  RETURN_IF_ERROR(eviction_weights_.Resolve(&params, config(), backend_.get()));
  return cache::MakeKvCache(transformer_->cache_shape(), params, config().max_position_embeddings,
                            backend_.get(), transformer_->Rotation(), kv_pool_);
}

absl::Status Generator::Prefill(cache::KvCache* cache, const std::vector<int32_t>& ids,
                                int64_t chunk, float* all_logits, float* last_logits,
                                const std::function<bool()>& keep_going) {
  const ModelConfig& c = config();
  const int64_t total = static_cast<int64_t>(ids.size());
  std::vector<int32_t> positions;
  std::vector<int64_t> rows;
  for (int64_t start = 0; start < total;) {
    const int64_t end = BeginPrefillChunk(cache, start, total, chunk);
    const int64_t len = end - start;
    positions.resize(static_cast<size_t>(len));
    rows.resize(static_cast<size_t>(len));
    for (int64_t i = 0; i < len; ++i) {
      positions[static_cast<size_t>(i)] = static_cast<int32_t>(start + i);
      rows[static_cast<size_t>(i)] = i;
    }
    // Every chunk uses the whole sequence's length for longrope, as Hugging Face does.
    SequenceStep step{cache, positions.data(), len, total};
    RETURN_IF_ERROR(transformer_->Forward({&step, 1}, ids.data() + start));
    if (all_logits != nullptr) {
      RETURN_IF_ERROR(transformer_->Logits(rows, all_logits + start * c.vocab_size));
    } else if (end == total) {
      const int64_t last_row = len - 1;
      RETURN_IF_ERROR(transformer_->Logits({&last_row, 1}, last_logits));
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
  auto cache = cache::MakeFullKvCache(transformer_->cache_shape(), c.max_position_embeddings,
                                      backend_.get());
  std::vector<float> logits(prompt_ids.size() * static_cast<size_t>(c.vocab_size));
  RETURN_IF_ERROR(Prefill(cache.get(), prompt_ids, chunk, logits.data(), nullptr));
  return logits;
}

absl::StatusOr<std::unique_ptr<SequenceRun>> Generator::Start(
    const std::vector<int32_t>& prompt_ids, const GenerateOptions& options,
    std::function<void(std::string_view)> on_text) {
  return NewRun(prompt_ids, options, std::move(on_text), /*remote=*/false);
}

absl::StatusOr<std::unique_ptr<SequenceRun>> Generator::StartRemote(
    const std::vector<int32_t>& prompt_ids, const GenerateOptions& options,
    std::function<void(std::string_view)> on_text) {
  return NewRun(prompt_ids, options, std::move(on_text), /*remote=*/true);
}

absl::StatusOr<std::unique_ptr<SequenceRun>> Generator::NewRun(
    const std::vector<int32_t>& prompt_ids, const GenerateOptions& options,
    std::function<void(std::string_view)> on_text, bool remote) {
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
  std::unique_ptr<SequenceRun> run(new SequenceRun());
  run->gen_ = this;
  run->remote_ = remote;
  run->prompt_ = prompt_ids;
  run->options_ = options;
  run->on_text_ = std::move(on_text);
  run->result_.prompt_token_ids = prompt_ids;
  // A remote run's tokens are sampled by the pipeline's last stage, which holds its sampler.
  if (!remote) run->sampler_ = std::make_unique<Sampler>(options.sampling);
  run->stop_ids_ = options.stop_token_ids;
  if (!options.ignore_eos) {
    run->stop_ids_.insert(run->stop_ids_.end(), eos_ids_.begin(), eos_ids_.end());
  }
  if (tokenizer_ && (options.detokenize || !options.stop_strings.empty())) {
    run->decoder_ = std::make_unique<StreamingDecoder>(tokenizer_.get(), prompt_ids);
  }
  // longrope switches from short to long factors once the sequence outgrows the original
  // context; like Hugging Face, recompute the whole sequence with the long factors then.
  run->longrope_switch_ = c.rope_scaling.type == RopeType::kLongRope
                              ? c.rope_scaling.original_max_position_embeddings
                              : -1;
  // Whole-prompt prefill sizes the slab for the prompt.
  run->options_.kv.prompt_tokens = static_cast<int64_t>(prompt_ids.size());
  if (!remote) {
    ASSIGN_OR_RETURN(run->cache_, NewCache(run->options_.kv));
  }
  run->fill_ = prompt_ids;
  run->position_ = static_cast<int64_t>(prompt_ids.size());
  run->t0_ = Clock::now();
  return run;
}

SequenceRun::~SequenceRun() = default;

void SequenceRun::Emit(std::string text, bool final_flush) {
  pending_ += text;
  if (!options_.stop_strings.empty()) {
    // Search the new text plus enough of what came before to catch a stop string spanning it.
    size_t first = std::string::npos;
    for (const std::string& s : options_.stop_strings) first = std::min(first, pending_.find(s));
    if (first != std::string::npos) {
      pending_.resize(first);
      stopped_by_string_ = true;
      final_flush = true;
    }
  }
  const size_t held = final_flush ? 0 : HeldBackSuffix(pending_, options_.stop_strings);
  const std::string out = pending_.substr(0, pending_.size() - held);
  pending_.erase(0, pending_.size() - held);
  result_.text += out;
  step_text_ += out;
  if (on_text_ && !out.empty()) on_text_(out);
}

void SequenceRun::Flush() {
  if (decoder_ && !stopped_by_string_ && !flushed_) Emit(decoder_->Flush(), true);
  flushed_ = true;
}

void SequenceRun::Accept(int32_t token) {
  const ModelConfig& c = gen_->config();
  result_.token_ids.push_back(token);
  step_text_.clear();
  bool done = false;
  if (std::find(stop_ids_.begin(), stop_ids_.end(), token) != stop_ids_.end()) {
    result_.finish_reason = "stop";
    done = true;
  } else {
    if (decoder_) Emit(decoder_->Push(token), false);
    if (stopped_by_string_) {
      result_.finish_reason = "stop";
      done = true;
    } else if (static_cast<int64_t>(result_.token_ids.size()) >= options_.max_tokens ||
               position_ >= c.max_position_embeddings) {  // or the context is full
      done = true;
    }
  }
  if (done) Flush();
  if (options_.on_token && !options_.on_token(token, step_text_)) {
    if (!done) result_.finish_reason = "abort";
    done = true;
  }
  if (done) {
    Finish();
    return;
  }
  if (position_ == longrope_switch_) {
    fill_ = prompt_;
    fill_.insert(fill_.end(), result_.token_ids.begin(), result_.token_ids.end());
    fill_pos_ = 0;
    prefilling_ = true;
    if (remote_) return;  // the workers make the new cache (PlannedSequence::new_cache)
    options_.kv.prompt_tokens = static_cast<int64_t>(fill_.size());
    auto cache = gen_->NewCache(options_.kv);
    if (!cache.ok()) {
      Fail(cache.status());
      return;
    }
    cache_ = *std::move(cache);
  } else {
    token_ = token;
  }
}

void SequenceRun::Finish() {
  if (result_.finish_reason != "abort") Flush();
  result_.decode_seconds = Seconds(t1_, Clock::now());
  if (cache_ != nullptr) {  // a remote run's statistics come from its workers
    result_.kv_stats = cache_->stats();
    result_.peak_kv_bytes = result_.kv_stats.peak_bytes;
    result_.kv_tokens_seen = cache_->num_tokens_seen();
  }
  cache_.reset();  // the KV memory goes back at once
  done_ = true;
}

void SequenceRun::Fail(absl::Status status) {
  status_ = std::move(status);
  cache_.reset();
  done_ = true;
}

std::vector<PlannedSequence> Generator::PlanStep(std::span<SequenceRun* const> runs) {
  std::vector<PlannedSequence> plan;
  for (SequenceRun* r : runs) {
    if (r->done_) continue;
    if (r->prefilling_ && r->options_.keep_going && r->fill_pos_ > 0 && !r->options_.keep_going()) {
      r->Fail(absl::CancelledError(absl::StrCat("cancelled during prefill, after ", r->fill_pos_,
                                                " of ", r->fill_.size(), " prompt tokens")));
      continue;
    }
    PlannedSequence p;
    p.run = r;
    if (r->prefilling_) {
      const int64_t total = static_cast<int64_t>(r->fill_.size());
      const int64_t chunk =
          r->options_.kv.evicts() ? r->options_.kv.chunk : r->options_.prefill_chunk;
      const int64_t start = r->fill_pos_;
      const int64_t end = PrefillChunk(r->options_.kv.prompt_tail(), r->options_.kv.whole_prefill(),
                                       start, total, chunk, &p.kind);
      p.tokens.assign(r->fill_.begin() + start, r->fill_.begin() + end);
      p.first_position = static_cast<int32_t>(start);
      // Every prefill chunk uses the whole sequence's length for longrope, as Hugging Face does.
      p.rope_seq_len = total;
      p.sample = end == total;
      p.first_step = start == 0 && r->first_fill_;
      p.new_cache = start == 0 && !r->first_fill_;
    } else {
      p.tokens.push_back(r->token_);
      p.first_position = static_cast<int32_t>(r->position_);
      p.kind = cache::StepKind::kDecode;
      p.sample = true;
    }
    plan.push_back(std::move(p));
  }
  return plan;
}

void Generator::CompleteStep(std::span<const PlannedSequence> plan,
                             std::span<const int32_t> sampled) {
  for (size_t i = 0; i < plan.size(); ++i) {
    const PlannedSequence& p = plan[i];
    SequenceRun* r = p.run;
    if (r->done_) continue;
    if (r->prefilling_) {
      r->fill_pos_ += static_cast<int64_t>(p.tokens.size());
      if (!p.sample) continue;  // more chunks to go
      r->prefilling_ = false;
      if (r->cache_) r->cache_->BeginStep(cache::StepKind::kDecode);
      if (!r->first_fill_) ++r->position_;  // longrope's recomputation
    } else {
      ++r->position_;
    }
    if (r->first_fill_) {
      r->first_fill_ = false;
      r->t1_ = Clock::now();
      r->result_.prefill_seconds = Seconds(r->t0_, r->t1_);
      r->result_.finish_reason = "length";
    }
    r->Accept(sampled[i]);
  }
}

void Generator::Step(std::span<SequenceRun* const> runs) {
  const ModelConfig& c = config();
  std::vector<PlannedSequence> plan = PlanStep(runs);
  if (plan.empty()) return;
  std::vector<SequenceStep> steps;
  std::vector<int32_t> tokens, positions;
  std::vector<int64_t> rows;
  for (const PlannedSequence& p : plan) {
    tokens.insert(tokens.end(), p.tokens.begin(), p.tokens.end());
    for (size_t i = 0; i < p.tokens.size(); ++i) {
      positions.push_back(p.first_position + static_cast<int32_t>(i));
    }
  }
  int64_t offset = 0;
  for (const PlannedSequence& p : plan) {
    const int64_t n = static_cast<int64_t>(p.tokens.size());
    p.run->cache_->BeginStep(p.kind);
    steps.push_back(SequenceStep{p.run->cache_.get(), positions.data() + offset, n,
                                 p.kind == cache::StepKind::kDecode ? 0 : p.rope_seq_len});
    if (p.sample) rows.push_back(offset + n - 1);
    offset += n;
  }
  std::vector<float> logits(rows.size() * static_cast<size_t>(c.vocab_size));
  absl::Status status = transformer_->Forward(steps, tokens.data());
  if (status.ok() && !rows.empty()) status = transformer_->Logits(rows, logits.data());
  if (!status.ok()) {
    for (const PlannedSequence& p : plan) p.run->Fail(status);
    return;
  }
  std::vector<int32_t> sampled(plan.size(), -1);
  size_t row = 0;
  for (size_t i = 0; i < plan.size(); ++i) {
    if (!plan[i].sample) continue;
    SequenceRun* r = plan[i].run;
    std::span<float> l(logits.data() + row * static_cast<size_t>(c.vocab_size),
                       static_cast<size_t>(c.vocab_size));
    ++row;
    sampled[i] = r->sampler_->Sample(l, r->prompt_, r->result_.token_ids);
  }
  CompleteStep(plan, sampled);
}

absl::StatusOr<GenerateResult> Generator::Generate(
    const std::vector<int32_t>& prompt_ids, const GenerateOptions& options,
    const std::function<void(std::string_view)>& on_text) {
  ASSIGN_OR_RETURN(std::unique_ptr<SequenceRun> run, Start(prompt_ids, options, on_text));
  SequenceRun* one = run.get();
  while (!run->done()) Step({&one, 1});
  if (!run->status().ok()) return run->status();
  return std::move(run->result());
}

}  // namespace kvgate::model
