// Locret retaining-head and Attention-Gate scoring kernels (see scoring.h).
#include <cuda_runtime.h>

#include "common/cuda/cuda_check.h"
#include "kernels/cuda/dtype.cuh"
#include "kernels/cuda/scoring.h"

namespace kvgate::kernels::cuda {
namespace {

constexpr int kThreads = 256;

unsigned Blocks(int64_t count) {
  const int64_t b = (count + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 65535 * 16 ? b : 65535 * 16);
}

// x[t] = concat(q[t], k[t], v[t]).
__global__ void ConcatQkvKernel(const float* q, const float* k, const float* v, int64_t n,
                                int64_t q_dim, int64_t kv_dim, float* x) {  // x: [n, d_in]
  const int64_t d_in = q_dim + 2 * kv_dim;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n * d_in;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / d_in, c = i % d_in;
    x[i] = c < q_dim            ? q[t * q_dim + c]
           : c < q_dim + kv_dim ? k[t * kv_dim + (c - q_dim)]
                                : v[t * kv_dim + (c - q_dim - kv_dim)];
  }
}

// x = x * sigmoid(x), as the CPU reference writes it: x / (1 + exp(-x)).
__global__ void SiluKernel(float* x, int64_t count) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float a = x[i];
    x[i] = a / (1.f + expf(-a));
  }
}

// p = sigmoid(p + bo[j]) per [n, n_kv] element.
__global__ void BiasSigmoidKernel(float* p, const float* bo, int64_t n, int64_t n_kv) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n * n_kv;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    p[i] = 1.f / (1.f + expf(-(p[i] + bo[i % n_kv])));
  }
}

__device__ float BlockReduce(float value, bool is_max, float* shared) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const float other = __shfl_down_sync(0xffffffffu, value, offset);
    value = is_max ? fmaxf(value, other) : value + other;
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  if (threadIdx.x == 0) {
    float r = shared[0];
    for (int w = 1; w < static_cast<int>(blockDim.x) / 32; ++w) {
      r = is_max ? fmaxf(r, shared[w]) : r + shared[w];
    }
    shared[0] = r;
  }
  __syncthreads();
  const float r = shared[0];
  __syncthreads();
  return r;
}

// One block per (new token t, gate head h): softmax over keys [0, past + t + 1) of
// q . k * scale, then o = sum_j p_j v_j. Keys are spread over the threads; the output is
// accumulated in shared memory.
__global__ void GateAttentionKernel(const float* q,       // [n, width]
                                    const float* gate_k,  // [past + n, width]
                                    const float* gate_v,  // [past + n, width]
                                    int64_t past, int64_t heads, int64_t head_dim, float scale,
                                    float* o) {  // [n, width]
  __shared__ float reduce[32];
  __shared__ float acc[256];
  const int64_t t = blockIdx.x / heads, h = blockIdx.x % heads, width = heads * head_dim;
  const int64_t keys = past + t + 1;
  const float* qt = q + t * width + h * head_dim;
  for (int64_t e = threadIdx.x; e < head_dim; e += blockDim.x) acc[e] = 0.f;
  float mx = -INFINITY;
  for (int64_t j = threadIdx.x; j < keys; j += blockDim.x) {
    const float* kj = gate_k + j * width + h * head_dim;
    float s = 0.f;
    for (int64_t e = 0; e < head_dim; ++e) s += qt[e] * kj[e];
    mx = fmaxf(mx, s * scale);
  }
  mx = BlockReduce(mx, true, reduce);
  float sum = 0.f;
  for (int64_t j = threadIdx.x; j < keys; j += blockDim.x) {
    const float* kj = gate_k + j * width + h * head_dim;
    float s = 0.f;
    for (int64_t e = 0; e < head_dim; ++e) s += qt[e] * kj[e];
    const float pj = expf(s * scale - mx);
    sum += pj;
    const float* vj = gate_v + j * width + h * head_dim;
    for (int64_t e = 0; e < head_dim; ++e) atomicAdd(&acc[e], pj * vj[e]);
  }
  sum = BlockReduce(sum, false, reduce);
  __syncthreads();
  for (int64_t e = threadIdx.x; e < head_dim; e += blockDim.x) {
    o[t * width + h * head_dim + e] = acc[e] / sum;
  }
}

// Expected Attention, stage 1: s[g, j] = mu_g . k_j * scale + k_j^T cov_g k_j / (2 d) for
// j in [skip, len), one thread per (g, j).
__global__ void ExpectedScoresKernel(const void* k, DType dtype, int64_t len, int64_t head_dim,
                                     int64_t skip, const float* mu, const float* cov, int64_t group,
                                     float scale, float* s) {  // s: [group, len]
  const int64_t span = len - skip;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < group * span;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t g = i / span, j = skip + i % span;
    const float* m = mu + g * head_dim;
    float lin = 0.f, quad = 0.f;
    for (int64_t a = 0; a < head_dim; ++a) {
      const float ka = LoadAsFloat(k, dtype, j * head_dim + a);
      lin += m[a] * ka;
      if (cov != nullptr) {
        const float* c = cov + (g * head_dim + a) * head_dim;
        float row = 0.f;
        for (int64_t b = 0; b < head_dim; ++b)
          row += c[b] * LoadAsFloat(k, dtype, j * head_dim + b);
        quad += ka * row;
      }
    }
    s[g * len + j] = lin * scale + quad / (2.f * static_cast<float>(head_dim));
  }
}

