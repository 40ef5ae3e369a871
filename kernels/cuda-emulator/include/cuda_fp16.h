// Emulator stand-in for CUDA's cuda_fp16.h: the f16 type and its conversions (the compiler's
// _Float16, which rounds to nearest even like the device).
#pragma once
#include <stdint.h>
#include <string.h>

struct __half {
  uint16_t bits;
};

inline float __half2float(__half h) {
  _Float16 v;
  memcpy(&v, &h.bits, 2);
  return (float)v;
}

inline __half __float2half_rn(float f) {
  _Float16 v = (_Float16)f;
  __half h;
  memcpy(&h.bits, &v, 2);
  return h;
}
