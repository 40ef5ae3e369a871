// Fused residual add + RMSNorm.
//
//   out[0, r, :] = sum    = round(x[r, :] + residual[r, :])
//   out[1, r, :] = normed = round(f32(sum) * inv_rms * weight)
//   inv_rms = 1 / sqrt(mean(f32(sum)^2) + eps)
//
// The norm is computed from the *rounded* sum (what an unfused
// `add` + `rms_norm` sees, and what the residual stream carries on).
// One block per row; x, residual and out contiguous, weight [cols].
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void add_rms_norm_impl(const T* __restrict__ x, const T* __restrict__ res,
                                                  const T* __restrict__ w, T* __restrict__ out,
                                                  int rows, int cols, float eps) {
  const int row = blockIdx.x;
  if (row >= rows) return;
  const size_t base = (size_t)row * cols;
  const T* xr = x + base;
  const T* rr = res + base;
  T* sum_r = out + base;
  T* norm_r = out + (size_t)rows * cols + base;

  float ss = 0.0f;
  for (int i = threadIdx.x; i < cols; i += blockDim.x) {
    const T s = from_f32<T>(to_f32(xr[i]) + to_f32(rr[i]));
    sum_r[i] = s;
    const float sf = to_f32(s);
    ss += sf * sf;
  }
  ss = block_sum(ss);
  const float inv_rms = 1.0f / sqrtf(ss / (float)cols + eps);
  // Each thread re-reads only the elements it wrote itself: no sync needed.
  for (int i = threadIdx.x; i < cols; i += blockDim.x) {
    norm_r[i] = from_f32<T>(to_f32(sum_r[i]) * inv_rms * to_f32(w[i]));
  }
}

#define ADD_RMS_NORM(NAME, T)                                                                   \
  extern "C" __global__ void NAME(const T* x, const T* res, const T* w, T* out, int rows,      \
                                  int cols, float eps) {                                        \
    add_rms_norm_impl<T>(x, res, w, out, rows, cols, eps);                                      \
  }

ADD_RMS_NORM(expanse_add_rms_norm_f32, float)
ADD_RMS_NORM(expanse_add_rms_norm_bf16, bf16)
ADD_RMS_NORM(expanse_add_rms_norm_f16, f16)
