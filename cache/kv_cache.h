// The per-sequence KV cache of a worker's layer range, behind the interface the eviction
// policies implement. Per (layer, KV head) it holds the retained tokens' keys, values and
// original positions in cache order; lengths may differ between heads once a policy evicts.
//
// Keys and values live in backend memory (kernels::Backend) in the shape's dtype; the cache
// keeps only metadata on the host (lengths, original positions, policy scores) and moves K/V
// with the backend's ops (AppendKv, CompactKv, copies): no host code reads or writes them.
//
// Contract of one step (prefill chunk or decode token) of one sequence:
//   Prepare(positions, n) once (room for the tokens, and everything the model needs for every
//   layer: rotary positions, per-head rotation deltas, the attention views, whether attention
//   must produce the mass side output), then per layer: ScoreNewTokens (learned policies),
//   Append of the n new tokens, attention over the prepared views, AfterAttention(layer)
//   (where eviction happens).
// Not thread-safe: one sequence's cache is touched by one engine thread at a time.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "cache/kv_pool.h"
#include "common/dtype.h"
#include "kernels/backend.h"
#include "kernels/tensor.h"

namespace kvgate::cache {

struct KvCacheShape {
  int64_t num_layers = 0;  // layers of this worker's range, indexed 0..num_layers-1 here
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t first_layer = 0;    // the model's index of local layer 0 (pipeline stages)
  DType dtype = DType::kF32;  // K and V storage (--kv-dtype)
  int64_t model_layers = 0;   // layers of the whole model (0: first_layer + num_layers)
  int64_t num_heads = 0;      // query heads (0: num_kv_heads)
  // Bytes of one token's K and V in one (layer, KV head).
  size_t slot_bytes() const { return static_cast<size_t>(2 * head_dim) * DTypeSize(dtype); }
};

// Fills cos/sin [n, rotary_dim / 2] with the angles that rotate a key row by deltas[i]
// positions (a pure rotation: how a key moves when its index changes under position
// re-assignment). Host tables; the backend applies them.
using RotationTableFn =
    std::function<void(const int32_t* deltas, int64_t n, float* cos, float* sin)>;
struct KeyRotation {
  int64_t rotary_dim = 0;
  RotationTableFn table;
};

// What a step of a sequence is, as the prefill driver tells the cache (StepKind::kAuto: judge
// by the number of new tokens: several = prefill chunk, one = decode).
enum class StepKind {
  kAuto,
  kPrefill,      // a prefill chunk followed by more evicting chunks
  kPrefillLast,  // the last evicting prefill chunk (locret: no stabilizers)
  kPrefillKeep,  // the protected prompt tail (locret n_loc): no eviction
  kDecode,
};

class KvCache {
 public:
  virtual ~KvCache() = default;

  // Whether this step's attention must produce the attention-mass side output
  // (kernels::AttentionMass), and from which query on.
  struct MassRequest {
    bool wanted = false;
    int64_t first_query = 0;
  };
  // What the model needs from the cache for one step, prepared once (Prepare).
  struct StepContext {
    int64_t n = 0;
    std::vector<int32_t> rope_positions;  // [n] where the new tokens are rotated
    // [num_layers, num_kv_heads] the extra rotation of each head's new keys and query group
    // (attention-gate under position re-assignment); empty: 0 everywhere.
    std::vector<int32_t> head_deltas;
    MassRequest mass;                        // the same for every layer
    std::vector<kernels::KvHeadView> views;  // [num_layers, num_kv_heads] as each layer's
                                             // attention sees them (after its Append)
    const kernels::KvHeadView* layer_views(int64_t layer, int64_t num_kv_heads) const {
      return &views[static_cast<size_t>(layer * num_kv_heads)];
    }
  };
  // Reserves room for `n` new tokens at original `positions` [n] (host) and prepares the
  // step's context. RESOURCE_EXHAUSTED when they do not fit (nothing changed then). The
  // context stays valid until the step's last AfterAttention.
  absl::StatusOr<const StepContext*> Prepare(const int32_t* positions, int64_t n);

  virtual const KvCacheShape& shape() const = 0;
  // Makes room for `n` more tokens in every (layer, KV head). RESOURCE_EXHAUSTED when the
  // cache cannot grow that far; nothing is changed then.
  virtual absl::Status Reserve(int64_t n) = 0;
  // Stores the keys and values of `n` new tokens of local layer `layer`.
  // REQUIRES: Reserve(n) succeeded for this step.
  virtual void Append(int64_t layer,
                      const float* k,            // [n, num_kv_heads, head_dim], backend memory
                      const float* v,            // [n, num_kv_heads, head_dim], backend memory
                      const int32_t* positions,  // [n] host
                      int64_t n) = 0;
  // The retained tokens of (layer, kv_head), in cache order (backend memory).
  virtual kernels::KvHeadView View(int64_t layer, int64_t kv_head) const = 0;
  // Original positions of the retained tokens of (layer, kv_head): [View(...).len], host.
  virtual const int32_t* Positions(int64_t layer, int64_t kv_head) const = 0;
  // The positions at which this step's `n` new tokens are rotated: their original positions,
  // or, under position re-assignment, their indices in the cache (contiguous over the retained
  // set). Writes out [n].
  virtual void RopePositions(const int32_t* original, int64_t n, int32_t* out) const {
    std::copy(original, original + n, out);
  }
  // Under position re-assignment with ragged heads (Attention-Gate): how many positions the
  // step's new tokens of (layer, kv_head), keys and the queries of its group alike, sit beyond
  // RopePositions' (that head's retained count minus the one RopePositions used). The model
  // rotates them by this much more. 0 everywhere else.
  virtual int32_t RopeHeadDelta(int64_t layer, int64_t kv_head) const { return 0; }

