// Branch-free exp/log that GCC and Clang auto-vectorise (Cephes polynomials).
//
// std::exp/std::log are scalar library calls; in the Sinkhorn inner loops they
// would cost ten times the arithmetic around them. These versions are accurate
// to about 1 ulp on the ranges the kernels use (float: exp on [-87, 88],
// log on normal positive floats). double falls back to the C library: float64
// is the correctness path, not the fast one.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace otseg {
namespace fast {

inline float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

inline int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

inline float exp(float x) {
  // Below -87 the result would be subnormal: return 0 like an underflow.
  const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  // Round to nearest through the 1.5*2^23 trick: no call, so it vectorises.
  const float fx = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = xc - fx * 0.693359375f + fx * 2.12194440e-4f;
  const float z = r * r;
  const float y =
      (((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r +
         4.1665795894e-2f) * r + 1.6666665459e-1f) * r + 5.0000001201e-1f) * z +
      r + 1.0f;
  const float scale = bits_to_float((static_cast<int32_t>(fx) + 127) << 23);
  return x < -87.0f ? 0.0f : y * scale;
}

inline float log(float x) {
  const int32_t i = float_to_bits(x);
  const int32_t e = ((i >> 23) & 0xff) - 126;
  const float m = bits_to_float((i & 0x7fffff) | 0x3f000000);  // [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  const float ef = static_cast<float>(e) - (small ? 1.0f : 0.0f);
  const float t = small ? (m + m - 1.0f) : (m - 1.0f);
  const float z = t * t;
  float y = ((((((((7.0376836292e-2f * t - 1.1514610310e-1f) * t + 1.1676998740e-1f) * t -
                  1.2420140846e-1f) * t + 1.4249322787e-1f) * t - 1.6668057665e-1f) * t +
               2.0000714765e-1f) * t - 2.4999993993e-1f) * t + 3.3333331174e-1f) * t * z;
  y += -2.12194440e-4f * ef;
  y += -0.5f * z;
  return t + y + 0.693359375f * ef;
}

inline double exp(double x) { return std::exp(x); }
inline double log(double x) { return std::log(x); }

}  // namespace fast
}  // namespace otseg
