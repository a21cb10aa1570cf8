// GEMV and dequantization straight on llama.cpp's k-quant super-blocks (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) as stored in
// GGUF files, with activations quantized to Q8_K as llama.cpp does for its k-quant dot products.
//
// Every format decodes to the same shape: 256 unsigned codes u, a signed int scale per 16-element sub-block (Q4_K and
// Q5_K have 32-element sub-blocks, read through a different lane map), an int min per sub-block for the formats with
// mins, and w = (d * sc) * (u - offset) - (dmin * m) (offset 32 for Q6_K, 4 for Q3_K, else 0). Q8_K activations are
// 256-blocks with an fp32 d, int8 q and the per-16 sums of q (bsums), so the offset and the mins cost one multiply by
// a bsum per sub-block instead of work per element:
//   dot = d_x * (d * sum_j sc_j * (sum_i u_i q_i - offset * bsum_j) - dmin * sum_j m_j * bsum_j).
// AVX-512 (BW + VNNI): vpdpbusd sums four code x activation products per int32 lane, two vectors of those are packed
// to int16 (|sum| <= 4 * 63 * 127, no saturation) and vpdpwssd scales each pair by its sub-block's scale (dot).

// Shared by the op-at-a-time extension and the fused decode step (step.cpp).

#pragma once

#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "simd.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define EDGELLM_KQ_AVX512 1
#include <immintrin.h>
#endif

namespace kq {

constexpr int64_t kQK = 256;
constexpr int kRowTile = 4;  // activation rows sharing one decode of each weight super-block
constexpr int kColTile = 4;  // weight rows sharing one load of the activation (one activation row: decode)

using simd::half_to_float;

// One row of x as Q8_K: int8 q, per-block fp32 d, per-16 sums of q and per-32 sums (8 per block, padded to 16).
struct Q8K {
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int16_t> bsums16, bsums32;
};

// llama.cpp's quantize_row_q8_K_ref: the signed value of largest magnitude (first wins) maps to -127.
Q8K quantize_q8k(const float* x, int64_t nb) {
  Q8K r{std::vector<int8_t>(nb * kQK), std::vector<float>(nb), std::vector<int16_t>(nb * 16),
        std::vector<int16_t>(nb * 16, 0)};
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * kQK;
    float amax = 0.0f, max = 0.0f;
    for (int i = 0; i < kQK; ++i)
      if (std::fabs(xb[i]) > amax) amax = std::fabs(xb[i]), max = xb[i];
    int8_t* q = r.q.data() + b * kQK;
    if (amax == 0.0f) {
      std::memset(q, 0, kQK);
      r.d[b] = 0.0f;
    } else {
      const float iscale = -127.0f / max;
      for (int i = 0; i < kQK; ++i) q[i] = static_cast<int8_t>(std::min(127.0f, std::nearbyint(iscale * xb[i])));
      r.d[b] = 1.0f / iscale;
    }
    for (int j = 0; j < 16; ++j) {
      int s = 0;
      for (int i = 0; i < 16; ++i) s += q[16 * j + i];
      r.bsums16[b * 16 + j] = static_cast<int16_t>(s);
      r.bsums32[b * 16 + j / 2] = static_cast<int16_t>(r.bsums32[b * 16 + j / 2] + s);
    }
  }
  return r;
}

// A super-block decoded for the portable path and for dequantization: scales and mins per 16 elements.
struct Decoded {
  uint8_t u[kQK];
  int16_t sc[16], m[16];
  float d, dmin;
};

