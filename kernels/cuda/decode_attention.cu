// Single-query (decode) grouped-query attention over a KV cache, read in place.
//
//   q   [B, H,   1,   D]  (strides q_sb, q_sh; last dim contiguous)
//   k,v [B, KVH, cap, D]  (strides *_sb, *_sh, *_ss; last dim contiguous)
//   out [B, H,   1,   D]  contiguous
//
// Query head h uses kv head h / (H / KVH). The query sits at position kv_len - 1, where
// kv_len = state[STATE_POS] + 1 when `state` is given (the decode step: one captured graph serves
// every position) and kv_len_host otherwise. Keys j in [kv_start, kv_len) are attended, kv_start =
// max(0, kv_len - window) with a sliding window (window > 0), else 0 (Hugging Face semantics).
// Scores s_j = (q . k_j) * scale in f32, softmax in f32 (online, max
// subtracted), out = sum_j p_j v_j, rounded once to T.
//
// Split-KV ("flash decoding"): grid (H, n_splits, B); block of NW warps. The
// attended keys are cut into n_splits chunks of ceil(n_keys / n_splits) (the last ones possibly
// empty, as the split count is fixed when a graph is captured); each block handles one chunk;
// each warp takes every NW-th key of the chunk, lanes split the head dimension (lane + 32*i).
// Warps are merged in
// shared memory. With n_splits == 1 the block writes the final output;
// otherwise it writes (acc[D], m, l) to `partial` [B, H, n_splits, D + 2] and
// expanse_decode_attn_combine_* merges the splits.
#include "common.cuh"
#include <math_constants.h>

#define NW 4
#define MAX_D 256

template <typename T, int PER>
__device__ __forceinline__ void decode_attn_partial_impl(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,
    float* __restrict__ partial, int n_heads, int n_kv_heads, int head_dim, long long q_sb,
    long long q_sh, long long k_sb, long long k_sh, long long k_ss, long long v_sb, long long v_sh,
    long long v_ss, const unsigned* __restrict__ state, int kv_len_host, int window, float scale) {
  __shared__ float sm_m[NW];
  __shared__ float sm_l[NW];
  __shared__ float sm_acc[NW][PER * 32];

  const int h = blockIdx.x;
  const int split = blockIdx.y;
  const int n_splits = gridDim.y;
  const int b = blockIdx.z;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int group = n_heads / n_kv_heads;
  const int kvh = h / group;

  const T* qp = q + b * q_sb + h * q_sh;
  const T* kp = k + b * k_sb + kvh * k_sh;
  const T* vp = v + b * v_sb + kvh * v_sh;

  float qr[PER], acc[PER];
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int d = lane + 32 * i;
    qr[i] = d < head_dim ? to_f32(qp[d]) : 0.0f;
    acc[i] = 0.0f;
  }
  float m = -CUDART_INF_F;
  float l = 0.0f;

  const int kv_end = state ? (int)state[STATE_POS] + 1 : kv_len_host;
  const int kv_start = window > 0 ? max(0, kv_end - window) : 0;
  const int chunk = (kv_end - kv_start + n_splits - 1) / n_splits;
  const int j0 = min(kv_start + split * chunk, kv_end);
  const int j1 = min(j0 + chunk, kv_end);
  for (int j = j0 + warp; j < j1; j += NW) {
    const T* kr = kp + (long long)j * k_ss;
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      const int d = lane + 32 * i;
      if (d < head_dim) s += qr[i] * to_f32(kr[d]);
    }
    s = warp_sum(s) * scale;
    const float m_new = fmaxf(m, s);
    const float corr = expf(m - m_new);  // 0 on the first key (m = -inf)
    const float p = expf(s - m_new);
    l = l * corr + p;
    const T* vr = vp + (long long)j * v_ss;
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      const int d = lane + 32 * i;
      if (d < head_dim) acc[i] = acc[i] * corr + p * to_f32(vr[d]);
    }
    m = m_new;
  }

  if (lane == 0) {
    sm_m[warp] = m;
    sm_l[warp] = l;
  }
#pragma unroll
  for (int i = 0; i < PER; ++i) sm_acc[warp][lane + 32 * i] = acc[i];
  __syncthreads();

  float mb = -CUDART_INF_F;
#pragma unroll
  for (int w = 0; w < NW; ++w) mb = fmaxf(mb, sm_m[w]);
  float wts[NW];
  float lb = 0.0f;
