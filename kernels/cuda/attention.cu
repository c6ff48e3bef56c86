// Attention over ragged per-head retained KV (see ops.h Attention for the contract).
//
// Design (one kernel for prefill and decode, plus a split reduction and the mass side output):
//  * Rows. For KV head g the query rows are the pairs (token i, query head of g's group),
//    flattened as r = i * group + hh, so the group's query heads share every K/V tile load.
//  * AttentionKernel<D>: a block of 4 warps owns 16 consecutive rows of one KV head and one
//    chunk of its keys. It walks the keys in tiles of 32 (K and V staged in shared memory; K rows
//    padded to D + 1 floats so that lane = key reads are bank-conflict free; aligned rows load as
//    float4, all of a thread's loads of a tile issued before its stores). A warp owns rows
//    warp, warp + 4, ...: lane l scores key l of the tile, the warp keeps the flash-style
//    online softmax state (running max m, sum l, unnormalized output o with D / 32 elements per
//    lane) and accumulates P @ V with the probabilities broadcast by shuffles.
//  * Splits. When the row tiles alone cannot fill the GPU (always for decode, n == 1, and for
//    short prefills over long caches), the key range [0, max len) is cut into `splits` chunks
//    (blockIdx.z); each block writes its unnormalized (o, m, l) to the workspace and
//    CombineSplitsKernel merges them. With splits == 1 the kernel writes the output directly.
//  * Mass. AttentionMass needs the final probabilities, known only once a row's log-sum-exp
//    is: the attention kernels store lse per row and MassKernel<D> recomputes the scores of 32
//    keys per block against the queries [first_query, n) and sums exp(s - lse) over queries
//    and the group's heads in a fixed order (deterministic, no atomics).
//  * The per-head views (pointers, lengths, strides) travel as kernel arguments by value,
//    kMaxHeadsPerLaunch heads per launch, so the host never copies (or blocks) for them.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/cuda/cuda_check.h"
#include "kernels/cuda/ops.h"

