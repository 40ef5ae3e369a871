// The residual update and RMSNorm of the decode rows (the step's norm ops), x, add and h [batch, cols],
// row b in block b with its state at state + b * STATE_WORDS:
//
//   x = table[state[STATE_TOKEN]]      if table != null   (embedding lookup: the first norm)
//   x = round(x + add)                 else if add != null (residual add of the last block output)
//   h = round(round(x * r) * w),       r = 1 / sqrt(sum(x^2) / cols + eps)
//
// The roundings are the reference's (transformers' too): x times rsqrt in f32, rounded to the model
// dtype, then the weight multiplied in that dtype. __f*_rn keeps nvcc from contracting them into FMAs.
// One block of 1024 threads per row; every thread re-reads only the x it wrote.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void residual_norm_impl(T* __restrict__ x, const T* __restrict__ add,
                                                   const T* __restrict__ table,
                                                   const unsigned* __restrict__ state,
                                                   const T* __restrict__ w, T* __restrict__ h,
                                                   int cols, float eps) {
  pdl_wait();
  pdl_launch_dependents();
  const size_t at = (size_t)blockIdx.x * cols;
  x += at;
  h += at;
  if (add) add += at;
  state += blockIdx.x * STATE_WORDS;
  const T* row = table ? table + (size_t)state[STATE_TOKEN] * cols : nullptr;
  float ss = 0.0f;
  for (int i = threadIdx.x; i < cols; i += blockDim.x) {
    T v = x[i];
    if (row) v = row[i];
    else if (add) v = from_f32<T>(__fadd_rn(to_f32(v), to_f32(add[i])));
    x[i] = v;
    const float f = to_f32(v);
    ss = __fadd_rn(ss, __fmul_rn(f, f));
  }
  ss = block_sum(ss);
  const float r = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(ss, (float)cols), eps)));
  for (int i = threadIdx.x; i < cols; i += blockDim.x) {
    h[i] = from_f32<T>(__fmul_rn(rnd<T>(__fmul_rn(to_f32(x[i]), r)), to_f32(w[i])));
  }
}

#define RESIDUAL_NORM(NAME, T)                                                                  \
  extern "C" __global__ void __launch_bounds__(1024)                                           \
      NAME(T* x, const T* add, const T* table, const unsigned* state, const T* w, T* h, int cols, \
           float eps) {                                                                         \
    residual_norm_impl<T>(x, add, table, state, w, h, cols, eps);                               \
  }

RESIDUAL_NORM(expanse_residual_norm_f32, float)
RESIDUAL_NORM(expanse_residual_norm_bf16, bf16)
RESIDUAL_NORM(expanse_residual_norm_f16, f16)
