// Greedy choice on the device: state[STATE_NEXT] = the first index of the largest logit (candle's
// argmax rule, which the sampler's greedy mode uses; NaN never wins), so greedy decoding copies back
// one id instead of the logits. Logits [batch, n]: row b in block b of 1024 threads, its id in the
// row's state (state + b * STATE_WORDS).
#include "common.cuh"
#include <math_constants.h>

__device__ __forceinline__ void better(float& v, int& i, float v2, int i2) {
  if (v2 > v || (v2 == v && i2 < i)) {
    v = v2;
    i = i2;
  }
}

template <typename T>
__device__ __forceinline__ void argmax_impl(const T* __restrict__ x, int n, unsigned* __restrict__ state) {
  pdl_wait();
  pdl_launch_dependents();
  x += (size_t)blockIdx.x * n;
  state += blockIdx.x * STATE_WORDS;
  __shared__ float sv[32];
  __shared__ int si[32];
  float v = -CUDART_INF_F;
  int idx = 0x7fffffff;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float f = to_f32(x[i]);
    if (f > v) {  // ascending i: keeps this thread's first maximum
      v = f;
      idx = i;
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float v2 = __shfl_xor_sync(0xffffffffu, v, off);
    const int i2 = __shfl_xor_sync(0xffffffffu, idx, off);
    better(v, idx, v2, i2);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    sv[warp] = v;
    si[warp] = idx;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < (int)(blockDim.x >> 5); ++w) better(v, idx, sv[w], si[w]);
    state[STATE_NEXT] = idx == 0x7fffffff ? 0u : (unsigned)idx;
  }
}

#define ARGMAX(NAME, T)                                                                         \
  extern "C" __global__ void __launch_bounds__(1024) NAME(const T* x, int n, unsigned* state) { \
    argmax_impl<T>(x, n, state);                                                                \
  }

ARGMAX(expanse_argmax_f32, float)
ARGMAX(expanse_argmax_bf16, bf16)
ARGMAX(expanse_argmax_f16, f16)
