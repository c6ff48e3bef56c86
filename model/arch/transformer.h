// The Llama-family decoder (Llama 2/3.x, Mistral, Qwen2, Phi-3), written once against the
// backend-neutral op set and run over any layer range [first, last): a pipeline stage runs its
// slice, a single process runs them all. Architectures differ only in data (biases, fused
// projections, rope scaling, sliding window), which the config and the weight loader resolve.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "cache/kv_cache.h"
#include "kernels/backend.h"
#include "model/arch/rope.h"
#include "model/config/model_config.h"
#include "model/weights/stage_weights.h"

namespace kvgate::model {

// One sequence's part of a step: `num_tokens` new tokens at `positions`.
struct SequenceStep {
  cache::KvCache* cache = nullptr;     // this stage's layers of the sequence
  const int32_t* positions = nullptr;  // [num_tokens]
  int64_t num_tokens = 0;
  // The sequence length that selects longrope's short or long factors; 0: the cache's length
  // after this step. Hugging Face uses the whole prompt's length for every prefill chunk.
  int64_t rope_seq_len = 0;
};

class Transformer {
 public:
  // `weights` must outlive nothing else: the Transformer owns them. `backend` is borrowed.
  Transformer(const ModelConfig& config, StageWeights weights, kernels::Backend* backend);

  const ModelConfig& config() const { return config_; }
  const StageWeights& weights() const { return weights_; }
  cache::KvCacheShape cache_shape() const;
  // The key re-rotation the cache needs under position re-assignment.
  cache::RerotateFn Rerotator() const;

  // Runs this stage's layers over the tokens of `seqs`, concatenated in order.
  // First stage: reads `token_ids` [total_tokens] and ignores `hidden` on input.
  // Other stages: `hidden` [total_tokens, hidden_size] holds the previous stage's output.
  // On return `hidden` holds this stage's output (the residual stream).
  absl::Status Forward(std::span<const SequenceStep> seqs,
                       const int32_t* token_ids,  // [total_tokens] or nullptr
                       float* hidden);            // [total_tokens, hidden_size]

  // Last stage: logits of the selected rows of `hidden` (final norm, then LM head).
  absl::Status Logits(const float* hidden,  // [total_tokens, hidden_size]
                      std::span<const int64_t> rows,
                      float* logits);  // [rows.size(), vocab_size]

 private:
  void EnsureScratch(int64_t total_tokens);
  // Position re-assignment with ragged heads: rotates each KV head's new keys, and its query
  // group, by the cache's RopeHeadDelta for (layer, head).
  void RotateRaggedHeads(std::span<const SequenceStep> seqs, int64_t layer);

  ModelConfig config_;
  StageWeights weights_;
  kernels::Backend* backend_;
  RotaryEmbedding rope_;
  int64_t scratch_tokens_ = 0;
  kernels::Backend::Buffer normed_{nullptr, nullptr}, q_{nullptr, nullptr}, k_{nullptr, nullptr},
      v_{nullptr, nullptr}, attn_{nullptr, nullptr}, proj_{nullptr, nullptr},
      gate_{nullptr, nullptr}, up_{nullptr, nullptr};
  std::vector<float> cos_, sin_;
  std::vector<int32_t> rope_pos_;
  std::vector<float> mass_;  // attention-mass side output, when the cache asks for it
  std::vector<kernels::KvHeadView> views_;
};

}  // namespace kvgate::model
