// __half for the host compiler (see cuda_runtime.h): conversions that round as
// CUDA's do (cvt.rn: to nearest even, overflow to inf, NaN to 0x7fff).
// tests/op/test_emulated_cuda_kernel.py checks them against torch over every
// 16-bit pattern.
#pragma once

#include <cstdint>
#include <cstring>

struct __half {
  uint16_t bits;
};

inline uint32_t emulated_bits_of(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

inline float emulated_float_of(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline float __half2float(__half value) {
  const uint32_t sign = static_cast<uint32_t>(value.bits & 0x8000u) << 16;
  const uint32_t exponent = (value.bits >> 10) & 0x1fu;
  const uint32_t mantissa = value.bits & 0x3ffu;
  if (exponent == 0x1f) {  // inf, or NaN (made quiet, payload kept)
    return emulated_float_of(sign | 0x7f800000u | (mantissa << 13) | (mantissa ? 0x400000u : 0u));
  }
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
    return sign ? -magnitude : magnitude;
  }
  return emulated_float_of(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

inline __half __float2half_rn(float value) {
  const uint32_t bits = emulated_bits_of(value);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) {
    return {0x7fff};
  }
  if (magnitude >= 0x477ff000u) {  // 65520 and above round to inf
    return {static_cast<uint16_t>(sign | 0x7c00u)};
  }
  if (magnitude >= 0x38800000u) {  // a normal half: rebias the exponent, round off 13 bits
    const uint32_t rebiased = magnitude - 0x38000000u;
    return {static_cast<uint16_t>(sign | ((rebiased + 0xfffu + ((rebiased >> 13) & 1u)) >> 13))};
  }
  if (magnitude < 0x33000000u) {  // below 2^-25, which rounds (to even) to zero too
    return {sign};
  }
  // A subnormal half: the value in units of 2^-24, rounded to nearest even.
  const uint32_t exponent = magnitude >> 23;
  const uint32_t significand = (magnitude & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126 - exponent;
  uint32_t units = significand >> shift;
  const uint32_t remainder = significand & ((1u << shift) - 1);
  const uint32_t halfway = 1u << (shift - 1);
  if (remainder > halfway || (remainder == halfway && (units & 1u))) {
    ++units;
  }
  return {static_cast<uint16_t>(sign | units)};
}
