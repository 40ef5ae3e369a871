// Single-query (decode) grouped-query attention over a KV cache, read in place, split over the
// sequence ("flash decoding") with the splits' combine fused into the same launch.
//
//   q   [B, H,   1,   D]  (strides q_sb, q_sh; last dim contiguous)
//   k,v [B, KVH, cap, D]  (strides *_sb, *_sh, *_ss; last dim contiguous)
//   out [B, H,   1,   D]  contiguous
//
// Query head h uses kv head h / (H / KVH). The query sits at position kv_len - 1, where
// kv_len = state[STATE_POS] + 1 when `state` is given (the decode step: one captured graph serves
// every position; row b's state at state + b * STATE_WORDS, its cache the batch index
// state[STATE_SLOT] of k and v, a slot of the step's pool) and kv_len_host otherwise (cache b). Keys j in [kv_start, kv_len) are attended, kv_start =
// max(0, kv_len - window) with a sliding window (window > 0), else 0 (Hugging Face semantics).
// Scores s_j = (q . k_j) * scale in f32, softmax in f32 (online, max subtracted),
// out = sum_j p_j v_j / sum_j p_j, rounded once to T.
//
// Shaped for the bandwidth limit (the cache is read once per token; the arithmetic is small):
// - Grid (KVH * ceil(G / GMAX), n_splits, B), G = H / KVH: a block serves up to GMAX query heads
//   of one kv head, so each K and V row is read once for the whole group, not once per head.
// - A key row is read by LK lanes, VPL 16-byte vectors each (D = 128 bf16: 8 lanes, 2 vectors), so
//   a warp holds KG = 32 / LK keys per load and KW = 2 KG keys per tile (8 at D = 128 bf16). Each
//   lane issues the tile's K and V loads together, and the next tile's before it computes this
//   one (register double buffering), so 8 loads of 16 bytes per lane are in flight while it works.
// - The softmax max is taken once per tile for the whole warp, so the lane groups of a warp share
//   one scale and merge by plain addition; warps merge in shared memory.
// - The attended keys are cut into n_splits chunks of ceil(n_keys / n_splits) (the last ones
//   possibly empty, as the split count is fixed when a graph is captured). With n_splits == 1 the
//   block writes the output. Otherwise it writes (acc[D], m, l) per head to `partial`
//   [B, H, n_splits, D + 2], and the last block of its head group to finish (a counter per group,
//   counters [B, gridDim.x], zero before the launch and reset by that block) merges the splits and
//   writes the output: no separate combine launch.
// Rows whose strides or addresses do not allow 16-byte loads, or whose head_dim is not a multiple
// of the vector, take the same loop with element loads.
#include "common.cuh"
#include <math_constants.h>

#define NW 4    // warps per block
#define GMAX 4  // query heads per block
#define VPL 2   // 16-byte vectors per lane and key row
#define KPG 2   // keys per lane group and tile

template <typename T, int D>
struct Shape {
  static constexpr int E = 16 / (int)sizeof(T);  // elements per vector
  static constexpr int LK = D / (E * VPL);       // lanes per key row
  static constexpr int KG = 32 / LK;             // keys per warp and load
  static constexpr int KW = KG * KPG;            // keys per warp and tile
  static constexpr int PER = VPL * E;            // elements of a row per lane
  static constexpr int OUTS = GMAX * D / (NW * 32);  // merged outputs per thread
  static_assert(LK >= 1 && LK <= 32 && 32 % LK == 0, "bad lane split");
  static_assert(OUTS * NW * 32 == GMAX * D, "bad output split");
};

// Vector `vi` (elements vi*E ..) of a row: 16 bytes, or element by element (zero past head_dim).
template <typename T, bool VEC>
__device__ __forceinline__ uint4 load_vec(const T* row, int vi, int head_dim, bool valid) {
  constexpr int E = 16 / (int)sizeof(T);
  uint4 r = make_uint4(0u, 0u, 0u, 0u);
  if (!valid) return r;
  if (VEC) return ld_stream(reinterpret_cast<const uint4*>(row + vi * E));
  T* t = reinterpret_cast<T*>(&r);
#pragma unroll
  for (int e = 0; e < E; ++e) t[e] = vi * E + e < head_dim ? row[vi * E + e] : from_f32<T>(0.0f);
  return r;
}

template <typename T>
__device__ __forceinline__ float elem(const uint4& v, int e) {
  return to_f32(reinterpret_cast<const T*>(&v)[e]);
}

