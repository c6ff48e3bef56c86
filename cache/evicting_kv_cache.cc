#include "cache/evicting_kv_cache.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <new>
#include <numeric>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace kvgate::cache {
namespace {

// Adds the wall time of its scope to *total.
class Timer {
 public:
  explicit Timer(double* total) : total_(total), t0_(std::chrono::steady_clock::now()) {}
  ~Timer() {
    *total_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
  }

 private:
  double* total_;
  std::chrono::steady_clock::time_point t0_;
};

class EvictingKvCache final : public KvCache {
 public:
  EvictingKvCache(const KvCacheShape& shape, const EvictionParams& params,
                  std::unique_ptr<EvictionPolicy> policy, kernels::Backend* backend,
                  KeyRotation rotation)
      : shape_(shape),
        params_(params),
        policy_(std::move(policy)),
        backend_(backend),
        rotation_(std::move(rotation)),
        reassign_(params.position_mode() == "reassign"),
        scores_tokens_(params.kind() == PolicyKind::kLocret && params.locret != nullptr),
        gated_(params.kind() == PolicyKind::kAttentionGate && params.gates != nullptr),
        // Locret's protected prompt tail is prefilled after the last eviction, so a head may
        // hold budget + tail + 1 before the first decode step cuts it back.
        slots_(params.budget + params.slab_extra()) {
    len_.assign(static_cast<size_t>(shape.num_layers * shape.num_kv_heads), 0);
    budget_.assign(static_cast<size_t>(shape.num_layers), params.budget);
    for (size_t l = 0; l < budget_.size() && l < params.layer_budgets.size(); ++l) {
      budget_[l] = std::clamp<int64_t>(params.layer_budgets[l], 1, params.budget);
    }
    force_.assign(budget_.size(), false);
  }

  // The K and V slabs in backend memory (separate from the constructor: it can fail).
  absl::Status AllocateSlabs(kernels::Allocator* memory) {
    memory_ = memory;
    const int64_t count = static_cast<int64_t>(len_.size()) * slots_ * shape_.head_dim;
    ASSIGN_OR_RETURN(k_, memory_->Alloc(count, shape_.dtype));
    ASSIGN_OR_RETURN(v_, memory_->Alloc(count, shape_.dtype));
    // The host metadata: positions and scores per slot (a budget too large for the host is an
    // error, not a crash).
    const size_t slots = len_.size() * static_cast<size_t>(slots_);
    try {
      pos_.resize(slots);
      scores_.resize(slots);
    } catch (const std::bad_alloc&) {
      return absl::ResourceExhaustedError(
          absl::StrCat("KV cache: no host memory for the metadata of ", slots, " token slots"));
    }
    return absl::OkStatus();
  }

  void LowerBudget(int64_t layer, int64_t budget) override {
    const size_t l = static_cast<size_t>(layer);
    if (l >= budget_.size() || budget >= budget_[l]) return;
    budget_[l] = std::max<int64_t>(1, budget);
    force_[l] = true;
    shrink_pending_ = true;
  }
  int64_t budget(int64_t layer) const override { return budget_[static_cast<size_t>(layer)]; }

  const KvCacheShape& shape() const override { return shape_; }

  absl::Status Reserve(int64_t n) override {
    const int64_t longest = *std::max_element(len_.begin(), len_.end());
    if (longest + n > slots_) {
      return absl::ResourceExhaustedError(
          absl::StrCat("KV cache: a step of ", n, " tokens does not fit the ", slots_,
                       " slots of budget + chunk (", longest,
                       " held); use prefill chunks of at most ", params_.chunk, " tokens"));
    }
    // The keep flags of the step's new tokens, where attention reads them.
    if (gated_) {
      RETURN_IF_ERROR(Ensure(visible_buf_, (shape_.num_kv_heads * n + 3) / 4, DType::kF32));
    }
    return absl::OkStatus();
  }

