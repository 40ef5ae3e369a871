// Shared helpers for expanse's CUDA kernels (included by every .cu file).
// All arithmetic is done in f32; values are rounded to the storage type once,
// with round-to-nearest-even. Compiled without --use_fast_math.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;
typedef __half f16;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(f16 x) { return __half2float(x); }

// An f16 stored as its bits (quantized blocks' scales, read byte by byte).
__device__ __forceinline__ float f16_bits_to_f32(uint16_t b) {
#if defined(EXPANSE_CUDA_EMULATOR)
  __half h;
  h.bits = b;
  return __half2float(h);
#else
  return __half2float(__ushort_as_half(b));
#endif
}

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ f16 from_f32<f16>(float x) { return __float2half_rn(x); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sum over the whole block; every thread gets the result.
// blockDim.x must be a multiple of 32 and at most 1024.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int n_warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // `partial` may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  float t = (lane < n_warps) ? partial[lane] : 0.0f;
  return warp_sum(t);
}

// A 16-byte load of data read once per token (weights, the KV cache): through the read-only path,
// without allocating in L1, so the x vector and q that every warp re-reads keep their L1 lines.
// (The emulator, compiled as host C++, has no __CUDA_ARCH__: a plain load.)
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
#if defined(__CUDA_ARCH__)
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
#else
  return *p;
#endif
}

// Programmatic dependent launch (Hopper+, src/kernels/cuda launches with the attribute): a kernel
// may start while the previous one in the stream drains. Every kernel calls pdl_wait() in every
// thread before its first global read or write, so nothing it touches can race with the previous
// kernel (the wait returns once that grid has completed and its writes are visible; transitively
// all earlier ones); pdl_launch_dependents() then lets the next kernel's blocks take free SMs and
// wait there instead of being launched after this grid ends. Below sm_90 both are no-ops, and the
// emulator checks that every thread waited (emu.h).
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#elif defined(EXPANSE_CUDA_EMULATOR)
  emu_pdl_wait();
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// Rounds an f32 value to T and back: where the reference rounds an intermediate to the model dtype.
template <typename T> __device__ __forceinline__ float rnd(float x) { return to_f32(from_f32<T>(x)); }

// Step state in device memory, so that one captured graph serves every position: STATE_WORDS words
// per row of the batch (one row per sequence decoded together).
#define STATE_WORDS 4
#define STATE_TOKEN 0  // the token being decoded
#define STATE_POS 1    // its position (= tokens already in the KV cache)
#define STATE_NEXT 2   // argmax of the logits, written by expanse_argmax_*
#define STATE_SLOT 3   // the row's KV cache: slot of the pool [slots, n_kv, cap, d] (0 for a lone cache)
