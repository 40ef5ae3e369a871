// Normal random numbers from a counter-based hash (synthetic weights): element i depends only on
// (seed, i), as in the CPU implementation (src/kernels/cpu/random.rs), so both make the same numbers
// up to the last ulp of logf/cosf, without a generator's state (and without cuRAND).
//
//   out[i] = round(mean + std * sqrt(-2 ln u1) * cos(2 pi u2)),  (u1, u2) from splitmix64(seed ^ mix(i))
#include "common.cuh"

__device__ __forceinline__ unsigned long long mix64(unsigned long long x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

template <typename T>
__device__ __forceinline__ void random_normal_impl(T* __restrict__ out, unsigned long long n,
                                                   unsigned long long seed, float mean, float std) {
  pdl_wait();
  pdl_launch_dependents();
  const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
  for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const unsigned long long h = mix64(seed ^ mix64(i));
    const float u1 = (float)((h >> 40) + 1) * (1.0f / 16777216.0f);
    const float u2 = (float)(h & 0xFFFFFFull) * (1.0f / 16777216.0f);
    const float z = sqrtf(-2.0f * logf(u1)) * cosf(6.28318530717958647692f * u2);
    out[i] = from_f32<T>(__fadd_rn(mean, __fmul_rn(std, z)));
  }
}

#define RANDOM_NORMAL(NAME, T)                                                                   \
  extern "C" __global__ void NAME(T* out, unsigned long long n, unsigned long long seed, float mean, \
                                  float std) {                                                   \
    random_normal_impl<T>(out, n, seed, mean, std);                                              \
  }

RANDOM_NORMAL(expanse_random_normal_f32, float)
RANDOM_NORMAL(expanse_random_normal_bf16, bf16)
RANDOM_NORMAL(expanse_random_normal_f16, f16)
