#include "model/arch/transformer.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace kvgate::model {

Transformer::Transformer(const ModelConfig& config, StageWeights weights, kernels::Backend* backend)
    : config_(config), weights_(std::move(weights)), backend_(backend), rope_(config) {}

cache::KvCacheShape Transformer::cache_shape() const {
  return cache::KvCacheShape{weights_.last_layer - weights_.first_layer, config_.num_kv_heads,
                             config_.head_dim, weights_.first_layer};
}

cache::RerotateFn Transformer::Rerotator() const {
  const int64_t d = config_.head_dim;
  const RotaryEmbedding* rope = &rope_;
  return [rope, d](float* row, int32_t delta) { rope->Rotate(row, d, delta); };
}

void Transformer::EnsureScratch(int64_t t) {
  if (t <= scratch_tokens_) return;
  const int64_t cap = std::max<int64_t>(t, 2 * scratch_tokens_);
  const int64_t H = config_.hidden_size, Q = config_.q_dim(), KV = config_.kv_dim();
  const int64_t I = config_.intermediate_size;
  normed_ = backend_->Alloc(static_cast<size_t>(cap * H));
  q_ = backend_->Alloc(static_cast<size_t>(cap * Q));
  k_ = backend_->Alloc(static_cast<size_t>(cap * KV));
  v_ = backend_->Alloc(static_cast<size_t>(cap * KV));
  attn_ = backend_->Alloc(static_cast<size_t>(cap * Q));
  proj_ = backend_->Alloc(static_cast<size_t>(cap * H));
  gate_ = backend_->Alloc(static_cast<size_t>(cap * I));
  up_ = backend_->Alloc(static_cast<size_t>(cap * I));
  scratch_tokens_ = cap;
}

absl::Status Transformer::Forward(std::span<const SequenceStep> seqs, const int32_t* token_ids,
                                  float* hidden) {
  const ModelConfig& c = config_;
  int64_t total = 0;
  for (const SequenceStep& s : seqs) {
    if (s.num_tokens <= 0 || s.cache == nullptr || s.positions == nullptr) {
      return absl::InvalidArgumentError("a sequence step needs tokens, positions and a cache");
    }
    total += s.num_tokens;
  }
  if (total == 0) return absl::OkStatus();
  if (weights_.is_first()) {
    if (token_ids == nullptr) return absl::InvalidArgumentError("first stage needs token ids");
    for (int64_t i = 0; i < total; ++i) {
      if (token_ids[i] < 0 || token_ids[i] >= c.vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat(
            "token id ", token_ids[i], " is outside the vocabulary [0, ", c.vocab_size, ")"));
      }
    }
    backend_->Embedding(token_ids, total, weights_.embed, hidden);
  }
  for (const SequenceStep& s : seqs) RETURN_IF_ERROR(s.cache->Reserve(s.num_tokens));
  EnsureScratch(total);

  // Rotary tables for every token of the step.
  const int64_t half = rope_.rotary_dim() / 2;
  cos_.resize(static_cast<size_t>(total * half));
  sin_.resize(cos_.size());
  {
    int64_t off = 0;
    for (const SequenceStep& s : seqs) {
      const int64_t seq_len =
          s.rope_seq_len > 0 ? s.rope_seq_len : s.cache->num_tokens_seen() + s.num_tokens;
      rope_pos_.resize(static_cast<size_t>(s.num_tokens));
      s.cache->RopePositions(s.positions, s.num_tokens, rope_pos_.data());
      rope_.Compute(rope_pos_.data(), s.num_tokens, seq_len, cos_.data() + off * half,
                    sin_.data() + off * half);
      off += s.num_tokens;
    }
  }

  const int64_t H = c.hidden_size, Q = c.q_dim(), KV = c.kv_dim(), D = c.head_dim;
  const int64_t I = c.intermediate_size;
  views_.resize(static_cast<size_t>(c.num_kv_heads));
  for (size_t li = 0; li < weights_.layers.size(); ++li) {
    const LayerWeights& L = weights_.layers[li];
    const int64_t layer = static_cast<int64_t>(li);
    // Attention block.
    backend_->RmsNorm(hidden, total, H, L.input_norm, c.rms_norm_eps, normed_.get());
    backend_->MatMul(normed_.get(), total, L.q, &L.q_bias, q_.get());
    backend_->MatMul(normed_.get(), total, L.k, &L.k_bias, k_.get());
    backend_->MatMul(normed_.get(), total, L.v, &L.v_bias, v_.get());
    {  // Learned per-token scores (locret, attention-gate) read the pre-RoPE projections.
      int64_t off = 0;
      for (const SequenceStep& s : seqs) {
        if (s.cache->wants_token_scores()) {
          s.cache->ScoreNewTokens(layer, normed_.get() + off * H, q_.get() + off * Q,
                                  k_.get() + off * KV, v_.get() + off * KV, s.num_tokens);
        }
        off += s.num_tokens;
      }
    }
    backend_->Rope(q_.get(), total, c.num_heads, D, rope_.rotary_dim(), cos_.data(), sin_.data());
    backend_->Rope(k_.get(), total, c.num_kv_heads, D, rope_.rotary_dim(), cos_.data(),
                   sin_.data());
    RotateRaggedHeads(seqs, layer);
    int64_t off = 0;
    for (const SequenceStep& s : seqs) {
      s.cache->Append(layer, k_.get() + off * KV, v_.get() + off * KV, s.positions, s.num_tokens);
      for (int64_t h = 0; h < c.num_kv_heads; ++h) {
        views_[static_cast<size_t>(h)] = s.cache->View(layer, h);
      }
      const cache::KvCache::MassRequest req = s.cache->mass_request(layer, s.num_tokens);
      kernels::AttentionMass mass;
      if (req.wanted) {
        int64_t longest = 0;
        for (const auto& v : views_) longest = std::max(longest, v.len);
        mass_.resize(static_cast<size_t>(c.num_kv_heads * longest));
        mass = kernels::AttentionMass{mass_.data(), longest, req.first_query};
      }
      backend_->Attention(q_.get() + off * Q, s.num_tokens, c.num_heads, c.num_kv_heads, D,
                          views_.data(), c.sliding_window, attn_.get() + off * Q,
                          req.wanted ? &mass : nullptr);
      RETURN_IF_ERROR(
          s.cache->AfterAttention(layer, req.wanted ? mass_.data() : nullptr, mass.stride));
      off += s.num_tokens;
    }
    backend_->MatMul(attn_.get(), total, L.o, nullptr, proj_.get());
    backend_->Add(hidden, proj_.get(), static_cast<size_t>(total * H));
    // MLP block.
    backend_->RmsNorm(hidden, total, H, L.post_norm, c.rms_norm_eps, normed_.get());
    backend_->MatMul(normed_.get(), total, L.gate, nullptr, gate_.get());
    backend_->MatMul(normed_.get(), total, L.up, nullptr, up_.get());
    backend_->SiluMul(gate_.get(), up_.get(), static_cast<size_t>(total * I), gate_.get());
    backend_->MatMul(gate_.get(), total, L.down, nullptr, proj_.get());
    backend_->Add(hidden, proj_.get(), static_cast<size_t>(total * H));
  }
  return absl::OkStatus();
}

