// Quantize-on-store of one row (per-token groups along head_dim) and the Walsh-Hadamard butterfly of one row, bit-exact
// with edgellm/kv/codec.py (see kvcodec.cpp). Shared by the op-at-a-time extension (kvcodec.cpp) and the fused
// decode step (step.cpp), which stores each new token's K/V in place.

#pragma once

#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace kvcodec {

// fp16 bits of x rounded to nearest-even, then moved one ulp towards -inf (down) or +inf (up) if that rounding
// landed on the wrong side of x: torch.nextafter(h, ±inf) on the bit pattern.
inline uint16_t to_fp16_directed(float x, bool up) {
  const c10::Half h(x);
  const float back = static_cast<float>(h);
  if (up ? !(back < x) : !(back > x)) return h.x;
  const uint16_t u = h.x;
  if ((u & 0x7fff) == 0) return up ? 0x0001 : 0x8001;  // ±0 steps to the smallest subnormal of the wanted sign
  const bool negative = u & 0x8000;
  return (negative == up) ? u - 1 : u + 1;  // away from zero: +1 on the magnitude; towards it: -1
}

inline float half_bits_to_float(uint16_t u) {
  c10::Half h;
  h.x = u;
  return static_cast<float>(h);
}

// The code of x against one zero/scale pair, as torch computes it: round((x - z) /
// s) with s replaced by 1 when it is 0, clamped to [0, levels].
inline uint8_t code_of(float x, float zero, float step, float levels) {
  const float c = std::nearbyint((x - zero) / step);
  return static_cast<uint8_t>(std::min(std::max(c, 0.0f), levels));
}

// zero and step of one group from its min and max, written as fp16 bits to *z / *s.
inline void group_grid(float lo, float hi, int levels, uint16_t* z, uint16_t* s, float* zero, float* step) {
  *z = to_fp16_directed(lo, false);
  *zero = half_bits_to_float(*z);
  *s = to_fp16_directed((hi - *zero) / static_cast<float>(levels), true);
  const float sf = half_bits_to_float(*s);
  *step = sf > 0.0f ? sf : 1.0f;
}

// One row of D values in groups of `group` → D * bits / 8 bytes of codes (lowest bits first) and D / group fp16
// scales/zeros; `codes` holds D bytes of scratch.
inline void quantize_row(const float* row, int64_t D, int bits, int64_t group, uint8_t* codes, uint8_t* out,
                         uint16_t* sc, uint16_t* ze) {
  const int levels = (1 << bits) - 1, per = 8 / bits;
  for (int64_t g = 0; g < D / group; ++g) {
    const float* v = row + g * group;
    float lo = v[0], hi = v[0];
    for (int64_t i = 1; i < group; ++i) lo = std::min(lo, v[i]), hi = std::max(hi, v[i]);
    float zero, step;
    group_grid(lo, hi, levels, ze + g, sc + g, &zero, &step);
    for (int64_t i = 0; i < group; ++i) codes[g * group + i] = code_of(v[i], zero, step, levels);
  }
  if (bits == 8) {
    std::memcpy(out, codes, D);
    return;
  }
  for (int64_t k = 0; k < D * bits / 8; ++k) {
    uint8_t byte = 0;
    for (int j = 0; j < per; ++j) byte |= codes[k * per + j] << (j * bits);
    out[k] = byte;
  }
}

// The Walsh-Hadamard butterfly of n values in place (n a power of 2), stage by stage, each a single add or subtract,
// then times s.
inline void hadamard_row(float* v, int64_t n, float s) {
  for (int64_t h = 1; h < n; h *= 2)
    for (int64_t i = 0; i < n; i += 2 * h)
      for (int64_t j = i; j < i + h; ++j) {
        const float a = v[j], b = v[j + h];
        v[j] = a + b;
        v[j + h] = a - b;
      }
  for (int64_t j = 0; j < n; ++j) v[j] *= s;
}

}  // namespace kvcodec
