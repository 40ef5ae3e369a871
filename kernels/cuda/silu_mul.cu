// out[i] = silu(gate[i]) * up[i] = gate / (1 + exp(-gate)) * up
// computed in f32, rounded once. Contiguous inputs of n elements.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void silu_mul_impl(const T* __restrict__ gate, const T* __restrict__ up,
                                              T* __restrict__ out, size_t n) {
  const size_t stride = (size_t)blockDim.x * gridDim.x;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float g = to_f32(gate[i]);
    const float u = to_f32(up[i]);
    const float s = g / (1.0f + expf(-g));
    out[i] = from_f32<T>(s * u);
  }
}

#define SILU_MUL(NAME, T)                                                                   \
  extern "C" __global__ void NAME(const T* gate, const T* up, T* out, size_t n) {          \
    silu_mul_impl<T>(gate, up, out, n);                                                     \
  }

SILU_MUL(expanse_silu_mul_f32, float)
SILU_MUL(expanse_silu_mul_bf16, bf16)
SILU_MUL(expanse_silu_mul_f16, f16)
