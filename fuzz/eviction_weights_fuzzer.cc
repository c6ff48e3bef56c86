// A learned-eviction weights file (Locret retaining heads, Attention-Gate gates) through the
// loaders a server runs at start, checked against a small model's shapes.
#include <cstddef>
#include <cstdint>

#include "fuzz/scratch_file.h"
#include "model/config/model_config.h"
#include "model/weights/eviction_weights.h"
#include "nlohmann/json.hpp"

namespace {

const kvgate::model::ModelConfig& Config() {
  static const kvgate::model::ModelConfig* config = [] {
    const nlohmann::json j = {{"architectures", {"LlamaForCausalLM"}},
                              {"hidden_size", 16},
                              {"intermediate_size", 32},
                              {"num_attention_heads", 2},
                              {"num_key_value_heads", 1},
                              {"num_hidden_layers", 2},
                              {"vocab_size", 32},
                              {"max_position_embeddings", 64},
                              {"rms_norm_eps", 1e-5}};
    auto c = kvgate::model::ModelConfig::FromJson(j, "fuzz config");
    if (!c.ok()) std::abort();
    return new kvgate::model::ModelConfig(*c);
  }();
  return *config;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = kvgate::fuzz::WriteScratch("weights.safetensors", data, size);
  (void)kvgate::model::ReadEvictionWeightsKind(path);
  (void)kvgate::model::LoadLocretHeads(path, Config());
  (void)kvgate::model::LoadAttentionGates(path, Config());
  return 0;
}
