// Matrix-vector products of the decode rows with a quantized weight (GGML's block types, as GGUF
// files and `--quant` hold them), the quantized twins of gemv.cu's kernels:
//
//   expanse_gemv_<q>_*:          y[b, r] = round(sum_c x[b, c] * w[r, c])     y [batch, y_stride]
//   expanse_gemv_silu_mul_<q>_*: w stacks gate and up ([2n, cols], one type) y [batch, n]
//                                y[b, r] = round(round(silu(round(gate_br))) * round(up_br))
//
// w[r, c] is the weight as ggml's dequantize_row_<q> computes it (the same f32 operations, each
// rounded: d·q, d·q + m, (d·sc)·q − dmin·m; the _rn intrinsics keep nvcc from fusing them),
// multiplied with the activations as they are (f32 accumulation, no 8-bit activation blocks): the
// decode step's only change for a quantized model is the weights' bytes.
// llama.cpp's CUDA build quantizes the activations to q8_1 blocks and uses dp4a, which is faster on
// some GPUs; this form keeps the step's other ops and buffers as they are (no activation blocks to
// produce) and is closer to the f32 product. Its speed needs a GPU to measure (gpu-check's q4_k row).
//
// Layout: one warp per output row (two rows, gate and up, in the SwiGLU variant). Q4_K and Q5_K rows
// (16-byte aligned blocks) are read in uint4s, each lane multiplying the 32 values of its 16 bytes
// (`k_dot_rows`); the other types in super-blocks of 256 values, each lane dequantizing 8 of them
// from byte loads (which 8 depends on the type, so that a lane reads whole bytes: `lane_weights`).
// y_stride lets the rows of one type of a mixed stack (a Q4_K_M file's q/k beside a Q6_K v) write
// their columns of the stacked output.
// Batch invariance: every row of x runs the same loop, one at a time (the weights re-read from cache
// for the next row): a sequence's results do not depend on the batch.
// Block: GEMV_WARPS warps = GEMV_WARPS rows (src/kernels/launch.rs).
#include "common.cuh"

// The types, as the kernels' names spell them (QuantKernel in src/kernels/launch.rs).
#define Q_Q8_0 0
#define Q_Q4_0 1
#define Q_Q4_1 2
#define Q_Q5_0 3
#define Q_Q5_1 4
#define Q_Q4_K 5
#define Q_Q5_K 6
#define Q_Q6_K 7

// Values and bytes of one block of type Q (ggml's QK and sizeof(block_q*)).
template <int Q> struct QBlock;
template <> struct QBlock<Q_Q8_0> { static constexpr int values = 32, bytes = 34; };
template <> struct QBlock<Q_Q4_0> { static constexpr int values = 32, bytes = 18; };
template <> struct QBlock<Q_Q4_1> { static constexpr int values = 32, bytes = 20; };
template <> struct QBlock<Q_Q5_0> { static constexpr int values = 32, bytes = 22; };
template <> struct QBlock<Q_Q5_1> { static constexpr int values = 32, bytes = 24; };
template <> struct QBlock<Q_Q4_K> { static constexpr int values = 256, bytes = 144; };
template <> struct QBlock<Q_Q5_K> { static constexpr int values = 256, bytes = 176; };
template <> struct QBlock<Q_Q6_K> { static constexpr int values = 256, bytes = 210; };

// Byte reads: blocks of 18, 22, 34 or 210 bytes leave later fields only 2-byte aligned.
__device__ __forceinline__ float half_at(const uint8_t* p) { return f16_bits_to_f32((uint16_t)(p[0] | (p[1] << 8))); }

