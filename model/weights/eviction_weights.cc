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

// The float32 data of tensor `name`, checked to have shape `want` and finite values.
absl::StatusOr<std::vector<float>> ReadTensor(const SafetensorsFile& file, const std::string& path,
                                              const std::string& name,
                                              const std::vector<int64_t>& want) {
  auto it = file.tensors().find(name);
  if (it == file.tensors().end()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": missing tensor ", name));
  }
  const TensorInfo& t = it->second;
  if (!t.dtype.has_value()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": tensor ", name, " has unsupported dtype ", t.dtype_name));
  }
  if (t.shape != want) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": tensor ", name, " has shape ",
                                                   Shape(t.shape), ", the model needs ",
                                                   Shape(want), ": made for another model"));
  }
  size_t count = 1;
  for (int64_t d : want) count *= static_cast<size_t>(d);
  std::vector<float> data(count);
  ConvertToF32(*t.dtype, t.data, data.data(), data.size());
  for (float x : data) {
    if (!std::isfinite(x)) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor ", name, " holds NaN or Inf"));
    }
  }
  return data;
}

// Opens `path` and checks its metadata kvgate.kind.
absl::StatusOr<std::unique_ptr<SafetensorsFile>> OpenKind(const std::string& path,
                                                          const std::string& kind,
                                                          const std::string& what) {
  auto file_or = SafetensorsFile::Open(path);
  if (!file_or.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--kv-weights: ", file_or.status().message()));
  }
  const auto& md = (*file_or)->metadata();
  auto it = md.find("kvgate.kind");
  if (it == md.end() || it->second != kind) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": not ", what, " (metadata kvgate.kind is '",
                     it == md.end() ? "" : it->second, "', expected '", kind, "')"));
  }
  return std::move(*file_or);
}

// Tensors whose name ends with `suffix` (one per layer).
int64_t CountLayers(const SafetensorsFile& file, const std::string& suffix) {
  int64_t n = 0;
  for (const auto& [name, info] : file.tensors()) {
    if (name.size() > suffix.size() && name.ends_with(suffix)) ++n;
  }
  return n;
}

}  // namespace

absl::StatusOr<std::string> ReadEvictionWeightsKind(const std::string& path) {
  auto file_or = SafetensorsFile::Open(path);
  if (!file_or.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--kv-weights: ", file_or.status().message()));
  }
  const auto& md = (*file_or)->metadata();
  auto it = md.find("kvgate.kind");
  if (it == md.end() || (it->second != "locret" && it->second != "attention-gate")) {
    return absl::InvalidArgumentError(
        absl::StrCat(path,
                     ": not learned eviction weights (metadata kvgate.kind is not locret or "
                     "attention-gate)"));
  }
  return it->second;
}

absl::StatusOr<std::shared_ptr<const cache::LocretHeads>> LoadLocretHeads(
    const std::string& path, const ModelConfig& config) {
  ASSIGN_OR_RETURN(auto file, OpenKind(path, "locret", "Locret retaining heads"));
  auto heads = std::make_shared<cache::LocretHeads>();
  heads->num_layers = config.num_layers;
  heads->num_heads = config.num_heads;
  heads->num_kv_heads = config.num_kv_heads;
  heads->head_dim = config.head_dim;
  const int64_t layers = CountLayers(*file, "retaining_head.fc1.weight");
  if (layers != config.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": retaining heads for ", layers,
                                                   " layers, the model has ", config.num_layers,
                                                   ": made for another model"));
  }
  auto first = file->tensors().find("model.layers.0.retaining_head.fc1.weight");
  if (first == file->tensors().end() || first->second.shape.size() != 2 ||
      first->second.shape[0] < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": missing or malformed model.layers.0.retaining_head.fc1.weight"));
  }
  heads->d_r = first->second.shape[0];
  for (int64_t i = 0; i < config.num_layers; ++i) {
    const std::string pre = absl::StrCat("model.layers.", i, ".retaining_head.");
    ASSIGN_OR_RETURN(auto fc1,
                     ReadTensor(*file, path, pre + "fc1.weight", {heads->d_r, heads->d_in()}));
    ASSIGN_OR_RETURN(
        auto fc2, ReadTensor(*file, path, pre + "fc2.weight", {config.num_kv_heads, heads->d_r}));
    heads->fc1.push_back(std::move(fc1));
    heads->fc2.push_back(std::move(fc2));
  }
  return std::shared_ptr<const cache::LocretHeads>(std::move(heads));
}

