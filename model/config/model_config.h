// ModelConfig: the hyperparameters of a Llama-family Hugging Face checkpoint (config.json),
// parsed and validated. Errors name the file and the field.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace kvgate::model {

enum class Architecture { kLlama, kMistral, kQwen2, kPhi3 };

enum class RopeType { kDefault, kLinear, kLlama3, kLongRope };

struct RopeScaling {
  RopeType type = RopeType::kDefault;
  double factor = 1.0;
  // llama3
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 0;
  // longrope / su: one factor per rotary frequency (rotary_dim / 2 each).
  std::vector<double> short_factor;
  std::vector<double> long_factor;
  double attention_factor = 1.0;  // cos/sin scale (longrope)
};

// The most positions a sequence may have: they are int32 throughout the engine.
inline constexpr int64_t kMaxPositions = (int64_t{1} << 31) - 1;

struct ModelConfig {
  std::string architecture_name;  // e.g. "LlamaForCausalLM"
  Architecture architecture = Architecture::kLlama;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t rotary_dim = 0;  // head_dim * partial_rotary_factor
  int64_t vocab_size = 0;
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-5;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // q/k/v biases (always true for Qwen2)
  bool fused_qkv = false;       // Phi-3: qkv_proj and gate_up_proj
  int64_t sliding_window = 0;   // 0: none
  int32_t bos_token_id = -1;
  std::vector<int32_t> eos_token_ids;

  // Parses a config.json object; `path` is used in error messages.
  static absl::StatusOr<ModelConfig> FromJson(const nlohmann::json& j, const std::string& path);
  // Loads `<model_dir>/config.json`.
  static absl::StatusOr<ModelConfig> Load(const std::string& model_dir);

  int64_t q_dim() const { return num_heads * head_dim; }
  int64_t kv_dim() const { return num_kv_heads * head_dim; }
  // Bytes of K and V for one token in one layer at `elem_bytes` per element.
  int64_t kv_bytes_per_token_per_layer(int64_t elem_bytes) const {
    return 2 * kv_dim() * elem_bytes;
  }
};

// Returns the config of a named real model shape for synthetic weights
// ("llama-3.2-1b", "llama-3.1-8b", "llama-2-7b", "mistral-7b", "qwen2-0.5b", "phi-3-mini").
absl::StatusOr<ModelConfig> SyntheticConfig(const std::string& name);
std::vector<std::string> SyntheticConfigNames();

}  // namespace kvgate::model