namespace kvgate::kernels::cuda {
namespace {

constexpr int kRows = 16;  // query rows per block
constexpr int kKeys = 32;  // keys per tile (one per lane)
constexpr int kWarps = 4;  // warps per block
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = kRows / kWarps;
constexpr int64_t kMinChunk = 64;  // fewest keys per split
constexpr int kMaxHeadsPerLaunch = 64;
// Occupancy over registers: 4 blocks of 128 threads (<= 128 registers a thread) measured best
// on an H100 for decode (sm_90, d 128: 73% of the copy bandwidth at 128K keys against 64% with
// 182 registers and 2 blocks); holding the next tile in registers while computing this one
// (a register prefetch) was no faster once occupancy is counted. Larger head dims take 2
// (their shared memory allows no more than 2 or 3 blocks anyway).
constexpr int kMinBlocksPerSm = 4;

// The views of up to kMaxHeadsPerLaunch KV heads (2.5 KB of kernel arguments).
struct KvHeads {
  const float* k[kMaxHeadsPerLaunch];
  const float* v[kMaxHeadsPerLaunch];
  const uint8_t* visible[kMaxHeadsPerLaunch];
  int64_t len[kMaxHeadsPerLaunch];
  int64_t stride[kMaxHeadsPerLaunch];
};

struct AttnParams {
  const float* q;  // [n, num_heads, D]
  float* out;      // [n, num_heads, D]
  int64_t n;
  int64_t num_heads;
  int64_t group;
  int64_t window;
  float scale;
  int head_base;   // KV head of the launch's first view
  int64_t chunk;   // keys per split
  int splits;      // gridDim.z
  bool vec;        // K/V rows 16-byte aligned: float4 loads
  float* part_o;   // [splits, n * num_heads, D] when splits > 1
  float* part_ml;  // [splits, n * num_heads, 2] when splits > 1
  float* lse;      // [n * num_heads] or null
};

__device__ __forceinline__ float WarpMax(float v) {
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}
__device__ __forceinline__ float WarpSum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Whether query token i (its keys end at `end`, exclusive) may see key j.
__device__ __forceinline__ bool Visible(int64_t j, int64_t start, int64_t end, int64_t first_new,
                                        const uint8_t* visible) {
  if (j < start || j >= end) return false;
  if (visible != nullptr && j >= first_new && j < end - 1 && visible[j - first_new] == 0) {
    return false;
  }
  return true;
}

// Stages keys [kb, kb + kKeys) (zeros at and past `hi`) into ks (row stride D + 1) and vs.
template <int D>
__device__ __forceinline__ void LoadTile(const float* k, const float* v, int64_t stride, int64_t kb,
                                         int64_t hi, bool vec, float* ks, float* vs) {
  if (vec) {
    constexpr int kVecs = D / 4;
    for (int idx = threadIdx.x; idx < kKeys * kVecs; idx += blockDim.x) {
      const int j = idx / kVecs, e = (idx % kVecs) * 4;
      const int64_t key = kb + j;
      float4 kk = make_float4(0.f, 0.f, 0.f, 0.f), vv = kk;
      if (key < hi) {
        kk = __ldg(reinterpret_cast<const float4*>(k + key * stride + e));
        vv = __ldg(reinterpret_cast<const float4*>(v + key * stride + e));
      }
      float* kd = ks + j * (D + 1) + e;
      kd[0] = kk.x;
      kd[1] = kk.y;
      kd[2] = kk.z;
      kd[3] = kk.w;
      *reinterpret_cast<float4*>(vs + j * D + e) = vv;
    }
  } else {
    for (int idx = threadIdx.x; idx < kKeys * D; idx += blockDim.x) {
      const int j = idx / D, e = idx % D;
      const int64_t key = kb + j;
      ks[j * (D + 1) + e] = key < hi ? k[key * stride + e] : 0.f;
      vs[j * D + e] = key < hi ? v[key * stride + e] : 0.f;
    }
  }
}

// The vectorized tile load for D <= 128: every thread first issues all of its D / 16 float4
// loads of K and of V (kept in registers), then stores them, so a tile's loads are in flight
// together rather than one load-store pair at a time.
template <int D>
struct TileRegs {
  static constexpr int kVecs = D / 16;  // kKeys * D / 4 float4 over kThreads threads
  float4 k[kVecs];
  float4 v[kVecs];

