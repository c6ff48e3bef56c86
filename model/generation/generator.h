// Single-process generation: a model with all its layers on one backend, chunked prefill,
// decode a token at a time, sampling and stop conditions. This is the reference path the
// pipeline-parallel service must reproduce token for token.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "cache/eviction/policy.h"
#include "cache/kv_cache.h"
#include "kernels/backend.h"
#include "model/arch/transformer.h"
#include "model/config/model_config.h"
#include "model/sampling/sampler.h"
#include "model/tokenizer/tokenizer.h"
#include "model/weights/eviction_weights.h"

namespace kvgate::model {

struct GenerateOptions {
  SamplingParams sampling;
  int64_t max_tokens = 256;
  std::vector<std::string> stop_strings;  // generation ends at the first one; it is not emitted
  std::vector<int32_t> stop_token_ids;    // in addition to the model's EOS ids
  bool ignore_eos = false;
  int64_t prefill_chunk = 512;  // tokens per prefill step (kv.chunk when a policy evicts)
  cache::EvictionParams kv;     // KV cache policy and budget ("full": keep everything)
  // Called after every generated token with its id and the text that became final with it
  // (often empty; the last call carries the flushed rest). Returning false aborts the
  // generation: it ends with finish_reason "abort" and its cache is freed.
  std::function<bool(int32_t token, std::string_view text)> on_token;
  // Checked between prefill chunks; returning false cancels the generation (CANCELLED).
  std::function<bool()> keep_going;
  // false: the run keeps no text (result.text and on_token's text stay empty) unless stop
  // strings need it to decide when it ends; a server's output processor detokenizes instead.
  bool detokenize = true;
};

struct GenerateResult {
  std::vector<int32_t> prompt_token_ids;
  std::vector<int32_t> token_ids;  // generated only
  std::string text;                // generated only, without a matched stop string
  std::string finish_reason;       // "stop", "length", or "abort" (on_token returned false)
  double prefill_seconds = 0;      // prompt forward until the first token is sampled
  double decode_seconds = 0;       // the remaining tokens
  double prefill_tokens_per_s() const;
  double decode_tokens_per_s() const;
  size_t peak_kv_bytes = 0;
  cache::KvCache::Stats kv_stats;
  int64_t kv_tokens_seen = 0;  // per layer and KV head
};

class Generator;
class SequenceRun;

// One sequence's part of a planned step (Generator::PlanStep): what the model runs for it.
struct PlannedSequence {
  SequenceRun* run = nullptr;
  std::vector<int32_t> tokens;  // a prefill chunk, or the one decode token
  int32_t first_position = 0;   // tokens[i] sits at first_position + i
  cache::StepKind kind = cache::StepKind::kDecode;
  int64_t rope_seq_len = 0;  // as SequenceStep::rope_seq_len
  bool sample = false;       // a token is sampled after this step (the fill is complete)
  bool first_step = false;   // the sequence's first step: its cache is created
  bool new_cache = false;    // its cache starts afresh (longrope's recomputation)
};

// The K/V storage --kv-dtype names ("f32", "bf16", "f16"); "": the device's default (bf16 on a
// GPU, f32 on the CPU backends).
absl::StatusOr<DType> ResolveKvDType(const std::string& name, const kernels::Device& device);

// The measured eviction ratio: evicted tokens over every (layer, KV head) slot the sequence's
// `tokens_seen` tokens occupied.
double EvictionRatio(const cache::KvCache::Stats& stats, int64_t tokens_seen,
                     const ModelConfig& config);

// One generation in progress. Generator::Step advances any number of runs by one model step
// each (a prefill chunk, or one decode token), in one batched forward pass: that is how the
// server batches requests. Generator::Generate is Start, then Step until done.
class SequenceRun {
 public:
  ~SequenceRun();
  bool done() const { return done_; }
  // When done: the result, or the error that ended the run.
  const absl::Status& status() const { return status_; }
  GenerateResult& result() { return result_; }
  int64_t prompt_tokens() const { return static_cast<int64_t>(prompt_.size()); }
  const std::vector<int32_t>& prompt() const { return prompt_; }
  const GenerateOptions& options() const { return options_; }
  // Whether the run's cache lives elsewhere (pipeline workers): the caller then runs the model
  // and sampling for PlanStep's plans and hands the tokens to CompleteStep.
  bool remote() const { return remote_; }
  // Ends the run with `status` (a failed stage, a lost worker).
  void Fail(absl::Status status);

 private:
  friend class Generator;
  SequenceRun() = default;
  void Emit(std::string text, bool final_flush);
  void Flush();
  // Handles a sampled token: stop conditions, text, on_token; decides what comes next.
  void Accept(int32_t token);
  void Finish();