// Q4_K/Q5_K's twelve bytes of 6-bit scales and mins, as ggml's get_scale_min_k4.
inline void scale_min_k4(const uint8_t* s, uint8_t* sc, uint8_t* m) {
  for (int j = 0; j < 8; ++j) {
    sc[j] = j < 4 ? s[j] & 63 : (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
    m[j] = j < 4 ? s[j + 4] & 63 : (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// Q3_K's twelve bytes of 6-bit scales (stored + 32): low nibbles in bytes 0..7, the top two bits in bytes 8..11.
inline void scales_q3_k(const uint8_t* s, int16_t* sc) {
  for (int j = 0; j < 16; ++j) {
    const int low = j < 8 ? s[j] & 15 : s[j - 8] >> 4;
    sc[j] = static_cast<int16_t>((low | (((s[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32);
  }
}

// Per format: bytes per block, the offset subtracted from u, whether it has mins and 32-element sub-blocks, and the
// scalar decode (the reference layout, as ggml's dequantize_row_*).
struct Q4K {
  static constexpr int kBytes = 144, kOffset = 0;
  static constexpr bool kMins = true, kSub32 = true;
  static void head(const uint8_t* b, Decoded& o) {  // d, dmin and the 6-bit scales and mins, shared with Q5_K
    o.d = half_to_float(b), o.dmin = half_to_float(b + 2);
    uint8_t sc[8], m[8];
    scale_min_k4(b + 4, sc, m);
    for (int j = 0; j < 16; ++j) o.sc[j] = sc[j / 2], o.m[j] = m[j / 2];
  }
  static void decode(const uint8_t* b, Decoded& o) {
    head(b, o);
    const uint8_t* qs = b + 16;
    for (int j = 0; j < 4; ++j)
      for (int l = 0; l < 32; ++l) o.u[64 * j + l] = qs[32 * j + l] & 15, o.u[64 * j + 32 + l] = qs[32 * j + l] >> 4;
  }
};

struct Q5K {
  static constexpr int kBytes = 176, kOffset = 0;
  static constexpr bool kMins = true, kSub32 = true;
  static void decode(const uint8_t* b, Decoded& o) {
    Q4K::head(b, o);
    const uint8_t *qh = b + 16, *qs = b + 48;
    for (int j = 0; j < 4; ++j)
      for (int l = 0; l < 32; ++l) {
        o.u[64 * j + l] = (qs[32 * j + l] & 15) | (((qh[l] >> (2 * j)) & 1) << 4);
        o.u[64 * j + 32 + l] = (qs[32 * j + l] >> 4) | (((qh[l] >> (2 * j + 1)) & 1) << 4);
      }
  }
};

struct Q6K {
  static constexpr int kBytes = 210, kOffset = 32;
  static constexpr bool kMins = false, kSub32 = false;
  static void decode(const uint8_t* b, Decoded& o) {
    o.d = half_to_float(b + 208), o.dmin = 0.0f;
    for (int j = 0; j < 16; ++j) o.sc[j] = static_cast<int8_t>(b[192 + j]), o.m[j] = 0;
    for (int h = 0; h < 2; ++h) {
      const uint8_t *ql = b + 64 * h, *qh = b + 128 + 32 * h;
      uint8_t* u = o.u + 128 * h;
      for (int l = 0; l < 32; ++l) {
        u[l] = (ql[l] & 15) | ((qh[l] & 3) << 4);
        u[32 + l] = (ql[32 + l] & 15) | (((qh[l] >> 2) & 3) << 4);
        u[64 + l] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
        u[96 + l] = (ql[32 + l] >> 4) | (((qh[l] >> 6) & 3) << 4);
      }
    }
  }
};

struct Q2K {
  static constexpr int kBytes = 84, kOffset = 0;
  static constexpr bool kMins = true, kSub32 = false;
  static void decode(const uint8_t* b, Decoded& o) {
    o.d = half_to_float(b + 80), o.dmin = half_to_float(b + 82);
    for (int j = 0; j < 16; ++j) o.sc[j] = b[j] & 15, o.m[j] = b[j] >> 4;
    for (int e = 0; e < kQK; ++e) o.u[e] = (b[16 + 32 * (e / 128) + e % 32] >> (2 * (e / 32 % 4))) & 3;
  }
};

struct Q3K {
  static constexpr int kBytes = 110, kOffset = 4;
  static constexpr bool kMins = false, kSub32 = false;
  static void decode(const uint8_t* b, Decoded& o) {
    o.d = half_to_float(b + 108), o.dmin = 0.0f;
    scales_q3_k(b + 96, o.sc);
    std::fill(o.m, o.m + 16, 0);
    for (int e = 0; e < kQK; ++e)
      o.u[e] = ((b[32 + 32 * (e / 128) + e % 32] >> (2 * (e / 32 % 4))) & 3) | (((b[e % 32] >> (e / 32)) & 1) << 2);
  }
};

// The portable dot of one decoded super-block with one Q8_K block: (integer dot, integer min sum).
inline void dot_decoded(const Decoded& w, const int8_t* q, const int16_t* bsums, int offset, int32_t& isum,
                        int32_t& msum) {
  isum = msum = 0;
  for (int j = 0; j < 16; ++j) {
    int32_t s = 0;
    for (int i = 0; i < 16; ++i) s += w.u[16 * j + i] * q[16 * j + i];
    isum += w.sc[j] * (s - offset * bsums[j]);
    msum += w.m[j] * bsums[j];
  }
}

template <class F, int R>
void rows_portable(const uint8_t* row, const Q8K* const* xs, int64_t nb, float* out) {
  float acc[R] = {};
  Decoded w;
  for (int64_t b = 0; b < nb; ++b) {
    F::decode(row + b * F::kBytes, w);
    for (int r = 0; r < R; ++r) {
      int32_t isum, msum;
      dot_decoded(w, xs[r]->q.data() + b * kQK, xs[r]->bsums16.data() + b * 16, F::kOffset, isum, msum);
      const float dx = xs[r]->d[b];
      acc[r] += (w.d * dx) * static_cast<float>(isum) - (w.dmin * dx) * static_cast<float>(msum);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = acc[r];
}

#ifdef EDGELLM_KQ_AVX512
// A super-block decoded into registers: four vectors of 64 codes (elements 64v..64v+63 in order), int16 scales (per
// 16 elements, or per 32 for kSub32) and mins (per 16, or per 32 against bsums32) in the low lanes.
struct Regs {
  __m512i u[4];
  __m256i sc, m;
  float d, dmin;
};

// Bytes of `v` shifted right by `lo` in the low 256 bits and `hi` in the high 256, then masked.
inline __m512i shift_mask(__m512i v, int lo, int hi, int mask) {
  const __m512i counts = _mm512_inserti64x4(_mm512_set1_epi16(static_cast<int16_t>(lo)), _mm256_set1_epi16(hi), 1);
  return _mm512_and_si512(_mm512_srlv_epi16(v, counts), _mm512_set1_epi8(static_cast<char>(mask)));
}

inline __m512i broadcast32(const uint8_t* p) {
  return _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Masks for the 6-bit scale fields, four at a time in 32-bit words (llama.cpp unpacks them so).
constexpr uint32_t kLow6 = 0x3f3f3f3f, kLow4 = 0x0f0f0f0f, kHigh2 = 0x30303030;

// d and dmin by one conversion, and the scales and mins unpacked in one vector: words A, B, C of the twelve bytes
// give scales 0..3 = A & 63, scales 4..7 = (C & 15) | (A >> 6) << 4, mins 0..3 = B & 63 and mins 4..7 =
// (C >> 4) | (B >> 6) << 4, byte by byte. Done a word at a time in scalar registers and inserted, this was a third of
// the instructions of a Q4_K super-block's dot product.
inline void k4_head(const uint8_t* b, Regs& o) {
  uint32_t halves;
  std::memcpy(&halves, b, 4);
  const __m128 dd = _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(halves)));
  o.d = _mm_cvtss_f32(dd), o.dmin = _mm_cvtss_f32(_mm_movehdup_ps(dd));
  const __m128i abc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 4));  // A, B, C and a code word
  const __m128i x = _mm_srlv_epi32(_mm_shuffle_epi32(abc, _MM_SHUFFLE(2, 1, 2, 0)), _mm_setr_epi32(0, 0, 0, 4));
  const __m128i y = _mm_srli_epi32(_mm_shuffle_epi32(abc, _MM_SHUFFLE(1, 1, 0, 0)), 2);
  const __m128i sm = _mm_or_si128(  // scales 0..7, then mins 0..7
      _mm_and_si128(x, _mm_setr_epi32(kLow6, kLow4, kLow6, kLow4)),
      _mm_and_si128(y, _mm_setr_epi32(0, kHigh2, 0, kHigh2)));
  const __m256i v = _mm256_cvtepu8_epi16(sm);
  o.sc = v;
  o.m = _mm256_zextsi128_si256(_mm256_extracti128_si256(v, 1));
}

inline void regs(Q4K, const uint8_t* b, Regs& o) {
  k4_head(b, o);
  for (int v = 0; v < 4; ++v) o.u[v] = shift_mask(broadcast32(b + 16 + 32 * v), 0, 4, 15);
}

inline void regs(Q5K, const uint8_t* b, Regs& o) {
  k4_head(b, o);
  const __m512i qh = broadcast32(b + 16);
  for (int v = 0; v < 4; ++v)
    o.u[v] = _mm512_or_si512(shift_mask(broadcast32(b + 48 + 32 * v), 0, 4, 15),
                             _mm512_slli_epi16(shift_mask(qh, 2 * v, 2 * v + 1, 1), 4));
}

inline void regs(Q6K, const uint8_t* b, Regs& o) {
  o.d = half_to_float(b + 208), o.dmin = 0.0f;
  o.sc = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 192)));
  o.m = _mm256_setzero_si256();
  const __m512i low = _mm512_set1_epi8(15);
  for (int h = 0; h < 2; ++h) {
    const __m512i ql = _mm512_loadu_si512(b + 64 * h), qh = broadcast32(b + 128 + 32 * h);
    o.u[2 * h] = _mm512_or_si512(_mm512_and_si512(ql, low), _mm512_slli_epi16(shift_mask(qh, 0, 2, 3), 4));
    o.u[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), low),
                                     _mm512_slli_epi16(shift_mask(qh, 4, 6, 3), 4));
  }
}

inline void regs(Q2K, const uint8_t* b, Regs& o) {
  o.d = half_to_float(b + 80), o.dmin = half_to_float(b + 82);
  const __m128i s = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
  o.sc = _mm256_cvtepu8_epi16(_mm_and_si128(s, _mm_set1_epi8(15)));
  o.m = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(s, 4), _mm_set1_epi8(15)));
  for (int v = 0; v < 4; ++v) o.u[v] = shift_mask(broadcast32(b + 16 + 32 * (v / 2)), 4 * (v % 2), 4 * (v % 2) + 2, 3);
}

inline void regs(Q3K, const uint8_t* b, Regs& o) {
  o.d = half_to_float(b + 108), o.dmin = 0.0f;
  // words A, B, C of the twelve scale bytes (a masked load: the block ends two bytes after them): scales 0..3 =
  // (A & 15) | (C & 3) << 4, 4..7 the same of B and C >> 2, 8..11 of A >> 4 and C >> 4, 12..15 of B >> 4 and C >> 6
  const __m128i abc = _mm_maskz_loadu_epi8(0x0fff, b + 96);
  const __m128i low = _mm_and_si128(_mm_srlv_epi32(_mm_shuffle_epi32(abc, _MM_SHUFFLE(1, 0, 1, 0)),
                                                   _mm_setr_epi32(0, 0, 4, 4)), _mm_set1_epi32(kLow4));
  const __m128i high = _mm_and_si128(_mm_slli_epi32(_mm_srlv_epi32(_mm_shuffle_epi32(abc, _MM_SHUFFLE(2, 2, 2, 2)),
                                                                   _mm_setr_epi32(0, 2, 4, 6)), 4),
                                     _mm_set1_epi32(kHigh2));
  const __m128i s = _mm_or_si128(low, high);
  o.sc = _mm256_sub_epi16(_mm256_cvtepu8_epi16(s), _mm256_set1_epi16(32));
  o.m = _mm256_setzero_si256();
  const __m512i hm = broadcast32(b);
  for (int v = 0; v < 4; ++v)
    o.u[v] = _mm512_or_si512(shift_mask(broadcast32(b + 32 + 32 * (v / 2)), 4 * (v % 2), 4 * (v % 2) + 2, 3),
                             _mm512_slli_epi16(shift_mask(hm, 2 * v, 2 * v + 1, 1), 2));
}

// Q4_K's codes in sub-block pairs for the GEMVs: one 64-byte load's low nibbles are sub-blocks 0 and 2, its high
// nibbles 1 and 3 (the next load 4 and 6, 5 and 7), two instructions per code vector instead of three and a broadcast
// load; the activations are loaded in the same order (load_q). The tiled GEMM (kgemm.h) keeps regs' element order.
template <class F>
constexpr bool kPaired = false;
template <>
constexpr bool kPaired<Q4K> = true;

// Element e of a super-block at byte `lane` of code vector v, in the GEMVs' order.
template <class F>
constexpr int gemv_element(int v, int lane) {
  if constexpr (kPaired<F>) return 128 * (v / 2) + 32 * (v % 2) + lane + (lane < 32 ? 0 : 32);
  return 64 * v + lane;
}

template <class F>
inline void gemv_regs(F f, const uint8_t* b, Regs& o) {
  regs(f, b, o);
}

inline void gemv_regs(Q4K, const uint8_t* b, Regs& o) {
  k4_head(b, o);
  const __m512i low = _mm512_set1_epi8(15);
  for (int h = 0; h < 2; ++h) {
    const __m512i c = _mm512_loadu_si512(b + 16 + 64 * h);
    o.u[2 * h] = _mm512_and_si512(c, low), o.u[2 * h + 1] = _mm512_and_si512(_mm512_srli_epi16(c, 4), low);
  }
}

// A block's 256 activation codes in the order of gemv_regs' code vectors.
template <class F>
inline void load_q(const int8_t* q, __m512i* out) {
  for (int v = 0; v < 4; ++v) {
    const int8_t* p = q + gemv_element<F>(v, 0);
    out[v] = kPaired<F> ? _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))),
                                             _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64)), 1)
                        : _mm512_loadu_si512(p);
  }
}