void Transformer::RotateRaggedHeads(std::span<const SequenceStep> seqs, int64_t layer) {
  const ModelConfig& c = config_;
  const int64_t Q = c.q_dim(), KV = c.kv_dim(), D = c.head_dim;
  const int64_t group = c.num_heads / c.num_kv_heads;
  int64_t off = 0;
  for (const SequenceStep& s : seqs) {
    for (int64_t h = 0; h < c.num_kv_heads; ++h) {
      const int32_t delta = s.cache->RopeHeadDelta(layer, h);
      if (delta == 0) continue;
      for (int64_t i = 0; i < s.num_tokens; ++i) {
        rope_.Rotate(k_.get() + (off + i) * KV + h * D, D, delta);
        for (int64_t g = 0; g < group; ++g) {
          rope_.Rotate(q_.get() + (off + i) * Q + (h * group + g) * D, D, delta);
        }
      }
    }
    off += s.num_tokens;
  }
}

absl::Status Transformer::Logits(const float* hidden, std::span<const int64_t> rows,
                                 float* logits) {
  if (!weights_.is_last()) return absl::FailedPreconditionError("not the last stage");
  const int64_t H = config_.hidden_size;
  const int64_t n = static_cast<int64_t>(rows.size());
  EnsureScratch(n);
  for (int64_t i = 0; i < n; ++i) {
    std::copy_n(hidden + rows[static_cast<size_t>(i)] * H, H, normed_.get() + i * H);
  }
  backend_->RmsNorm(normed_.get(), n, H, weights_.final_norm, config_.rms_norm_eps, normed_.get());
  backend_->MatMul(normed_.get(), n, weights_.lm_head, nullptr, logits);
  return absl::OkStatus();
}

}  // namespace kvgate::model