  Generator* gen_ = nullptr;
  bool remote_ = false;
  std::vector<int32_t> prompt_;
  GenerateOptions options_;
  std::function<void(std::string_view)> on_text_;
  std::unique_ptr<cache::KvCache> cache_;
  std::unique_ptr<Sampler> sampler_;
  std::vector<int32_t> stop_ids_;
  std::unique_ptr<StreamingDecoder> decoder_;
  std::string pending_, step_text_;
  bool stopped_by_string_ = false, flushed_ = false;
  GenerateResult result_;
  absl::Status status_;
  bool done_ = false;
  // Prefill of `fill_` (the prompt; or prompt + generated at longrope's switch) in chunks.
  bool prefilling_ = true;
  bool first_fill_ = true;
  std::vector<int32_t> fill_;
  int64_t fill_pos_ = 0;
  int32_t token_ = -1;    // the token the next decode step feeds
  int64_t position_ = 0;  // its position
  int64_t longrope_switch_ = -1;
  std::chrono::steady_clock::time_point t0_, t1_;
};

struct LoadOptions {
  int threads = 0;  // CPU threads; 0: all cores
  // Where the model runs: "cpu", "cuda[:N]" or "guarded"; "": $KVGATE_DEVICE, else "cpu".
  std::string device;
  // K/V storage of the caches: "f32", "bf16" or "f16"; "": f32 on the CPU backends, bf16 on
  // a GPU.
  std::string kv_dtype;
  // Called as layers load: (done, total). Used for progress on stderr.
  std::function<void(int64_t, int64_t)> progress;
  // A sampled check of the first and last layers' weights for NaN and Inf.
  bool check_weights = true;
  // --quantize: "", "none", "q8_0" or "q4_0" (the CPU backends only).
  std::string quantize;
  // --quantize-all: the embedding and the LM head too.
  bool quantize_all = false;
};

class Generator {
 public:
  // Loads config, weights (all layers) and tokenizer from a Hugging Face model directory.
  static absl::StatusOr<std::unique_ptr<Generator>> Load(const std::string& model_dir,
                                                         const LoadOptions& options);
  // Config and tokenizer only, no weights: the coordinator's front end, whose runs are all
  // remote (StartRemote) and executed by pipeline workers.
  static absl::StatusOr<std::unique_ptr<Generator>> LoadFrontend(const std::string& model_dir);
  // A model of a named real shape with random weights, no tokenizer (benchmarks).
  static absl::StatusOr<std::unique_ptr<Generator>> Synthetic(const std::string& shape, DType dtype,
                                                              const LoadOptions& options);

  // Generates from `prompt_ids`. `on_text` receives text as it becomes final (valid UTF-8,
  // never a piece of a stop string); it may be null.
  absl::StatusOr<GenerateResult> Generate(const std::vector<int32_t>& prompt_ids,
                                          const GenerateOptions& options,
                                          const std::function<void(std::string_view)>& on_text);

  // Validates and sets up one generation (its cache included); `on_text` as in Generate.
  absl::StatusOr<std::unique_ptr<SequenceRun>> Start(
      const std::vector<int32_t>& prompt_ids, const GenerateOptions& options,
      std::function<void(std::string_view)> on_text = nullptr);
  // As Start, but the run's cache and model live on pipeline workers (no local cache).
  absl::StatusOr<std::unique_ptr<SequenceRun>> StartRemote(
      const std::vector<int32_t>& prompt_ids, const GenerateOptions& options,
      std::function<void(std::string_view)> on_text = nullptr);
  // Advances every run that is not done by one step, all in one forward pass. A run that
  // fails (or whose on_token / keep_going says stop) becomes done. An error of the batched
  // pass itself ends every run of the batch with it. Local runs only.
  void Step(std::span<SequenceRun* const> runs);
  // The parts of Step: plan one step of every run not done (cancellation is checked here; a
  // cancelled run becomes done), then, once the model ran the plan, hand over the token
  // sampled for every planned sequence with `sample` (`sampled[i]` for plan[i]; others
  // ignored): stop conditions, streaming text, the next step.
  std::vector<PlannedSequence> PlanStep(std::span<SequenceRun* const> runs);
  void CompleteStep(std::span<const PlannedSequence> plan, std::span<const int32_t> sampled);
  // Logits [prompt_ids.size(), vocab_size] of every position of one forward over the prompt,
  // in chunks of `chunk` tokens (tests and evaluation).
  absl::StatusOr<std::vector<float>> PromptLogits(const std::vector<int32_t>& prompt_ids,
                                                  int64_t chunk);

  // A fresh cache for one sequence under `kv` (validated; locret's retaining heads and
  // attention-gate's gates are loaded from kv.weights on first use and kept for later requests).
  absl::StatusOr<std::unique_ptr<cache::KvCache>> NewCache(const cache::EvictionParams& kv);
  // Caches made after this take their memory from `pool` (borrowed; nullptr: no pool).
  void SetKvPool(cache::KvPool* pool) { kv_pool_ = pool; }
  // Runs `ids` through the model into `cache` in chunks of `chunk` tokens; a cache with a
  // protected prompt tail (locret n_loc) gets its evicting chunks first, then the tail. Writes
  // the logits of every position to `all_logits` [ids.size(), vocab_size] when it is given,
  // else those of the last position to `last_logits` [vocab_size].
  // `keep_going`, when given, is asked after every chunk; false stops with CANCELLED.
  absl::Status Prefill(cache::KvCache* cache, const std::vector<int32_t>& ids, int64_t chunk,
                       float* all_logits, float* last_logits,
                       const std::function<bool()>& keep_going = nullptr);

  const ModelConfig& config() const { return config_; }
  const Tokenizer* tokenizer() const { return tokenizer_.get(); }
  kernels::Backend* backend() const { return backend_.get(); }  // null for a front end
  Transformer& transformer() { return *transformer_; }          // REQUIRES: not a front end
  const std::vector<int32_t>& eos_ids() const { return eos_ids_; }

 private:
  friend class SequenceRun;
  Generator() = default;
  absl::Status CheckPrompt(const std::vector<int32_t>& prompt_ids) const;
  absl::StatusOr<std::unique_ptr<SequenceRun>> NewRun(const std::vector<int32_t>& prompt_ids,
                                                      const GenerateOptions& options,
                                                      std::function<void(std::string_view)> on_text,
                                                      bool remote);

  ModelConfig config_;
  std::unique_ptr<kernels::Backend> backend_;
  std::unique_ptr<Transformer> transformer_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::vector<int32_t> eos_ids_;
  cache::KvPool* kv_pool_ = nullptr;
  EvictionWeightsCache eviction_weights_;  // locret heads and gates, by file
};

}  // namespace kvgate::model