  __device__ __forceinline__ void Fetch(const float* kp, const float* vp, int64_t stride,
                                        int64_t kb, int64_t hi) {
#pragma unroll
    for (int t = 0; t < kVecs; ++t) {
      const int idx = threadIdx.x + t * kThreads;
      const int j = idx / (D / 4), e = (idx % (D / 4)) * 4;
      const int64_t key = kb + j;
      k[t] = v[t] = make_float4(0.f, 0.f, 0.f, 0.f);
      if (key < hi) {
        k[t] = __ldg(reinterpret_cast<const float4*>(kp + key * stride + e));
        v[t] = __ldg(reinterpret_cast<const float4*>(vp + key * stride + e));
      }
    }
  }
  __device__ __forceinline__ void Store(float* ks, float* vs) const {
#pragma unroll
    for (int t = 0; t < kVecs; ++t) {
      const int idx = threadIdx.x + t * kThreads;
      const int j = idx / (D / 4), e = (idx % (D / 4)) * 4;
      float* kd = ks + j * (D + 1) + e;
      kd[0] = k[t].x;
      kd[1] = k[t].y;
      kd[2] = k[t].z;
      kd[3] = k[t].w;
      *reinterpret_cast<float4*>(vs + j * D + e) = v[t];
    }
  }
};

template <int D>
__global__ void __launch_bounds__(kThreads, D <= 128 ? kMinBlocksPerSm : 2)
    AttentionKernel(AttnParams p, KvHeads kv) {
  constexpr int kPerLane = (D + 31) / 32;
  extern __shared__ float smem[];
  float* qs = smem;                  // [kRows, D]
  float* ks = qs + kRows * D;        // [kKeys, D + 1]
  float* vs = ks + kKeys * (D + 1);  // [kKeys, D]

  const int hv = blockIdx.y;
  const int64_t g = p.head_base + hv;
  const int64_t len = kv.len[hv], stride = kv.stride[hv];
  const float* k = kv.k[hv];
  const float* v = kv.v[hv];
  const uint8_t* visible = kv.visible[hv];
  const int64_t n = p.n, group = p.group, num_heads = p.num_heads;
  const int64_t rows_total = n * group;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t row_end = min(row0 + kRows, rows_total);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t first_new = len - n;

  for (int idx = threadIdx.x; idx < kRows * D; idx += blockDim.x) {
    const int64_t row = row0 + idx / D;
    float val = 0.f;
    if (row < row_end) {
      const int64_t i = row / group, head = g * group + row % group;
      val = p.q[(i * num_heads + head) * D + idx % D];
    }
    qs[idx] = val;
  }

  // The keys any row of this block sees, cut to this block's chunk.
  const int64_t i_lo = row0 / group, i_hi = (row_end - 1) / group;
  int64_t hi = first_new + i_hi + 1;
  int64_t lo = p.window > 0 ? max(int64_t{0}, first_new + i_lo + 1 - p.window) : 0;
  const int64_t c_lo = static_cast<int64_t>(blockIdx.z) * p.chunk;
  lo = max(lo, c_lo);
  hi = min(hi, c_lo + p.chunk);

  // This warp's rows: warp + kWarps * t for t < active (a prefix of the kRowsPerWarp slots).
  int active = 0;
  int64_t start[kRowsPerWarp], end[kRowsPerWarp];
#pragma unroll
  for (int t = 0; t < kRowsPerWarp; ++t) {
    const int64_t row = row0 + warp + kWarps * t;
    if (row < row_end) active = t + 1;
    const int64_t i = row / group;
    end[t] = first_new + i + 1;
    start[t] = p.window > 0 ? max(int64_t{0}, end[t] - p.window) : 0;
  }
  float m[kRowsPerWarp], l[kRowsPerWarp], o[kRowsPerWarp][kPerLane];
#pragma unroll
  for (int t = 0; t < kRowsPerWarp; ++t) {
    m[t] = -INFINITY;
    l[t] = 0.f;
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) o[t][c] = 0.f;
  }

  for (int64_t kb = lo; kb < hi; kb += kKeys) {
    __syncthreads();  // the previous tile (and, the first time, nothing) is consumed
    if (D <= 128 && p.vec) {
      TileRegs<D <= 128 ? D : 16> tile;  // all of the tile's loads issued before any store
      tile.Fetch(k, v, stride, kb, hi);
      tile.Store(ks, vs);
    } else {
      LoadTile<D>(k, v, stride, kb, hi, p.vec, ks, vs);
    }
    __syncthreads();
    const int64_t j = kb + lane;
    float s[kRowsPerWarp];
#pragma unroll
    for (int t = 0; t < kRowsPerWarp; ++t) s[t] = 0.f;
    const float* kr = ks + lane * (D + 1);
#pragma unroll 4
    for (int e = 0; e < D; e += 4) {
      const float k0 = kr[e], k1 = kr[e + 1], k2 = kr[e + 2], k3 = kr[e + 3];
#pragma unroll
      for (int t = 0; t < kRowsPerWarp; ++t) {
        if (t < active) {
          const float4 qv = *reinterpret_cast<const float4*>(qs + (warp + kWarps * t) * D + e);
          s[t] += qv.x * k0;
          s[t] += qv.y * k1;
          s[t] += qv.z * k2;
          s[t] += qv.w * k3;
        }
      }
    }
    const int keys = static_cast<int>(min(static_cast<int64_t>(kKeys), hi - kb));
#pragma unroll
    for (int t = 0; t < kRowsPerWarp; ++t) {
      if (t >= active) continue;  // warp-uniform
      const bool ok = j < hi && Visible(j, start[t], end[t], first_new, visible);
      const float score = ok ? s[t] * p.scale : -INFINITY;
      const float new_m = fmaxf(m[t], WarpMax(score));
      if (new_m == -INFINITY) continue;  // nothing visible yet: warp-uniform
      const float prob = ok ? expf(score - new_m) : 0.f;
      const float corr = expf(m[t] - new_m);
      l[t] = l[t] * corr + WarpSum(prob);
      m[t] = new_m;
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) o[t][c] *= corr;
      for (int jj = 0; jj < keys; ++jj) {
        const float pj = __shfl_sync(0xffffffffu, prob, jj);
        const float* vr = vs + jj * D;
#pragma unroll
        for (int c = 0; c < kPerLane; ++c) {
          const int e = lane + 32 * c;
          if (e < D) o[t][c] += pj * vr[e];
        }
      }
    }
  }