// K-quants' 6-bit scale and min of sub-block j (ggml's get_scale_min_k4).
__device__ __forceinline__ void scale_min_k4(int j, const uint8_t* q, int& sc, int& m) {
  if (j < 4) {
    sc = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// This lane's 8 weights of super-block `sb` (values 256·sb …) of a row of `cols` values, and their
// columns; false when the super-block is past the row's end for this lane (a 32-value type whose row
// is not whole super-blocks).
template <int Q>
__device__ __forceinline__ bool lane_weights(const uint8_t* row, int sb, int cols, int lane, float (&w)[8], int (&col)[8]) {
  if (QBlock<Q>::values == 256) {
    const uint8_t* b = row + (size_t)sb * QBlock<Q>::bytes;
    const int c0 = sb * 256;
    if (Q == Q_Q6_K) {
      // ql[128] qh[64] scales[16] d: half n = lane / 16 holds values 128n + l + {0, 32, 64, 96} for
      // l < 32; this lane takes l = l0, l0 + 1.
      const uint8_t* ql = b + 64 * (lane / 16);
      const uint8_t* qh = b + 128 + 32 * (lane / 16);
      const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192) + 8 * (lane / 16);
      const float d = half_at(b + 208);
      const int l0 = (lane % 16) * 2, is = l0 / 16;
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        const int l = l0 + t;
        const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
        const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
        const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
        const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
        const int base = c0 + 128 * (lane / 16) + l;
        w[4 * t + 0] = __fmul_rn(__fmul_rn(d, (float)sc[is + 0]), (float)q1);
        w[4 * t + 1] = __fmul_rn(__fmul_rn(d, (float)sc[is + 2]), (float)q2);
        w[4 * t + 2] = __fmul_rn(__fmul_rn(d, (float)sc[is + 4]), (float)q3);
        w[4 * t + 3] = __fmul_rn(__fmul_rn(d, (float)sc[is + 6]), (float)q4);
        col[4 * t + 0] = base;
        col[4 * t + 1] = base + 32;
        col[4 * t + 2] = base + 64;
        col[4 * t + 3] = base + 96;
      }
    } else {
      // Q4_K: d dmin scales[12] qs[128]; Q5_K: d dmin scales[12] qh[32] qs[128]. Chunk j = lane / 8
      // of 64 values: byte k of its 32 holds value 64j + k (low nibble, sub-block 2j) and
      // 64j + 32 + k (high nibble, sub-block 2j + 1); this lane takes k = k0 … k0 + 3.
      const int j = lane / 8, k0 = (lane % 8) * 4;
      const float d = half_at(b), dmin = half_at(b + 2);
      int sc, m;
      scale_min_k4(2 * j, b + 4, sc, m);
      const float d1 = d * (float)sc, m1 = dmin * (float)m;
      scale_min_k4(2 * j + 1, b + 4, sc, m);
      const float d2 = d * (float)sc, m2 = dmin * (float)m;
      const uint8_t* qs = b + (Q == Q_Q5_K ? 48 : 16) + 32 * j;
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        const int k = k0 + t;
        int lo = qs[k] & 0xF, hi = qs[k] >> 4;
        if (Q == Q_Q5_K) {
          const int h = b[16 + k];
          lo += (h & (1 << (2 * j))) ? 16 : 0;
          hi += (h & (2 << (2 * j))) ? 16 : 0;
        }
        w[t] = __fsub_rn(__fmul_rn(d1, (float)lo), m1);
        w[4 + t] = __fsub_rn(__fmul_rn(d2, (float)hi), m2);
        col[t] = c0 + 64 * j + k;
        col[4 + t] = c0 + 64 * j + 32 + k;
      }
    }
    return true;
  }
  // 32-value types: block bi = 8·sb + lane / 4, quarter s = lane % 4 of it.
  const int bi = 8 * sb + lane / 4, s = lane % 4;
  if (bi * 32 >= cols) return false;
  const uint8_t* b = row + (size_t)bi * QBlock<Q>::bytes;
  const int c0 = bi * 32;
  const float d = half_at(b);
  if (Q == Q_Q8_0) {
    const int8_t* qs = reinterpret_cast<const int8_t*>(b + 2);
#pragma unroll
    for (int t = 0; t < 8; ++t) {
      w[t] = (float)qs[8 * s + t] * d;
      col[t] = c0 + 8 * s + t;
    }
    return true;
  }
  // Q4_0: d qs[16]; Q4_1: d m qs[16]; Q5_0: d qh[4] qs[16]; Q5_1: d m qh[4] qs[16]. Byte j of qs
  // holds value j (low nibble) and j + 16 (high); this lane takes j = 4s … 4s + 3.
  const bool has_min = Q == Q_Q4_1 || Q == Q_Q5_1, five = Q == Q_Q5_0 || Q == Q_Q5_1;
  const float m = has_min ? half_at(b + 2) : 0.0f;
  const uint8_t* qh = b + (has_min ? 4 : 2);
  const uint8_t* qs = qh + (five ? 4 : 0);
  const uint32_t h = five ? (uint32_t)qh[0] | ((uint32_t)qh[1] << 8) | ((uint32_t)qh[2] << 16) | ((uint32_t)qh[3] << 24) : 0u;
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    const int j = 4 * s + t;
    int x0 = qs[j] & 0x0F, x1 = qs[j] >> 4;
    if (five) {
      x0 |= ((h >> j) << 4) & 0x10;
      x1 |= (h >> (j + 12)) & 0x10;
    }
    if (has_min) {
      w[t] = __fadd_rn(__fmul_rn((float)x0, d), m);
      w[4 + t] = __fadd_rn(__fmul_rn((float)x1, d), m);
    } else {
      const int off = five ? 16 : 8;
      w[t] = (float)(x0 - off) * d;
      w[4 + t] = (float)(x1 - off) * d;
    }
    col[t] = c0 + j;
    col[4 + t] = c0 + 16 + j;
  }
  return true;
}

