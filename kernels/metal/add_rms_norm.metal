// Fused residual add + RMSNorm; see kernels/cuda/add_rms_norm.cu.
//   out[0, r, :] = sum    = round(x + residual)
//   out[1, r, :] = normed = round(f32(sum) / sqrt(mean(f32(sum)^2) + eps) * weight)
// One threadgroup per row (threadgroup size a multiple of 32, <= 1024).
#include <metal_stdlib>
using namespace metal;
#if __METAL_VERSION__ >= 320
#pragma METAL fp math_mode(safe)
#pragma METAL fp contract(off)
#endif

struct AddRmsNormParams {
    uint rows;
    uint cols;
    float eps;
};

template <typename T>
inline void add_rms_norm_impl(device const T* x, device const T* res, device const T* w,
                              device T* out, constant AddRmsNormParams& p,
                              threadgroup float* partial, uint row, uint tid, uint ntg,
                              uint simd_lane, uint simd_id) {
    if (row >= p.rows) return;
    const uint cols = p.cols;
    const ulong base = ulong(row) * cols;
    device const T* xr = x + base;
    device const T* rr = res + base;
    device T* sum_r = out + base;
    device T* norm_r = out + ulong(p.rows) * cols + base;

    float ss = 0.0f;
    for (uint i = tid; i < cols; i += ntg) {
        const T s = T(float(xr[i]) + float(rr[i]));
        sum_r[i] = s;
        const float sf = float(s);
        ss += sf * sf;
    }
    ss = simd_sum(ss);
    if (simd_lane == 0) partial[simd_id] = ss;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const uint n_simd = (ntg + 31) / 32;
    float t = simd_lane < n_simd ? partial[simd_lane] : 0.0f;
    t = simd_sum(t);
    const float inv_rms = precise::divide(1.0f, precise::sqrt(t / float(cols) + p.eps));
    for (uint i = tid; i < cols; i += ntg) {
        norm_r[i] = T(float(sum_r[i]) * inv_rms * float(w[i]));
    }
}

#define ADD_RMS_NORM(NAME, T)                                                        \
kernel void NAME(device const T* x   [[buffer(0)]],                                  \
                 device const T* res [[buffer(1)]],                                  \
                 device const T* w   [[buffer(2)]],                                  \
                 device T* out       [[buffer(3)]],                                  \
                 constant AddRmsNormParams& p [[buffer(4)]],                         \
                 uint row [[threadgroup_position_in_grid]],                          \
                 uint tid [[thread_index_in_threadgroup]],                           \
                 uint ntg [[threads_per_threadgroup]],                               \
                 uint simd_lane [[thread_index_in_simdgroup]],                       \
                 uint simd_id [[simdgroup_index_in_threadgroup]]) {                  \
    threadgroup float partial[32];                                                   \
    add_rms_norm_impl<T>(x, res, w, out, p, partial, row, tid, ntg, simd_lane, simd_id); \
}

ADD_RMS_NORM(expanse_add_rms_norm_f32, float)
ADD_RMS_NORM(expanse_add_rms_norm_f16, half)
#if defined(__HAVE_BFLOAT__)
ADD_RMS_NORM(expanse_add_rms_norm_bf16, bfloat)
#endif