template <typename T, int D, bool VEC>
__device__ __forceinline__ void decode_attn_impl(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,
    float* __restrict__ partial, unsigned* __restrict__ counters, int n_heads, int n_kv_heads,
    int head_dim, long long q_sb, long long q_sh, long long k_sb, long long k_sh, long long k_ss,
    long long v_sb, long long v_sh, long long v_ss, int kv_end, int cache_b, int window, float scale) {
  using S = Shape<T, D>;
  constexpr int E = S::E, LK = S::LK, KG = S::KG, KW = S::KW;
  __shared__ float sm_m[NW][GMAX];
  __shared__ float sm_l[NW][GMAX];
  __shared__ float sm_acc[NW][GMAX][D];
  __shared__ float sm_w[GMAX][32];
  __shared__ unsigned sm_last;

  const int group = n_heads / n_kv_heads;
  const int n_sub = (group + GMAX - 1) / GMAX;
  const int kvh = blockIdx.x / n_sub;
  const int h0 = kvh * group + (blockIdx.x % n_sub) * GMAX;
  const int g_act = min(GMAX, kvh * group + group - h0);
  const int split = blockIdx.y;
  const int n_splits = gridDim.y;
  const int b = blockIdx.z;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int kg = lane / LK;  // key of the warp's load this lane reads
  const int p = lane % LK;   // its place in the row: vectors p + LK * i

  const T* kp = k + cache_b * k_sb + kvh * k_sh;
  const T* vp = v + cache_b * v_sb + kvh * v_sh;

  // This lane's slice of each head's query, in f32 (zero for absent heads and past head_dim).
  float qr[GMAX][S::PER];
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    const T* qh = q + b * q_sb + (long long)(h0 + (g < g_act ? g : 0)) * q_sh;
#pragma unroll
    for (int i = 0; i < VPL; ++i)
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const int d = (p + LK * i) * E + e;
        qr[g][i * E + e] = g < g_act && d < head_dim ? to_f32(qh[d]) : 0.0f;
      }
  }

  const int kv_start = window > 0 ? max(0, kv_end - window) : 0;
  const int chunk = (kv_end - kv_start + n_splits - 1) / n_splits;
  const int j0 = min(kv_start + split * chunk, kv_end);
  const int j1 = min(j0 + chunk, kv_end);

  float m[GMAX], l[GMAX], acc[GMAX][S::PER];
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    m[g] = -CUDART_INF_F;
    l[g] = 0.0f;
#pragma unroll
    for (int x = 0; x < S::PER; ++x) acc[g][x] = 0.0f;
  }

  uint4 kb[KPG][VPL], vb[KPG][VPL];
  auto load = [&](int tile) {
#pragma unroll
    for (int i = 0; i < KPG; ++i) {
      const int j = tile + kg + KG * i;
      const bool ok = j < j1;
      const T* kr = kp + (long long)(ok ? j : 0) * k_ss;
      const T* vr = vp + (long long)(ok ? j : 0) * v_ss;
#pragma unroll
      for (int x = 0; x < VPL; ++x) {
        const int vi = p + LK * x;
        kb[i][x] = load_vec<T, VEC>(kr, vi, head_dim, ok && vi * E < head_dim);
        vb[i][x] = load_vec<T, VEC>(vr, vi, head_dim, ok && vi * E < head_dim);
      }
    }
  };

  // Tiles of KW keys per warp, warps interleaved; the loop is uniform in the warp (its shuffles
  // need every lane), the keys past j1 of a tile masked.
  int tile = j0 + warp * KW;
  if (tile < j1) load(tile);
#pragma unroll 1
  while (tile < j1) {
    uint4 kc[KPG][VPL], vc[KPG][VPL];
#pragma unroll
    for (int i = 0; i < KPG; ++i)
#pragma unroll
      for (int x = 0; x < VPL; ++x) {
        kc[i][x] = kb[i][x];
        vc[i][x] = vb[i][x];
      }
    const int cur = tile;
    tile += NW * KW;
    if (tile < j1) load(tile);

    float s[KPG][GMAX];
#pragma unroll
    for (int i = 0; i < KPG; ++i)
#pragma unroll
      for (int g = 0; g < GMAX; ++g) {
        float part = 0.0f;
#pragma unroll
        for (int x = 0; x < VPL; ++x)
#pragma unroll
          for (int e = 0; e < E; ++e) part = fmaf(qr[g][x * E + e], elem<T>(kc[i][x], e), part);
#pragma unroll
        for (int off = LK / 2; off > 0; off >>= 1) part += __shfl_xor_sync(0xffffffffu, part, off);
        s[i][g] = cur + kg + KG * i < j1 ? part * scale : -CUDART_INF_F;
      }
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
      float mt = s[0][g];
#pragma unroll
      for (int i = 1; i < KPG; ++i) mt = fmaxf(mt, s[i][g]);
#pragma unroll
      for (int off = LK; off < 32; off <<= 1) mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, off));
      // Finite: the tile's first key (lane group 0, i = 0) is attended.
      const float m_new = fmaxf(m[g], mt);
      const float corr = expf(m[g] - m_new);  // 0 on the first tile (m = -inf)
      float pi[KPG];
      float lt = 0.0f;
