// Table-lookup GEMV for low-bit weights (the T-MAC method): y = x @ W.T with W[n, k] = code * scale + bias per group.
//
// A b-bit code is the sum of b one-bit planes weighted 1, 2, 4, 8. Four weights of one plane form a 4-bit index, and
// their dot product with four activations is one of 16 sums, built once per row of x and reused by all N rows of W.
// With the {-1,+1} reading of a bit the 16 sums are symmetric and fit int8 with half the step of the {0,1} subset
// sums; the difference is a per-group constant folded into the bias in registers (see lut.py).
//
// Scales and biases are fp16 in memory (decode is bandwidth bound: at group 32, fp32 pairs would add 2 bits a weight)
// and widened to fp32 per group; the lookups weigh scale / 2 and sum(x) weighs bias + (2^bits - 1) / 2 * scale.
//
// Packed layout (lut.py writes it): rows in blocks of kBlockRows = 4 tiles x 16 rows, K in chunks of 32 (8 quads).
// For each block, chunk, tile and plane one 64-byte vector: dword r is row r of the tile, its byte t holds quad t's
// index in the low nibble and quad 4+t's in the high one. A table register holds 4 quads x 16 int8 entries, so
// `vpermb` with index (nibble | t << 4) looks up 16 rows x 4 quads at once, and `vpdpbusd` with the plane weight
// 2^p as its unsigned operand adds each row's 4 lookups into one int32: no widening, all planes in one accumulator.

// Shared by the op-at-a-time extension (lut.cpp) and the fused decode step (step.cpp).

#pragma once

#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "simd.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI__) && defined(__AVX512VNNI__)
#define EDGELLM_LUT_AVX512 1
#include <immintrin.h>
#endif

namespace lut {

constexpr int64_t kTileRows = 16;
constexpr int64_t kTiles = 4;
constexpr int64_t kBlockRows = kTiles * kTileRows;
constexpr int64_t kChunk = 32;  // weights per chunk: 8 quads
constexpr int64_t kChunkBytes = 64;  // one plane of one tile for one chunk

// Per row of x: int8 tables [Kp / 4][16], per-group table step ts and sum of x. The int8 value of an entry is
// round(sum * 127 / max_group), with the sums added left to right so the PyTorch reference reproduces them exactly.
inline void build_tables(const float* x, int64_t Kp, int64_t group, int64_t G, int8_t* table, float* ts, float* xsum) {
  for (int64_t g = 0; g < G; ++g) {
    const int64_t k0 = g * group, k1 = std::min(Kp, k0 + group);
    float m = 0.0f, s = 0.0f;
    for (int64_t k = k0; k < k1; k += 4) {
      const float a = ((std::fabs(x[k]) + std::fabs(x[k + 1])) + std::fabs(x[k + 2])) + std::fabs(x[k + 3]);
      m = std::max(m, a);
    }
    for (int64_t k = k0; k < k1; ++k) s += x[k];
    ts[g] = m / 127.0f;
    xsum[g] = s;
    const float inv = m > 0.0f ? 127.0f / m : 0.0f;
#ifdef EDGELLM_LUT_AVX512
    // Entry e has sign +1 for weight t where bit t of e is set, else -1.
    const __m512 s0 = _mm512_setr_ps(-1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1);
    const __m512 s1 = _mm512_setr_ps(-1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1);
    const __m512 s2 = _mm512_setr_ps(-1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1);
    const __m512 s3 = _mm512_setr_ps(-1, -1, -1, -1, -1, -1, -1, -1, 1, 1, 1, 1, 1, 1, 1, 1);
    const __m512 vinv = _mm512_set1_ps(inv);
    for (int64_t k = k0; k < k1; k += 4) {
      __m512 t = _mm512_mul_ps(s0, _mm512_set1_ps(x[k]));
      t = _mm512_fmadd_ps(s1, _mm512_set1_ps(x[k + 1]), t);  // exact products: fma rounds like the plain add
      t = _mm512_fmadd_ps(s2, _mm512_set1_ps(x[k + 2]), t);
      t = _mm512_fmadd_ps(s3, _mm512_set1_ps(x[k + 3]), t);
      const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(t, vinv));  // round half to even, as torch.round
      _mm_storeu_si128(reinterpret_cast<__m128i*>(table + k * 4), _mm512_cvtsepi32_epi8(q));
    }
#else
    for (int64_t k = k0; k < k1; k += 4)
      for (int e = 0; e < 16; ++e) {
        float t = (e & 1) ? x[k] : -x[k];
        t += (e & 2) ? x[k + 1] : -x[k + 1];
        t += (e & 4) ? x[k + 2] : -x[k + 2];
        t += (e & 8) ? x[k + 3] : -x[k + 3];
        const float q = std::nearbyint(t * inv);
        table[k * 4 + e] = static_cast<int8_t>(std::clamp(q, -127.0f, 127.0f));
      }
#endif
  }
}