absl::StatusOr<std::shared_ptr<const cache::AttentionGates>> LoadAttentionGates(
    const std::string& path, const ModelConfig& config) {
  ASSIGN_OR_RETURN(auto file, OpenKind(path, "attention-gate", "Attention-Gate gates"));
  const auto& md = file->metadata();
  auto gates = std::make_shared<cache::AttentionGates>();
  gates->num_layers = config.num_layers;
  gates->hidden_size = config.hidden_size;
  gates->num_kv_heads = config.num_kv_heads;
  try {
    gates->heads = std::stoll(md.at("kvgate.heads"));
    gates->head_dim = std::stoll(md.at("kvgate.head_dim"));
    gates->tau = md.count("kvgate.tau") ? std::stof(md.at("kvgate.tau")) : 0.5f;
  } catch (const std::exception&) {
    return absl::InvalidArgumentError(
        absl::StrCat(path,
                     ": metadata kvgate.heads, kvgate.head_dim or kvgate.tau is missing "
                     "or not a number"));
  }
  if (gates->heads < 1 || gates->head_dim < 1 || !(gates->tau > 0.f && gates->tau < 1.f)) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": bad gate shape or threshold in the metadata"));
  }
  const int64_t layers = CountLayers(*file, "attention_gate.q_proj.weight");
  if (layers != config.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": gates for ", layers,
                                                   " layers, the model has ", config.num_layers,
                                                   ": made for another model"));
  }
  const int64_t w = gates->width(), D = config.hidden_size, kv = config.num_kv_heads;
  for (int64_t i = 0; i < config.num_layers; ++i) {
    const std::string pre = absl::StrCat("model.layers.", i, ".attention_gate.");
    cache::AttentionGates::Layer L;
    ASSIGN_OR_RETURN(L.wq, ReadTensor(*file, path, pre + "q_proj.weight", {w, D}));
    ASSIGN_OR_RETURN(L.wk, ReadTensor(*file, path, pre + "k_proj.weight", {w, D}));
    ASSIGN_OR_RETURN(L.wv, ReadTensor(*file, path, pre + "v_proj.weight", {w, D}));
    ASSIGN_OR_RETURN(L.wo, ReadTensor(*file, path, pre + "o_proj.weight", {kv, w}));
    if (file->tensors().count(pre + "o_proj.bias")) {
      ASSIGN_OR_RETURN(L.bo, ReadTensor(*file, path, pre + "o_proj.bias", {kv}));
    } else {
      L.bo.assign(static_cast<size_t>(kv), 0.f);
    }
    gates->layers.push_back(std::move(L));
  }
  return std::shared_ptr<const cache::AttentionGates>(std::move(gates));
}

absl::Status EvictionWeightsCache::Resolve(cache::EvictionParams* params, const ModelConfig& config,
                                           kernels::Backend* backend) {
  const cache::PolicyKind kind = params->kind();
  if (kind == cache::PolicyKind::kLocret && params->locret == nullptr) {
    auto it = locret_.find(params->weights);
    if (it == locret_.end()) {
      if (sealed_) return absl::FailedPreconditionError("locret: these weights are not registered");
      ASSIGN_OR_RETURN(auto heads, LoadLocretHeads(params->weights, config));
      it = locret_.emplace(params->weights, std::move(heads)).first;
    }
    params->locret = it->second;
  }
  if (kind == cache::PolicyKind::kAttentionGate && params->gates == nullptr) {
    auto it = gates_.find(params->weights);
    if (it == gates_.end()) {
      if (sealed_) {
        return absl::FailedPreconditionError("attention-gate: these weights are not registered");
      }
      ASSIGN_OR_RETURN(auto gates, LoadAttentionGates(params->weights, config));
      it = gates_.emplace(params->weights, std::move(gates)).first;
    }
    params->gates = it->second;
  }
  const bool locret = kind == cache::PolicyKind::kLocret && params->locret != nullptr;
  const bool gated = kind == cache::PolicyKind::kAttentionGate && params->gates != nullptr;
  if ((locret || gated) && params->device_weights == nullptr) {
    const void* key = locret ? static_cast<const void*>(params->locret.get())
                             : static_cast<const void*>(params->gates.get());
    auto it = device_.find(key);
    if (it == device_.end()) {
      ASSIGN_OR_RETURN(auto uploaded,
                       cache::UploadEvictionWeights(locret ? params->locret : nullptr,
                                                    gated ? params->gates : nullptr, backend));
      // Keep the host weights alive as long as their device views.
      it = device_.emplace(key, Uploaded{params->locret, params->gates, std::move(uploaded)}).first;
    }
    params->device_weights = it->second.device;
  }
  return absl::OkStatus();
}

}  // namespace kvgate::model
