// out[i] = silu(gate[i]) * up[i], computed in f32 and rounded once.
// Compiled at run time by src/kernels/metal.rs (include_str!).
#include <metal_stdlib>
using namespace metal;
#if __METAL_VERSION__ >= 320
#pragma METAL fp math_mode(safe)
#pragma METAL fp contract(off)
#endif

template <typename T>
inline void silu_mul_impl(device const T* gate, device const T* up, device T* out, uint n, uint i) {
    if (i >= n) return;
    const float g = float(gate[i]);
    const float u = float(up[i]);
    const float s = precise::divide(g, 1.0f + precise::exp(-g));
    out[i] = T(s * u);
}

#define SILU_MUL(NAME, T)                                                   \
kernel void NAME(device const T* gate [[buffer(0)]],                        \
                 device const T* up   [[buffer(1)]],                        \
                 device T* out        [[buffer(2)]],                        \
                 constant uint& n     [[buffer(3)]],                        \
                 uint i [[thread_position_in_grid]]) {                      \
    silu_mul_impl<T>(gate, up, out, n, i);                                  \
}

SILU_MUL(expanse_silu_mul_f32, float)
SILU_MUL(expanse_silu_mul_f16, half)
#if defined(__HAVE_BFLOAT__)
SILU_MUL(expanse_silu_mul_bf16, bfloat)
#endif
