// Helpers shared by the model tests.
#pragma once

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "cache/kv_cache.h"
#include "kernels/backend.h"
#include "model/arch/transformer.h"
#include "model/weights/safetensors.h"
#include "nlohmann/json.hpp"

namespace kvgate::testing {

// ../shared/models/<name> relative to the repository root (the tests' working directory).
inline std::string SharedModel(const std::string& name) { return "../shared/models/" + name; }

// A whole model (all layers) on the test backend (tests/unit/test_backend.h), without a
// tokenizer.
struct LoadedModel {
  std::unique_ptr<kernels::Backend> backend;
  std::unique_ptr<model::Transformer> transformer;
};

absl::StatusOr<LoadedModel> LoadModel(const std::string& dir);

// Logits [ids.size(), vocab] of one forward pass over `ids` in prefill chunks of `chunk`.
absl::StatusOr<std::vector<float>> ForwardLogits(model::Transformer& t,
                                                 const std::vector<int32_t>& ids, int64_t chunk);

// Greedy decode: prefill `prompt`, then `steps` tokens one at a time. Returns prompt + new ids.
absl::StatusOr<std::vector<int32_t>> GreedyDecode(model::Transformer& t,
                                                  const std::vector<int32_t>& prompt,
                                                  int64_t steps);

nlohmann::json ReadJson(const std::string& path);

}  // namespace kvgate::testing
