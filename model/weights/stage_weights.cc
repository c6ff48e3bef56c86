#include "model/weights/stage_weights.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status.h"
#include "kernels/cpu/thread_pool.h"

namespace kvgate::model {
namespace {

using kernels::WeightView;

std::string ShapeStr(const std::vector<int64_t>& s) {
  return absl::StrCat("[", absl::StrJoin(s, ", "), "]");
}

// Whether a sample of the tensor's elements is finite: its first and last 256 and 4096
// spread evenly between (a corrupt or diverged checkpoint is rarely NaN in one place only).
bool SampleFinite(const uint8_t* data, DType dtype, size_t count) {
  constexpr size_t kEnds = 256, kSpread = 4096;
  const size_t size = DTypeSize(dtype);
  auto finite = [&](size_t i) {
    float f = 0;
    ConvertToF32(dtype, data + i * size, &f, 1);
    return std::isfinite(f);
  };
  for (size_t i = 0; i < std::min(count, kEnds); ++i) {
    if (!finite(i) || !finite(count - 1 - i)) return false;
  }
  const size_t stride = std::max<size_t>(1, count / kSpread);
  for (size_t i = 0; i < count; i += stride) {
    if (!finite(i)) return false;
  }
  return true;
}

class Loader {
 public:
  Loader(Checkpoint* ckpt, StageWeights* out) : ckpt_(ckpt), out_(out) {}

  // Loads `name` and checks its shape is `shape` ([n] or [rows, cols]); with `check_finite`,
  // that a sample of its values holds no NaN or Inf.
  absl::StatusOr<WeightView> Get(const std::string& name, std::vector<int64_t> shape,
                                 bool check_finite = false) {
    ASSIGN_OR_RETURN(const TensorInfo* t, ckpt_->Get(name));
    if (t->shape != shape) {
      return absl::InvalidArgumentError(absl::StrCat(*t->file, ": tensor '", name, "' has shape ",
                                                     ShapeStr(t->shape),
                                                     " but config.json implies ", ShapeStr(shape)));
    }
    WeightView w;
    w.dtype = *t->dtype;
    w.rows = shape.size() == 2 ? shape[0] : 1;
    w.cols = shape.back();
    const size_t align = DTypeSize(w.dtype);
    if (reinterpret_cast<uintptr_t>(t->data) % align != 0) {
      // Misaligned in the file (legal in safetensors): copy to an aligned buffer.
      HostBlock& copy = out_->owned.emplace_back(t->nbytes);
      std::memcpy(copy.data(), t->data, t->nbytes);
      w.data = copy.data();
    } else {
      w.data = t->data;
      // Fault the pages in now, so that loading (with its progress) is where the disk reads
      // happen, not the first request.
      uint8_t sink = 0;
      for (size_t off = 0; off < t->nbytes; off += 4096) sink ^= t->data[off];
      touched_ = touched_ ^ sink;
    }
    if (check_finite && !SampleFinite(static_cast<const uint8_t*>(w.data), w.dtype,
                                      t->nbytes / DTypeSize(w.dtype))) {
      return absl::InvalidArgumentError(
          absl::StrCat(*t->file, ": tensor '", name,
                       "' holds NaN or Inf (a sampled check of the first and last layers; "
                       "--skip-weight-check loads it anyway)"));
    }
    return w;
  }

 private:
  Checkpoint* ckpt_;
  StageWeights* out_;
  volatile uint8_t touched_ = 0;
};

absl::Status CheckRange(const ModelConfig& c, int64_t first, int64_t last) {
  if (first < 0 || first >= c.num_layers || last <= first || last > c.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("layer range [", first, ", ", last,
                                                   ") is not within the model's ", c.num_layers,
                                                   " layers"));
  }
  return absl::OkStatus();
}

}  // namespace

int64_t StageWeights::WeightBytesPerToken() const {
  auto bytes = [](const WeightView& w) { return w.empty() ? 0 : w.bytes(); };
  int64_t total = bytes(final_norm) + bytes(lm_head);
  if (!embed.empty()) total += embed.row_bytes();  // one row per token
  for (const LayerWeights& l : layers) {
    for (const WeightView* w : {&l.input_norm, &l.q, &l.k, &l.v, &l.q_bias, &l.k_bias, &l.v_bias,
                                &l.o, &l.post_norm, &l.gate, &l.up, &l.down}) {
      total += bytes(*w);
    }
  }
  return total;
}

