// Included before every kernel file when the emulator compiles kernels/cuda/*.cu as host C++: the
// CUDA keywords, built-in variables and device functions the kernels use, with CUDA's semantics.
// Each CUDA thread is a fiber; __syncthreads and __shfl_xor_sync suspend it until the block (or
// the warp) has arrived, so missing barriers and divergent shuffles show up as wrong results or
// as errors (emu.cpp).
#pragma once
// Kernel sources see that they run here (common.cuh's pdl_wait reports to the emulator).
#define EXPANSE_CUDA_EMULATOR 1
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One block runs at a time (per emulator lock), so a function-level static is block-shared memory.
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
};

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

namespace emu {
const dim3& thread_idx();
const dim3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
void syncthreads();
void pdl_wait();
uint64_t shfl(unsigned mask, uint64_t bits, int src_lane);
}  // namespace emu

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())

inline void __syncthreads() { emu::syncthreads(); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 8, "shuffled values are at most 8 bytes");
  uint64_t bits = 0;
  memcpy(&bits, &v, sizeof(T));
  const int lane = (int)(threadIdx.x & 31);
  // Lanes whose partner lies outside their width-sized segment keep their own value (CUDA).
  int src = lane ^ lane_mask;
  if ((src / width) != (lane / width)) src = lane;
  bits = emu::shfl(mask, bits, src);
  T out;
  memcpy(&out, &bits, sizeof(T));
  return out;
}

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}

// One block runs at a time and a fiber runs until it waits: a read-modify-write is atomic, and
// every write is visible to the blocks that run after it (what __threadfence orders on a GPU).
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old + v;
  return old;
}
inline void __threadfence() {}

// griddepcontrol.wait of programmatic dependent launch (common.cuh's pdl_wait): launches run one
// after another here, so it only records that the thread waited; a thread that ends its block
// without waiting fails the launch (it could race with the previous kernel on a GPU).
inline void emu_pdl_wait() { emu::pdl_wait(); }

// The _rn intrinsics are single IEEE operations; emu.cpp is compiled with -ffp-contract=off, so
// these and plain expressions stay unfused (nvcc contracts a*b+c in plain expressions, which the
// tests' tolerances cover).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
