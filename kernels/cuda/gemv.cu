// Matrix-vector product of one decode row with a weight [rows, cols] (the step's projections):
//
//   expanse_gemv_*:          y[r] = round(sum_c x[c] * w[r, c])
//   expanse_gemv_silu_mul_*: w stacks gate and up ([2n, cols]); for r < n
//                            y[r] = round(round(silu(round(gate_r))) * round(up_r))
//                            (the reference's roundings: projections in the model dtype, SiLU in f32,
//                            the product in the model dtype)
//
// Decode is bound by the bytes of the weights, so the loop is shaped for memory-level parallelism:
// one warp per output row (gate and up rows together in the SwiGLU variant), 16-byte loads, and
// GEMV_UNROLL loads of each row issued per lane before the first FMA consumes one (otherwise each
// load waits out the full HBM latency alone and only occupancy hides it; scripts/kernel-audit.sh
// checks the SASS). Weights stream past L1 (ld_stream); x, which every warp re-reads, stays cached.
// Each lane keeps GEMV_UNROLL f32 partial sums per row (one per load of the batch), adds them in
// order at the end, then the warp reduces: a summation order of its own, within the tests' f32
// tolerance of the CPU's.
// Rows whose length or address does not allow 16-byte loads take the scalar loop.
// Block: GEMV_WARPS warps = GEMV_WARPS rows (src/kernels/launch.rs).
#include "common.cuh"

// 16-byte loads of each weight row in flight per lane.
#define GEMV_UNROLL 4

template <typename T>
__device__ __forceinline__ float fma16(const uint4& w, const uint4& x, float acc) {
  const T* wt = reinterpret_cast<const T*>(&w);
  const T* xt = reinterpret_cast<const T*>(&x);
#pragma unroll
  for (int k = 0; k < (int)(16 / sizeof(T)); ++k) acc = fmaf(to_f32(wt[k]), to_f32(xt[k]), acc);
  return acc;
}

// out[r] = sum_c w[r][c] * x[c] for R rows sharing x, every lane of the warp holding the result.
template <typename T, int R>
__device__ __forceinline__ void dot_rows(const T* const (&w)[R], const T* __restrict__ x, int cols,
                                         int lane, float (&out)[R]) {
  constexpr int N = 16 / sizeof(T);
  constexpr int U = GEMV_UNROLL;
  // One accumulator per row and unrolled load: U independent FMA chains, so that ptxas, which
  // places a load as late as the chain that consumes it allows, issues all U loads up front.
  float acc[R][U];
  uintptr_t addr = reinterpret_cast<uintptr_t>(x);
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int u = 0; u < U; ++u) acc[r][u] = 0.0f;
    addr |= reinterpret_cast<uintptr_t>(w[r]);
  }
  if (cols % N == 0 && (addr & 15) == 0) {
    const uint4* x4 = reinterpret_cast<const uint4*>(x);
    const uint4* w4[R];
#pragma unroll
    for (int r = 0; r < R; ++r) w4[r] = reinterpret_cast<const uint4*>(w[r]);
    const int n4 = cols / N;
    int i = lane;
    // Register double buffering: the next batch's loads are issued before this batch's FMAs, in a
    // block of their own that ptxas cannot sink into the FMA chains (left alone, it places each
    // load just before its first use, and every load waits out the memory latency alone).
    uint4 wv[R][U], xv[U];
    auto load = [&](int at) {
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int r = 0; r < R; ++r) wv[r][u] = ld_stream(w4[r] + at + 32 * u);
#pragma unroll
      for (int u = 0; u < U; ++u) xv[u] = __ldg(x4 + at + 32 * u);
    };
    if (i + 32 * (U - 1) < n4) load(i);
#pragma unroll 1
    while (i + 32 * (U - 1) < n4) {
      uint4 cw[R][U], cx[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        cx[u] = xv[u];
#pragma unroll
        for (int r = 0; r < R; ++r) cw[r][u] = wv[r][u];
      }
      i += 32 * U;
      if (i + 32 * (U - 1) < n4) load(i);
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r][u] = fma16<T>(cw[r][u], cx[u], acc[r][u]);
    }
    for (; i < n4; i += 32) {
      const uint4 xv = __ldg(x4 + i);
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r][0] = fma16<T>(ld_stream(w4[r] + i), xv, acc[r][0]);
    }
  } else {
    for (int i = lane; i < cols; i += 32) {
      const float xf = to_f32(x[i]);
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r][0] = fmaf(to_f32(w[r][i]), xf, acc[r][0]);
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float s = acc[r][0];
#pragma unroll
    for (int u = 1; u < U; ++u) s += acc[r][u];
    out[r] = warp_sum(s);
  }
}

template <typename T>
__device__ __forceinline__ void gemv_impl(const T* __restrict__ w, const T* __restrict__ x,
                                          T* __restrict__ y, int rows, int cols) {
  pdl_wait();
  pdl_launch_dependents();
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;  // the whole warp leaves together
  const int lane = threadIdx.x & 31;
  const T* const rw[1] = {w + (size_t)row * cols};
  float s[1];
  dot_rows<T, 1>(rw, x, cols, lane, s);
  if (lane == 0) y[row] = from_f32<T>(s[0]);
}

template <typename T>
__device__ __forceinline__ void gemv_silu_mul_impl(const T* __restrict__ w, const T* __restrict__ x,
                                                   T* __restrict__ y, int n, int cols) {
  pdl_wait();
  pdl_launch_dependents();
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= n) return;
  const int lane = threadIdx.x & 31;
  const T* const rw[2] = {w + (size_t)row * cols, w + (size_t)(row + n) * cols};
  float gu[2];
  dot_rows<T, 2>(rw, x, cols, lane, gu);
  if (lane == 0) {
    const float gr = rnd<T>(gu[0]);
    const float silu = __fdiv_rn(gr, __fadd_rn(1.0f, expf(-gr)));
    y[row] = from_f32<T>(__fmul_rn(rnd<T>(silu), rnd<T>(gu[1])));
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