// The dot product of a block's codes and activations: vpdpbusd sums four code x activation products per int32 lane
// (|sum| <= 4 * 63 * 127, an int16), vpackssdw packs two vectors' sums into one of int16 and vpdpwssd scales each
// pair by its sub-block's scale: per 128 codes two vpdpbusd, one pack, one scale permute and one vpdpwssd, where
// vpmaddubsw + vpdpwssd per 64 codes took two permutes more. ScaleIndex holds the permutes' indices: int16 lane l
// of pack h is int32 lane 4 (l / 8) + l % 4 of code vector 2h + (l % 8) / 4, i.e. its codes 16 (l / 8) + 4 (l % 4).
struct ScaleIndex {
  alignas(64) int16_t idx[2][32];
  ScaleIndex(int (*element)(int, int), bool sub32) {
    for (int h = 0; h < 2; ++h)
      for (int l = 0; l < 32; ++l) {
        const int e = element(2 * h + l % 8 / 4, 16 * (l / 8) + 4 * (l % 4));
        idx[h][l] = static_cast<int16_t>(sub32 ? e / 32 : e / 16);
      }
  }
};

template <class F>
inline void scale_index(__m512i* idx) {
  static const ScaleIndex table(gemv_element<F>, F::kSub32);
  for (int h = 0; h < 2; ++h) idx[h] = _mm512_load_si512(table.idx[h]);
}