#pragma unroll
      for (int i = 0; i < KPG; ++i) {
        pi[i] = expf(s[i][g] - m_new);  // 0 for masked keys
        lt += pi[i];
      }
      l[g] = l[g] * corr + lt;
#pragma unroll
      for (int x = 0; x < VPL; ++x)
#pragma unroll
        for (int e = 0; e < E; ++e) {
          float a = acc[g][x * E + e] * corr;
#pragma unroll
          for (int i = 0; i < KPG; ++i) a = fmaf(pi[i], elem<T>(vc[i][x], e), a);
          acc[g][x * E + e] = a;
        }
      m[g] = m_new;
    }
  }

  // The warp's lane groups share m: their sums add up.
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
#pragma unroll
    for (int off = LK; off < 32; off <<= 1) {
      l[g] += __shfl_xor_sync(0xffffffffu, l[g], off);
#pragma unroll
      for (int x = 0; x < S::PER; ++x) acc[g][x] += __shfl_xor_sync(0xffffffffu, acc[g][x], off);
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
      sm_m[warp][g] = m[g];
      sm_l[warp][g] = l[g];
    }
  }
  if (kg == 0) {
#pragma unroll
    for (int g = 0; g < GMAX; ++g)
#pragma unroll
      for (int x = 0; x < VPL; ++x)
#pragma unroll
        for (int e = 0; e < E; ++e) sm_acc[warp][g][(p + LK * x) * E + e] = acc[g][x * E + e];
  }
  __syncthreads();

  // Merge the warps: output o = threadIdx.x + i * blockDim.x is head o / D, element o % D.
  const size_t bh0 = (size_t)b * n_heads + h0;
#pragma unroll
  for (int i = 0; i < S::OUTS; ++i) {
    const int o = threadIdx.x + i * NW * 32;
    const int g = o / D, d = o % D;
    if (g >= g_act || d >= head_dim) continue;
    float mb = -CUDART_INF_F;
#pragma unroll
    for (int w = 0; w < NW; ++w) mb = fmaxf(mb, sm_m[w][g]);
    float lb = 0.0f, a = 0.0f;
#pragma unroll
    for (int w = 0; w < NW; ++w) {
      const float wt = sm_m[w][g] == -CUDART_INF_F ? 0.0f : expf(sm_m[w][g] - mb);
      lb += wt * sm_l[w][g];
      a += wt * sm_acc[w][g][d];
    }
    if (n_splits == 1) {
      out[(bh0 + g) * head_dim + d] = from_f32<T>(a / lb);
    } else {
      float* pp = partial + ((bh0 + g) * n_splits + split) * (head_dim + 2);
      pp[d] = a;
      if (d == 0) {
        pp[head_dim] = mb;
        pp[head_dim + 1] = lb;
      }
    }
  }
  if (n_splits == 1) return;

  // Count this split in; the last block of the head group to arrive merges every split. Each
  // thread's fence orders its partial writes before the count (CUDA's "last block" pattern).
  __threadfence();
  __syncthreads();
  unsigned* counter = counters + (size_t)b * gridDim.x + blockIdx.x;
  if (threadIdx.x == 0) sm_last = atomicAdd(counter, 1u) == (unsigned)n_splits - 1;
  __syncthreads();
  if (!sm_last) return;
  __threadfence();

  // Per head: the largest split max and the weighted sum of l (warp g takes head g).
  __shared__ float sm_mb[GMAX], sm_lb[GMAX];
  for (int g = warp; g < GMAX; g += NW) {
    const float* ph = partial + (bh0 + (g < g_act ? g : 0)) * n_splits * (head_dim + 2);
    float mb = -CUDART_INF_F;
    for (int s = lane; s < n_splits; s += 32) mb = fmaxf(mb, __ldcg(ph + s * (head_dim + 2) + head_dim));
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) mb = fmaxf(mb, __shfl_xor_sync(0xffffffffu, mb, off));
    float lb = 0.0f;
    for (int s = lane; s < n_splits; s += 32) {
      const float ms = __ldcg(ph + s * (head_dim + 2) + head_dim);
      if (ms != -CUDART_INF_F) lb += expf(ms - mb) * __ldcg(ph + s * (head_dim + 2) + head_dim + 1);
    }
    lb = warp_sum(lb);
    if (lane == 0) {
      sm_mb[g] = mb;
      sm_lb[g] = lb;
    }
  }
  __syncthreads();
  float a[S::OUTS];
