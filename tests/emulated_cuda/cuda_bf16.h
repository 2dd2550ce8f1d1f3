// __nv_bfloat16 for the host compiler (see cuda_runtime.h): conversions that
// round as CUDA's do (cvt.rn: to nearest even, NaN to 0x7fff).
// tests/op/test_emulated_cuda_kernel.py checks them against torch over every
// 16-bit pattern.
#pragma once

#include "cuda_fp16.h"

struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 value) {
  return emulated_float_of(static_cast<uint32_t>(value.bits) << 16);
}

inline __nv_bfloat16 __float2bfloat16_rn(float value) {
  const uint32_t bits = emulated_bits_of(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    return {0x7fff};
  }
  return {static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16)};
}
