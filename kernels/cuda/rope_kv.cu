// Rotary embedding of each decode row's query and key at pos = state[STATE_POS], and the key/value
// write into the row's KV cache (the step's rope_kv op); row b (blockIdx.y) reads its state at
// state + b * STATE_WORDS:
//
//   qkv      [batch, q (n_heads*d) | k (n_kv*d) | v (n_kv*d)]   q and k rotated in place
//   cos, sin [max_pos, d/2]                              the model's tables (model dtype)
//   k_cache, v_cache [slots, n_kv, cap, d]               row pos of each head of slot state[STATE_SLOT]
//
// Rotate-half form; each product and the sum rounded to T, as candle's rope (and transformers) do in
// a half dtype. One thread per rotated pair or copied value.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void rope_kv_impl(T* __restrict__ qkv, const T* __restrict__ cos,
                                             const T* __restrict__ sin, T* __restrict__ k_cache,
                                             T* __restrict__ v_cache,
                                             const unsigned* __restrict__ state, int n_heads,
                                             int n_kv, int d, int cap) {
  pdl_wait();
  pdl_launch_dependents();
  state += blockIdx.y * STATE_WORDS;
  qkv += (size_t)blockIdx.y * (n_heads + 2 * n_kv) * d;
  const size_t slot = (size_t)state[STATE_SLOT] * n_kv * cap * d;
  k_cache += slot;
  v_cache += slot;
  const int pos = (int)state[STATE_POS];
  const int half = d / 2;
  const T* c = cos + (size_t)pos * half;
  const T* s = sin + (size_t)pos * half;
  const int pairs = (n_heads + n_kv) * half;
  const int total = pairs + n_kv * d;
  for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < total; t += gridDim.x * blockDim.x) {
    if (t < pairs) {
      const int head = t / half, i = t % half;
      T* hp = qkv + (size_t)head * d;
      const float x1 = to_f32(hp[i]), x2 = to_f32(hp[i + half]);
      const float cc = to_f32(c[i]), ss = to_f32(s[i]);
      const T o1 = from_f32<T>(__fsub_rn(rnd<T>(__fmul_rn(x1, cc)), rnd<T>(__fmul_rn(x2, ss))));
      const T o2 = from_f32<T>(__fadd_rn(rnd<T>(__fmul_rn(x1, ss)), rnd<T>(__fmul_rn(x2, cc))));
      hp[i] = o1;
      hp[i + half] = o2;
      if (head >= n_heads) {
        T* row = k_cache + ((size_t)(head - n_heads) * cap + pos) * d;
        row[i] = o1;
        row[i + half] = o2;
      }
    } else {
      const int e = t - pairs, kh = e / d, i = e % d;
      v_cache[((size_t)kh * cap + pos) * d + i] = qkv[(size_t)(n_heads + n_kv) * d + e];
    }
  }
}

#define ROPE_KV(NAME, T)                                                                        \
  extern "C" __global__ void NAME(T* qkv, const T* cos, const T* sin, T* k_cache, T* v_cache,  \
                                  const unsigned* state, int n_heads, int n_kv, int d, int cap) { \
    rope_kv_impl<T>(qkv, cos, sin, k_cache, v_cache, state, n_heads, n_kv, d, cap);             \
  }

ROPE_KV(expanse_rope_kv_f32, float)
ROPE_KV(expanse_rope_kv_bf16, bf16)
ROPE_KV(expanse_rope_kv_f16, f16)