  // Whether a step of `n_new` new tokens needs the attention mass (the same for every layer).
  virtual MassRequest mass_request(int64_t layer, int64_t n_new) const { return {}; }
  // The view layer `layer`'s attention reads once the step's `n` new tokens are appended
  // (Prepare's views; the cache keeps them valid through the step).
  virtual kernels::KvHeadView AttentionView(int64_t layer, int64_t kv_head, int64_t n) {
    kernels::KvHeadView v = View(layer, kv_head);
    v.len += n;
    return v;
  }
  // Called once per layer after that layer's attention of a step; eviction policies evict
  // here. `mass` [num_kv_heads, mass_stride] (host) is the side output when mass_request
  // asked for it, else nullptr. The plain cache does nothing.
  virtual absl::Status AfterAttention(int64_t layer, const float* mass, int64_t mass_stride) {
    return absl::OkStatus();
  }

  // Lowers the budget of local layer `layer` to `budget` (>= 1; never raises it): the layer
  // evicts down to it at the sequence's next step (relief, operator caps). The memory
  // reserved for the sequence stays until it ends. No-op for the plain cache.
  virtual void LowerBudget(int64_t layer, int64_t budget) {}
  // The budget in force for local layer `layer` (0: unbounded).
  virtual int64_t budget(int64_t layer) const { return 0; }

  // Declares the kind of the next step.
  virtual void BeginStep(StepKind kind) {}
  // Whether this cache scores new tokens itself (locret from their pre-RoPE q, k, v;
  // attention-gate from the layer's normalized input); if so, the model calls ScoreNewTokens
  // for every layer of a step before Append.
  virtual bool wants_token_scores() const { return false; }
  // All four in backend memory; the scores land in host metadata.
  virtual absl::Status ScoreNewTokens(int64_t layer,
                                      const float* x,  // [n, hidden_size], normalized input
                                      const float* q,  // [n, num_heads * head_dim]
                                      const float* k,  // [n, num_kv_heads * head_dim]
                                      const float* v,  // [n, num_kv_heads * head_dim]
                                      int64_t n) {
    return absl::OkStatus();
  }
  // The prompt tail a prefill must run after the last evicting chunk (locret n_loc); 0: none.
  virtual int64_t protected_tail() const { return 0; }
  // Whether the prompt is prefilled whole and compressed once (the prefill driver then tells
  // the cache kPrefillKeep for every chunk but the last of the evicting prefix).
  virtual bool whole_prefill() const { return false; }
  // The policy's stored scores of (layer, kv_head)'s retained tokens [View(...).len], or
  // nullptr when the cache keeps none.
  virtual const float* Scores(int64_t layer, int64_t kv_head) const { return nullptr; }

  // Tokens appended so far (per layer; equal for all layers after a full step).
  virtual int64_t num_tokens_seen() const = 0;
  // Bytes of K/V memory currently allocated and currently holding retained tokens.
  virtual size_t bytes_reserved() const = 0;
  virtual size_t bytes_used() const = 0;

  struct Stats {
    int64_t max_retained_per_head = 0;  // largest retained count of any head after any eviction
    int64_t max_held_per_head = 0;      // largest count of any head at any step's end (decode
                                        // lets heads reach budget + slack before evicting)
    int64_t evicted_tokens = 0;         // summed over layers and KV heads
    size_t peak_bytes = 0;              // largest bytes_reserved()
    // Wall time in the eviction machinery: scoring new tokens (locret, attention-gate) and
    // AfterAttention (observing, selecting, compacting), including the waits for the device
    // those copies of scores and mass imply.
    double eviction_seconds = 0;
  };
  virtual Stats stats() const = 0;

 private:
  StepContext ctx_;
};

// The plain cache: keeps every token (no eviction). Storage per layer is [num_kv_heads,
// capacity, head_dim] of the shape's dtype for K and for V, in `backend` memory, grown
// geometrically up to `max_tokens`. With a pool, every growth is leased from it (Reserve fails
// with RESOURCE_EXHAUSTED when the pool is full, or when the backend is out of memory).
// `backend` is borrowed and must outlive the cache.
std::unique_ptr<KvCache> MakeFullKvCache(const KvCacheShape& shape, int64_t max_tokens,
                                         kernels::Backend* backend, KvPool* pool = nullptr);

}  // namespace kvgate::cache
