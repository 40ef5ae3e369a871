// Matrix-vector products of the decode rows (one per sequence of the batch, x [batch, cols]) with a
// weight [rows, cols] (the step's projections):
//
//   expanse_gemv_*:          y[b, r] = round(sum_c x[b, c] * w[r, c])            y [batch, rows]
//   expanse_gemv_silu_mul_*: w stacks gate and up ([2n, cols]); for r < n         y [batch, n]
//                            y[b, r] = round(round(silu(round(gate_br))) * round(up_br))
//                            (the reference's roundings: projections in the model dtype, SiLU in f32,
//                            the product in the model dtype)
//
// Two entry points of each: the plain one takes the rows of x one at a time (a batch of one: the
// single-sequence decode step, whose occupancy its small register count keeps), the `_tiled` one
// GEMV_NX rows of x per read of the weight rows (the rest one at a time), for batches of at least
// GEMV_NX (src/kernels/launch.rs picks). Batch invariance: each (x row, weight row) dot product runs
// the same FMAs in the same order in both, whatever the batch size and wherever the row sits in it
// — its own accumulators, the same lanes, the same final sums — so a sequence's logits are the same
// bits alone and in any batch.
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
// Rows of x sharing one read of the weights in the _tiled kernels (the SwiGLU variant reads two
// weight rows: half as many). GEMV_TILE / GEMV_SILU_TILE in src/kernels/launch.rs.
#define GEMV_NX 4
#define GEMV_SILU_NX 2

template <typename T>
__device__ __forceinline__ float fma16(const uint4& w, const uint4& x, float acc) {
  const T* wt = reinterpret_cast<const T*>(&w);
  const T* xt = reinterpret_cast<const T*>(&x);
#pragma unroll
  for (int k = 0; k < (int)(16 / sizeof(T)); ++k) acc = fmaf(to_f32(wt[k]), to_f32(xt[k]), acc);
  return acc;
}

// out[r][j] = sum_c w[r][c] * x[j * cols + c] for R weight rows and NX rows of x, every lane of the
// warp holding the results. Each (r, j) pair has accumulators of its own, summed in the same order for
// every NX (the batch invariance above).
template <typename T, int R, int NX>
__device__ __forceinline__ void dot_rows(const T* const (&w)[R], const T* __restrict__ x, int cols,
                                         int lane, float (&out)[R][NX]) {
  constexpr int N = 16 / sizeof(T);
  constexpr int U = GEMV_UNROLL;
  // One accumulator per pair and unrolled load: independent FMA chains, so that ptxas, which places
  // a load as late as the chain that consumes it allows, issues all loads up front.
  float acc[R][NX][U];
  uintptr_t addr = reinterpret_cast<uintptr_t>(x);
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int j = 0; j < NX; ++j)
#pragma unroll
      for (int u = 0; u < U; ++u) acc[r][j][u] = 0.0f;
    addr |= reinterpret_cast<uintptr_t>(w[r]);
  }
  // cols % N == 0 keeps every row of x as aligned as the first: the same path for every NX.
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
    uint4 wv[R][U], xv[NX][U];
    auto load = [&](int at) {
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int r = 0; r < R; ++r) wv[r][u] = ld_stream(w4[r] + at + 32 * u);
#pragma unroll
      for (int j = 0; j < NX; ++j)
#pragma unroll
        for (int u = 0; u < U; ++u) xv[j][u] = __ldg(x4 + (size_t)j * n4 + at + 32 * u);
    };
    if (i + 32 * (U - 1) < n4) load(i);
#pragma unroll 1
    while (i + 32 * (U - 1) < n4) {
      uint4 cw[R][U], cx[NX][U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int j = 0; j < NX; ++j) cx[j][u] = xv[j][u];
#pragma unroll
        for (int r = 0; r < R; ++r) cw[r][u] = wv[r][u];
      }
      i += 32 * U;
      if (i + 32 * (U - 1) < n4) load(i);
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int j = 0; j < NX; ++j) acc[r][j][u] = fma16<T>(cw[r][u], cx[j][u], acc[r][j][u]);
    }
    for (; i < n4; i += 32) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const uint4 wr = ld_stream(w4[r] + i);