  void BeginStep(StepKind kind) override { step_kind_ = kind; }
  bool wants_token_scores() const override { return scores_tokens_ || gated_; }
  absl::Status ScoreNewTokens(int64_t layer, const float* x, const float* q, const float* k,
                              const float* v, int64_t n) override {
    Timer timer(&stats_.eviction_seconds);
    const int64_t h = shape_.num_kv_heads;
    const int64_t global = shape_.first_layer + layer;
    const DeviceEvictionWeights& w = *params_.device_weights;
    RETURN_IF_ERROR(Ensure(score_buf_, n * h, DType::kF32));
    if (gated_) {
      const kernels::GateLayerWeights& g = w.gates[static_cast<size_t>(global)];
      if (gate_.empty()) gate_.resize(static_cast<size_t>(shape_.num_layers));
      GateState& st = gate_[static_cast<size_t>(layer)];
      const int64_t width = g.heads * g.head_dim;
      RETURN_IF_ERROR(Grow(st.k, st.rows, st.rows + n, width));
      RETURN_IF_ERROR(Grow(st.v, st.rows, st.rows + n, width));
      backend_->GateProbabilities(g, x, n, params_.gates->hidden_size, h, st.k.as<float>(),
                                  st.v.as<float>(), st.rows, score_buf_.as<float>());
      st.rows += n;
    } else {
      backend_->LocretScore(w.locret[static_cast<size_t>(global)], q, k, v, n, h,
                            score_buf_.as<float>());
    }
    pending_scores_.resize(static_cast<size_t>(n * h));
    RETURN_IF_ERROR(backend_->CopyToHost(pending_scores_.data(), score_buf_.data(),
                                         pending_scores_.size() * sizeof(float)));
    pending_layer_ = layer;
    return absl::OkStatus();
  }
  int64_t protected_tail() const override { return params_.prompt_tail(); }
  const float* Scores(int64_t layer, int64_t kv_head) const override {
    return &scores_[Index(layer, kv_head) * slots_];
  }

  void Append(int64_t layer, const float* k, const float* v, const int32_t* positions,
              int64_t n) override {
    const int64_t h = shape_.num_kv_heads;
    const bool scored = (scores_tokens_ || gated_) && pending_layer_ == layer &&
                        pending_scores_.size() == static_cast<size_t>(n * h);
    if (gated_) {
      // Keep flags of the new tokens: p > tau; the sequence's first token is always kept.
      new_visible_.assign(static_cast<size_t>(h * n), 1);
      for (int64_t head = 0; head < h && scored; ++head) {
        for (int64_t i = 0; i < n; ++i) {
          const bool keep = positions[i] == 0 ||
                            pending_scores_[static_cast<size_t>(i * h + head)] > params_.gates->tau;
          new_visible_[static_cast<size_t>(head * n + i)] = keep ? 1 : 0;
        }
      }
      // The attention kernels read the flags from backend memory (sized by Reserve).
      KVGATE_CHECK(visible_buf_.bytes() >= new_visible_.size());
      KVGATE_CHECK(
          backend_->CopyToDevice(visible_buf_.data(), new_visible_.data(), new_visible_.size())
              .ok());
      visible_layer_ = layer;
    }
    slot_ptrs_.resize(static_cast<size_t>(h));
    for (int64_t head = 0; head < h; ++head) {
      const size_t idx = Index(layer, head);
      int64_t& len = len_[idx];
      KVGATE_CHECK(len + n <= slots_);
      const size_t row = idx * static_cast<size_t>(slots_) + static_cast<size_t>(len);
      slot_ptrs_[static_cast<size_t>(head)] =
          kernels::KvHeadSlot{RowPtr(k_, row), RowPtr(v_, row), shape_.dtype};
      for (int64_t i = 0; i < n; ++i) {
        pos_[row + static_cast<size_t>(i)] = positions[i];
        scores_[row + static_cast<size_t>(i)] =
            scored ? pending_scores_[static_cast<size_t>(i * h + head)] : 0.f;
      }
      len += n;
    }
    backend_->AppendKv(k, v, n, h, shape_.head_dim, slot_ptrs_.data());
    pending_layer_ = -1;
    if (layer == shape_.num_layers - 1) tokens_seen_ += n;
    n_new_ = n;
  }