inline __m512i dot(const Regs& w, const __m512i* q, const __m512i* idx) {
  const __m512i z = _mm512_setzero_si512(), sc = _mm512_castsi256_si512(w.sc);
  const __m512i p0 = _mm512_packs_epi32(_mm512_dpbusd_epi32(z, w.u[0], q[0]), _mm512_dpbusd_epi32(z, w.u[1], q[1]));
  const __m512i p1 = _mm512_packs_epi32(_mm512_dpbusd_epi32(z, w.u[2], q[2]), _mm512_dpbusd_epi32(z, w.u[3], q[3]));
  return _mm512_dpwssd_epi32(_mm512_madd_epi16(p0, _mm512_permutexvar_epi16(idx[0], sc)), p1,
                             _mm512_permutexvar_epi16(idx[1], sc));
}

// A row's dot product from its accumulators: the scaled sums minus the mins' sums.
inline float finish(__m512 acc, __m256 accm) {
  const __m128 m4 = _mm_add_ps(_mm256_castps256_ps128(accm), _mm256_extractf128_ps(accm, 1));
  const __m128 m2 = _mm_add_ps(m4, _mm_movehl_ps(m4, m4));
  return _mm512_reduce_add_ps(acc) - _mm_cvtss_f32(_mm_add_ss(m2, _mm_movehdup_ps(m2)));
}

