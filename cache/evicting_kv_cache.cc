#include "cache/evicting_kv_cache.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <numeric>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cache/budget_allocation.h"
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
        expected_(params.kind() == PolicyKind::kExpectedAttention),
        adaptive_(params.adaptive()) {
    const int64_t layers = shape.num_layers;
    len_.assign(static_cast<size_t>(layers * shape.num_kv_heads), 0);
    // The layer budgets: the coordinator's grant when it sent one, else the allocation's own.
    budget_ = LayerBudgets(params, shape.first_layer, layers,
                           std::max(shape.model_layers, shape.first_layer + layers));
    for (size_t l = 0; l < budget_.size() && l < params.layer_budgets.size(); ++l) {
      budget_[l] = std::max<int64_t>(params.layer_budgets[l], 1);
    }
    force_.assign(budget_.size(), false);
    // Locret's protected prompt tail is prefilled after the last eviction, so a head may hold
    // budget + tail + 1 before the first decode step cuts it back (slab_extra covers it).
    std::vector<int64_t> slots(budget_.size());
    for (size_t l = 0; l < slots.size(); ++l) slots[l] = params_.slab_slots(budget_[l]);
    Plan(slots);
  }

  // The K and V slabs in backend memory (separate from the constructor: it can fail).
  absl::Status AllocateSlabs(kernels::Allocator* memory) {
    memory_ = memory;
    const int64_t count = rows_ * shape_.head_dim;
    ASSIGN_OR_RETURN(k_, memory_->Alloc(count, shape_.dtype));
    ASSIGN_OR_RETURN(v_, memory_->Alloc(count, shape_.dtype));
    // The host metadata: positions and scores per slot (a budget too large for the host is an
    // error, not a crash).
    try {
      pos_.resize(static_cast<size_t>(rows_));
      scores_.resize(static_cast<size_t>(rows_));
    } catch (const std::bad_alloc&) {
      return absl::ResourceExhaustedError(
          absl::StrCat("KV cache: no host memory for the metadata of ", rows_, " token slots"));
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
    const int64_t h = shape_.num_kv_heads;
    for (int64_t layer = 0; adaptive_ && layer < shape_.num_layers; ++layer) {
      // A head out of room in a layer that has room for the step: move the boundaries.
      bool short_head = false;
      for (int64_t head = 0; head < h; ++head) {
        short_head |= len_[Index(layer, head)] + n > cap_[Index(layer, head)];
      }
      if (short_head && FreeRows(layer) >= h * n) RETURN_IF_ERROR(Relayout(layer));
    }
    const bool prefill =
        step_kind_ != StepKind::kDecode && (step_kind_ != StepKind::kAuto || n > 1);
    if (!Fits(n) && params_.whole_prefill() && prefill) {
      // A fill longer than the prompt the slab was sized for (a re-prefill with generated
      // tokens): grow every layer to hold it whole.
      const int64_t longest = *std::max_element(len_.begin(), len_.end());
      std::vector<int64_t> slots(slots_);
      int64_t rows = 0;
      for (int64_t& s : slots) {
        s = std::max(s, longest + n + params_.slab_extra());
        rows += h * s;
      }
      if (lease.bytes() > 0) {
        RETURN_IF_ERROR(lease.Resize(static_cast<size_t>(rows) * shape_.slot_bytes(), rows));
      }
      RETURN_IF_ERROR(Reallocate(slots));
    }
    for (size_t idx = 0; idx < len_.size(); ++idx) {
      if (len_[idx] + n > cap_[idx]) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "KV cache: a step of ", n, " tokens does not fit the ", cap_[idx],
            " slots of a head of layer ", static_cast<int64_t>(idx) / h, " (", len_[idx],
            " held, budget + chunk); use prefill chunks of at most ", params_.chunk, " tokens"));
      }
    }
    // The keep flags of the step's new tokens, where attention reads them.
    if (gated_) {
      RETURN_IF_ERROR(Ensure(visible_buf_, (shape_.num_kv_heads * n + 3) / 4, DType::kF32));
    }
    return absl::OkStatus();
  }

  void BeginStep(StepKind kind) override { step_kind_ = kind; }
  bool wants_token_scores() const override { return scores_tokens_ || gated_ || expected_; }
  absl::Status ScoreNewTokens(int64_t layer, const float* x, const float* q, const float* k,
                              const float* v, int64_t n) override {
    Timer timer(&stats_.eviction_seconds);
    if (expected_) return ObserveQueries(layer, q, n);
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
  bool whole_prefill() const override { return params_.whole_prefill(); }
  const float* Scores(int64_t layer, int64_t kv_head) const override {
    return &scores_[static_cast<size_t>(start_[Index(layer, kv_head)])];
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
      KVGATE_CHECK(len + n <= cap_[idx]);
      const size_t row = static_cast<size_t>(start_[idx] + len);
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
    const size_t row = static_cast<size_t>(start_[idx]);
    return kernels::KvHeadView{RowPtr(k_, row), RowPtr(v_, row), len_[idx],
                               shape_.head_dim, visible,         shape_.dtype};
  }

  kernels::KvHeadView AttentionView(int64_t layer, int64_t kv_head, int64_t n) override {
    const size_t idx = Index(layer, kv_head);
    const size_t row = static_cast<size_t>(start_[idx]);
    const uint8_t* visible = gated_ ? visible_buf_.as<uint8_t>() + kv_head * n : nullptr;
    return kernels::KvHeadView{RowPtr(k_, row), RowPtr(v_, row), len_[idx] + n,
                               shape_.head_dim, visible,         shape_.dtype};
  }

  const int32_t* Positions(int64_t layer, int64_t kv_head) const override {
    return &pos_[static_cast<size_t>(start_[Index(layer, kv_head)])];
  }

  void RopePositions(const int32_t* original, int64_t n, int32_t* out) const override {
    if (!reassign_) {
      std::copy(original, original + n, out);
      return;
    }
    // Under uniform locret and streaming every head of every layer holds the same count, so
    // one index serves all; ragged heads (attention-gate, adaptive) add RopeHeadDelta.
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
    const int64_t budget = budget_[static_cast<size_t>(layer)];
    protect_recent_ = kind == StepKind::kPrefillLast ? 0 : params_.resolved_stabilizers(budget);
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
    const bool forced = force_[static_cast<size_t>(layer)];
    bool over = false, decode_full = false;
    int64_t total = 0;
    for (int64_t head = 0; head < h; ++head) {
      HeadTokens t = Head(layer, head, mass, mass_stride);
      if (t.mass != nullptr || policy_->MassFirstQuery(n_new_) == std::nullopt) {
        policy_->Observe(t);
      }
      total += t.len;
      over |= t.len > budget;
      decode_full |= t.len >= budget + params_.decode_slack;
    }
    if (adaptive_) {
      // The heads share the layer's budget: the layer is over when their total is.
      over = total > h * budget;
      decode_full |= total >= h * (budget + params_.decode_slack);
    }
    const bool evict = kind != StepKind::kPrefillKeep && over &&
                       (prefill || policy_->evict_every_step() || decode_full || forced);
    if (kind != StepKind::kPrefillKeep) force_[static_cast<size_t>(layer)] = false;
    if (evict && expected_) RETURN_IF_ERROR(ScoreExpected(layer));
    if (evict) {
      if (adaptive_) {
        RETURN_IF_ERROR(EvictAdaptive(layer, mass, mass_stride));
      } else if (policy_->layer_wise()) {
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
      if (evict && (adaptive_ || policy_->layer_wise())) {
        max_after_evict_ = std::max(max_after_evict_, len);
      }
      stats_.max_held_per_head = std::max(stats_.max_held_per_head, len);
    }
    any_eviction_ |= evict;
    // Whole-prompt prefill: once compressed (or found within the budget), the slab shrinks to
    // budget + extra.
    if (kind == StepKind::kPrefillLast && params_.whole_prefill()) shrink_pending_ = true;
    if (shrink_pending_ && layer == shape_.num_layers - 1) Shrink();
    return absl::OkStatus();
  }

  // After lowered budgets were evicted down to, or a whole prompt compressed: a smaller slab
  // (budget + extra slots per head of each layer), and its memory back to the pool.
  void Shrink() {
    const int64_t h = shape_.num_kv_heads;
    std::vector<int64_t> slots(budget_.size());
    bool smaller = false;
    for (size_t l = 0; l < slots.size(); ++l) {
      slots[l] = std::min(budget_[l] + params_.slab_extra(), slots_[l]);
      smaller |= slots[l] < slots_[l];
      // Not evicted down yet (a protected prefill): later.
      const int64_t layer = static_cast<int64_t>(l);
      if (adaptive_) {
        if (h * slots_[l] - FreeRows(layer) > h * budget_[l]) return;
      } else {
        for (int64_t head = 0; head < h; ++head) {
          if (len_[Index(layer, head)] > slots[l]) return;
        }
      }
    }
    shrink_pending_ = false;
    if (!smaller) return;
    peak_bytes_ = std::max(peak_bytes_, bytes_reserved());
    // Without memory for the smaller copy, the larger slab stays.
    if (Reallocate(slots).ok() && lease.bytes() > 0) {
      lease.Resize(bytes_reserved(), token_slots()).IgnoreError();  // shrinking always succeeds
    }
  }

  int64_t num_tokens_seen() const override { return tokens_seen_; }
  size_t bytes_reserved() const override { return k_.bytes() + v_.bytes(); }
  int64_t token_slots() const { return rows_; }
  // Bytes the slabs take (before they are allocated).
  size_t bytes_needed() const { return static_cast<size_t>(rows_) * shape_.slot_bytes(); }
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
    return b.as<uint8_t>() + row * RowBytes();
  }
  size_t RowBytes() const { return static_cast<size_t>(shape_.head_dim) * DTypeSize(shape_.dtype); }

  // The layout for `slots` [layers] token slots per KV head: each layer a region of
  // num_kv_heads * slots rows. Uniform and pyramid: each head `slots` of them, fixed. Adaptive:
  // heads hold different counts, so each head gets its retained tokens plus an equal share of
  // the region's free rows (Spread), and the boundaries move after each eviction.
  void Plan(const std::vector<int64_t>& slots) {
    const int64_t h = shape_.num_kv_heads;
    slots_ = slots;
    base_.resize(slots.size() + 1);
    start_.resize(len_.size());
    cap_.resize(len_.size());
    int64_t row = 0;
    for (size_t l = 0; l < slots.size(); ++l) {
      base_[l] = row;
      row += h * slots[l];
      for (int64_t head = 0; head < h; ++head) {
        const size_t idx = Index(static_cast<int64_t>(l), head);
        start_[idx] = base_[l] + head * slots[l];
        cap_[idx] = slots[l];
      }
    }
    base_[slots.size()] = row;
    rows_ = row;
    if (adaptive_) {
      for (size_t l = 0; l < slots.size(); ++l) Spread(static_cast<int64_t>(l), &start_, &cap_);
    }
  }

  // Adaptive: the regions of `layer`'s heads that give each its retained tokens and an equal
  // share of the layer's free rows (the last head the remainder).
  void Spread(int64_t layer, std::vector<int64_t>* start, std::vector<int64_t>* cap) const {
    const int64_t h = shape_.num_kv_heads;
    const size_t l = static_cast<size_t>(layer);
    int64_t used = 0;
    for (int64_t head = 0; head < h; ++head) used += len_[Index(layer, head)];
    const int64_t share = (base_[l + 1] - base_[l] - used) / h;
    int64_t row = base_[l];
    for (int64_t head = 0; head < h; ++head) {
      const size_t idx = Index(layer, head);
      (*start)[idx] = row;
      (*cap)[idx] = head + 1 < h ? len_[idx] + share : base_[l + 1] - row;
      row += (*cap)[idx];
    }
  }

  // The rows `layer`'s region has free.
  int64_t FreeRows(int64_t layer) const {
    int64_t used = 0;
    for (int64_t head = 0; head < shape_.num_kv_heads; ++head) used += len_[Index(layer, head)];
    return base_[static_cast<size_t>(layer) + 1] - base_[static_cast<size_t>(layer)] - used;
  }

  // Moves every head's retained rows into a new slab of `slots` per head of each layer.
  absl::Status Reallocate(const std::vector<int64_t>& slots) {
    const std::vector<int64_t> old_start = start_, old_cap = cap_, old_slots = slots_;
    Plan(slots);
    const int64_t count = rows_ * shape_.head_dim;
    absl::StatusOr<kernels::DeviceBuffer> k = memory_->Alloc(count, shape_.dtype);
    absl::StatusOr<kernels::DeviceBuffer> v =
        k.ok() ? memory_->Alloc(count, shape_.dtype) : k.status();
    absl::Status status = v.status();
    std::vector<int32_t> pos;
    std::vector<float> sc;
    if (status.ok()) {
      try {
        pos.resize(static_cast<size_t>(rows_));
        sc.resize(static_cast<size_t>(rows_));
      } catch (const std::bad_alloc&) {
        status = absl::ResourceExhaustedError("KV cache: no host memory to resize the slab");
      }
    }
    for (size_t idx = 0; status.ok() && idx < len_.size(); ++idx) {
      const size_t n = static_cast<size_t>(len_[idx]);
      const size_t from = static_cast<size_t>(old_start[idx]),
                   to = static_cast<size_t>(start_[idx]);
      status = backend_->CopyOnDevice(RowPtr(*k, to), RowPtr(k_, from), n * RowBytes());
      if (status.ok()) {
        status = backend_->CopyOnDevice(RowPtr(*v, to), RowPtr(v_, from), n * RowBytes());
      }
      std::copy_n(&pos_[from], n, &pos[to]);
      std::copy_n(&scores_[from], n, &sc[to]);
    }
    if (!status.ok()) {
      // Back to the old layout (the old slab is untouched).
      Plan(old_slots);
      start_ = old_start;
      cap_ = old_cap;
      return status;
    }
    k_ = *std::move(k);
    v_ = *std::move(v);
    pos_.swap(pos);
    scores_.swap(sc);
    return absl::OkStatus();
  }

  // Moves rows [from, from + n) of the slab (K, V and metadata) to [to, to + n), regions that
  // may overlap: in pieces no longer than the distance, so that no copy overlaps itself.
  absl::Status MoveRows(int64_t to, int64_t from, int64_t n) {
    if (to == from || n == 0) return absl::OkStatus();
    const int64_t dist = std::abs(to - from);
    for (int64_t done = 0; done < n;) {
      const int64_t piece = std::min(dist, n - done);
      // Leftwards front to back, rightwards back to front.
      const int64_t off = to < from ? done : n - done - piece;
      const size_t dst = static_cast<size_t>(to + off), src = static_cast<size_t>(from + off);
      const size_t bytes = static_cast<size_t>(piece) * RowBytes();
      RETURN_IF_ERROR(backend_->CopyOnDevice(RowPtr(k_, dst), RowPtr(k_, src), bytes));
      RETURN_IF_ERROR(backend_->CopyOnDevice(RowPtr(v_, dst), RowPtr(v_, src), bytes));
      done += piece;
    }
    std::memmove(&pos_[static_cast<size_t>(to)], &pos_[static_cast<size_t>(from)],
                 static_cast<size_t>(n) * sizeof(int32_t));
    std::memmove(&scores_[static_cast<size_t>(to)], &scores_[static_cast<size_t>(from)],
                 static_cast<size_t>(n) * sizeof(float));
    return absl::OkStatus();
  }

  // Adaptive: moves `layer`'s heads to the regions Spread gives them (after an eviction, or
  // when a head has no room left while the layer has). Two passes keep every move safe: all
  // heads packed to the left in order, then moved right to their regions in reverse order.
  absl::Status Relayout(int64_t layer) {
    const int64_t h = shape_.num_kv_heads;
    int64_t row = base_[static_cast<size_t>(layer)];
    for (int64_t head = 0; head < h; ++head) {
      const size_t idx = Index(layer, head);
      RETURN_IF_ERROR(MoveRows(row, start_[idx], len_[idx]));
      start_[idx] = row;
      row += len_[idx];
    }
    std::vector<int64_t> start = start_;
    Spread(layer, &start, &cap_);
    for (int64_t head = h - 1; head >= 0; --head) {
      const size_t idx = Index(layer, head);
      RETURN_IF_ERROR(MoveRows(start[idx], start_[idx], len_[idx]));
      start_[idx] = start[idx];
    }
    return absl::OkStatus();
  }

  // Expected Attention: adds the step's queries [n, num_heads, head_dim] (pre-RoPE, backend
  // memory) to the layer's statistics (sums of q and q q^T per query head, in double), except
  // those of the first `sinks` positions, whose queries are outliers (as kvpress drops them).
  absl::Status ObserveQueries(int64_t layer, const float* q, int64_t n) {
    const int64_t heads = num_heads(), d = shape_.head_dim;
    if (queries_.empty()) queries_.resize(static_cast<size_t>(shape_.num_layers));
    QueryStats& st = queries_[static_cast<size_t>(layer)];
    if (st.sum.empty()) {
      st.sum.assign(static_cast<size_t>(heads * d), 0.0);
      st.sum_sq.assign(params_.ea_covariance ? static_cast<size_t>(heads * d * d) : 0, 0.0);
    }
    host_q_.resize(static_cast<size_t>(n * heads * d));
    RETURN_IF_ERROR(backend_->CopyToHost(host_q_.data(), q, host_q_.size() * sizeof(float)));
    for (int64_t i = 0; i < n; ++i, ++st.seen) {
      if (st.seen < params_.sinks) continue;
      ++st.count;
      for (int64_t h = 0; h < heads; ++h) {
        const float* qh = &host_q_[static_cast<size_t>((i * heads + h) * d)];
        double* s = &st.sum[static_cast<size_t>(h * d)];
        for (int64_t a = 0; a < d; ++a) s[a] += qh[a];
        if (st.sum_sq.empty()) continue;
        double* s2 = &st.sum_sq[static_cast<size_t>(h * d * d)];
        for (int64_t a = 0; a < d; ++a) {
          const double qa = qh[a];
          for (int64_t b = 0; b < d; ++b) s2[a * d + b] += qa * qh[b];
        }
      }
    }
    return absl::OkStatus();
  }

  // Expected Attention: fills the stored scores of `layer`'s retained tokens with the
  // attention the next `ea_future` queries are expected to pay them. The queries' mean mu and
  // covariance S per query head come from the layer's statistics; RoPE at a future position t
  // is the rotation R(t) = cos(t theta) I + sin(t theta) P, so the future queries' statistics
  // are taken as R mu and R S R^T for R the average of R(t) over the next `ea_future`
  // positions (the paper's and kvpress's approximation). The backend scores the keys.
  absl::Status ScoreExpected(int64_t layer) {
    const int64_t heads = num_heads(), d = shape_.head_dim, kv = shape_.num_kv_heads;
    const int64_t group = heads / kv;
    if (queries_.empty()) queries_.resize(static_cast<size_t>(shape_.num_layers));
    const QueryStats& st = queries_[static_cast<size_t>(layer)];
    const bool cov = params_.ea_covariance;
    // The average rotation over the future positions: per rotated pair (a, a + half), the
    // mean cosine and sine. Original positions: the queries come after the tokens seen;
    // re-assigned ones: after the budget the cache keeps.
    const int64_t half = rotation_.rotary_dim / 2;
    const int64_t first = reassign_ ? budget_[static_cast<size_t>(layer)] : st.seen;
    const int64_t f = params_.ea_future;
    deltas_.resize(static_cast<size_t>(f));
    for (int64_t t = 0; t < f; ++t)
      deltas_[static_cast<size_t>(t)] = static_cast<int32_t>(first + t);
    rot_cos_.resize(static_cast<size_t>(f * half));
    rot_sin_.resize(rot_cos_.size());
    rotation_.table(deltas_.data(), f, rot_cos_.data(), rot_sin_.data());
    std::vector<double> c(static_cast<size_t>(half), 0.0), s(static_cast<size_t>(half), 0.0);
    for (int64_t t = 0; t < f; ++t) {
      for (int64_t a = 0; a < half; ++a) {
        c[static_cast<size_t>(a)] +=
            rot_cos_[static_cast<size_t>(t * half + a)] / static_cast<double>(f);
        s[static_cast<size_t>(a)] +=
            rot_sin_[static_cast<size_t>(t * half + a)] / static_cast<double>(f);
      }
    }
    // R's row a: (entry at column a, the other column, its entry); identity past rotary_dim.
    auto row = [&](int64_t a, double* diag, int64_t* other, double* off) {
      if (a < half) {
        *diag = c[static_cast<size_t>(a)];
        *other = a + half;
        *off = -s[static_cast<size_t>(a)];
      } else if (a < 2 * half) {
        *diag = c[static_cast<size_t>(a - half)];
        *other = a - half;
        *off = s[static_cast<size_t>(a - half)];
      } else {
        *diag = 1.0;
        *other = a;
        *off = 0.0;
      }
    };
    const double n = std::max<double>(1.0, static_cast<double>(st.count));
    mu_host_.assign(static_cast<size_t>(heads * d), 0.f);
    cov_host_.assign(cov ? static_cast<size_t>(heads * d * d) : 0, 0.f);
    std::vector<double> m(static_cast<size_t>(d)), sig(static_cast<size_t>(d * d)),
        rs(static_cast<size_t>(d * d));
    for (int64_t h = 0; h < heads && st.count > 0; ++h) {
      for (int64_t a = 0; a < d; ++a)
        m[static_cast<size_t>(a)] = st.sum[static_cast<size_t>(h * d + a)] / n;
      for (int64_t a = 0; a < d; ++a) {
        double diag, off;
        int64_t other;
        row(a, &diag, &other, &off);
        mu_host_[static_cast<size_t>(h * d + a)] =
            static_cast<float>(diag * m[static_cast<size_t>(a)] +
                               (other != a ? off * m[static_cast<size_t>(other)] : 0.0));
      }
      if (!cov) continue;
      // S = E[q q^T] - mu mu^T, then R S, then (R S) R^T: two nonzeros per row of R.
      for (int64_t a = 0; a < d; ++a) {
        for (int64_t b = 0; b < d; ++b) {
          sig[static_cast<size_t>(a * d + b)] =
              st.sum_sq[static_cast<size_t>((h * d + a) * d + b)] / n -
              m[static_cast<size_t>(a)] * m[static_cast<size_t>(b)];
        }
      }
      for (int64_t a = 0; a < d; ++a) {
        double diag, off;
        int64_t other;
        row(a, &diag, &other, &off);
        for (int64_t b = 0; b < d; ++b) {
          rs[static_cast<size_t>(a * d + b)] =
              diag * sig[static_cast<size_t>(a * d + b)] +
              (other != a ? off * sig[static_cast<size_t>(other * d + b)] : 0.0);
        }
      }
      for (int64_t b = 0; b < d; ++b) {
        double diag, off;
        int64_t other;
        row(b, &diag, &other, &off);
        for (int64_t a = 0; a < d; ++a) {
          cov_host_[static_cast<size_t>((h * d + a) * d + b)] =
              static_cast<float>(diag * rs[static_cast<size_t>(a * d + b)] +
                                 (other != b ? off * rs[static_cast<size_t>(a * d + other)] : 0.0));
        }
      }
    }
    RETURN_IF_ERROR(Ensure(mu_buf_, heads * d, DType::kF32));
    RETURN_IF_ERROR(
        backend_->CopyToDevice(mu_buf_.data(), mu_host_.data(), mu_host_.size() * sizeof(float)));
    if (cov) {
      RETURN_IF_ERROR(Ensure(cov_buf_, heads * d * d, DType::kF32));
      RETURN_IF_ERROR(backend_->CopyToDevice(cov_buf_.data(), cov_host_.data(),
                                             cov_host_.size() * sizeof(float)));
    }
    for (int64_t head = 0; head < kv; ++head) {
      const size_t idx = Index(layer, head);
      const int64_t len = len_[idx];
      if (len == 0) continue;
      const size_t base = static_cast<size_t>(start_[idx]);
      int64_t skip = 0;  // the sinks: the first retained rows (cache order is position order)
      while (skip < len && pos_[base + static_cast<size_t>(skip)] < params_.sinks) ++skip;
      RETURN_IF_ERROR(Ensure(score_buf_, len, DType::kF32));
      backend_->ExpectedAttention(RowPtr(k_, base), RowPtr(v_, base), shape_.dtype, len, d, skip,
                                  mu_buf_.as<float>() + head * group * d,
                                  cov ? cov_buf_.as<float>() + head * group * d * d : nullptr,
                                  group, score_buf_.as<float>());
      RETURN_IF_ERROR(backend_->CopyToHost(&scores_[base], score_buf_.data(),
                                           static_cast<size_t>(len) * sizeof(float)));
    }
    return absl::OkStatus();
  }
  int64_t num_heads() const {
    return shape_.num_heads > 0 ? shape_.num_heads : shape_.num_kv_heads;
  }

  bool Fits(int64_t n) const {
    for (size_t idx = 0; idx < len_.size(); ++idx) {
      if (len_[idx] + n > cap_[idx]) return false;
    }
    return true;
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
    t.positions = &pos_[static_cast<size_t>(start_[idx])];
    t.scores = &scores_[static_cast<size_t>(start_[idx])];
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

  // Moves the kept entries of one head to the front of its region, in order.
  void Compact(int64_t layer, int64_t head, const std::vector<int64_t>& keep) {
    const size_t idx = Index(layer, head);
    const size_t base = static_cast<size_t>(start_[idx]);
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

  // Ada-KV: the layer's heads share num_kv_heads * budget slots. Each head's priorities (the
  // policy's, as for a head of its own) are joined; each head's top `adaptive_floor * budget`
  // count as kept (the safeguard); the layer keeps the highest priorities over all heads, so a
  // head whose attention is concentrated gives slots to one whose attention is spread.
  absl::Status EvictAdaptive(int64_t layer, const float* mass, int64_t mass_stride) {
    const int64_t h = shape_.num_kv_heads;
    const int64_t budget = budget_[static_cast<size_t>(layer)];
    // Ada-KV's safeguard, as kvpress rounds it: at least one token per head when on.
    const int64_t floor =
        params_.adaptive_floor > 0
            ? std::max<int64_t>(1, static_cast<int64_t>(params_.adaptive_floor *
                                                        static_cast<double>(budget)))
            : 0;
    std::vector<int64_t> offset(static_cast<size_t>(h + 1), 0);
    for (int64_t head = 0; head < h; ++head) {
      offset[static_cast<size_t>(head + 1)] =
          offset[static_cast<size_t>(head)] + len_[Index(layer, head)];
    }
    const int64_t total = offset[static_cast<size_t>(h)];
    if (total <= h * budget) return absl::OkStatus();
    sum_.resize(static_cast<size_t>(total));
    for (int64_t head = 0; head < h; ++head) {
      HeadTokens t = Head(layer, head, mass, mass_stride);
      float* p = &sum_[static_cast<size_t>(offset[static_cast<size_t>(head)])];
      policy_->Priorities(t, budget, p);
      if (floor > 0 && t.len > floor) {
        // The safeguard: the head's `floor` best (ties to the more recent) are kept.
        order_.resize(static_cast<size_t>(t.len));
        std::iota(order_.begin(), order_.end(), 0);
        std::nth_element(
            order_.begin(), order_.begin() + (floor - 1), order_.end(),
            [p](int64_t a, int64_t b) { return p[a] > p[b] || (p[a] == p[b] && a > b); });
        for (int64_t i = 0; i < floor; ++i) p[order_[static_cast<size_t>(i)]] = kKept;
      } else if (floor > 0) {
        std::fill(p, p + t.len, kKept);
      }
    }
    RETURN_IF_ERROR(Select(sum_, total, h * budget, keep_));
    // keep_ is ascending: split it by head, back into head-relative indices.
    size_t k = 0;
    for (int64_t head = 0; head < h; ++head) {
      head_keep_.clear();
      const int64_t lo = offset[static_cast<size_t>(head)],
                    hi = offset[static_cast<size_t>(head + 1)];
      for (; k < keep_.size() && keep_[k] < hi; ++k) head_keep_.push_back(keep_[k] - lo);
      if (static_cast<int64_t>(head_keep_.size()) < hi - lo) Compact(layer, head, head_keep_);
    }
    return Relayout(layer);
  }

  static constexpr float kKept = std::numeric_limits<float>::infinity();

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
  bool expected_;
  bool adaptive_;
  // Expected Attention: per layer, the statistics of the queries seen (pre-RoPE, per query
  // head), and the host and backend copies of the future queries' mean and covariance.
  struct QueryStats {
    int64_t seen = 0;            // queries of this layer so far (the next one's position)
    int64_t count = 0;           // of them, the ones in the statistics (past the sinks)
    std::vector<double> sum;     // [num_heads, head_dim]
    std::vector<double> sum_sq;  // [num_heads, head_dim, head_dim] (covariance only)
  };
  std::vector<QueryStats> queries_;
  std::vector<float> host_q_, mu_host_, cov_host_;
  kernels::DeviceBuffer mu_buf_, cov_buf_;
  // The layout: layer l's rows are [base_[l], base_[l + 1]) of the slab, slots_[l] per KV head
  // when allocated; head (l, h)'s region is [start_, start_ + cap_) (moved by adaptive).
  std::vector<int64_t> slots_;   // [layers]
  std::vector<int64_t> base_;    // [layers + 1]
  std::vector<int64_t> start_;   // [layers, kv_heads]
  std::vector<int64_t> cap_;     // [layers, kv_heads]
  int64_t rows_ = 0;             // token slots of the slab, all layers and heads
  kernels::DeviceBuffer k_, v_;  // [rows, head_dim] of dtype, backend
  std::vector<int32_t> pos_;     // [rows], host
  std::vector<float> scores_;    // [rows], host
  std::vector<int64_t> len_;     // [layers, kv_heads]
  std::vector<int64_t> budget_;  // [layers] the budget in force per KV head (adaptive: mean)
  std::vector<bool> force_;      // [layers] evict down at the next step (budget lowered)
  bool shrink_pending_ = false;  // a budget was lowered: shrink the slab after the next step
  size_t peak_bytes_ = 0;        // before a shrink
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
  int64_t max_after_evict_ = 0;
  bool any_eviction_ = false;
  Stats stats_;
  std::vector<float> priority_, sum_;
  std::vector<int64_t> keep_, head_keep_, order_;

 public:
  KvPool::Lease lease;  // the slab's memory, from the worker's pool
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
  if ((params.position_mode() == "reassign" || params.kind() == PolicyKind::kExpectedAttention) &&
      rotation.table == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(params.kind() == PolicyKind::kExpectedAttention
                                                       ? "expected-attention"
                                                       : "position re-assignment",
                                                   " needs the model's RoPE"));
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
