// Learned eviction weights a server offers, by name (Locret retaining heads, Attention-Gate
// gates). The operator registers them when the server starts; a request names a policy and
// optionally one of these names, never a file, so no request makes any process open a file.
//
// Names: the model directory's own `locret.safetensors` and `attention_gate.safetensors` are
// registered as "locret" and "attention-gate" (each policy's default); `--kv-weights
// NAME=FILE` adds or replaces a name, and a bare `--kv-weights FILE` replaces its policy's
// default. Every file is loaded once at start and checked against the model.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/config/model_config.h"

namespace kvgate::coordinator {

class WeightsRegistry {
 public:
  struct Entry {
    std::string policy;  // locret | attention-gate
    std::string path;    // the server's file (never shown to clients)
  };

  WeightsRegistry() = default;
  // `flags`: the --kv-weights values, NAME=FILE or FILE.
  static absl::StatusOr<WeightsRegistry> Load(const std::string& model_dir,
                                              const std::vector<std::string>& flags,
                                              const model::ModelConfig& config);

  // The file of the weights named `name` ("": the policy's default) for `policy`;
  // INVALID_ARGUMENT naming kv.weights_name when there is none (the error lists the names).
  absl::StatusOr<std::string> Resolve(const std::string& policy, const std::string& name) const;

  // "name (policy)" for every entry, sorted.
  std::vector<std::string> Describe() const;
  // Every distinct file with its policy (what workers load with their shard).
  std::vector<Entry> Files() const;

 private:
  std::map<std::string, Entry> entries_;
};

}  // namespace kvgate::coordinator
