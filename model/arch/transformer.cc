#include "model/arch/transformer.h"

#include <algorithm>
#include <map>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace kvgate::model {

absl::StatusOr<std::unique_ptr<Transformer>> Transformer::Create(const ModelConfig& config,
                                                                 StageWeights weights,
                                                                 kernels::Backend* backend,
                                                                 DType kv_dtype) {
  std::unique_ptr<Transformer> t(new Transformer(config, std::move(weights), backend, kv_dtype));
  RETURN_IF_ERROR(t->UploadWeights());
  return t;
}

Transformer::Transformer(const ModelConfig& config, StageWeights weights, kernels::Backend* backend,
                         DType kv_dtype)
    : config_(config),
      weights_(std::move(weights)),
      backend_(backend),
      kv_dtype_(kv_dtype),
      rope_(config) {}

absl::Status Transformer::UploadWeights() {
  // Views of the same host memory share one upload. A tied LM head stays in the embedding's
  // rows, on the first stage and on a last stage without the embedding alike, so that its logits
  // are the same bits however the layers are split.
  std::map<std::tuple<const void*, int64_t, int64_t>, kernels::WeightView> done;
  auto upload = [&](kernels::WeightView& w, bool matmul_only) -> absl::Status {
    if (w.empty()) return absl::OkStatus();
    const auto key = std::make_tuple(w.data, w.rows, w.cols);
    if (auto it = done.find(key); it != done.end()) {
      w = it->second;
      return absl::OkStatus();
    }
    kernels::DeviceBuffer storage;
    ASSIGN_OR_RETURN(kernels::WeightView up, backend_->Upload(w, &storage));
    if (matmul_only) {
      kernels::DeviceBuffer prepared;
      ASSIGN_OR_RETURN(up, backend_->PrepareMatMulWeight(up, &prepared));
      if (!prepared.empty()) {
        storage = std::move(prepared);
        // The checkpoint's bytes are not read again: their pages go back to the kernel.
        if (weights_.checkpoint != nullptr) weights_.checkpoint->DropPages(w.data, w.bytes());
      }
    }
    uploaded_bytes_ += static_cast<int64_t>(storage.bytes());
    if (!storage.empty()) weight_storage_.push_back(std::move(storage));
    done[key] = up;
    const bool moved = up.data != w.data;
    w = up;
    // Host copies the process made (synthetic, realigned tensors) that no view reads any more
    // now that this one is in backend memory or repacked: not held twice.
    if (moved) weights_.ReleaseUnreferenced();
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(upload(weights_.embed, false));
  RETURN_IF_ERROR(upload(weights_.final_norm, false));
  RETURN_IF_ERROR(upload(weights_.lm_head, !config_.tie_word_embeddings));
  for (LayerWeights& L : weights_.layers) {
    for (kernels::WeightView* w : {&L.input_norm, &L.q_bias, &L.k_bias, &L.v_bias, &L.post_norm}) {
      RETURN_IF_ERROR(upload(*w, false));
    }
    for (kernels::WeightView* w : {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down}) {
      RETURN_IF_ERROR(upload(*w, true));
    }
  }
  return absl::OkStatus();
}

cache::KvCacheShape Transformer::cache_shape() const {
  return cache::KvCacheShape{weights_.last_layer - weights_.first_layer,
                             config_.num_kv_heads,
                             config_.head_dim,
                             weights_.first_layer,
                             kv_dtype_,
                             config_.num_layers,
                             config_.num_heads};
}

cache::KeyRotation Transformer::Rotation() const {
  const RotaryEmbedding* rope = &rope_;
  return cache::KeyRotation{rope_.rotary_dim(),
                            [rope](const int32_t* deltas, int64_t n, float* cos, float* sin) {
                              rope->DeltaTable(deltas, n, cos, sin);
                            }};
}

int64_t Transformer::ScratchBytesPerToken() const {
  const int64_t H = config_.hidden_size, Q = config_.q_dim(), KV = config_.kv_dim();
  const int64_t I = config_.intermediate_size, half = rope_.rotary_dim() / 2;
  // Doubling growth may hold up to twice the step's tokens.
  return 2 * static_cast<int64_t>(sizeof(float)) * (3 * H + 2 * Q + 2 * KV + 2 * I + 2 * half);
}

void Transformer::ReleaseScratch() {
  for (kernels::DeviceBuffer* b :
       {&hidden_, &normed_, &q_, &k_, &v_, &attn_, &proj_, &gate_, &up_, &cos_dev_, &sin_dev_}) {
    *b = kernels::DeviceBuffer();
  }
  scratch_tokens_ = 0;
  std::vector<float>().swap(cos_);
  std::vector<float>().swap(sin_);
  std::vector<float>().swap(mass_);
}

absl::Status Transformer::EnsureScratch(int64_t t) {
  if (t <= scratch_tokens_) return absl::OkStatus();
  const int64_t cap = std::max<int64_t>(t, 2 * scratch_tokens_);
  const int64_t H = config_.hidden_size, Q = config_.q_dim(), KV = config_.kv_dim();
  const int64_t I = config_.intermediate_size;
  const int64_t half = rope_.rotary_dim() / 2;
  // The residual stream keeps its rows when it grows (LoadHidden may have filled it).
  ASSIGN_OR_RETURN(kernels::DeviceBuffer hidden, backend_->Alloc(cap * H, DType::kF32));
  if (!hidden_.empty()) {
    RETURN_IF_ERROR(backend_->CopyOnDevice(hidden.data(), hidden_.data(), hidden_.bytes()));
  }
  hidden_ = std::move(hidden);
  ASSIGN_OR_RETURN(normed_, backend_->Alloc(cap * H, DType::kF32));
  ASSIGN_OR_RETURN(q_, backend_->Alloc(cap * Q, DType::kF32));
  ASSIGN_OR_RETURN(k_, backend_->Alloc(cap * KV, DType::kF32));
  ASSIGN_OR_RETURN(v_, backend_->Alloc(cap * KV, DType::kF32));
  ASSIGN_OR_RETURN(attn_, backend_->Alloc(cap * Q, DType::kF32));
  ASSIGN_OR_RETURN(proj_, backend_->Alloc(cap * H, DType::kF32));
  ASSIGN_OR_RETURN(gate_, backend_->Alloc(cap * I, DType::kF32));
  ASSIGN_OR_RETURN(up_, backend_->Alloc(cap * I, DType::kF32));
  ASSIGN_OR_RETURN(cos_dev_, backend_->Alloc(cap * half, DType::kF32));
  ASSIGN_OR_RETURN(sin_dev_, backend_->Alloc(cap * half, DType::kF32));
  scratch_tokens_ = cap;
  return absl::OkStatus();
}

absl::Status Transformer::LoadHidden(const float* host, int64_t total) {
  RETURN_IF_ERROR(EnsureScratch(total));
  return backend_->CopyToDevice(hidden_.data(), host,
                                static_cast<size_t>(total * config_.hidden_size) * sizeof(float));
}

absl::Status Transformer::StoreHidden(int64_t total, float* host) const {
  if (total > scratch_tokens_) return absl::InvalidArgumentError("no such rows in the stream");
  return backend_->CopyToHost(host, hidden_.data(),
                              static_cast<size_t>(total * config_.hidden_size) * sizeof(float));
}

absl::Status Transformer::Forward(std::span<const SequenceStep> seqs, const int32_t* token_ids) {
  const ModelConfig& c = config_;
  int64_t total = 0;
  for (const SequenceStep& s : seqs) {
    if (s.num_tokens <= 0 || s.cache == nullptr || s.positions == nullptr) {
      return absl::InvalidArgumentError("a sequence step needs tokens, positions and a cache");
    }
    total += s.num_tokens;
  }
  if (total == 0) return absl::OkStatus();
  RETURN_IF_ERROR(EnsureScratch(total));
  if (weights_.is_first()) {
    // Token ids were validated at the edge (the request); the kernels assert the range.
    if (token_ids == nullptr) return absl::InvalidArgumentError("first stage needs token ids");
    backend_->Embedding(token_ids, total, weights_.embed, hidden());
  }
  // Each cache prepares its step once: room, rotary positions, per-head deltas, the views
  // every layer's attention reads, whether attention must produce the mass side output.
  contexts_.clear();
  for (const SequenceStep& s : seqs) {
    ASSIGN_OR_RETURN(const cache::KvCache::StepContext* ctx,
                     s.cache->Prepare(s.positions, s.num_tokens));
    contexts_.push_back(ctx);
  }

  // Rotary tables for every token of the step: built on the host once, copied once.
  const int64_t half = rope_.rotary_dim() / 2;
  cos_.resize(static_cast<size_t>(total * half));
  sin_.resize(cos_.size());
  {
    int64_t off = 0;
    for (size_t si = 0; si < seqs.size(); ++si) {
      const SequenceStep& s = seqs[si];
      const int64_t seq_len =
          s.rope_seq_len > 0 ? s.rope_seq_len : s.cache->num_tokens_seen() + s.num_tokens;
      rope_.Compute(contexts_[si]->rope_positions.data(), s.num_tokens, seq_len,
                    cos_.data() + off * half, sin_.data() + off * half);
      off += s.num_tokens;
    }
    RETURN_IF_ERROR(backend_->CopyToDevice(cos_dev_.data(), cos_.data(), cos_.size() * 4));
    RETURN_IF_ERROR(backend_->CopyToDevice(sin_dev_.data(), sin_.data(), sin_.size() * 4));
  }

  const int64_t H = c.hidden_size, Q = c.q_dim(), KV = c.kv_dim(), D = c.head_dim;
  const int64_t I = c.intermediate_size;
  const int64_t n_kv = c.num_kv_heads;
  float* hidden = this->hidden();
  float* normed = normed_.as<float>();
  float* q = q_.as<float>();
  float* k = k_.as<float>();
  float* v = v_.as<float>();
  masses_.resize(seqs.size());
  attn_seqs_.resize(seqs.size());
  for (size_t li = 0; li < weights_.layers.size(); ++li) {
    const LayerWeights& L = weights_.layers[li];
    const int64_t layer = static_cast<int64_t>(li);
    // Attention block.
    backend_->RmsNorm(hidden, total, H, L.input_norm, c.rms_norm_eps, normed);
    backend_->MatMul(normed, total, L.q, &L.q_bias, q);
    backend_->MatMul(normed, total, L.k, &L.k_bias, k);
    backend_->MatMul(normed, total, L.v, &L.v_bias, v);
    {  // Learned per-token scores (locret, attention-gate) read the pre-RoPE projections.
      int64_t off = 0;
      for (const SequenceStep& s : seqs) {
        if (s.cache->wants_token_scores()) {
          RETURN_IF_ERROR(s.cache->ScoreNewTokens(layer, normed + off * H, q + off * Q,
                                                  k + off * KV, v + off * KV, s.num_tokens));
        }
        off += s.num_tokens;
      }
    }
    backend_->Rope(q, total, c.num_heads, D, rope_.rotary_dim(), cos_dev_.as<float>(),
                   sin_dev_.as<float>());
    backend_->Rope(k, total, n_kv, D, rope_.rotary_dim(), cos_dev_.as<float>(),
                   sin_dev_.as<float>());
    RETURN_IF_ERROR(RotateRaggedHeads(seqs, layer, total));
    // Every sequence's new K/V into its cache, then one attention call over all of them.
    int64_t off = 0, mass_floats = 0;
    for (size_t si = 0; si < seqs.size(); ++si) {
      const SequenceStep& s = seqs[si];
      s.cache->Append(layer, k + off * KV, v + off * KV, s.positions, s.num_tokens);
      const kernels::KvHeadView* views = contexts_[si]->layer_views(layer, n_kv);
      int64_t longest = 0;
      for (int64_t h = 0; h < n_kv; ++h) longest = std::max(longest, views[h].len);
      const cache::KvCache::MassRequest& req = contexts_[si]->mass;
      masses_[si] = kernels::AttentionMass{nullptr, req.wanted ? longest : 0, req.first_query};
      mass_floats += req.wanted ? n_kv * longest : 0;
      attn_seqs_[si] = kernels::AttentionSeq{off, s.num_tokens, views, nullptr};
      off += s.num_tokens;
    }
    if (mass_floats > 0) {
      if (mass_dev_.count() < mass_floats) {
        ASSIGN_OR_RETURN(
            mass_dev_, backend_->Alloc(std::max(mass_floats, 2 * mass_dev_.count()), DType::kF32));
      }
      int64_t m = 0;
      for (size_t si = 0; si < seqs.size(); ++si) {
        if (masses_[si].stride == 0) continue;
        masses_[si].mass = mass_dev_.as<float>() + m;
        attn_seqs_[si].mass = &masses_[si];
        m += n_kv * masses_[si].stride;
      }
    }
    backend_->Attention(q, c.num_heads, n_kv, D, attn_seqs_, c.sliding_window, attn_.as<float>());
    for (size_t si = 0; si < seqs.size(); ++si) {
      const kernels::AttentionMass& m = masses_[si];
      const float* host_mass = nullptr;
      if (m.mass != nullptr) {  // the policies read it on the host (scores are metadata)
        mass_.resize(static_cast<size_t>(n_kv * m.stride));
        RETURN_IF_ERROR(backend_->CopyToHost(mass_.data(), m.mass, mass_.size() * sizeof(float)));
        host_mass = mass_.data();
      }
      RETURN_IF_ERROR(seqs[si].cache->AfterAttention(layer, host_mass, m.stride));
    }
    backend_->MatMul(attn_.as<float>(), total, L.o, nullptr, proj_.as<float>());
    backend_->Add(hidden, proj_.as<float>(), static_cast<size_t>(total * H));
    // MLP block.
    backend_->RmsNorm(hidden, total, H, L.post_norm, c.rms_norm_eps, normed);
    backend_->MatMul(normed, total, L.gate, nullptr, gate_.as<float>());
    backend_->MatMul(normed, total, L.up, nullptr, up_.as<float>());
    backend_->SiluMul(gate_.as<float>(), up_.as<float>(), static_cast<size_t>(total * I),
                      gate_.as<float>());
    backend_->MatMul(gate_.as<float>(), total, L.down, nullptr, proj_.as<float>());
    backend_->Add(hidden, proj_.as<float>(), static_cast<size_t>(total * H));
  }
  return absl::OkStatus();
}

absl::Status Transformer::RotateRaggedHeads(std::span<const SequenceStep> seqs, int64_t layer,
                                            int64_t total) {
  const ModelConfig& c = config_;
  const int64_t n_kv = c.num_kv_heads, group = c.num_heads / c.num_kv_heads;
  // Nothing to do unless a sequence has deltas (attention-gate under re-assignment).
  if (std::all_of(contexts_.begin(), contexts_.end(),
                  [](const auto* ctx) { return ctx->head_deltas.empty(); })) {
    return absl::OkStatus();
  }
  // Per (token, KV head) delta.
  deltas_.assign(static_cast<size_t>(total * n_kv), 0);
  bool any = false;
  int64_t off = 0;
  for (size_t si = 0; si < seqs.size(); ++si) {
    const SequenceStep& s = seqs[si];
    const std::vector<int32_t>& head_deltas = contexts_[si]->head_deltas;
    for (int64_t h = 0; h < n_kv && !head_deltas.empty(); ++h) {
      const int32_t delta = head_deltas[static_cast<size_t>(layer * n_kv + h)];
      if (delta == 0) continue;
      any = true;
      for (int64_t i = 0; i < s.num_tokens; ++i)
        deltas_[static_cast<size_t>((off + i) * n_kv + h)] = delta;
    }
    off += s.num_tokens;
  }
  if (!any) return absl::OkStatus();
  // Keys: one table row per (token, KV head); queries: per (token, query head), the group's.
  const int64_t half = rope_.rotary_dim() / 2;
  const int64_t q_rows = total * c.num_heads;
  std::vector<int32_t> q_deltas(static_cast<size_t>(q_rows));
  for (int64_t r = 0; r < q_rows; ++r) {
    const int64_t token = r / c.num_heads, head = r % c.num_heads;
    q_deltas[static_cast<size_t>(r)] = deltas_[static_cast<size_t>(token * n_kv + head / group)];
  }
  std::vector<float> cos(static_cast<size_t>(q_rows * half)), sin(cos.size());
  if (ragged_cos_.count() < q_rows * half) {
    ASSIGN_OR_RETURN(ragged_cos_, backend_->Alloc(q_rows * half, DType::kF32));
    ASSIGN_OR_RETURN(ragged_sin_, backend_->Alloc(q_rows * half, DType::kF32));
  }
  const int64_t k_rows = total * n_kv;
  rope_.DeltaTable(deltas_.data(), k_rows, cos.data(), sin.data());
  RETURN_IF_ERROR(backend_->CopyToDevice(ragged_cos_.data(), cos.data(), k_rows * half * 4));
  RETURN_IF_ERROR(backend_->CopyToDevice(ragged_sin_.data(), sin.data(), k_rows * half * 4));
  backend_->Rope(k_.as<float>(), k_rows, 1, c.head_dim, rope_.rotary_dim(), ragged_cos_.as<float>(),
                 ragged_sin_.as<float>());
  rope_.DeltaTable(q_deltas.data(), q_rows, cos.data(), sin.data());
  RETURN_IF_ERROR(backend_->CopyToDevice(ragged_cos_.data(), cos.data(), q_rows * half * 4));
  RETURN_IF_ERROR(backend_->CopyToDevice(ragged_sin_.data(), sin.data(), q_rows * half * 4));
  backend_->Rope(q_.as<float>(), q_rows, 1, c.head_dim, rope_.rotary_dim(), ragged_cos_.as<float>(),
                 ragged_sin_.as<float>());
  return absl::OkStatus();
}

absl::Status Transformer::Logits(std::span<const int64_t> rows, float* logits) {
  if (!weights_.is_last()) return absl::FailedPreconditionError("not the last stage");
  const int64_t H = config_.hidden_size, V = config_.vocab_size;
  const int64_t n = static_cast<int64_t>(rows.size());
  if (n == 0) return absl::OkStatus();
  RETURN_IF_ERROR(EnsureScratch(n));
  backend_->GatherRows(hidden(), H, rows.data(), n, normed_.as<float>());
  backend_->RmsNorm(normed_.as<float>(), n, H, weights_.final_norm, config_.rms_norm_eps,
                    normed_.as<float>());
  if (logits_dev_.count() < n * V) {
    ASSIGN_OR_RETURN(logits_dev_, backend_->Alloc(n * V, DType::kF32));
  }
  backend_->MatMul(normed_.as<float>(), n, weights_.lm_head, nullptr, logits_dev_.as<float>());
  return backend_->CopyToHost(logits, logits_dev_.data(),
                              static_cast<size_t>(n * V) * sizeof(float));
}

}  // namespace kvgate::model
