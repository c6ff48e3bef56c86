// The weights of one pipeline stage: layers [first, last) of a model, plus the embedding for
// the first stage and the final norm and LM head for the last. Tensors stay memory-mapped in
// their stored dtype; fused Phi-3 tensors are split into views without copying.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "common/host_block.h"
#include "kernels/tensor.h"
#include "model/config/model_config.h"
#include "model/weights/safetensors.h"

namespace kvgate::model {

struct LayerWeights {
  kernels::WeightView input_norm;              // [hidden_size]
  kernels::WeightView q, k, v;                 // [q_dim | kv_dim, hidden_size]
  kernels::WeightView q_bias, k_bias, v_bias;  // [q_dim | kv_dim] (Qwen2) or empty
  kernels::WeightView o;                       // [hidden_size, q_dim]
  kernels::WeightView post_norm;               // [hidden_size]
  kernels::WeightView gate, up;                // [intermediate_size, hidden_size]
  kernels::WeightView down;                    // [hidden_size, intermediate_size]
};

struct StageWeights {
  int64_t first_layer = 0;
  int64_t last_layer = 0;            // exclusive
  kernels::WeightView embed;         // [vocab_size, hidden_size]; first stage only
  kernels::WeightView final_norm;    // [hidden_size]; last stage only
  kernels::WeightView lm_head;       // [vocab_size, hidden_size]; last stage only
  std::vector<LayerWeights> layers;  // [last_layer - first_layer]

  bool is_first() const { return !embed.empty(); }
  bool is_last() const { return !lm_head.empty(); }
  // Bytes of weights this stage reads per token (every matrix once).
  int64_t WeightBytesPerToken() const;
  // Frees the owned buffers that no view reads any more (a backend copied or repacked what
  // they held).
  void ReleaseUnreferenced();

  // Keeps the memory behind the views alive: the checkpoint's mappings, or owned buffers.
  std::shared_ptr<Checkpoint> checkpoint;
  std::vector<HostBlock> owned;
};

// Called after each layer is loaded: (layers done, layers total).
using LoadProgress = std::function<void(int64_t, int64_t)>;

// Loads layers [first, last) (last == -1: to the end). Every tensor's dtype and shape is
// checked against the config, and with `check_finite` a sample of the model's first and last
// layers (embedding, norm and LM head included) for NaN and Inf; errors name the tensor and
// the file.
absl::StatusOr<StageWeights> LoadStageWeights(const ModelConfig& config,
                                              std::shared_ptr<Checkpoint> checkpoint, int64_t first,
                                              int64_t last, const LoadProgress& progress = nullptr,
                                              bool check_finite = true);

// Random weights of the config's exact shape in `dtype` (like vLLM's dummy load format):
// for benchmarks, no files needed. Deterministic in `seed`.
absl::StatusOr<StageWeights> MakeSyntheticWeights(const ModelConfig& config, DType dtype,
                                                  int64_t first, int64_t last, uint64_t seed);

}  // namespace kvgate::model
