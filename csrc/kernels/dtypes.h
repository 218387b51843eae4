// Torch-free storage types and conversions for 16-bit floats.
//
// The C++ kernels only need to load and store IEEE binary16 and bfloat16 values and do all arithmetic
// in fp32, so two plain bit containers and branch-free conversions suffice. Branch-free (select-based)
// code matters: it lets the compiler vectorise the conversion inside the kernels' inner loops even
// without F16C/AVX512-BF16 instructions. The containers have the same size and layout as
// c10::Half/c10::BFloat16 and CUDA's __half/__nv_bfloat16, so tensors' data pointers can be cast.
#pragma once

#include <cstdint>
#include <cstring>

namespace unigendet {

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};
static_assert(sizeof(Half) == 2 && sizeof(BFloat16) == 2, "16-bit storage types must be 2 bytes");

inline float bits_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t float_as_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float to_float(float v) { return v; }

inline float to_float(BFloat16 v) { return bits_as_float(uint32_t(v.bits) << 16); }

// binary16 -> binary32, exact for every input (normal, subnormal, zero, inf, NaN); after Fabian
// Giesen's half_to_float_fast4, with the special cases written as selects.
inline float to_float(Half v) {
  const uint32_t shifted_exp = 0x7c00u << 13;
  const uint32_t h = v.bits;
  uint32_t o = (h & 0x7fffu) << 13;  // exponent and mantissa
  const uint32_t exp = o & shifted_exp;
  o += uint32_t(127 - 15) << 23;  // rebias the exponent
  o += (exp == shifted_exp) ? (uint32_t(128 - 16) << 23) : 0u;  // inf/NaN keep an all-ones exponent
  // Zero and subnormals: renormalise through one float subtraction.
  const float sub = bits_as_float(o + (1u << 23)) - bits_as_float(113u << 23);
  const uint32_t mag = (exp == 0) ? float_as_bits(sub) : o;
  return bits_as_float(mag | ((h & 0x8000u) << 16));
}

template <typename T>
inline T from_float(float f);

template <>
inline float from_float<float>(float f) {
  return f;
}

// binary32 -> bfloat16 with round-to-nearest-even; NaN stays a (quiet) NaN.
template <>
inline BFloat16 from_float<BFloat16>(float f) {
  const uint32_t u = float_as_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const bool is_nan = (u & 0x7fffffffu) > 0x7f800000u;
  return BFloat16{static_cast<uint16_t>(is_nan ? ((u >> 16) | 0x0040u) : rounded)};
}

// binary32 -> binary16 with round-to-nearest-even, overflow to inf, subnormals and NaN handled;
// after Fabian Giesen's float_to_half_fast3_rtne.
template <>
inline Half from_float<Half>(float f) {
  const uint32_t f32_infty = 255u << 23;
  const uint32_t f16_max = uint32_t(127 + 16) << 23;
  const uint32_t denorm_magic_bits = uint32_t((127 - 15) + (23 - 10) + 1) << 23;
  uint32_t u = float_as_bits(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint16_t o;
  if (u >= f16_max) {
    o = (u > f32_infty) ? 0x7e00 : 0x7c00;
  } else if (u < (113u << 23)) {
    // The result is subnormal or zero: align the mantissa with one float addition (which rounds
    // to nearest even), then subtract the magic bias.
    const float sum = bits_as_float(u) + bits_as_float(denorm_magic_bits);
    o = static_cast<uint16_t>(float_as_bits(sum) - denorm_magic_bits);
  } else {
    const uint32_t mant_odd = (u >> 13) & 1u;
    u += (uint32_t(15 - 127) << 23) + 0xfffu;
    u += mant_odd;
    o = static_cast<uint16_t>(u >> 13);
  }
  return Half{static_cast<uint16_t>(o | (sign >> 16))};
}

}  // namespace unigendet