template <class F, int R>
void rows_avx512(const uint8_t* row, const Q8K* const* xs, int64_t nb, float* out) {
  __m512i idx[2];
  scale_index<F>(idx);
  __m512 acc[R];
  __m256 accm[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps(), accm[r] = _mm256_setzero_ps();
  Regs w;
  for (int64_t b = 0; b < nb; ++b) {
    simd::prefetch_l2(row + b * F::kBytes, F::kBytes);
    gemv_regs(F{}, row + b * F::kBytes, w);
    for (int r = 0; r < R; ++r) {
      __m512i q[4];
      load_q<F>(xs[r]->q.data() + b * kQK, q);
      __m512i isum = dot(w, q, idx);
      const float dx = xs[r]->d[b];
      if constexpr (F::kOffset != 0) {
        const __m256i bs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs[r]->bsums16.data() + b * 16));
        const __m256i corr = _mm256_mullo_epi32(_mm256_madd_epi16(w.sc, bs), _mm256_set1_epi32(F::kOffset));
        isum = _mm512_sub_epi32(isum, _mm512_zextsi256_si512(corr));
      }
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(w.d * dx), acc[r]);
      if constexpr (F::kMins) {
        const int16_t* bsums = (F::kSub32 ? xs[r]->bsums32 : xs[r]->bsums16).data() + b * 16;
        const __m256i msum = _mm256_madd_epi16(w.m, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bsums)));
        accm[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(msum), _mm256_set1_ps(w.dmin * dx), accm[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) out[r] = finish(acc[r], accm[r]);
}