// ---- Q4_K and Q5_K: 16-byte loads ------------------------------------------------------------
// Their blocks (144 and 176 bytes) keep every field 16-byte aligned in an aligned row: a lane reads
// whole uint4s of one block — the 16-byte header (d, dmin, scales), 16 bytes of qs (32 values:
// 16 low nibbles and the 16 high ones of the same bytes), for Q5_K the 16 bytes of qh beside them —
// and multiplies its 32 values itself. Eight lanes share a block (its header read by all eight in one
// request; the loads bypass L1, so a batch's later rows re-read the weights from L2), a warp takes
// four blocks per pass and KQ_PASSES passes per iteration, every pass's loads issued before the
// first is used (scripts/kernel-audit.sh checks it in the SASS). The other types'
// blocks (18–34 or 210 bytes) are not 16-byte aligned: they take `lane_weights`' byte loads.
#define KQ_PASSES 2

template <int Q>
struct KLoads {
  uint4 head, qs, qh;
};

// The loads of block `b` of a row for lane `lane` (sub-lane lane % 8 of the block's eight).
template <int Q>
__device__ __forceinline__ KLoads<Q> k_load(const uint8_t* row, int b, int lane) {
  const uint4* blk = reinterpret_cast<const uint4*>(row + (size_t)b * QBlock<Q>::bytes);
  const int sub = lane & 7;
  KLoads<Q> l;
  l.head = ld_stream(blk);
  if (Q == Q_Q5_K) {
    l.qh = ld_stream(blk + 1 + (sub & 1));
    l.qs = ld_stream(blk + 3 + sub);
  } else {
    l.qh = make_uint4(0, 0, 0, 0);
    l.qs = ld_stream(blk + 1 + sub);
  }
  return l;
}

// acc += this lane's 32 weights of block `b` times x (x the row of x, c0 = 256·b): sub-lane s takes
// qs bytes 16s … 16s + 15, chunk j = s / 2 of 64 values, bytes k = 16·(s % 2) + t: value 64j + k
// (low nibble, sub-block 2j) and 64j + 32 + k (high nibble, sub-block 2j + 1), as ggml's
// dequantize_row_q4_K / _q5_K write them.
// Word i of a uint4 and byte t of it, by shifts and selects: indexing a register's bytes through a
// pointer would put it in local memory.
__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }
__device__ __forceinline__ int byte_of(const uint4& v, int t) { return (int)((word_of(v, t >> 2) >> (8 * (t & 3))) & 0xFF); }

// scale_min_k4 on the scales held in a header's words y, z, w (bytes 4..15 of the block).
__device__ __forceinline__ void scale_min_words(int j, const uint4& h, int& sc, int& m) {
  if (j < 4) {
    sc = (int)((h.y >> (8 * j)) & 63);
    m = (int)((h.z >> (8 * j)) & 63);
  } else {
    const int s = 8 * (j - 4);
    sc = (int)(((h.w >> s) & 0xF) | (((h.y >> s) >> 6 & 3) << 4));
    m = (int)(((h.w >> s) >> 4 & 0xF) | (((h.z >> s) >> 6 & 3) << 4));
  }
}