#pragma unroll
  for (int w = 0; w < NW; ++w) {
    wts[w] = sm_m[w] == -CUDART_INF_F ? 0.0f : expf(sm_m[w] - mb);
    lb += wts[w] * sm_l[w];
  }

  const size_t bh = (size_t)b * n_heads + h;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float a = 0.0f;
#pragma unroll
    for (int w = 0; w < NW; ++w) a += wts[w] * sm_acc[w][d];
    if (n_splits == 1) {
      out[bh * head_dim + d] = from_f32<T>(a / lb);
    } else {
      partial[(bh * n_splits + split) * (head_dim + 2) + d] = a;
    }
  }
  if (n_splits > 1 && threadIdx.x == 0) {
    float* pp = partial + (bh * n_splits + split) * (head_dim + 2);
    pp[head_dim] = mb;
    pp[head_dim + 1] = lb;
  }
}

// grid (H, 1, B), block >= 32 threads (loops over D).
template <typename T>
__device__ __forceinline__ void decode_attn_combine_impl(const float* __restrict__ partial,
                                                         T* __restrict__ out, int n_heads,
                                                         int head_dim, int n_splits) {
  const int h = blockIdx.x;
  const int b = blockIdx.z;
  const size_t bh = (size_t)b * n_heads + h;
  const float* pp = partial + bh * n_splits * (head_dim + 2);
  float mb = -CUDART_INF_F;
  for (int s = 0; s < n_splits; ++s) mb = fmaxf(mb, pp[s * (head_dim + 2) + head_dim]);
  float lb = 0.0f;
  for (int s = 0; s < n_splits; ++s) {
    const float ms = pp[s * (head_dim + 2) + head_dim];
    const float wt = ms == -CUDART_INF_F ? 0.0f : expf(ms - mb);
    lb += wt * pp[s * (head_dim + 2) + head_dim + 1];
  }
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float a = 0.0f;
    for (int s = 0; s < n_splits; ++s) {
      const float ms = pp[s * (head_dim + 2) + head_dim];
      const float wt = ms == -CUDART_INF_F ? 0.0f : expf(ms - mb);
      a += wt * pp[s * (head_dim + 2) + d];
    }
    out[bh * head_dim + d] = from_f32<T>(a / lb);
  }
}

#define DECODE_ATTN_PARTIAL(NAME, T, PER)                                                        \
  extern "C" __global__ void __launch_bounds__(NW * 32)                                         \
      NAME(const T* q, const T* k, const T* v, T* out, float* partial, int n_heads,              \
           int n_kv_heads, int head_dim, long long q_sb, long long q_sh, long long k_sb,         \
           long long k_sh, long long k_ss, long long v_sb, long long v_sh, long long v_ss,       \
           const unsigned* state, int kv_len_host, int window, float scale) {                    \
    decode_attn_partial_impl<T, PER>(q, k, v, out, partial, n_heads, n_kv_heads, head_dim, q_sb, \
                                     q_sh, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss, state,            \
                                     kv_len_host, window, scale);                                \
  }

#define DECODE_ATTN_COMBINE(NAME, T)                                                             \
  extern "C" __global__ void NAME(const float* partial, T* out, int n_heads, int head_dim,        \
                                  int n_splits) {                                                \
    decode_attn_combine_impl<T>(partial, out, n_heads, head_dim, n_splits);                      \
  }

// PER = ceil(D / 32): d64 handles D <= 64, d128 D <= 128, d256 D <= 256.
DECODE_ATTN_PARTIAL(expanse_decode_attn_f32_d64, float, 2)
DECODE_ATTN_PARTIAL(expanse_decode_attn_f32_d128, float, 4)
DECODE_ATTN_PARTIAL(expanse_decode_attn_f32_d256, float, 8)
DECODE_ATTN_PARTIAL(expanse_decode_attn_bf16_d64, bf16, 2)
DECODE_ATTN_PARTIAL(expanse_decode_attn_bf16_d128, bf16, 4)
DECODE_ATTN_PARTIAL(expanse_decode_attn_bf16_d256, bf16, 8)
DECODE_ATTN_PARTIAL(expanse_decode_attn_f16_d64, f16, 2)
DECODE_ATTN_PARTIAL(expanse_decode_attn_f16_d128, f16, 4)
DECODE_ATTN_PARTIAL(expanse_decode_attn_f16_d256, f16, 8)

DECODE_ATTN_COMBINE(expanse_decode_attn_combine_f32, float)
DECODE_ATTN_COMBINE(expanse_decode_attn_combine_bf16, bf16)
DECODE_ATTN_COMBINE(expanse_decode_attn_combine_f16, f16)
