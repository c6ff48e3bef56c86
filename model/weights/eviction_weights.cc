#include "model/weights/eviction_weights.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status.h"
#include "model/weights/safetensors.h"

namespace kvgate::model {
namespace {

std::string Shape(const std::vector<int64_t>& s) {
  return absl::StrCat("[", absl::StrJoin(s, ", "), "]");
}

}  // namespace

absl::StatusOr<std::shared_ptr<const cache::LocretHeads>> LoadLocretHeads(
    const std::string& path, const ModelConfig& config) {
  auto file_or = SafetensorsFile::Open(path);
  if (!file_or.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--kv-weights: ", file_or.status().message()));
  }
  const SafetensorsFile& file = **file_or;
  auto kind = file.metadata().find("kvgate.kind");
  if (kind == file.metadata().end() || kind->second != "locret") {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": not Locret retaining heads (metadata kvgate.kind is '",
                     kind == file.metadata().end() ? "" : kind->second, "', expected 'locret')"));
  }
  auto heads = std::make_shared<cache::LocretHeads>();
  heads->num_layers = config.num_layers;
  heads->num_heads = config.num_heads;
  heads->num_kv_heads = config.num_kv_heads;
  heads->head_dim = config.head_dim;
  int64_t layers_in_file = 0;
  for (const auto& [name, info] : file.tensors()) {
    if (name.size() > 25 && name.ends_with("retaining_head.fc1.weight")) ++layers_in_file;
  }
  if (layers_in_file != config.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": retaining heads for ", layers_in_file,
                                                   " layers, the model has ", config.num_layers,
                                                   ": made for another model"));
  }
  for (int64_t i = 0; i < config.num_layers; ++i) {
    for (int which = 1; which <= 2; ++which) {
      const std::string name =
          absl::StrCat("model.layers.", i, ".retaining_head.fc", which, ".weight");
      auto it = file.tensors().find(name);
      if (it == file.tensors().end()) {
        return absl::InvalidArgumentError(absl::StrCat(path, ": missing tensor ", name));
      }
      const TensorInfo& t = it->second;
      if (!t.dtype.has_value()) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": tensor ", name, " has unsupported dtype ", t.dtype_name));
      }
      if (i == 0 && which == 1 && t.shape.size() == 2) heads->d_r = t.shape[0];
      const std::vector<int64_t> want = which == 1
                                            ? std::vector<int64_t>{heads->d_r, heads->d_in()}
                                            : std::vector<int64_t>{config.num_kv_heads, heads->d_r};
      if (t.shape != want || heads->d_r <= 0) {
        return absl::InvalidArgumentError(absl::StrCat(path, ": tensor ", name, " has shape ",
                                                       Shape(t.shape), ", the model needs ",
                                                       Shape(want), ": made for another model"));
      }
      std::vector<float> data(static_cast<size_t>(want[0] * want[1]));
      ConvertToF32(*t.dtype, t.data, data.data(), data.size());
      for (float x : data) {
        if (!std::isfinite(x)) {
          return absl::InvalidArgumentError(
              absl::StrCat(path, ": tensor ", name, " holds NaN or Inf"));
        }
      }
      (which == 1 ? heads->fc1 : heads->fc2).push_back(std::move(data));
    }
  }
  return std::shared_ptr<const cache::LocretHeads>(std::move(heads));
}

}  // namespace kvgate::model
