// CUDA twins of the CPU ops (kernels/cpu/ops.h), plus the device-side pieces of eviction and
// sampling. Framework-free and stream-explicit: every function takes the cudaStream_t it
// enqueues on and returns the launch error (cudaSuccess when the work was enqueued); nothing
// synchronizes unless its comment says so. All pointers are device pointers unless a comment
// says "host". The matrix product lives in kernels/cuda/gemm.h (it needs a cuBLAS handle).
//
// Parity with the CPU reference: the elementwise ops compute the same formulas in float32
// (Rope bit-exactly: no fused multiply-add); RmsNorm sums squares in float32 where the CPU
// uses double; Attention follows cpu::Attention's causal / window / Attention-Gate rules and
// produces the same AttentionMass side output.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "common/dtype.h"
#include "kernels/tensor.h"

namespace kvgate::kernels::cuda {

// ---------------------------------------------------------------------------------------------
// Elementwise ops (ops.cu)
// ---------------------------------------------------------------------------------------------

// out[i, :] = float(table[ids[i], :]). An id outside [0, vocab_size) gives a row of NaN (the
// CPU aborts; a kernel cannot, so the CudaBackend checks ids on the host first).
cudaError_t Embedding(const int32_t* ids,  // [n]
                      int64_t n,
                      const void* table,  // [vocab_size, hidden_size] of table_dtype
                      DType table_dtype, int64_t vocab_size, int64_t hidden_size,
                      float* out,  // [n, hidden_size]
                      cudaStream_t stream);

// out = x / rms(x) * weight, per row. One block per row.
cudaError_t RmsNorm(const float* x,      // [n, dim]
                    const void* weight,  // [dim] of weight_dtype
                    DType weight_dtype, int64_t n, int64_t dim, float eps,
                    float* out,  // [n, dim]; may alias x
                    cudaStream_t stream);

// Rotate-half RoPE (Hugging Face layout) over the first rotary_dim dims of every head, in place.
cudaError_t Rope(float* x,  // [n, num_heads, head_dim]
                 int64_t n, int64_t num_heads, int64_t head_dim, int64_t rotary_dim,
                 const float* cos,  // [n, rotary_dim / 2]
                 const float* sin,  // [n, rotary_dim / 2]
                 cudaStream_t stream);

// out = silu(gate) * up.
cudaError_t SiluMul(const float* gate,  // [count]
                    const float* up,    // [count]
                    int64_t count,
                    float* out,  // [count]; may alias gate or up
                    cudaStream_t stream);

// x += y.
cudaError_t Add(float* x,        // [count]
                const float* y,  // [count]
                int64_t count, cudaStream_t stream);

// out = x converted to `to` (round to nearest even for bf16 / f16; f32 copies).
cudaError_t ConvertFromF32(const float* x,  // [count]
                           int64_t count, DType to,
                           void* out,  // [count] of `to`
                           cudaStream_t stream);

// y[i, :] += float(bias[:]).
cudaError_t AddBias(float* y,  // [n, m]
                    int64_t n, int64_t m,
                    const void* bias,  // [m] of bias_dtype
                    DType bias_dtype, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Attention (attention.cu)
// ---------------------------------------------------------------------------------------------

// Largest head_dim Attention takes. The kernels run multiples of 16; any other head_dim runs on
// zero-padded copies of q, K and V in the workspace (small models: stories260K's head_dim 8).
inline constexpr int64_t kMaxAttentionHeadDim = 256;

// Bytes of device workspace Attention needs for these shapes on the current device (the split
// of long key ranges over many blocks, and the log-sum-exp rows the mass side output reads).
size_t AttentionWorkspaceBytes(int64_t n, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                               int64_t max_len);

// Causal attention of one sequence's n new queries over its retained KV, exactly the rules of
// cpu::Attention: query i sees entries [0, len - n + i + 1) of its KV head, restricted to the
// last `window` of them when window > 0; new_visible hides gated new keys from later queries;
// GQA maps query head hd to KV head hd / (num_heads / num_kv_heads).
// `kv` is a HOST array of float32 views whose k, v and new_visible are DEVICE pointers (the
// CudaBackend widens bf16 / f16 caches to float32 before calling this); its fields are
// passed to the kernels by value (no host-to-device copy, so the call never blocks the host).
// REQUIRES: every len >= n; 0 < head_dim <= kMaxAttentionHeadDim;
// workspace_bytes >= AttentionWorkspaceBytes(n, num_heads, num_kv_heads, head_dim, max len).
// n == 1 (decode) splits each head's keys into chunks over many blocks and reduces them with
// a second kernel; n > 1 (prefill) tiles queries and keys flash-style (online softmax), and
// also splits keys when there are too few query tiles to fill the GPU.
cudaError_t Attention(const float* q,  // [n, num_heads, head_dim]
                      int64_t n, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                      const KvHeadView* kv,  // [num_kv_heads] (host array, device data)
                      int64_t window,
                      float* out,                 // [n, num_heads, head_dim]
                      const AttentionMass* mass,  // host struct, mass->mass on device; or null
                      void* workspace,            // [workspace_bytes]
                      size_t workspace_bytes, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Eviction: per-head top-k selection and compaction (topk.cu)
// ---------------------------------------------------------------------------------------------

// Per KV head g: the indices of the min(lens[g], budget) highest scores among entries
// [0, lens[g]) of row g, ties going to the larger index (the more recent token), written to
// kept[g, 0..count) in ascending order, count to kept_count[g]. This is the selection of
// EvictingKvCache::Select (-0.0 and +0.0 tie). One block per head (radix select).
cudaError_t SelectTopK(const float* scores,  // [num_kv_heads, stride]
                       int64_t num_kv_heads, int64_t stride,
                       const int32_t* lens,  // [num_kv_heads]
                       int64_t budget,
                       int32_t* kept,        // [num_kv_heads, budget]
                       int32_t* kept_count,  // [num_kv_heads]
                       cudaStream_t stream);

// Gathers kept rows: dst row t of head g = src row kept[g, t] of head g, t < kept_count[g]
// (rows of `width` 4-byte elements: K or V rows, or per-token scores / int32 positions with
// width 1). Row r of head g starts at element g * head_stride + r * row_stride. dst == src is
// allowed when kept rows are ascending (as SelectTopK writes them): each head is then moved by
// one block in order, staging each chunk of rows before writing it; otherwise all rows move in
// parallel. Rows at t >= kept_count[g] are left as they are.
cudaError_t CompactRows(const void* src,  // [num_kv_heads, head_stride] of 4-byte elements
                        void* dst,        // [num_kv_heads, head_stride] of 4-byte elements
                        int64_t num_kv_heads, int64_t head_stride, int64_t row_stride,
                        int64_t width,
                        const int32_t* kept,  // [num_kv_heads, kept_stride]
                        int64_t kept_stride,
                        const int32_t* kept_count,  // [num_kv_heads]
                        cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// The KV cache (kv.cu): twins of cpu::GatherRows, AppendKv and CompactKv
// ---------------------------------------------------------------------------------------------

// dst[i, :] = src[rows[i], :].
cudaError_t GatherRows(const float* src,  // [.., width]
                       int64_t width,
                       const int64_t* rows,  // [n]
                       int64_t n,
                       float* dst,  // [n, width]
                       cudaStream_t stream);

// Token i of KV head g -> row i of k_dst[g] / v_dst[g], converted to `dtype`.
cudaError_t AppendKv(const float* k,  // [n, num_kv_heads, head_dim]
                     const float* v,  // [n, num_kv_heads, head_dim]
                     int64_t n, int64_t num_kv_heads, int64_t head_dim,
                     void* const* k_dst,  // [num_kv_heads] device array of device pointers
                     void* const* v_dst,  // [num_kv_heads] device array of device pointers
                     DType dtype, cudaStream_t stream);

// Row keep[i] -> row i of one head (in place, through `staging`), moved keys rotated by cos/sin
// row i when the tables are given.
cudaError_t CompactKv(void* k, void* v,  // [len, head_dim] of dtype each
                      DType dtype, int64_t head_dim,
                      const int64_t* keep,  // [count]
                      int64_t count, int64_t rotary_dim,
                      const float* cos,  // [count, rotary_dim / 2] or null
                      const float* sin,  // [count, rotary_dim / 2] or null
                      float* staging,    // [2, count, head_dim]
                      cudaStream_t stream);

// out = float32(x).
cudaError_t WidenToF32(const void* x,  // [count] of dtype
                       DType dtype, int64_t count,
                       float* out,  // [count]
                       cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Sampling (sampling.cu)
// ---------------------------------------------------------------------------------------------

// The filters of model::SamplingParams (penalties are applied to the logits beforehand).
struct SampleParams {
  float temperature = 1.0f;  // 0: greedy
  int64_t top_k = 0;         // 0: off
  float top_p = 1.0f;        // 1: off
  float min_p = 0.0f;        // 0: off
  uint64_t seed = 0;         // the draw of row r uses Philox(key = seed, counter = (.., r, offset))
  uint64_t offset = 0;       // e.g. the decode step, so one seed gives a stream of draws
};

// One token per row. Greedy: the first maximum (as std::max_element). Otherwise the candidate
// set of the CPU sampler (sorted by logit, ties by id: top-k, then top-p over the softmax of
// the top-k, then min-p) and a draw from softmax(logits / temperature) restricted to it, by the
// Gumbel-max trick with counter-based Philox noise: deterministic for (seed, offset, row), not
// the CPU sampler's random stream. One block per row.
cudaError_t Sample(const float* logits,  // [batch, vocab]
                   int64_t batch, int64_t vocab, const SampleParams& params,
                   int32_t* tokens,  // [batch]
                   cudaStream_t stream);

}  // namespace kvgate::kernels::cuda