// acc += this lane's 32 weights of block `b` times x (x the row of x, c0 = 256·b): sub-lane s takes
// qs bytes 16s … 16s + 15, chunk j = s / 2 of 64 values, bytes k = 16·(s % 2) + t: value 64j + k
// (low nibble, sub-block 2j) and 64j + 32 + k (high nibble, sub-block 2j + 1), as ggml's
// dequantize_row_q4_K / _q5_K write them.
template <typename T, int Q>
__device__ __forceinline__ float k_fma(const KLoads<Q>& l, const T* __restrict__ x, int b, int lane, float acc) {
  const int sub = lane & 7, j = sub >> 1, k0 = 16 * (sub & 1);
  const float d = f16_bits_to_f32((uint16_t)(l.head.x & 0xFFFF));
  const float dmin = f16_bits_to_f32((uint16_t)(l.head.x >> 16));
  int sc, m;
  scale_min_words(2 * j, l.head, sc, m);
  const float d1 = d * (float)sc, m1 = dmin * (float)m;
  scale_min_words(2 * j + 1, l.head, sc, m);
  const float d2 = d * (float)sc, m2 = dmin * (float)m;
  const T* xl = x + 256 * b + 64 * j + k0;
#pragma unroll
  for (int t = 0; t < 16; ++t) {
    int lo = byte_of(l.qs, t) & 0xF;
    if (Q == Q_Q5_K) lo += (byte_of(l.qh, t) & (1 << (2 * j))) ? 16 : 0;
    acc = fmaf(__fsub_rn(__fmul_rn(d1, (float)lo), m1), to_f32(xl[t]), acc);
  }
#pragma unroll
  for (int t = 0; t < 16; ++t) {
    int hi = byte_of(l.qs, t) >> 4;
    if (Q == Q_Q5_K) hi += (byte_of(l.qh, t) & (2 << (2 * j))) ? 16 : 0;
    acc = fmaf(__fsub_rn(__fmul_rn(d2, (float)hi), m2), to_f32(xl[32 + t]), acc);
  }
  return acc;
}

// out[r] = sum_c w_r[c] * x[c] for R rows of Q4_K / Q5_K blocks at 16-byte aligned addresses.
template <typename T, int Q, int R>
__device__ __forceinline__ void k_dot_rows(const uint8_t* const (&w)[R], const T* __restrict__ x, int cols, int lane, float (&out)[R]) {
  constexpr int P = KQ_PASSES;
  const int n_blocks = cols / 256, per_iter = 4 * P;
  float acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.0f;
  // Register double buffering, as gemv.cu's dot_rows: the next iteration's loads are issued before
  // this iteration's FMAs consume the current ones.
  KLoads<Q> nxt[R][P];
  auto load = [&](int b0) {
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int b = b0 + 4 * p + (lane >> 3);
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (b < n_blocks) nxt[r][p] = k_load<Q>(w[r], b, lane);
    }
  };
  load(0);
#pragma unroll 1
  for (int b0 = 0; b0 < n_blocks; b0 += per_iter) {
    KLoads<Q> cur[R][P];
#pragma unroll
    for (int p = 0; p < P; ++p)
#pragma unroll
      for (int r = 0; r < R; ++r) cur[r][p] = nxt[r][p];
    if (b0 + per_iter < n_blocks) load(b0 + per_iter);
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int b = b0 + 4 * p + (lane >> 3);
      if (b >= n_blocks) continue;
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r] = k_fma<T, Q>(cur[r][p], x, b, lane, acc[r]);
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) out[r] = warp_sum(acc[r]);
}