// Stage 2, one block per g: stats[2 g] = max over j of s[g, j], stats[2 g + 1] = the sum of
// exp(s - max).
__global__ void ExpectedSoftmaxStatsKernel(const float* s, int64_t len, int64_t skip,
                                           float* stats) {
  __shared__ float reduce[32];
  const float* sg = s + blockIdx.x * len;
  float mx = -INFINITY;
  for (int64_t j = skip + threadIdx.x; j < len; j += blockDim.x) mx = fmaxf(mx, sg[j]);
  mx = BlockReduce(mx, true, reduce);
  float sum = 0.f;
  for (int64_t j = skip + threadIdx.x; j < len; j += blockDim.x) sum += expf(sg[j] - mx);
  sum = BlockReduce(sum, false, reduce);
  if (threadIdx.x == 0) {
    stats[2 * blockIdx.x] = mx;
    stats[2 * blockIdx.x + 1] = sum;
  }
}

// Stage 3: out[j] = mean over g of softmax_g[j], times ||v_j|| (0 for the skipped rows).
__global__ void ExpectedCombineKernel(const float* s, const float* stats, const void* v,
                                      DType dtype, int64_t len, int64_t head_dim, int64_t skip,
                                      int64_t group, float* out) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < len;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (j < skip) {
      out[j] = 0.f;
      continue;
    }
    float p = 0.f;
    for (int64_t g = 0; g < group; ++g) {
      p += expf(s[g * len + j] - stats[2 * g]) / stats[2 * g + 1] / static_cast<float>(group);
    }
    float norm = 0.f;
    for (int64_t e = 0; e < head_dim; ++e) {
      const float x = LoadAsFloat(v, dtype, j * head_dim + e);
      norm += x * x;
    }
    out[j] = p * sqrtf(norm);
  }
}

}  // namespace

absl::Status ExpectedAttention(const void* k, const void* v, DType dtype, int64_t len,
                               int64_t head_dim, int64_t skip, const float* mu, const float* cov,
                               int64_t group, float* scratch, float* out, cudaStream_t stream) {
  if (len <= 0) return absl::OkStatus();
  float* s = scratch;                    // [group, len]
  float* stats = scratch + group * len;  // [group, 2]
  if (skip < len) {
    const float scale = 1.0f / sqrtf(static_cast<float>(head_dim));
    ExpectedScoresKernel<<<Blocks(group * (len - skip)), kThreads, 0, stream>>>(
        k, dtype, len, head_dim, skip, mu, cov, group, scale, s);
    KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    ExpectedSoftmaxStatsKernel<<<static_cast<unsigned>(group), kThreads, 0, stream>>>(s, len, skip,
                                                                                      stats);
    KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  ExpectedCombineKernel<<<Blocks(len), kThreads, 0, stream>>>(s, stats, v, dtype, len, head_dim,
                                                              skip, group, out);
  KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

absl::Status LocretScore(Gemm& gemm, const float* q, const float* k, const float* v, int64_t n,
                         int64_t q_dim, int64_t kv_dim, const float* fc1, const float* fc2,
                         int64_t d_r, int64_t num_kv_heads, float* scratch, float* out) {
  if (n == 0) return absl::OkStatus();
  const int64_t d_in = q_dim + 2 * kv_dim;
  float* x = scratch;                  // [n, d_in]
  float* hidden = scratch + n * d_in;  // [n, d_r]
  cudaStream_t stream = gemm.stream();
  ConcatQkvKernel<<<Blocks(n * d_in), kThreads, 0, stream>>>(q, k, v, n, q_dim, kv_dim, x);
  KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  if (absl::Status s = gemm.MatMul(x, n, fc1, DType::kF32, d_r, d_in, nullptr, DType::kF32, hidden);
      !s.ok()) {
    return s;
  }
  SiluKernel<<<Blocks(n * d_r), kThreads, 0, stream>>>(hidden, n * d_r);
  KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return gemm.MatMul(hidden, n, fc2, DType::kF32, num_kv_heads, d_r, nullptr, DType::kF32, out);
}

absl::Status GateProbabilities(Gemm& gemm, const float* x, int64_t n, int64_t hidden_size,
                               const float* wq, const float* wk, const float* wv, const float* wo,
                               const float* bo, int64_t heads, int64_t head_dim,
                               int64_t num_kv_heads, float* gate_k, float* gate_v, int64_t past,
                               float* scratch, float* p) {
  if (n == 0) return absl::OkStatus();
  if (head_dim > 256) return absl::InvalidArgumentError("gate head_dim above 256");
  const int64_t width = heads * head_dim;
  float* q = scratch;              // [n, width]
  float* o = scratch + n * width;  // [n, width]
  cudaStream_t stream = gemm.stream();
  if (absl::Status s =
          gemm.MatMul(x, n, wq, DType::kF32, width, hidden_size, nullptr, DType::kF32, q);
      !s.ok()) {
    return s;
  }
  // The new tokens' keys and values go straight after the `past` rows of the caches.
  if (absl::Status s = gemm.MatMul(x, n, wk, DType::kF32, width, hidden_size, nullptr, DType::kF32,
                                   gate_k + past * width);
      !s.ok()) {
    return s;
  }
  if (absl::Status s = gemm.MatMul(x, n, wv, DType::kF32, width, hidden_size, nullptr, DType::kF32,
                                   gate_v + past * width);
      !s.ok()) {
    return s;
  }
  const float scale = 1.0f / sqrtf(static_cast<float>(head_dim));
  GateAttentionKernel<<<static_cast<unsigned>(n * heads), 128, 0, stream>>>(
      q, gate_k, gate_v, past, heads, head_dim, scale, o);
  KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  if (absl::Status s =
          gemm.MatMul(o, n, wo, DType::kF32, num_kv_heads, width, nullptr, DType::kF32, p);
      !s.ok()) {
    return s;
  }
  BiasSigmoidKernel<<<Blocks(n * num_kv_heads), kThreads, 0, stream>>>(p, bo, n, num_kv_heads);
  KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace kvgate::kernels::cuda
