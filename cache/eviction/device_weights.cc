#include "cache/eviction/device_weights.h"

#include "common/status.h"

namespace kvgate::cache {
namespace {

kernels::WeightView HostView(const std::vector<float>& data, int64_t rows, int64_t cols) {
  return kernels::WeightView{data.data(), DType::kF32, rows, cols};
}

}  // namespace

absl::StatusOr<std::shared_ptr<const DeviceEvictionWeights>> UploadEvictionWeights(
    std::shared_ptr<const LocretHeads> locret, std::shared_ptr<const AttentionGates> gates,
    kernels::Backend* backend) {
  auto out = std::make_shared<DeviceEvictionWeights>();
  auto upload = [&](const kernels::WeightView& host) -> absl::StatusOr<kernels::WeightView> {
    kernels::DeviceBuffer storage;
    ASSIGN_OR_RETURN(kernels::WeightView view, backend->Upload(host, &storage));
    if (!storage.empty()) out->storage.push_back(std::move(storage));
    return view;
  };
  if (locret != nullptr) {
    for (int64_t l = 0; l < locret->num_layers; ++l) {
      const size_t i = static_cast<size_t>(l);
      kernels::LocretLayerWeights w;
      ASSIGN_OR_RETURN(w.fc1, upload(HostView(locret->fc1[i], locret->d_r, locret->d_in())));
      ASSIGN_OR_RETURN(w.fc2, upload(HostView(locret->fc2[i], locret->num_kv_heads, locret->d_r)));
      w.kv_dim = locret->num_kv_heads * locret->head_dim;
      out->locret.push_back(w);
    }
  }
  if (gates != nullptr) {
    const int64_t width = gates->width(), D = gates->hidden_size, h = gates->num_kv_heads;
    for (const AttentionGates::Layer& L : gates->layers) {
      kernels::GateLayerWeights w;
      ASSIGN_OR_RETURN(w.wq, upload(HostView(L.wq, width, D)));
      ASSIGN_OR_RETURN(w.wk, upload(HostView(L.wk, width, D)));
      ASSIGN_OR_RETURN(w.wv, upload(HostView(L.wv, width, D)));
      ASSIGN_OR_RETURN(w.wo, upload(HostView(L.wo, h, width)));
      ASSIGN_OR_RETURN(w.bo, upload(HostView(L.bo, 1, h)));
      w.heads = gates->heads;
      w.head_dim = gates->head_dim;
      out->gates.push_back(w);
    }
  }
  return std::shared_ptr<const DeviceEvictionWeights>(std::move(out));
}

}  // namespace kvgate::cache