  kernels::KvHeadView View(int64_t layer, int64_t kv_head) const override {
    const size_t idx = Index(layer, kv_head);
    const uint8_t* visible =
        gated_ && layer == visible_layer_ ? visible_buf_.as<uint8_t>() + kv_head * n_new_ : nullptr;
    const size_t row = idx * static_cast<size_t>(slots_);
    return kernels::KvHeadView{RowPtr(k_, row), RowPtr(v_, row), len_[idx],
                               shape_.head_dim, visible,         shape_.dtype};
  }

  kernels::KvHeadView AttentionView(int64_t layer, int64_t kv_head, int64_t n) override {
    const size_t idx = Index(layer, kv_head);
    const size_t row = idx * static_cast<size_t>(slots_);
    const uint8_t* visible = gated_ ? visible_buf_.as<uint8_t>() + kv_head * n : nullptr;
    return kernels::KvHeadView{RowPtr(k_, row), RowPtr(v_, row), len_[idx] + n,
                               shape_.head_dim, visible,         shape_.dtype};
  }

  const int32_t* Positions(int64_t layer, int64_t kv_head) const override {
    return &pos_[Index(layer, kv_head) * slots_];
  }

  void RopePositions(const int32_t* original, int64_t n, int32_t* out) const override {
    if (!reassign_) {
      std::copy(original, original + n, out);
      return;
    }
    // Under locret and streaming every head of every layer holds the same count, so one
    // index serves all; attention-gate's ragged heads add RopeHeadDelta.
    rope_base_ = len_[0];
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<int32_t>(rope_base_ + i);
  }

  int32_t RopeHeadDelta(int64_t layer, int64_t kv_head) const override {
    if (!reassign_) return 0;
    return static_cast<int32_t>(len_[Index(layer, kv_head)] - rope_base_);
  }

  MassRequest mass_request(int64_t layer, int64_t n_new) const override {
    auto q0 = policy_->MassFirstQuery(n_new);
    if (!q0) return {};
    return MassRequest{true, std::clamp<int64_t>(*q0, 0, n_new - 1)};
  }

  absl::Status AfterAttention(int64_t layer, const float* mass, int64_t mass_stride) override {
    Timer timer(&stats_.eviction_seconds);
    const int64_t h = shape_.num_kv_heads;
    const StepKind kind = step_kind_ != StepKind::kAuto
                              ? step_kind_
                              : (n_new_ > 1 ? StepKind::kPrefill : StepKind::kDecode);
    const bool prefill = kind == StepKind::kPrefill || kind == StepKind::kPrefillLast;
    protect_recent_ = kind == StepKind::kPrefillLast ? 0 : params_.resolved_stabilizers();
    if (gated_ && visible_layer_ == layer) {
      // Tokens their gate flagged 0 are not stored: drop them from each head after the step's
      // attention (they attended to themselves).
      for (int64_t head = 0; head < h; ++head) {
        const int64_t len = len_[Index(layer, head)];
        keep_.clear();
        for (int64_t j = 0; j < len; ++j) {
          const int64_t t = j - (len - n_new_);
          if (t < 0 || new_visible_[static_cast<size_t>(head * n_new_ + t)] != 0) {
            keep_.push_back(j);
          }
        }
        if (static_cast<int64_t>(keep_.size()) < len) Compact(layer, head, keep_);
      }
      visible_layer_ = -1;
    }
    const int64_t budget = budget_[static_cast<size_t>(layer)];
    const bool forced = force_[static_cast<size_t>(layer)];
    bool over = false, decode_full = false;
    for (int64_t head = 0; head < h; ++head) {
      HeadTokens t = Head(layer, head, mass, mass_stride);
      if (t.mass != nullptr || policy_->MassFirstQuery(n_new_) == std::nullopt) {
        policy_->Observe(t);
      }
      over |= t.len > budget;
      decode_full |= t.len >= budget + params_.decode_slack;
    }
    const bool evict = kind != StepKind::kPrefillKeep && over &&
                       (prefill || policy_->evict_every_step() || decode_full || forced);
    if (kind != StepKind::kPrefillKeep) force_[static_cast<size_t>(layer)] = false;
    if (evict) {
      if (policy_->layer_wise()) {
        RETURN_IF_ERROR(EvictLayerWise(layer, mass, mass_stride));
      } else {
        // In decode each head is cut back when it itself reaches budget + slack (heads are
        // ragged under attention-gate).
        const bool every = prefill || policy_->evict_every_step() || forced;
        for (int64_t head = 0; head < h; ++head) {
          if (every || len_[Index(layer, head)] >= budget + params_.decode_slack) {
            RETURN_IF_ERROR(EvictHead(layer, head, mass, mass_stride));
            max_after_evict_ = std::max(max_after_evict_, len_[Index(layer, head)]);
          }
        }
      }
    }
    for (int64_t head = 0; head < h; ++head) {
      const int64_t len = len_[Index(layer, head)];
      if (evict && policy_->layer_wise()) max_after_evict_ = std::max(max_after_evict_, len);
      stats_.max_held_per_head = std::max(stats_.max_held_per_head, len);
    }
    any_eviction_ |= evict;
    if (shrink_pending_ && layer == shape_.num_layers - 1) Shrink();
    return absl::OkStatus();
  }