#ifdef EDGELLM_LUT_AVX512
inline __m512 load_half(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#endif

// One block of kBlockRows output rows for one row of x: out[r] = sum_g A[r, g] * scale[r, g] * (ts[g] / 2) +
// (bias[r, g] + half_range * scale[r, g]) * xsum[g], A being the int32 sum of the plane-weighted lookups of group g
// and half_range (2^bits - 1) / 2.
template <int P>
void lut_block(const uint8_t* w, const c10::Half* scale, const c10::Half* bias, const int8_t* table, const float* ts,
               const float* xsum, int64_t C, int64_t G, int64_t chunks_per_group, float* out) {
  constexpr float kHalfRange = 0.5f * ((1 << P) - 1);
#ifdef EDGELLM_LUT_AVX512
  const __m512 half_range = _mm512_set1_ps(kHalfRange);
  const __m512i nibble = _mm512_set1_epi8(0x0f);
  const __m512i quad = _mm512_set1_epi32(0x30201000);  // byte t of each dword reads table t of the register
  __m512i plane[P];
#pragma GCC unroll 4
  for (int p = 0; p < P; ++p) plane[p] = _mm512_set1_epi8(static_cast<char>(1 << p));
  __m512 accf[kTiles];
#pragma GCC unroll 4
  for (int t = 0; t < kTiles; ++t) accf[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const int64_t c0 = g * chunks_per_group, c1 = std::min(C, c0 + chunks_per_group);
    __m512i lo_acc[kTiles], hi_acc[kTiles];  // two chains per tile hide vpdpbusd's latency
#pragma GCC unroll 4
    for (int t = 0; t < kTiles; ++t) lo_acc[t] = hi_acc[t] = _mm512_setzero_si512();
    for (int64_t c = c0; c < c1; ++c) {
      const __m512i tlo = _mm512_loadu_si512(table + c * 128), thi = _mm512_loadu_si512(table + c * 128 + 64);
#pragma GCC unroll 4
      for (int t = 0; t < kTiles; ++t)
#pragma GCC unroll 4
        for (int p = 0; p < P; ++p) {
          simd::prefetch_l2(w, kChunkBytes);
          const __m512i v = _mm512_loadu_si512(w);
          w += kChunkBytes;
          const __m512i lo = _mm512_ternarylogic_epi32(v, nibble, quad, 0xEA);  // (v & 0x0f) | quad
          const __m512i hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), nibble, quad, 0xEA);
          lo_acc[t] = _mm512_dpbusd_epi32(lo_acc[t], plane[p], _mm512_permutexvar_epi8(lo, tlo));
          hi_acc[t] = _mm512_dpbusd_epi32(hi_acc[t], plane[p], _mm512_permutexvar_epi8(hi, thi));
        }
    }
    const __m512 step = _mm512_set1_ps(0.5f * ts[g]), sx = _mm512_set1_ps(xsum[g]);
#pragma GCC unroll 4
    for (int t = 0; t < kTiles; ++t) {
      const __m512 a = _mm512_cvtepi32_ps(_mm512_add_epi32(lo_acc[t], hi_acc[t]));
      const __m512 s = load_half(scale + (g * kTiles + t) * kTileRows);
      const __m512 b = _mm512_fmadd_ps(s, half_range, load_half(bias + (g * kTiles + t) * kTileRows));
      accf[t] = _mm512_fmadd_ps(a, _mm512_mul_ps(s, step), accf[t]);
      accf[t] = _mm512_fmadd_ps(b, sx, accf[t]);
    }
  }
#pragma GCC unroll 4
  for (int t = 0; t < kTiles; ++t) _mm512_storeu_ps(out + t * kTileRows, accf[t]);
#else
  float accf[kBlockRows] = {};
  for (int64_t g = 0; g < G; ++g) {
    const int64_t c0 = g * chunks_per_group, c1 = std::min(C, c0 + chunks_per_group);
    int32_t acc[kBlockRows] = {};
    for (int64_t c = c0; c < c1; ++c)
      for (int t = 0; t < kTiles; ++t)
        for (int p = 0; p < P; ++p, w += kChunkBytes)
          for (int r = 0; r < kTileRows; ++r)
            for (int q = 0; q < 4; ++q) {
              const uint8_t v = w[r * 4 + q];
              const int32_t sum = table[(c * 8 + q) * 16 + (v & 15)] + table[(c * 8 + 4 + q) * 16 + (v >> 4)];
              acc[t * kTileRows + r] += sum << p;
            }
    for (int64_t i = 0; i < kBlockRows; ++i) {
      const float s = scale[g * kBlockRows + i], b = bias[g * kBlockRows + i] + kHalfRange * s;
      accf[i] += static_cast<float>(acc[i]) * (s * (0.5f * ts[g])) + b * xsum[g];
    }
  }
  std::memcpy(out, accf, sizeof(accf));
