// Matrix-vector product of one decode row with a weight [rows, cols] (the step's projections):
//
//   expanse_gemv_*:          y[r] = round(sum_c x[c] * w[r, c])
//   expanse_gemv_silu_mul_*: w stacks gate and up ([2n, cols]); for r < n
//                            y[r] = round(round(silu(round(gate_r))) * round(up_r))
//                            (the reference's roundings: projections in the model dtype, SiLU in f32,
//                            the product in the model dtype)
//
// One warp per output row, 16-byte loads of weight and input (8 bf16/f16 or 4 f32 per lane and
// step), f32 accumulation, one rounding per output. Rows whose length or address does not allow
// 16-byte loads take the scalar loop. Block: GEMV_WARPS warps = GEMV_WARPS rows.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ float dot_row(const T* __restrict__ w, const T* __restrict__ x, int cols,
                                         int lane) {
  constexpr int N = 16 / sizeof(T);
  float acc = 0.0f;
  const bool vec = (cols % N == 0) &&
                   (((reinterpret_cast<uintptr_t>(w) | reinterpret_cast<uintptr_t>(x)) & 15) == 0);
  if (vec) {
    const uint4* w4 = reinterpret_cast<const uint4*>(w);
    const uint4* x4 = reinterpret_cast<const uint4*>(x);
    const int n4 = cols / N;
#pragma unroll 4
    for (int i = lane; i < n4; i += 32) {
      const uint4 wv = __ldg(w4 + i);
      const uint4 xv = x4[i];
      const T* wt = reinterpret_cast<const T*>(&wv);
      const T* xt = reinterpret_cast<const T*>(&xv);
#pragma unroll
      for (int k = 0; k < N; ++k) acc = fmaf(to_f32(wt[k]), to_f32(xt[k]), acc);
    }
  } else {
    for (int i = lane; i < cols; i += 32) acc = fmaf(to_f32(w[i]), to_f32(x[i]), acc);
  }
  return warp_sum(acc);
}

template <typename T>
__device__ __forceinline__ void gemv_impl(const T* __restrict__ w, const T* __restrict__ x,
                                          T* __restrict__ y, int rows, int cols) {
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;  // the whole warp leaves together
  const float s = dot_row(w + (size_t)row * cols, x, cols, threadIdx.x & 31);
  if ((threadIdx.x & 31) == 0) y[row] = from_f32<T>(s);
}

template <typename T>
__device__ __forceinline__ void gemv_silu_mul_impl(const T* __restrict__ w, const T* __restrict__ x,
                                                   T* __restrict__ y, int n, int cols) {
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= n) return;
  const int lane = threadIdx.x & 31;
  const float g = dot_row(w + (size_t)row * cols, x, cols, lane);
  const float u = dot_row(w + (size_t)(row + n) * cols, x, cols, lane);
  if (lane == 0) {
    const float gr = rnd<T>(g);
    const float silu = __fdiv_rn(gr, __fadd_rn(1.0f, expf(-gr)));
    y[row] = from_f32<T>(__fmul_rn(rnd<T>(silu), rnd<T>(u)));
  }
}

#define GEMV(NAME, T)                                                                    \
  extern "C" __global__ void NAME(const T* w, const T* x, T* y, int rows, int cols) {   \
    gemv_impl<T>(w, x, y, rows, cols);                                                   \
  }
#define GEMV_SILU_MUL(NAME, T)                                                           \
  extern "C" __global__ void NAME(const T* w, const T* x, T* y, int n, int cols) {      \
    gemv_silu_mul_impl<T>(w, x, y, n, cols);                                             \
  }

GEMV(expanse_gemv_f32, float)
GEMV(expanse_gemv_bf16, bf16)
GEMV(expanse_gemv_f16, f16)
GEMV_SILU_MUL(expanse_gemv_silu_mul_f32, float)
GEMV_SILU_MUL(expanse_gemv_silu_mul_bf16, bf16)
GEMV_SILU_MUL(expanse_gemv_silu_mul_f16, f16)
