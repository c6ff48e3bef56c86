// The Llama-family decoder (Llama 2/3.x, Mistral, Qwen2, Phi-3), written once against the
// backend-neutral op set and run over any layer range [first, last): a pipeline stage runs its
// slice, a single process runs them all. Architectures differ only in data (biases, fused
// projections, rope scaling, sliding window), which the config and the weight loader resolve.
//
// Every tensor the model computes lives in the backend's memory: the weights (uploaded once at
// Create), the residual stream and scratch, the rotary tables of each step, the KV caches. The
// host sees token ids, positions, and the logits of the rows that sample.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cache/kv_cache.h"
#include "kernels/backend.h"
#include "model/arch/rope.h"
#include "model/config/model_config.h"
#include "model/weights/stage_weights.h"

namespace kvgate::model {

// One sequence's part of a step: `num_tokens` new tokens at `positions`.
struct SequenceStep {
  cache::KvCache* cache = nullptr;     // this stage's layers of the sequence
  const int32_t* positions = nullptr;  // [num_tokens] host
  int64_t num_tokens = 0;
  // The sequence length that selects longrope's short or long factors; 0: the cache's length
  // after this step. Hugging Face uses the whole prompt's length for every prefill chunk.
  int64_t rope_seq_len = 0;
};

class Transformer {
 public:
  // Uploads `weights` to `backend` (borrowed; it must outlive the Transformer and every cache
  // made for it). RESOURCE_EXHAUSTED when they do not fit. `kv_dtype`: the K/V storage of the
  // caches made for this model (cache_shape()).
  static absl::StatusOr<std::unique_ptr<Transformer>> Create(const ModelConfig& config,
                                                             StageWeights weights,
                                                             kernels::Backend* backend,
                                                             DType kv_dtype = DType::kF32);

  const ModelConfig& config() const { return config_; }
  const StageWeights& weights() const { return weights_; }
  kernels::Backend* backend() const { return backend_; }
  // Bytes of weights held in the backend's memory (0 when it reads the host's mapping).
  int64_t uploaded_weight_bytes() const { return uploaded_bytes_; }
  cache::KvCacheShape cache_shape() const;
  // The key re-rotation the cache needs under position re-assignment.
  cache::KeyRotation Rotation() const;

  // Runs this stage's layers over the tokens of `seqs`, concatenated in order.
  // First stage: embeds `token_ids` [total_tokens] (host). Other stages: reads the residual
  // stream LoadHidden put in. On return hidden() holds this stage's output.
  absl::Status Forward(std::span<const SequenceStep> seqs, const int32_t* token_ids);

  // The residual stream [total_tokens, hidden_size] in backend memory.
  float* hidden() const { return hidden_.as<float>(); }
  // Host <-> the residual stream of `total` tokens (the activations between stages).
  absl::Status LoadHidden(const float* host, int64_t total);   // [total, hidden_size]
  absl::Status StoreHidden(int64_t total, float* host) const;  // [total, hidden_size]

  // Bytes of scratch a step holds per token it carries (the residual stream, projections, MLP,
  // rotary tables): what admission counts besides the KV.
  int64_t ScratchBytesPerToken() const;
  // Frees the scratch (an idle worker gives its memory back); the next step allocates anew.
  void ReleaseScratch();

  // Last stage: logits of the selected rows of the residual stream (final norm, then LM
  // head), copied to the host: only the rows that sample leave the device.
  absl::Status Logits(std::span<const int64_t> rows,
                      float* logits);  // [rows.size(), vocab_size] host

 private:
  Transformer(const ModelConfig& config, StageWeights weights, kernels::Backend* backend,
              DType kv_dtype);
  absl::Status UploadWeights();
  absl::Status EnsureScratch(int64_t total_tokens);
  // Position re-assignment with ragged heads: rotates each KV head's new keys, and its query
  // group, by the delta the cache prepared for (layer, head).
  absl::Status RotateRaggedHeads(std::span<const SequenceStep> seqs, int64_t layer, int64_t total);

  ModelConfig config_;
  StageWeights weights_;
  kernels::Backend* backend_;
  DType kv_dtype_;
  RotaryEmbedding rope_;
  std::vector<kernels::DeviceBuffer> weight_storage_;  // uploaded weights (non-host backends)
  int64_t uploaded_bytes_ = 0;
  int64_t scratch_tokens_ = 0;
  kernels::DeviceBuffer hidden_, normed_, q_, k_, v_, attn_, proj_, gate_, up_;
  kernels::DeviceBuffer cos_dev_, sin_dev_;  // [tokens, rotary_dim / 2] of the step
  kernels::DeviceBuffer ragged_cos_, ragged_sin_;
  kernels::DeviceBuffer mass_dev_, logits_dev_;
  std::vector<float> cos_, sin_;  // host tables
  std::vector<int32_t> deltas_;
  std::vector<float> mass_;  // attention-mass side output on the host, for the policies
  std::vector<const cache::KvCache::StepContext*> contexts_;  // of the step's sequences
  std::vector<kernels::AttentionMass> masses_;
  std::vector<kernels::AttentionSeq> attn_seqs_;
};

}  // namespace kvgate::model