// out[r] = sum_c w_r[c] * x[c] for R rows of type Q, every lane of the warp holding the results.
// Each lane accumulates its products in a fixed order; then the warp reduces. Q4_K and Q5_K rows at
// 16-byte aligned addresses take `k_dot_rows`; the rest `lane_weights`' 8 values per super-block.
template <typename T, int Q, int R>
__device__ __forceinline__ void qdot_rows(const uint8_t* const (&w)[R], const T* __restrict__ x, int cols, int lane, float (&out)[R]) {
  if constexpr (Q == Q_Q4_K || Q == Q_Q5_K) {
    uintptr_t addr = 0;
#pragma unroll
    for (int r = 0; r < R; ++r) addr |= reinterpret_cast<uintptr_t>(w[r]);
    if ((addr & 15) == 0) {
      k_dot_rows<T, Q, R>(w, x, cols, lane, out);
      return;
    }
  }
  float acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.0f;
  const int n_sb = (cols + 255) / 256;
#pragma unroll 1
  for (int sb = 0; sb < n_sb; ++sb) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float wv[8];
      int col[8];
      if (!lane_weights<Q>(w[r], sb, cols, lane, wv, col)) continue;
#pragma unroll
      for (int t = 0; t < 8; ++t) acc[r] = fmaf(wv[t], to_f32(x[col[t]]), acc[r]);
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) out[r] = warp_sum(acc[r]);
}

template <typename T, int Q>
__device__ __forceinline__ void gemv_q_impl(const uint8_t* __restrict__ w, const T* __restrict__ x, T* __restrict__ y, int rows, int cols, int batch,
                                            int y_stride) {
  pdl_wait();
  pdl_launch_dependents();
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;  // the whole warp leaves together
  const int lane = threadIdx.x & 31;
  const size_t row_bytes = (size_t)(cols / QBlock<Q>::values) * QBlock<Q>::bytes;
  const uint8_t* const rw[1] = {w + (size_t)row * row_bytes};
  for (int j = 0; j < batch; ++j) {
    float s[1];
    qdot_rows<T, Q, 1>(rw, x + (size_t)j * cols, cols, lane, s);
    if (lane == 0) y[(size_t)j * y_stride + row] = from_f32<T>(s[0]);
  }
}

template <typename T, int Q>
__device__ __forceinline__ void gemv_silu_mul_q_impl(const uint8_t* __restrict__ w, const T* __restrict__ x, T* __restrict__ y, int n, int cols,
                                                     int batch) {
  pdl_wait();
  pdl_launch_dependents();
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= n) return;
  const int lane = threadIdx.x & 31;
  const size_t row_bytes = (size_t)(cols / QBlock<Q>::values) * QBlock<Q>::bytes;
  const uint8_t* const rw[2] = {w + (size_t)row * row_bytes, w + (size_t)(row + n) * row_bytes};
  for (int j = 0; j < batch; ++j) {
    float gu[2];
    qdot_rows<T, Q, 2>(rw, x + (size_t)j * cols, cols, lane, gu);
    if (lane == 0) {
      const float gr = rnd<T>(gu[0]);
      const float silu = __fdiv_rn(gr, __fadd_rn(1.0f, expf(-gr)));
      y[(size_t)j * n + row] = from_f32<T>(__fmul_rn(rnd<T>(silu), rnd<T>(gu[1])));
    }
  }
}

#define GEMV_Q(QN, Q, TN, T)                                                                                                   \
  extern "C" __global__ void expanse_gemv_##QN##_##TN(const uint8_t* w, const T* x, T* y, int rows, int cols, int batch,  \
                                                       int y_stride) {                                                    \
    gemv_q_impl<T, Q>(w, x, y, rows, cols, batch, y_stride);                                                              \
  }                                                                                                                        \
  extern "C" __global__ void expanse_gemv_silu_mul_##QN##_##TN(const uint8_t* w, const T* x, T* y, int n, int cols,        \
                                                                int batch) {                                              \
    gemv_silu_mul_q_impl<T, Q>(w, x, y, n, cols, batch);                                                                  \
  }
#define GEMV_Q_ALL(QN, Q) GEMV_Q(QN, Q, f32, float) GEMV_Q(QN, Q, bf16, bf16) GEMV_Q(QN, Q, f16, f16)

GEMV_Q_ALL(q8_0, Q_Q8_0)
GEMV_Q_ALL(q4_0, Q_Q4_0)
GEMV_Q_ALL(q4_1, Q_Q4_1)
GEMV_Q_ALL(q5_0, Q_Q5_0)
GEMV_Q_ALL(q5_1, Q_Q5_1)
GEMV_Q_ALL(q4_k, Q_Q4_K)
GEMV_Q_ALL(q5_k, Q_Q5_K)
GEMV_Q_ALL(q6_k, Q_Q6_K)
