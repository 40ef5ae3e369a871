// Emulator stand-in for CUDA's math_constants.h (the constants the kernels use).
#pragma once
#include <math.h>
#define CUDART_INF_F INFINITY
