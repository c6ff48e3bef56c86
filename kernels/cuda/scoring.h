// The learned eviction scores on the GPU: Locret's retaining heads and Attention-Gate's gates,
// twins of the CPU references cache::LocretHeads::Score and cache::AttentionGates::Probabilities
// (checked against them by tests/unit/kernels/cuda_scoring_test.cc). The matrix products go
// through cuBLAS (kernels/cuda/gemm.h, float32 weights: fp32 GEMM); small kernels do the rest.
// All pointers are device pointers; work is enqueued on the Gemm's stream.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "common/dtype.h"
#include "kernels/cuda/gemm.h"

namespace kvgate::kernels::cuda {

// Locret: out[t, j] = fc2[j, :] . silu(fc1 @ concat(q[t], k[t], v[t])), one score per KV head.
absl::Status LocretScore(Gemm& gemm,
                         const float* q,  // [n, q_dim], pre-RoPE
                         const float* k,  // [n, kv_dim], pre-RoPE
                         const float* v,  // [n, kv_dim]
                         int64_t n, int64_t q_dim, int64_t kv_dim,
                         const float* fc1,  // [d_r, q_dim + 2 * kv_dim]
                         const float* fc2,  // [num_kv_heads, d_r]
                         int64_t d_r, int64_t num_kv_heads,
                         float* scratch,  // [n, q_dim + 2 * kv_dim + d_r]
                         float* out);     // [n, num_kv_heads]

// Attention-Gate: keep probabilities of n new tokens. The gate's own q, k, v projections of x;
// causal attention of its `heads` heads over every token of the sequence so far (gate_k and
// gate_v hold the `past` earlier tokens' rows; the new tokens' rows are written after them);
// then p = sigmoid(wo @ o + bo). width = heads * head_dim; head_dim <= 256.
absl::Status GateProbabilities(Gemm& gemm,
                               const float* x,  // [n, hidden_size], the layer's normalized input
                               int64_t n, int64_t hidden_size,
                               const float* wq,  // [width, hidden_size]
                               const float* wk,  // [width, hidden_size]
                               const float* wv,  // [width, hidden_size]
                               const float* wo,  // [num_kv_heads, width]
                               const float* bo,  // [num_kv_heads]
                               int64_t heads, int64_t head_dim, int64_t num_kv_heads,
                               float* gate_k,  // [past + n, width]; rows [0, past) given
                               float* gate_v,  // [past + n, width]; rows [0, past) given
                               int64_t past,
                               float* scratch,  // [n, 2 * width]
                               float* p);       // [n, num_kv_heads]

// Expected Attention's key scores, the twin of cpu::ExpectedAttention: raw scores of every
// (query head g, key j) in one kernel, the softmax statistics of each g in a second, the mean
// over g times ||v_j|| in a third.
absl::Status ExpectedAttention(const void* k, const void* v,  // [len, head_dim] of dtype each
                               DType dtype, int64_t len, int64_t head_dim, int64_t skip,
                               const float* mu,   // [group, head_dim]
                               const float* cov,  // [group, head_dim, head_dim], or null
                               int64_t group,
                               float* scratch,  // [group * len + 2 * group]
                               float* out,      // [len]
                               cudaStream_t stream);

}  // namespace kvgate::kernels::cuda
