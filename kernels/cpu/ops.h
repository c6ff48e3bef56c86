// The CPU backend's ops: the reference implementation of every kernel, multi-threaded with
// the persistent pool of kernels/cpu/thread_pool.h and vectorized with AVX2 / AVX-512 where the CPU
// has them (checked at run time). All functions are stateless; none allocates beyond small
// per-thread scratch.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "kernels/tensor.h"

namespace kvgate::kernels::cpu {

// kAvx512Vnni: AVX-512 whose quantized dot products use VNNI's vpdpbusd. kAvx512Bf16: that,
// and bf16 products with AVX512-BF16's vdpbf16ps (see MatMulRoundsActivationsToBf16).
enum class SimdLevel { kScalar, kAvx2, kAvx512, kAvx512Vnni, kAvx512Bf16 };

// The best level this CPU supports, or the one forced by SetSimdLevel.
SimdLevel ActiveSimdLevel();
// Forces a level (tests compare levels); clamps to what the CPU supports.
void SetSimdLevel(SimdLevel level);
// Back to the detected level.
void ResetSimdLevel();
// Human-readable CPU features, e.g. "avx512f avx512bf16 avx2 fma f16c".
std::string CpuFeatures();
// Sets/gets the number of threads the ops use.
void SetNumThreads(int n);
int NumThreads();

// out[i, :] = table[ids[i], :].
void Embedding(const int32_t* ids,  // [n]
               int64_t n,
               const WeightView& table,  // [vocab_size, hidden_size]
               float* out);              // [n, hidden_size]

// out = x / rms(x) * weight, per row.
void RmsNorm(const float* x,  // [n, dim]
             int64_t n, int64_t dim,
             const WeightView& weight,  // [dim]
             double eps,
             float* out);  // [n, dim]; may alias x

// y = x @ w^T (+ bias): float32 accumulation over the weight's stored dtype. Where
// MatMulRoundsActivationsToBf16(w) is true, x is rounded to bf16 first (as llama.cpp and
// PyTorch do for bf16 weights) and the products are bf16 x bf16 pairs summed in float32.
void MatMul(const float* x,  // [n, k]
            int64_t n,
            const WeightView& w,     // [m, k]
            const WeightView* bias,  // [m] or nullptr
            float* y);               // [n, m]

// Row-major `w` [m, k] (float32, bf16 or f16) into panels of the same dtype (kernels/tensor.h,
// Layout::kPanels), the layout MatMul reads fastest: every token tile multiplies 16 weight rows
// at once with no final sums, and every output is the index-order sum of fused multiply-adds
// (16-bit weights widened exactly), whatever the batch or SIMD level. `out` holds
// PanelElements(m, k) elements of w's dtype; the returned view reads them. MatMul takes no bf16
// products (SetBf16Products) over panels.
// REQUIRES: w is unquantized and row-major.
int64_t PanelElements(int64_t m, int64_t k);
WeightView PackPanels(const WeightView& w, void* out);  // out [PanelElements(m, k)]

// Whether MatMul at the active SIMD level rounds the activations to bf16 for `w`: with
// Bf16Products() at kAvx512Bf16, bf16 weights at every token count (so a row never depends on
// the batch) and block-quantized weights when more than a few tokens share the call (prefill:
// rows dequantized to bf16).
bool MatMulRoundsActivationsToBf16(const WeightView& w, int64_t n);

// bf16 products: bf16 weights (and quantized prefill) times bf16-rounded activations with
// AVX512-BF16's vdpbf16ps, llama.cpp's and PyTorch's bf16 numerics (logits move by ~1e-2), or
// float32 activations (the default: what the Hugging Face parity tests hold to 1e-4). On a
// Sapphire Rapids Xeon the bf16 matrix product alone is ~1.3x faster but whole-model prefill
// within noise, so it stays opt-in: here, or KVGATE_BF16_PRODUCTS=1 in the environment (serve's
// workers inherit it). No effect without AVX512-BF16.
void SetBf16Products(bool on);
bool Bf16Products();

// Rotate-half RoPE (Hugging Face layout) over the first rotary_dim dims of every head.
void Rope(float* x,  // [n, num_heads, head_dim], in place
          int64_t n, int64_t num_heads, int64_t head_dim, int64_t rotary_dim,
          const float* cos,   // [n, rotary_dim / 2]
          const float* sin);  // [n, rotary_dim / 2]

// out = silu(gate) * up.
void SiluMul(const float* gate,  // [count]
             const float* up,    // [count]
             size_t count,
             float* out);  // [count]; may alias gate or up

// x += y.
void Add(float* x, const float* y, size_t count);  // [count] each

// Causal attention of one sequence's n new queries over its KV cache, in which the new tokens'
// keys are already the last n entries of every head: query i sees entries
// [0, len - n + i + 1), restricted to the last `window` of them when window > 0. K and V rows
// may be float32, bf16 or f16 (the view's dtype); scores and sums are float32.
void Attention(const float* q,  // [n, num_heads, head_dim]
               int64_t n, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
               const KvHeadView* kv,  // [num_kv_heads]
               int64_t window,
               float* out,                  // [n, num_heads, head_dim]
               const AttentionMass* mass);  // optional side output; nullptr: none

// dst[i, :] = src[rows[i], :].
void GatherRows(const float* src,  // [.., width]
                int64_t width,
                const int64_t* rows,  // [n]
                int64_t n,
                float* dst);  // [n, width]

// Token i of KV head g -> row i of slots[g], converted to the slot's dtype.
void AppendKv(const float* k,  // [n, num_kv_heads, head_dim]
              const float* v,  // [n, num_kv_heads, head_dim]
              int64_t n, int64_t num_kv_heads, int64_t head_dim,
              const KvHeadSlot* slots);  // [num_kv_heads]

// Per row g: the indices of the min(lens[g], budget) highest priorities among [0, lens[g]),
// ties to the larger index, ascending, to kept[g * budget ...]; the count to kept_count[g].
void SelectTopK(const float* priorities,  // [rows, stride]
                int64_t rows, int64_t stride,
                const int32_t* lens,  // [rows]
                int64_t budget,
                int32_t* kept,         // [rows, budget]
                int32_t* kept_count);  // [rows]

// Row keep[i] -> row i (keep ascending); moved key rows then rotated by cos/sin row i when
// the tables are given (rotate-half over the first rotary_dim dims).
void CompactKv(void* k, void* v,  // [len, head_dim] of dtype each
               DType dtype, int64_t head_dim,
               const int64_t* keep,  // [count]
               int64_t count, int64_t rotary_dim,
               const float* cos,   // [count, rotary_dim / 2] or null
               const float* sin);  // [count, rotary_dim / 2] or null

// Expected Attention's key scores (Backend::ExpectedAttention).
void ExpectedAttention(const void* k, const void* v,  // [len, head_dim] of dtype each
                       DType dtype, int64_t len, int64_t head_dim, int64_t skip,
                       const float* mu,   // [group, head_dim]
                       const float* cov,  // [group, head_dim, head_dim], or null
                       int64_t group,
                       float* out);  // [len]

// Locret: out[t, j] = fc2[j, :] . silu(fc1 @ concat(q[t], k[t], v[t])).
void LocretScore(const LocretLayerWeights& w,
                 const float* q,  // [n, q_dim], pre-RoPE
                 const float* k,  // [n, kv_dim], pre-RoPE
                 const float* v,  // [n, kv_dim]
                 int64_t n, int64_t num_kv_heads,
                 float* out);  // [n, num_kv_heads]

// Attention-Gate: the gate's q, k, v projections of x (no positional encoding), causal
// attention of its heads over the `past` earlier tokens' rows of gate_k / gate_v and the new
// ones (written after them), then p = sigmoid(wo @ o + bo).
void GateProbabilities(const GateLayerWeights& w,
                       const float* x,  // [n, hidden_size]
                       int64_t n, int64_t hidden_size, int64_t num_kv_heads,
                       float* gate_k,  // [past + n, heads * head_dim]
                       float* gate_v,  // [past + n, heads * head_dim]
                       int64_t past,
                       float* p);  // [n, num_kv_heads]

}  // namespace kvgate::kernels::cpu