#pragma unroll
        for (int j = 0; j < NX; ++j) acc[r][j][0] = fma16<T>(wr, __ldg(x4 + (size_t)j * n4 + i), acc[r][j][0]);
      }
    }
  } else {
    for (int i = lane; i < cols; i += 32) {
#pragma unroll
      for (int j = 0; j < NX; ++j) {
        const float xf = to_f32(x[(size_t)j * cols + i]);
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r][j][0] = fmaf(to_f32(w[r][i]), xf, acc[r][j][0]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int j = 0; j < NX; ++j) {
      float s = acc[r][j][0];
#pragma unroll
      for (int u = 1; u < U; ++u) s += acc[r][j][u];
      out[r][j] = warp_sum(s);
    }
}

// y[j0 + j, row] for NX rows of x from j0 (lane 0 writes).
template <typename T, int NX>
__device__ __forceinline__ void gemv_rows(const T* __restrict__ w, const T* __restrict__ x,
                                          T* __restrict__ y, int rows, int cols, int row, int j0,
                                          int lane) {
  const T* const rw[1] = {w + (size_t)row * cols};
  float s[1][NX];
  dot_rows<T, 1, NX>(rw, x + (size_t)j0 * cols, cols, lane, s);
  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < NX; ++j) y[(size_t)(j0 + j) * rows + row] = from_f32<T>(s[0][j]);
  }
}

// TILE: rows of x per read of the weights (then one at a time).
template <typename T, int TILE>
__device__ __forceinline__ void gemv_impl(const T* __restrict__ w, const T* __restrict__ x,
                                          T* __restrict__ y, int rows, int cols, int batch) {
  pdl_wait();
  pdl_launch_dependents();
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;  // the whole warp leaves together
  const int lane = threadIdx.x & 31;
  int j = 0;
  if (TILE > 1)
    for (; j + TILE <= batch; j += TILE) gemv_rows<T, TILE>(w, x, y, rows, cols, row, j, lane);
  for (; j < batch; ++j) gemv_rows<T, 1>(w, x, y, rows, cols, row, j, lane);
}

// act[j0 + j, row] for NX rows of x from j0 (lane 0 writes).
template <typename T, int NX>
__device__ __forceinline__ void silu_mul_rows(const T* __restrict__ w, const T* __restrict__ x,
                                              T* __restrict__ y, int n, int cols, int row, int j0,
                                              int lane) {
  const T* const rw[2] = {w + (size_t)row * cols, w + (size_t)(row + n) * cols};
  float gu[2][NX];
  dot_rows<T, 2, NX>(rw, x + (size_t)j0 * cols, cols, lane, gu);
  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < NX; ++j) {
      const float gr = rnd<T>(gu[0][j]);
      const float silu = __fdiv_rn(gr, __fadd_rn(1.0f, expf(-gr)));
      y[(size_t)(j0 + j) * n + row] = from_f32<T>(__fmul_rn(rnd<T>(silu), rnd<T>(gu[1][j])));
    }
  }
}

template <typename T, int TILE>
__device__ __forceinline__ void gemv_silu_mul_impl(const T* __restrict__ w, const T* __restrict__ x,
                                                   T* __restrict__ y, int n, int cols, int batch) {
  pdl_wait();
  pdl_launch_dependents();
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= n) return;
  const int lane = threadIdx.x & 31;
  int j = 0;
  if (TILE > 1)
    for (; j + TILE <= batch; j += TILE) silu_mul_rows<T, TILE>(w, x, y, n, cols, row, j, lane);
  for (; j < batch; ++j) silu_mul_rows<T, 1>(w, x, y, n, cols, row, j, lane);
}

#define GEMV(NAME, T, TILE)                                                                   \
  extern "C" __global__ void NAME(const T* w, const T* x, T* y, int rows, int cols, int batch) { \
    gemv_impl<T, TILE>(w, x, y, rows, cols, batch);                                           \
  }
#define GEMV_SILU_MUL(NAME, T, TILE)                                                          \
  extern "C" __global__ void NAME(const T* w, const T* x, T* y, int n, int cols, int batch) { \
    gemv_silu_mul_impl<T, TILE>(w, x, y, n, cols, batch);                                     \
  }

GEMV(expanse_gemv_f32, float, 1)
GEMV(expanse_gemv_bf16, bf16, 1)
GEMV(expanse_gemv_f16, f16, 1)
GEMV(expanse_gemv_tiled_f32, float, GEMV_NX)
GEMV(expanse_gemv_tiled_bf16, bf16, GEMV_NX)
GEMV(expanse_gemv_tiled_f16, f16, GEMV_NX)
GEMV_SILU_MUL(expanse_gemv_silu_mul_f32, float, 1)
GEMV_SILU_MUL(expanse_gemv_silu_mul_bf16, bf16, 1)
GEMV_SILU_MUL(expanse_gemv_silu_mul_f16, f16, 1)
GEMV_SILU_MUL(expanse_gemv_silu_mul_tiled_f32, float, GEMV_SILU_NX)
GEMV_SILU_MUL(expanse_gemv_silu_mul_tiled_bf16, bf16, GEMV_SILU_NX)
GEMV_SILU_MUL(expanse_gemv_silu_mul_tiled_f16, f16, GEMV_SILU_NX)