  // After lowered budgets were evicted down to: a smaller slab (budget + extra slots per head
  // for the largest budget in force), and its memory back to the pool.
  void Shrink() {
    shrink_pending_ = false;
    const int64_t top = *std::max_element(budget_.begin(), budget_.end());
    const int64_t slots = top + params_.slab_extra();
    if (slots >= slots_) return;
    for (int64_t l : len_) {
      if (l > slots) return;  // not evicted down yet (a protected prefill): later
    }
    peak_bytes_ = std::max(peak_bytes_, bytes_reserved());
    const size_t heads = len_.size();
    const size_t ns = static_cast<size_t>(slots), os = static_cast<size_t>(slots_);
    const int64_t count = static_cast<int64_t>(heads * ns) * shape_.head_dim;
    auto k = memory_->Alloc(count, shape_.dtype);
    auto v = memory_->Alloc(count, shape_.dtype);
    if (!k.ok() || !v.ok()) return;  // no memory for the smaller copy: keep the larger slab
    std::vector<int32_t> pos(heads * ns);
    std::vector<float> sc(heads * ns);
    const size_t row_bytes = static_cast<size_t>(shape_.head_dim) * DTypeSize(shape_.dtype);
    for (size_t idx = 0; idx < heads; ++idx) {
      const size_t n = static_cast<size_t>(len_[idx]);
      if (!backend_->CopyOnDevice(RowPtr(*k, idx * ns), RowPtr(k_, idx * os), n * row_bytes).ok() ||
          !backend_->CopyOnDevice(RowPtr(*v, idx * ns), RowPtr(v_, idx * os), n * row_bytes).ok()) {
        return;
      }
      std::copy_n(&pos_[idx * os], n, &pos[idx * ns]);
      std::copy_n(&scores_[idx * os], n, &sc[idx * ns]);
    }
    k_ = *std::move(k);
    v_ = *std::move(v);
    pos_.swap(pos);
    scores_.swap(sc);
    params_.budget = top;
    slots_ = slots;
    if (lease.bytes() > 0) {
      // Shrinking a lease always succeeds.
      lease.Resize(bytes_reserved(), token_slots()).IgnoreError();
    }
  }