void StageWeights::ReleaseUnreferenced() {
  std::vector<const WeightView*> views = {&embed, &final_norm, &lm_head};
  for (const LayerWeights& l : layers) {
    for (const WeightView* w : {&l.input_norm, &l.q, &l.k, &l.v, &l.q_bias, &l.k_bias, &l.v_bias,
                                &l.o, &l.post_norm, &l.gate, &l.up, &l.down}) {
      views.push_back(w);
    }
  }
  auto unreferenced = [&](const HostBlock& b) {
    const auto begin = reinterpret_cast<uintptr_t>(b.data());
    for (const WeightView* w : views) {
      const auto at = reinterpret_cast<uintptr_t>(w->data);
      if (!w->empty() && at >= begin && at < begin + b.size()) return false;
    }
    return true;
  };
  owned.erase(std::remove_if(owned.begin(), owned.end(), unreferenced), owned.end());
}

absl::StatusOr<StageWeights> LoadStageWeights(const ModelConfig& c,
                                              std::shared_ptr<Checkpoint> checkpoint, int64_t first,
                                              int64_t last, const LoadProgress& progress,
                                              bool check_finite) {
  if (last < 0) last = c.num_layers;
  RETURN_IF_ERROR(CheckRange(c, first, last));
  StageWeights s;
  s.first_layer = first;
  s.last_layer = last;
  s.checkpoint = checkpoint;
  Loader ld(checkpoint.get(), &s);
  const int64_t H = c.hidden_size, I = c.intermediate_size, Q = c.q_dim(), KV = c.kv_dim();
  const bool first_stage = first == 0, last_stage = last == c.num_layers;
  if (first_stage || (last_stage && c.tie_word_embeddings)) {
    ASSIGN_OR_RETURN(WeightView embed,
                     ld.Get("model.embed_tokens.weight", {c.vocab_size, H}, check_finite));
    if (first_stage) s.embed = embed;
    if (last_stage && c.tie_word_embeddings) s.lm_head = embed;
  }
  if (last_stage) {
    ASSIGN_OR_RETURN(s.final_norm, ld.Get("model.norm.weight", {H}, check_finite));
    if (!c.tie_word_embeddings) {
      if (!checkpoint->Has("lm_head.weight") && checkpoint->Has("model.embed_tokens.weight")) {
        return absl::InvalidArgumentError(
            absl::StrCat(checkpoint->dir(),
                         ": tensor 'lm_head.weight' is missing and config.json has "
                         "tie_word_embeddings false"));
      }
      ASSIGN_OR_RETURN(s.lm_head, ld.Get("lm_head.weight", {c.vocab_size, H}, check_finite));
    }
  }
  for (int64_t i = first; i < last; ++i) {
    const std::string p = absl::StrCat("model.layers.", i, ".");
    // Sampled for NaN and Inf: the model's first and last layers.
    const bool check = check_finite && (i == 0 || i == c.num_layers - 1);
    auto get = [&](const std::string& name, std::vector<int64_t> shape) {
      return ld.Get(name, std::move(shape), check);
    };
    LayerWeights l;
    ASSIGN_OR_RETURN(l.input_norm, get(p + "input_layernorm.weight", {H}));
    ASSIGN_OR_RETURN(l.post_norm, get(p + "post_attention_layernorm.weight", {H}));
    if (c.fused_qkv) {
      ASSIGN_OR_RETURN(WeightView qkv, get(p + "self_attn.qkv_proj.weight", {Q + 2 * KV, H}));
      l.q = qkv.Rows(0, Q);
      l.k = qkv.Rows(Q, KV);
      l.v = qkv.Rows(Q + KV, KV);
      ASSIGN_OR_RETURN(WeightView gate_up, get(p + "mlp.gate_up_proj.weight", {2 * I, H}));
      l.gate = gate_up.Rows(0, I);
      l.up = gate_up.Rows(I, I);
    } else {
      ASSIGN_OR_RETURN(l.q, get(p + "self_attn.q_proj.weight", {Q, H}));
      ASSIGN_OR_RETURN(l.k, get(p + "self_attn.k_proj.weight", {KV, H}));
      ASSIGN_OR_RETURN(l.v, get(p + "self_attn.v_proj.weight", {KV, H}));
      ASSIGN_OR_RETURN(l.gate, get(p + "mlp.gate_proj.weight", {I, H}));
      ASSIGN_OR_RETURN(l.up, get(p + "mlp.up_proj.weight", {I, H}));
    }
    if (c.attention_bias) {
      ASSIGN_OR_RETURN(l.q_bias, get(p + "self_attn.q_proj.bias", {Q}));
      ASSIGN_OR_RETURN(l.k_bias, get(p + "self_attn.k_proj.bias", {KV}));
      ASSIGN_OR_RETURN(l.v_bias, get(p + "self_attn.v_proj.bias", {KV}));
    }
    ASSIGN_OR_RETURN(l.o, get(p + "self_attn.o_proj.weight", {H, Q}));
    ASSIGN_OR_RETURN(l.down, get(p + "mlp.down_proj.weight", {H, I}));
    s.layers.push_back(l);
    if (progress) progress(i - first + 1, last - first);
  }
  return s;
}