// rows_avx512 for one activation row against C weight rows `stride` bytes apart: a decode step's GEMV. The
// activation's codes, sums and scale are loaded once per super-block for all C rows, and the setup and the final
// horizontal sums are paid once per C rows; with short rows (K = 1024 is 4 super-blocks) those were a fifth of the
// time, one row per call.
template <class F, int C>
void cols_avx512(const uint8_t* w, int64_t stride, const Q8K& x, int64_t nb, float* out) {
  __m512i idx[2];
  scale_index<F>(idx);
  __m512 acc[C];
  __m256 accm[C];
  for (int c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps(), accm[c] = _mm256_setzero_ps();
  const int64_t group = C * stride, ahead = (simd::kPrefetchBytes + group - 1) / group * group;
  const int8_t* xq = x.q.data();
  const float* xd = x.d.data();
  const int16_t* xs = (F::kSub32 ? x.bsums32 : x.bsums16).data();  // the offset's (16s) or the mins' sub-blocks
  for (int64_t b = 0; b < nb; ++b) {
    __m512i q[4];
    load_q<F>(xq + b * kQK, q);
    const __m256i bs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs + b * 16));
    const float dx = xd[b];
#pragma GCC unroll 8  // unrolled, the accumulators stay in registers (a loop over c kept them on the stack)
    for (int c = 0; c < C; ++c) {
      const uint8_t* blk = w + c * stride + b * F::kBytes;
      // the same block of a later group of C rows, at least simd::kPrefetchBytes on: the C rows are read side by
      // side, so a plain look-ahead would land in this group's own rows
      for (int off = 0; off < F::kBytes; off += 64)
        _mm_prefetch(reinterpret_cast<const char*>(blk) + ahead + off, _MM_HINT_T1);
      Regs r;
      gemv_regs(F{}, blk, r);
      __m512i isum = dot(r, q, idx);
      if constexpr (F::kOffset != 0) {
        const __m256i corr = _mm256_mullo_epi32(_mm256_madd_epi16(r.sc, bs), _mm256_set1_epi32(F::kOffset));
        isum = _mm512_sub_epi32(isum, _mm512_zextsi256_si512(corr));
      }
      acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(r.d * dx), acc[c]);
      if constexpr (F::kMins)
        accm[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(r.m, bs)), _mm256_set1_ps(r.dmin * dx),
                                  accm[c]);
    }
  }
  for (int c = 0; c < C; ++c) out[c] = finish(acc[c], accm[c]);
}
#endif

template <class F, int R>
void rows(bool portable, const uint8_t* row, const Q8K* const* xs, int64_t nb, float* out) {
#ifdef EDGELLM_KQ_AVX512
  if (!portable) return rows_avx512<F, R>(row, xs, nb, out);
#endif
  rows_portable<F, R>(row, xs, nb, out);
}

// y[n] = W[n] . x for the weight rows n in [n0, n1) (`stride` bytes apart) and one activation row: a decode GEMV.
template <class F>
void gemv(bool portable, const uint8_t* w, int64_t stride, const Q8K& x, int64_t nb, int64_t n0, int64_t n1,
          float* y) {
  int64_t n = n0;
#ifdef EDGELLM_KQ_AVX512
  if (!portable) {
    for (; n + kColTile <= n1; n += kColTile) cols_avx512<F, kColTile>(w + n * stride, stride, x, nb, y + n);
    for (; n < n1; ++n) cols_avx512<F, 1>(w + n * stride, stride, x, nb, y + n);
    return;
  }
#endif
  const Q8K* xs[1] = {&x};
  for (; n < n1; ++n) rows_portable<F, 1>(w + n * stride, xs, nb, y + n);
}

}  // namespace kq