  int64_t num_tokens_seen() const override { return tokens_seen_; }
  size_t bytes_reserved() const override { return k_.bytes() + v_.bytes(); }
  int64_t token_slots() const { return static_cast<int64_t>(len_.size()) * slots_; }
  // Bytes the slabs take (before they are allocated).
  size_t bytes_needed() const { return static_cast<size_t>(token_slots()) * shape_.slot_bytes(); }
  size_t bytes_used() const override {
    int64_t total = 0;
    for (int64_t l : len_) total += l;
    return static_cast<size_t>(total) * shape_.slot_bytes();
  }
  Stats stats() const override {
    Stats s = stats_;
    s.max_retained_per_head = any_eviction_ ? max_after_evict_ : s.max_held_per_head;
    s.peak_bytes = std::max(peak_bytes_, bytes_reserved());
    return s;
  }

 private:
  size_t Index(int64_t layer, int64_t head) const {
    return static_cast<size_t>(layer * shape_.num_kv_heads + head);
  }
  // Row `row` of a K or V slab buffer.
  void* RowPtr(const kernels::DeviceBuffer& b, size_t row) const {
    return b.as<uint8_t>() + row * static_cast<size_t>(shape_.head_dim) * DTypeSize(shape_.dtype);
  }
  // Makes `b` hold at least `count` elements of `dtype` (contents not kept).
  absl::Status Ensure(kernels::DeviceBuffer& b, int64_t count, DType dtype) {
    if (b.count() >= count && b.dtype() == dtype) return absl::OkStatus();
    ASSIGN_OR_RETURN(b, backend_->Alloc(std::max<int64_t>(count, 2 * b.count()), dtype));
    return absl::OkStatus();
  }
  // Grows a [rows, width] float32 buffer to hold `need` rows, keeping its first `rows` rows.
  absl::Status Grow(kernels::DeviceBuffer& b, int64_t rows, int64_t need, int64_t width) {
    if (b.count() >= need * width) return absl::OkStatus();
    ASSIGN_OR_RETURN(kernels::DeviceBuffer g,
                     backend_->Alloc(std::max(need, 2 * rows) * width, DType::kF32));
    if (rows > 0) {
      RETURN_IF_ERROR(backend_->CopyOnDevice(g.data(), b.data(),
                                             static_cast<size_t>(rows * width) * sizeof(float)));
    }
    b = std::move(g);
    return absl::OkStatus();
  }

  HeadTokens Head(int64_t layer, int64_t head, const float* mass, int64_t mass_stride) {
    const size_t idx = Index(layer, head);
    HeadTokens t;
    t.len = len_[idx];
    t.n_new = n_new_;
    t.positions = &pos_[idx * slots_];
    t.scores = &scores_[idx * slots_];
    t.mass = mass != nullptr ? mass + head * mass_stride : nullptr;
    t.protect_recent = protect_recent_;
    return t;
  }

  // Indices of the `b` highest priorities (ties: the more recent), in cache order: the
  // backend's SelectTopK over the priorities, copied to its memory.
  absl::Status Select(const std::vector<float>& priority, int64_t len, int64_t b,
                      std::vector<int64_t>& keep) {
    keep.resize(static_cast<size_t>(len));
    std::iota(keep.begin(), keep.end(), 0);
    if (len <= b) return absl::OkStatus();
    RETURN_IF_ERROR(Ensure(priority_buf_, len, DType::kF32));
    RETURN_IF_ERROR(backend_->CopyToDevice(priority_buf_.data(), priority.data(),
                                           static_cast<size_t>(len) * sizeof(float)));
    kept32_.resize(static_cast<size_t>(b));
    const int32_t len32 = static_cast<int32_t>(len);
    int32_t count = 0;
    backend_->SelectTopK(priority_buf_.as<float>(), 1, len, &len32, b, kept32_.data(), &count);
    keep.assign(kept32_.begin(), kept32_.begin() + count);
    return absl::OkStatus();
  }