absl::StatusOr<StageWeights> MakeSyntheticWeights(const ModelConfig& c, DType dtype, int64_t first,
                                                  int64_t last, uint64_t seed) {
  if (last < 0) last = c.num_layers;
  RETURN_IF_ERROR(CheckRange(c, first, last));
  StageWeights s;
  s.first_layer = first;
  s.last_layer = last;
  uint64_t tensor_seed = seed;
  // Values ~ uniform(-a, a) with a = 1/sqrt(cols) (norm weights: 1 + small noise), so that
  // activations stay finite through any number of layers.
  auto make = [&](int64_t rows, int64_t cols, bool norm) {
    const size_t n = static_cast<size_t>(rows * cols);
    s.owned.emplace_back(n * DTypeSize(dtype));
    uint8_t* data = s.owned.back().data();
    const float scale = norm ? 0.1f : 1.0f / std::sqrt(static_cast<float>(cols));
    const uint64_t ts = ++tensor_seed * 0x9E3779B97F4A7C15ull;
    kernels::cpu::ParallelFor(
        static_cast<int64_t>(n), kernels::cpu::Schedule::kStatic, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            uint64_t z = ts + static_cast<uint64_t>(i) * 0xBF58476D1CE4E5B9ull;
            z = (z ^ (z >> 31)) * 0x94D049BB133111EBull;
            z ^= z >> 29;
            const float u = static_cast<float>(z >> 40) * (1.0f / 16777216.0f) * 2.f - 1.f;
            const float v = norm ? 1.f + scale * u : scale * u;
            switch (dtype) {
              case DType::kF32:
                std::memcpy(data + i * 4, &v, 4);
                break;
              case DType::kF16: {
                const uint16_t h = F32ToF16(v);
                std::memcpy(data + i * 2, &h, 2);
                break;
              }
              case DType::kBF16: {
                const uint16_t h = F32ToBf16(v);
                std::memcpy(data + i * 2, &h, 2);
                break;
              }
            }
          }
        });
    return WeightView{data, dtype, rows, cols};
  };
  const int64_t H = c.hidden_size, I = c.intermediate_size, Q = c.q_dim(), KV = c.kv_dim();
  const bool first_stage = first == 0, last_stage = last == c.num_layers;
  if (first_stage || (last_stage && c.tie_word_embeddings)) {
    WeightView embed = make(c.vocab_size, H, false);
    if (first_stage) s.embed = embed;
    if (last_stage && c.tie_word_embeddings) s.lm_head = embed;
  }
  if (last_stage) {
    s.final_norm = make(1, H, true);
    if (!c.tie_word_embeddings) s.lm_head = make(c.vocab_size, H, false);
  }
  for (int64_t i = first; i < last; ++i) {
    LayerWeights l;
    l.input_norm = make(1, H, true);
    l.post_norm = make(1, H, true);
    l.q = make(Q, H, false);
    l.k = make(KV, H, false);
    l.v = make(KV, H, false);
    if (c.attention_bias) {
      l.q_bias = make(1, Q, false);
      l.k_bias = make(1, KV, false);
      l.v_bias = make(1, KV, false);
    }
    l.o = make(H, Q, false);
    l.gate = make(I, H, false);
    l.up = make(I, H, false);
    l.down = make(H, I, false);
    s.layers.push_back(l);
  }
  return s;
}

}  // namespace kvgate::model