  const int64_t nh = n * num_heads;
#pragma unroll
  for (int t = 0; t < kRowsPerWarp; ++t) {
    if (t >= active) continue;
    const int64_t row = row0 + warp + kWarps * t;
    const int64_t i = row / group, head = g * group + row % group;
    const int64_t row_id = i * num_heads + head;
    if (p.splits == 1) {
      const float inv = 1.0f / l[t];
      float* orow = p.out + row_id * D;
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) {
        const int e = lane + 32 * c;
        if (e < D) orow[e] = o[t][c] * inv;
      }
      if (p.lse != nullptr && lane == 0) p.lse[row_id] = m[t] + logf(l[t]);
    } else {
      const int64_t part = static_cast<int64_t>(blockIdx.z) * nh + row_id;
      float* orow = p.part_o + part * D;
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) {
        const int e = lane + 32 * c;
        if (e < D) orow[e] = o[t][c];
      }
      if (lane == 0) {
        p.part_ml[part * 2] = m[t];
        p.part_ml[part * 2 + 1] = l[t];
      }
    }
  }
}

// Deterministic block reductions (fixed shuffle tree, then warps in order); every thread gets
// the result. `red` is shared scratch of 32 floats.
__device__ float BlockReduce(float v, bool is_max, float* red) {
  for (int off = 16; off > 0; off >>= 1) {
    const float o = __shfl_xor_sync(0xffffffffu, v, off);
    v = is_max ? fmaxf(v, o) : v + o;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  __syncthreads();  // red may still be read by a previous reduction
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float r = red[0];
  for (int w = 1; w < warps; ++w) r = is_max ? fmaxf(r, red[w]) : r + red[w];
  return r;
}

constexpr int kCombineThreads = 128;

// One block per row (i, head): merges the splits' (o, m, l). The split weights
// exp(m_z - max) go to shared memory once; each thread then sums its output elements over the
// splits with independent loads.
__global__ void __launch_bounds__(kCombineThreads)
    CombineSplitsKernel(const float* __restrict__ part_o,   // [splits, nh, d]
                        const float* __restrict__ part_ml,  // [splits, nh, 2]
                        int splits, int64_t nh, int64_t d,
                        float* __restrict__ out,    // [nh, d]
                        float* __restrict__ lse) {  // [nh] or null
  extern __shared__ float weight[];                 // [splits]
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  float mx = -INFINITY;
  for (int z = threadIdx.x; z < splits; z += blockDim.x) {
    mx = fmaxf(mx, part_ml[(z * nh + row) * 2]);
  }
  mx = BlockReduce(mx, /*is_max=*/true, red);
  float sum = 0.f;
  for (int z = threadIdx.x; z < splits; z += blockDim.x) {
    const float mz = part_ml[(z * nh + row) * 2];
    const float w = mz == -INFINITY ? 0.f : expf(mz - mx);
    weight[z] = w;
    sum += part_ml[(z * nh + row) * 2 + 1] * w;
  }
  sum = BlockReduce(sum, /*is_max=*/false, red);  // its barriers also publish `weight`
  const float inv = 1.0f / sum;
  for (int64_t e = threadIdx.x; e < d; e += blockDim.x) {
    float acc = 0.f;
#pragma unroll 8
    for (int z = 0; z < splits; ++z) {
      const float w = weight[z];
      if (w != 0.f) acc += part_o[(z * nh + row) * d + e] * w;
    }
    out[row * d + e] = acc * inv;
  }
  if (lse != nullptr && threadIdx.x == 0) lse[row] = mx + logf(sum);
}

struct MassParams {
  const float* q;    // [n, num_heads, D]
  const float* lse;  // [n * num_heads]
  float* mass;       // [num_kv_heads, mass_stride]
  int64_t mass_stride;
  int64_t first_query;
  int64_t n;
  int64_t num_heads;
  int64_t group;
  int64_t window;
  float scale;
  int head_base;
};

// Block = 32 keys of one KV head (lane = key); warp w takes queries first_query + w, + 4, ...
// The four warps' sums are added in warp order.
template <int D>
__global__ void __launch_bounds__(kThreads) MassKernel(MassParams p, KvHeads kv) {
  extern __shared__ float smem[];
  float* ks = smem;                   // [kKeys, D + 1]
  float* red = ks + kKeys * (D + 1);  // [kWarps, kKeys]
  const int hv = blockIdx.y;
  const int64_t g = p.head_base + hv;
  const int64_t len = kv.len[hv], stride = kv.stride[hv];
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kKeys;
  if (j0 >= len) return;  // whole block: uniform
  const float* k = kv.k[hv];
  const uint8_t* visible = kv.visible[hv];
  for (int idx = threadIdx.x; idx < kKeys * D; idx += blockDim.x) {
    const int j = idx / D, e = idx % D;
    ks[j * (D + 1) + e] = j0 + j < len ? k[(j0 + j) * stride + e] : 0.f;
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t j = j0 + lane;
  const int64_t first_new = len - p.n;
  const float* kr = ks + lane * (D + 1);
  float acc = 0.f;
  for (int64_t i = p.first_query + warp; i < p.n; i += kWarps) {
    const int64_t end = first_new + i + 1;
    const int64_t start = p.window > 0 ? max(int64_t{0}, end - p.window) : 0;
    if (end <= j0 || start >= j0 + kKeys) continue;  // warp-uniform
    const bool ok = j < len && Visible(j, start, end, first_new, visible);
    for (int64_t hh = 0; hh < p.group; ++hh) {
      const int64_t row = i * p.num_heads + g * p.group + hh;
      const float* qr = p.q + row * D;
      float s = 0.f;
#pragma unroll 8
      for (int e = 0; e < D; ++e) s += __ldg(qr + e) * kr[e];
      const float lse = __ldg(p.lse + row);
      if (ok) acc += expf(s * p.scale - lse);
    }
  }
  red[warp * kKeys + lane] = acc;
  __syncthreads();
  if (warp == 0 && j < len) {
    float total = 0.f;
    for (int w = 0; w < kWarps; ++w) total += red[w * kKeys + lane];
    p.mass[g * p.mass_stride + j] = total;
  }
}

size_t AttentionSmemBytes(int64_t d) {
  return static_cast<size_t>(kRows * d + kKeys * (d + 1) + kKeys * d) * sizeof(float);
}
size_t MassSmemBytes(int64_t d) {
  return static_cast<size_t>(kKeys * (d + 1) + kWarps * kKeys) * sizeof(float);
}

// How the key range is split, and the workspace layout that follows from it.
struct Plan {
  int64_t splits = 1;
  int64_t chunk = 0;
  size_t lse_offset = 0, ml_offset = 0, o_offset = 0, bytes = 0;
};

size_t AlignUp(size_t x) { return (x + 255) / 256 * 256; }

Plan MakePlan(int64_t n, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t max_len,
              bool need_lse) {
  int device = 0, sms = 132;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    cudaGetLastError();
    sms = 132;
  }
  const int64_t group = num_heads / num_kv_heads;
  const int64_t row_tiles = (n * group + kRows - 1) / kRows;
  const int64_t blocks = row_tiles * num_kv_heads;
  const int64_t want = 4 * static_cast<int64_t>(sms);
  Plan plan;
  int64_t splits = blocks >= want ? 1 : (want + blocks - 1) / blocks;
  splits =
      std::clamp<int64_t>(splits, 1, std::max<int64_t>(1, (max_len + kMinChunk - 1) / kMinChunk));
  int64_t chunk = (std::max<int64_t>(max_len, 1) + splits - 1) / splits;
  chunk = (chunk + kKeys - 1) / kKeys * kKeys;
  plan.chunk = chunk;
  plan.splits = (std::max<int64_t>(max_len, 1) + chunk - 1) / chunk;
  const int64_t nh = n * num_heads;
  size_t off = 0;
  plan.lse_offset = off;
  if (need_lse) off += AlignUp(static_cast<size_t>(nh) * sizeof(float));
  plan.ml_offset = off;
  plan.o_offset = off;
  if (plan.splits > 1) {
    off += AlignUp(static_cast<size_t>(plan.splits * nh * 2) * sizeof(float));
    plan.o_offset = off;
    off += AlignUp(static_cast<size_t>(plan.splits * nh * head_dim) * sizeof(float));
  }
  plan.bytes = off;
  return plan;
}

template <int D>
cudaError_t LaunchAttention(const AttnParams& base, const KvHeadView* kv, int64_t num_kv_heads,
                            const MassParams* mass, cudaStream_t stream) {
  const size_t smem = AttentionSmemBytes(D);
  if (smem > 48 * 1024) {
    KVGATE_CUDA_TRY(cudaFuncSetAttribute(
        AttentionKernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  const int64_t row_tiles = (base.n * base.group + kRows - 1) / kRows;
  for (int64_t h0 = 0; h0 < num_kv_heads; h0 += kMaxHeadsPerLaunch) {
    const int count = static_cast<int>(std::min<int64_t>(kMaxHeadsPerLaunch, num_kv_heads - h0));
    KvHeads heads{};
    AttnParams p = base;
    p.head_base = static_cast<int>(h0);
    p.vec = true;
    for (int i = 0; i < count; ++i) {
      const KvHeadView& view = kv[h0 + i];
      heads.k[i] = static_cast<const float*>(view.k);  // float32 views (the backend widens)
      heads.v[i] = static_cast<const float*>(view.v);
      heads.visible[i] = view.new_visible;
      heads.len[i] = view.len;
      heads.stride[i] = view.stride;
      p.vec = p.vec && view.stride % 4 == 0 && reinterpret_cast<uintptr_t>(view.k) % 16 == 0 &&
              reinterpret_cast<uintptr_t>(view.v) % 16 == 0;
    }
    const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(count),
                    static_cast<unsigned>(base.splits));
    AttentionKernel<D><<<grid, kThreads, smem, stream>>>(p, heads);
    KVGATE_CUDA_TRY(cudaGetLastError());
  }
  const int64_t nh = base.n * base.num_heads;
  if (base.splits > 1) {
    CombineSplitsKernel<<<static_cast<unsigned>(nh), kCombineThreads,
                          static_cast<size_t>(base.splits) * sizeof(float), stream>>>(
        base.part_o, base.part_ml, base.splits, nh, D, base.out, base.lse);
    KVGATE_CUDA_TRY(cudaGetLastError());
  }
  if (mass == nullptr) return cudaSuccess;
  for (int64_t h0 = 0; h0 < num_kv_heads; h0 += kMaxHeadsPerLaunch) {
    const int count = static_cast<int>(std::min<int64_t>(kMaxHeadsPerLaunch, num_kv_heads - h0));
    KvHeads heads{};
    MassParams mp = *mass;
    mp.head_base = static_cast<int>(h0);
    int64_t max_len = 0;
    for (int i = 0; i < count; ++i) {
      const KvHeadView& view = kv[h0 + i];
      heads.k[i] = static_cast<const float*>(view.k);  // float32 views (the backend widens)
      heads.v[i] = static_cast<const float*>(view.v);
      heads.visible[i] = view.new_visible;
      heads.len[i] = view.len;
      heads.stride[i] = view.stride;
      max_len = std::max(max_len, view.len);
    }
    if (max_len == 0) continue;
    const dim3 grid(static_cast<unsigned>((max_len + kKeys - 1) / kKeys),
                    static_cast<unsigned>(count));
    MassKernel<D><<<grid, kThreads, MassSmemBytes(D), stream>>>(mp, heads);
    KVGATE_CUDA_TRY(cudaGetLastError());
  }
  return cudaSuccess;
}

// head_dim rounded up to the kernels' multiple of 16: a head_dim that is not one runs on
// zero-padded copies of q, K and V (zero columns add nothing to q.k; V's zero columns give
// output columns that are dropped), with the softmax scale of the real head_dim.
int64_t PaddedHeadDim(int64_t head_dim) { return (head_dim + 15) / 16 * 16; }

// The padded copies' place in the workspace, after the plan's buffers.
struct PadLayout {
  size_t q_offset = 0, out_offset = 0, kv_offset = 0, bytes = 0;
};

PadLayout MakePadLayout(size_t after, int64_t n, int64_t num_heads, int64_t num_kv_heads,
                        int64_t padded, int64_t max_len) {
  PadLayout pad;
  const size_t rows = static_cast<size_t>(n * num_heads * padded) * sizeof(float);
  pad.q_offset = AlignUp(after);
  pad.out_offset = pad.q_offset + AlignUp(rows);
  pad.kv_offset = pad.out_offset + AlignUp(rows);
  pad.bytes =
      pad.kv_offset + static_cast<size_t>(2 * num_kv_heads * max_len * padded) * sizeof(float);
  return pad;
}

}  // namespace

size_t AttentionWorkspaceBytes(int64_t n, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                               int64_t max_len) {
  if (n <= 0 || num_kv_heads <= 0) return 0;
  const int64_t padded = PaddedHeadDim(head_dim);
  const size_t plan =
      MakePlan(n, num_heads, num_kv_heads, padded, max_len, /*need_lse=*/true).bytes;
  if (padded == head_dim) return plan;
  return MakePadLayout(plan, n, num_heads, num_kv_heads, padded, max_len).bytes;
}

namespace {

// The kernels on a head_dim they take (a multiple of 16), with the plan for these shapes.
cudaError_t RunAttention(const float* q, int64_t n, int64_t num_heads, int64_t num_kv_heads,
                         int64_t head_dim, float scale, const KvHeadView* kv, int64_t window,
                         float* out, const AttentionMass* mass, const Plan& plan, char* ws,
                         cudaStream_t stream) {
  AttnParams p{};
  p.q = q;
  p.out = out;
  p.n = n;
  p.num_heads = num_heads;
  p.group = num_heads / num_kv_heads;
  p.window = window;
  p.scale = scale;
  p.chunk = plan.chunk;
  p.splits = static_cast<int>(plan.splits);
  p.part_ml = plan.splits > 1 ? reinterpret_cast<float*>(ws + plan.ml_offset) : nullptr;
  p.part_o = plan.splits > 1 ? reinterpret_cast<float*>(ws + plan.o_offset) : nullptr;
  p.lse = mass != nullptr ? reinterpret_cast<float*>(ws + plan.lse_offset) : nullptr;
  MassParams mp{};
  if (mass != nullptr) {
    mp.q = q;
    mp.lse = p.lse;
    mp.mass = mass->mass;
    mp.mass_stride = mass->stride;
    mp.first_query = std::max<int64_t>(0, mass->first_query);
    mp.n = n;
    mp.num_heads = num_heads;
    mp.group = p.group;
    mp.window = window;
    mp.scale = p.scale;
  }
  const MassParams* mpp = mass != nullptr ? &mp : nullptr;
  switch (head_dim) {
#define KVGATE_ATTENTION_CASE(D) \
  case D:                        \
    return LaunchAttention<D>(p, kv, num_kv_heads, mpp, stream);
    KVGATE_ATTENTION_CASE(16)
    KVGATE_ATTENTION_CASE(32)
    KVGATE_ATTENTION_CASE(48)
    KVGATE_ATTENTION_CASE(64)
    KVGATE_ATTENTION_CASE(80)
    KVGATE_ATTENTION_CASE(96)
    KVGATE_ATTENTION_CASE(112)
    KVGATE_ATTENTION_CASE(128)
    KVGATE_ATTENTION_CASE(144)
    KVGATE_ATTENTION_CASE(160)
    KVGATE_ATTENTION_CASE(176)
    KVGATE_ATTENTION_CASE(192)
    KVGATE_ATTENTION_CASE(208)
    KVGATE_ATTENTION_CASE(224)
    KVGATE_ATTENTION_CASE(240)
    KVGATE_ATTENTION_CASE(256)
#undef KVGATE_ATTENTION_CASE
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t Attention(const float* q, int64_t n, int64_t num_heads, int64_t num_kv_heads,
                      int64_t head_dim, const KvHeadView* kv, int64_t window, float* out,
                      const AttentionMass* mass, void* workspace, size_t workspace_bytes,
                      cudaStream_t stream) {
  if (n == 0 || num_kv_heads == 0) return cudaSuccess;
  if (head_dim <= 0 || head_dim > kMaxAttentionHeadDim || num_heads % num_kv_heads != 0) {
    return cudaErrorInvalidValue;
  }
  int64_t max_len = 0;
  for (int64_t g = 0; g < num_kv_heads; ++g) {
    if (kv[g].len < n) return cudaErrorInvalidValue;
    max_len = std::max(max_len, kv[g].len);
  }
  const int64_t padded = PaddedHeadDim(head_dim);
  const Plan plan = MakePlan(n, num_heads, num_kv_heads, padded, max_len, mass != nullptr);
  const PadLayout pad =
      padded == head_dim ? PadLayout{0, 0, 0, plan.bytes}
                         : MakePadLayout(plan.bytes, n, num_heads, num_kv_heads, padded, max_len);
  if (pad.bytes > workspace_bytes || (pad.bytes > 0 && workspace == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  if (padded == head_dim) {
    return RunAttention(q, n, num_heads, num_kv_heads, head_dim, scale, kv, window, out, mass, plan,
                        static_cast<char*>(workspace), stream);
  }
  // Zero-padded copies: q [n * num_heads, padded], each KV head's K and V [len, padded].
  char* ws = static_cast<char*>(workspace);
  const size_t row = static_cast<size_t>(head_dim) * sizeof(float);
  const size_t prow = static_cast<size_t>(padded) * sizeof(float);
  auto* q_pad = reinterpret_cast<float*>(ws + pad.q_offset);
  auto* out_pad = reinterpret_cast<float*>(ws + pad.out_offset);
  auto* kv_pad = reinterpret_cast<float*>(ws + pad.kv_offset);
  KVGATE_CUDA_TRY(cudaMemsetAsync(ws + pad.q_offset, 0, pad.bytes - pad.q_offset, stream));
  KVGATE_CUDA_TRY(cudaMemcpy2DAsync(q_pad, prow, q, row, row, static_cast<size_t>(n * num_heads),
                                    cudaMemcpyDeviceToDevice, stream));
  std::vector<KvHeadView> views(static_cast<size_t>(num_kv_heads));
  for (int64_t g = 0; g < num_kv_heads; ++g) {
    const KvHeadView& src = kv[g];
    float* k = kv_pad + 2 * g * max_len * padded;
    float* v = k + max_len * padded;
    const size_t stride = static_cast<size_t>(src.stride) * sizeof(float);
    if (src.len > 0) {
      KVGATE_CUDA_TRY(cudaMemcpy2DAsync(k, prow, src.k, stride, row, static_cast<size_t>(src.len),
                                        cudaMemcpyDeviceToDevice, stream));
      KVGATE_CUDA_TRY(cudaMemcpy2DAsync(v, prow, src.v, stride, row, static_cast<size_t>(src.len),
                                        cudaMemcpyDeviceToDevice, stream));
    }
    views[static_cast<size_t>(g)] = KvHeadView{k, v, src.len, padded, src.new_visible, DType::kF32};
  }
  KVGATE_CUDA_TRY(RunAttention(q_pad, n, num_heads, num_kv_heads, padded, scale, views.data(),
                               window, out_pad, mass, plan, ws, stream));
  return cudaMemcpy2DAsync(out, row, out_pad, prow, row, static_cast<size_t>(n * num_heads),
                           cudaMemcpyDeviceToDevice, stream);
}

}  // namespace kvgate::kernels::cuda