  // Moves the kept entries of one head to the front of its slab, in order.
  void Compact(int64_t layer, int64_t head, const std::vector<int64_t>& keep) {
    const size_t idx = Index(layer, head);
    const size_t base = idx * static_cast<size_t>(slots_);
    int32_t* pos = &pos_[base];
    float* sc = &scores_[base];
    const int64_t count = static_cast<int64_t>(keep.size());
    bool moved = false;
    for (int64_t dst = 0; dst < count; ++dst) {
      const int64_t src = keep[static_cast<size_t>(dst)];
      if (src == dst) continue;
      moved = true;
      pos[dst] = pos[src];
      sc[dst] = sc[src];
    }
    if (moved) {
      const float* cos = nullptr;
      const float* sin = nullptr;
      if (reassign_) {
        // A key moved from index src to dst is re-rotated by dst - src (0: unchanged).
        const int64_t half = rotation_.rotary_dim / 2;
        deltas_.resize(keep.size());
        for (int64_t dst = 0; dst < count; ++dst) {
          deltas_[static_cast<size_t>(dst)] =
              static_cast<int32_t>(dst - keep[static_cast<size_t>(dst)]);
        }
        rot_cos_.resize(keep.size() * static_cast<size_t>(half));
        rot_sin_.resize(rot_cos_.size());
        rotation_.table(deltas_.data(), count, rot_cos_.data(), rot_sin_.data());
        cos = rot_cos_.data();
        sin = rot_sin_.data();
      }
      backend_->CompactKv(RowPtr(k_, base), RowPtr(v_, base), shape_.dtype, shape_.head_dim,
                          keep.data(), count, rotation_.rotary_dim, cos, sin);
    }
    stats_.evicted_tokens += len_[idx] - count;
    len_[idx] = count;
  }

  absl::Status EvictHead(int64_t layer, int64_t head, const float* mass, int64_t mass_stride) {
    HeadTokens t = Head(layer, head, mass, mass_stride);
    const int64_t budget = budget_[static_cast<size_t>(layer)];
    if (t.len <= budget) return absl::OkStatus();
    priority_.resize(static_cast<size_t>(t.len));
    policy_->Priorities(t, budget, priority_.data());
    RETURN_IF_ERROR(Select(priority_, t.len, budget, keep_));
    Compact(layer, head, keep_);
    return absl::OkStatus();
  }

  // One kept set for every head (their lengths are equal: they always keep the same set).
  absl::Status EvictLayerWise(int64_t layer, const float* mass, int64_t mass_stride) {
    const int64_t len = len_[Index(layer, 0)];
    const int64_t budget = budget_[static_cast<size_t>(layer)];
    if (len <= budget) return absl::OkStatus();
    sum_.assign(static_cast<size_t>(len), 0.f);
    priority_.resize(static_cast<size_t>(len));
    for (int64_t head = 0; head < shape_.num_kv_heads; ++head) {
      HeadTokens t = Head(layer, head, mass, mass_stride);
      KVGATE_CHECK(t.len == len);
      policy_->Priorities(t, budget, priority_.data());
      for (int64_t j = 0; j < len; ++j)
        sum_[static_cast<size_t>(j)] += priority_[static_cast<size_t>(j)];
    }
    RETURN_IF_ERROR(Select(sum_, len, budget, keep_));
    for (int64_t head = 0; head < shape_.num_kv_heads; ++head) Compact(layer, head, keep_);
    return absl::OkStatus();
  }