#pragma unroll
  for (int i = 0; i < S::OUTS; ++i) a[i] = 0.0f;
  for (int s0 = 0; s0 < n_splits; s0 += 32) {
    // The weights of 32 splits, once per head, then every output accumulates them.
    for (int t = threadIdx.x; t < GMAX * 32; t += NW * 32) {
      const int g = t / 32, s = s0 + t % 32;
      float wt = 0.0f;
      if (g < g_act && s < n_splits) {
        const float ms = __ldcg(partial + ((bh0 + g) * n_splits + s) * (head_dim + 2) + head_dim);
        wt = ms == -CUDART_INF_F ? 0.0f : expf(ms - sm_mb[g]);
      }
      sm_w[g][t % 32] = wt;
    }
    __syncthreads();
    const int n = min(32, n_splits - s0);
#pragma unroll
    for (int i = 0; i < S::OUTS; ++i) {
      const int o = threadIdx.x + i * NW * 32;
      const int g = o / D, d = o % D;
      if (g >= g_act || d >= head_dim) continue;
      const float* pd = partial + ((bh0 + g) * n_splits + s0) * (head_dim + 2) + d;
      for (int c = 0; c < n; ++c) a[i] += sm_w[g][c] * __ldcg(pd + (size_t)c * (head_dim + 2));
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < S::OUTS; ++i) {
    const int o = threadIdx.x + i * NW * 32;
    const int g = o / D, d = o % D;
    if (g < g_act && d < head_dim) out[(bh0 + g) * head_dim + d] = from_f32<T>(a[i] / sm_lb[g]);
  }
  if (threadIdx.x == 0) *counter = 0u;  // ready for the next launch (a graph replays this one)
}

template <typename T, int D>
__device__ __forceinline__ void decode_attn(
    const T* q, const T* k, const T* v, T* out, float* partial, unsigned* counters, int n_heads,
    int n_kv_heads, int head_dim, long long q_sb, long long q_sh, long long k_sb, long long k_sh,
    long long k_ss, long long v_sb, long long v_sh, long long v_ss, const unsigned* state,
    int kv_len_host, int window, float scale) {
  pdl_wait();
  pdl_launch_dependents();
  const unsigned* row = state ? state + blockIdx.z * STATE_WORDS : nullptr;
  const int kv_end = row ? (int)row[STATE_POS] + 1 : kv_len_host;
  const int cache_b = row ? (int)row[STATE_SLOT] : (int)blockIdx.z;
  constexpr long long E = 16 / (long long)sizeof(T);
  // Uniform over the launch: every row start 16-byte aligned and head_dim whole vectors.
  const bool vec = head_dim % E == 0 && ((reinterpret_cast<uintptr_t>(k) | reinterpret_cast<uintptr_t>(v)) & 15) == 0 &&
                   (k_sb | k_sh | k_ss | v_sb | v_sh | v_ss) % E == 0;
  if (vec) {
    decode_attn_impl<T, D, true>(q, k, v, out, partial, counters, n_heads, n_kv_heads, head_dim, q_sb,
                                 q_sh, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss, kv_end, cache_b, window, scale);
  } else {
    decode_attn_impl<T, D, false>(q, k, v, out, partial, counters, n_heads, n_kv_heads, head_dim, q_sb,
                                  q_sh, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss, kv_end, cache_b, window, scale);
  }
}

#define DECODE_ATTN(NAME, T, D)                                                                   \
  extern "C" __global__ void __launch_bounds__(NW * 32)                                          \
      NAME(const T* q, const T* k, const T* v, T* out, float* partial, unsigned* counters,        \
           int n_heads, int n_kv_heads, int head_dim, long long q_sb, long long q_sh,             \
           long long k_sb, long long k_sh, long long k_ss, long long v_sb, long long v_sh,        \
           long long v_ss, const unsigned* state, int kv_len_host, int window, float scale) {     \
    decode_attn<T, D>(q, k, v, out, partial, counters, n_heads, n_kv_heads, head_dim, q_sb, q_sh, \
                      k_sb, k_sh, k_ss, v_sb, v_sh, v_ss, state, kv_len_host, window, scale);     \
  }

// d64 handles head_dim <= 64, d128 <= 128, d256 <= 256.
DECODE_ATTN(expanse_decode_attn_f32_d64, float, 64)
DECODE_ATTN(expanse_decode_attn_f32_d128, float, 128)
DECODE_ATTN(expanse_decode_attn_f32_d256, float, 256)
DECODE_ATTN(expanse_decode_attn_bf16_d64, bf16, 64)
DECODE_ATTN(expanse_decode_attn_bf16_d128, bf16, 128)
DECODE_ATTN(expanse_decode_attn_bf16_d256, bf16, 256)
DECODE_ATTN(expanse_decode_attn_f16_d64, f16, 64)
DECODE_ATTN(expanse_decode_attn_f16_d128, f16, 128)
DECODE_ATTN(expanse_decode_attn_f16_d256, f16, 256)