#endif
}

#ifdef EDGELLM_LUT_AVX512
// Two rows of x per pass over a block: the index load and nibble split are shared by both rows (3 of 7 instructions
// per vector), each row adding its own lookups. Fewer registers than twice lut_block: one int32 chain per row and
// tile (lo and hi merged), and the fp32 sums live in `out` (2 x kBlockRows), updated once per group.
template <int P>
void lut_block2(const uint8_t* w, const c10::Half* scale, const c10::Half* bias, const int8_t* table0,
                const int8_t* table1, const float* ts, const float* xsum, int64_t G, int64_t C, int64_t chunks_per_group,
                float* out) {
  const __m512 half_range = _mm512_set1_ps(0.5f * ((1 << P) - 1));
  const __m512i nibble = _mm512_set1_epi8(0x0f);
  const __m512i quad = _mm512_set1_epi32(0x30201000);
  __m512i plane[P];
#pragma GCC unroll 4
  for (int p = 0; p < P; ++p) plane[p] = _mm512_set1_epi8(static_cast<char>(1 << p));
  for (int i = 0; i < 2 * kBlockRows; i += 16) _mm512_storeu_ps(out + i, _mm512_setzero_ps());
  for (int64_t g = 0; g < G; ++g) {
    const int64_t c0 = g * chunks_per_group, c1 = std::min(C, c0 + chunks_per_group);
    __m512i acc0[kTiles], acc1[kTiles];
#pragma GCC unroll 4
    for (int t = 0; t < kTiles; ++t) acc0[t] = acc1[t] = _mm512_setzero_si512();
    for (int64_t c = c0; c < c1; ++c) {
      const __m512i lo0 = _mm512_loadu_si512(table0 + c * 128), hi0 = _mm512_loadu_si512(table0 + c * 128 + 64);
      const __m512i lo1 = _mm512_loadu_si512(table1 + c * 128), hi1 = _mm512_loadu_si512(table1 + c * 128 + 64);
#pragma GCC unroll 4
      for (int t = 0; t < kTiles; ++t)
#pragma GCC unroll 4
        for (int p = 0; p < P; ++p) {
          const __m512i v = _mm512_loadu_si512(w);
          w += kChunkBytes;
          const __m512i lo = _mm512_ternarylogic_epi32(v, nibble, quad, 0xEA);
          const __m512i hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), nibble, quad, 0xEA);
          acc0[t] = _mm512_dpbusd_epi32(acc0[t], plane[p], _mm512_permutexvar_epi8(lo, lo0));
          acc1[t] = _mm512_dpbusd_epi32(acc1[t], plane[p], _mm512_permutexvar_epi8(lo, lo1));
          acc0[t] = _mm512_dpbusd_epi32(acc0[t], plane[p], _mm512_permutexvar_epi8(hi, hi0));
          acc1[t] = _mm512_dpbusd_epi32(acc1[t], plane[p], _mm512_permutexvar_epi8(hi, hi1));
        }
    }
#pragma GCC unroll 4
    for (int t = 0; t < kTiles; ++t) {
      const __m512 s = load_half(scale + (g * kTiles + t) * kTileRows);
      const __m512 b = _mm512_fmadd_ps(s, half_range, load_half(bias + (g * kTiles + t) * kTileRows));
      float* o0 = out + t * kTileRows;
      float* o1 = o0 + kBlockRows;
      __m512 y0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc0[t]), _mm512_mul_ps(s, _mm512_set1_ps(0.5f * ts[g])),
                                  _mm512_loadu_ps(o0));
      __m512 y1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc1[t]), _mm512_mul_ps(s, _mm512_set1_ps(0.5f * ts[G + g])),
                                  _mm512_loadu_ps(o1));
      _mm512_storeu_ps(o0, _mm512_fmadd_ps(b, _mm512_set1_ps(xsum[g]), y0));
      _mm512_storeu_ps(o1, _mm512_fmadd_ps(b, _mm512_set1_ps(xsum[G + g]), y1));
    }
  }
}

using Block2Fn = void (*)(const uint8_t*, const c10::Half*, const c10::Half*, const int8_t*, const int8_t*,
                          const float*, const float*, int64_t, int64_t, int64_t, float*);
#endif

using BlockFn = void (*)(const uint8_t*, const c10::Half*, const c10::Half*, const int8_t*, const float*,
                         const float*, int64_t, int64_t, int64_t, float*);

}  // namespace lut