  KvCacheShape shape_;
  EvictionParams params_;
  std::unique_ptr<EvictionPolicy> policy_;
  kernels::Backend* backend_;
  kernels::Allocator* memory_ = nullptr;  // K/V slabs: the pool's arena, or the backend
  KeyRotation rotation_;
  bool reassign_;
  mutable int64_t rope_base_ = 0;  // the count RopePositions used this step
  bool scores_tokens_;
  bool gated_;
  int64_t slots_;                // per (layer, KV head)
  kernels::DeviceBuffer k_, v_;  // [layers, kv_heads, slots, head_dim] of dtype, backend
  std::vector<int32_t> pos_;     // [layers, kv_heads, slots], host
  std::vector<float> scores_;    // [layers, kv_heads, slots], host
  std::vector<int64_t> len_;     // [layers, kv_heads]
  std::vector<int64_t> budget_;  // [layers] the budget in force (<= params_.budget)
  std::vector<bool> force_;      // [layers] evict down at the next step (budget lowered)
  bool shrink_pending_ = false;
  size_t peak_bytes_ =
      0;  // before a shrink  // a budget was lowered: shrink the slab after the next step
  int64_t tokens_seen_ = 0;
  int64_t n_new_ = 0;
  StepKind step_kind_ = StepKind::kAuto;
  int64_t protect_recent_ = 0;
  std::vector<float> pending_scores_;  // [n, kv_heads] scores of the step's new tokens
  int64_t pending_layer_ = -1;
  kernels::DeviceBuffer score_buf_;     // [n, kv_heads] the scoring op's output
  kernels::DeviceBuffer priority_buf_;  // [len] what SelectTopK selects from
  std::vector<int32_t> kept32_;
  // Attention-Gate: the gate's own keys and values per layer (every token of the sequence, in
  // backend memory), and the keep flags of the step's new tokens [kv_heads, n] for the layer
  // being run (host, and their copy in backend memory that attention reads).
  struct GateState {
    kernels::DeviceBuffer k, v;  // [rows capacity, H_ag * d_ag]
    int64_t rows = 0;
  };
  std::vector<GateState> gate_;
  std::vector<uint8_t> new_visible_;
  kernels::DeviceBuffer visible_buf_;
  std::vector<kernels::KvHeadSlot> slot_ptrs_;
  std::vector<int32_t> deltas_;
  std::vector<float> rot_cos_, rot_sin_;
  int64_t visible_layer_ = -1;

 public:
  KvPool::Lease lease;  // the slab's memory, from the worker's pool
  int64_t max_after_evict_ = 0;
  bool any_eviction_ = false;
  Stats stats_;
  std::vector<float> priority_, sum_;
  std::vector<int64_t> keep_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<KvCache>> MakeEvictingKvCache(const KvCacheShape& shape,
                                                             const EvictionParams& params,
                                                             kernels::Backend* backend,
                                                             const KeyRotation& rotation,
                                                             KvPool* pool) {
  ASSIGN_OR_RETURN(std::unique_ptr<EvictionPolicy> policy, MakeEvictionPolicy(params));
  if (policy == nullptr) {
    return absl::InvalidArgumentError("the evicting cache needs a policy other than full");
  }
  if (params.position_mode() == "reassign" && rotation.table == nullptr) {
    return absl::InvalidArgumentError("position re-assignment needs the model's RoPE");
  }
  if (params.learned() && params.device_weights == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        params.policy, ": the weights of ", params.weights, " are not in the backend's memory"));
  }
  auto cache =
      std::make_unique<EvictingKvCache>(shape, params, std::move(policy), backend, rotation);
  if (pool != nullptr) {
    cache->lease = pool->NewLease();
    RETURN_IF_ERROR(cache->lease.Resize(cache->bytes_needed(), cache->token_slots()));
  }
  RETURN_IF_ERROR(cache->AllocateSlabs(pool != nullptr && pool->memory() != nullptr ? pool->memory()
                                                                                    : backend));
  return std::unique_ptr<KvCache>(std::move(cache));
}

absl::StatusOr<std::unique_ptr<KvCache>> MakeKvCache(const KvCacheShape& shape,
                                                     const EvictionParams& params,
                                                     int64_t max_tokens, kernels::Backend* backend,
                                                     const KeyRotation& rotation, KvPool* pool) {
  RETURN_IF_ERROR(params.Validate());
  if (!params.evicts()) {
    return MakeFullKvCache(shape, max_tokens, backend, pool);  // full keeps everything
  }
  return MakeEvictingKvCache(shape, params, backend, rotation, pool);
}

}  // namespace kvgate::cache
