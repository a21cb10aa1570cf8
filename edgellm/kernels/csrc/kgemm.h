// Prefill's GEMM straight on k-quant super-blocks: activations as Q8_K (quantize_q8k's numbers, vectorised), int8
// dot products with VNNI, tiled so that each weight super-block is unpacked once for every activation row.
//
// Why: a prefill that dequantizes to bf16 and runs a bf16 GEMM is bound by vdpbf16ps, 32 multiply-adds per
// instruction; vpdpbusd does 64 at the same rate (one zmm per cycle on a Zen 4 core: ~100 GMAC/s for oneDNN's bf16
// GEMM there, ~180 for this loop). llama.cpp's int8 k-quant dot products prefilled its Q6_K file faster than our
// dequantize + bf16 GEMM.
//
// Layout: lanes are weight rows. A tile of 32 weight rows is repacked once per super-block into, per 4-element step,
// two vectors of 16 rows x 4 unsigned codes; one activation row's 4 int8 values are broadcast and vpdpbusd adds the
// 4 products into each row's lane. Per sub-block the int32 sums are multiplied by the rows' scales and summed
// (vpmulld, exact); the offset (Q6_K 32, Q3_K 4) is subtracted per sub-block through the activation's bsums
// (vpdpwssd, exact); then one conversion and d * d_x per super-block, as the GEMV does:
//   y += (d * d_x) * isum - (dmin * d_x) * sum_j m_j * bsum_j.
// Six activation rows x 32 weight rows keep 24 int32 accumulators in registers.

#pragma once

#include "kquants.h"
#include "tiles.h"

#ifdef EDGELLM_KQ_AVX512

#include <ATen/Parallel.h>

namespace kq {

using tiles::kCols;

// Q8_K rows in flat buffers: int8 q (M, K), d (M, K / 256), per-16 sums (M, K / 256, 16) and per-32 sums in the
// first 8 of another 16 per block. Values as quantize_q8k's, bit for bit.
struct Q8KRows {
  int64_t M = 0, nb = 0;
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int16_t> bsums16, bsums32;
};

inline __m512 load_f32(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_f32(const c10::BFloat16* p) { return simd::load16(p); }

// quantize_q8k on one row, sixteen elements per instruction: the same fp32 multiply, round-to-nearest-even
// (nearbyint in the default rounding mode) and clamp, so the same codes.
template <class T>
inline void quantize_q8k_row(const T* x, int64_t nb, int8_t* q, float* d, int16_t* bs16, int16_t* bs32) {
  const __m512 sign = _mm512_set1_ps(-0.0f);
  for (int64_t b = 0; b < nb; ++b) {
    const T* xb = x + b * kQK;
    __m512 v[16];
    __m512 amax = _mm512_setzero_ps();
    for (int c = 0; c < 16; ++c) v[c] = load_f32(xb + 16 * c), amax = _mm512_max_ps(amax, _mm512_andnot_ps(sign, v[c]));
    const float a = _mm512_reduce_max_ps(amax);
    int8_t* qb = q + b * kQK;
    int16_t *s16 = bs16 + b * 16, *s32 = bs32 + b * 16;
    std::fill(s32, s32 + 16, 0);
    if (a == 0.0f) {
      std::memset(qb, 0, kQK), std::fill(s16, s16 + 16, 0);
      d[b] = 0.0f;
      continue;
    }
    float max = 0.0f;  // the signed value of largest magnitude, the first one where several tie
    for (int c = 0; c < 16; ++c) {
      const __mmask16 hit = _mm512_cmpeq_ps_mask(_mm512_andnot_ps(sign, v[c]), _mm512_set1_ps(a));
      if (hit) {
        alignas(64) float lanes[16];
        _mm512_store_ps(lanes, v[c]);
        max = lanes[__builtin_ctz(hit)];
        break;
      }
    }
    const float iscale = -127.0f / max;
    const __m512 s = _mm512_set1_ps(iscale), top = _mm512_set1_ps(127.0f);
    for (int c = 0; c < 16; ++c) {
      const __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(s, v[c]), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512i i = _mm512_cvtps_epi32(_mm512_min_ps(top, r));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + 16 * c), _mm512_cvtepi32_epi8(i));
      s16[c] = static_cast<int16_t>(_mm512_reduce_add_epi32(i));
    }
    for (int j = 0; j < 8; ++j) s32[j] = static_cast<int16_t>(s16[2 * j] + s16[2 * j + 1]);
    d[b] = 1.0f / iscale;
  }
}

template <class T>
Q8KRows quantize_rows(const T* x, int64_t M, int64_t K) {
  Q8KRows r;
  r.M = M, r.nb = K / kQK;
  r.q.resize(M * K), r.d.resize(M * r.nb), r.bsums16.resize(M * r.nb * 16), r.bsums32.resize(M * r.nb * 16);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      quantize_q8k_row(x + m * K, r.nb, r.q.data() + m * K, r.d.data() + m * r.nb, r.bsums16.data() + m * r.nb * 16,
                       r.bsums32.data() + m * r.nb * 16);
  });
  return r;
}

// One super-block of a 32-row tile, repacked. Sub-blocks: 16 of 16 elements, or 8 of 32 (Q4_K, Q5_K). Pairs: the
// int16 pairs vpdpwssd takes against the activation's bsum pairs: -offset * (sc_2p, sc_2p+1) for the formats with
// an offset, the mins (m_2p, m_2p+1) for those with mins (per 32 elements for Q4_K/Q5_K).
template <class F>
struct Packed {
  static constexpr int kSubs = F::kSub32 ? 8 : 16, kStepsPerSub = 64 / kSubs, kPairs = kSubs / 2;
  static_assert(!(F::kMins && F::kOffset), "a format has mins or an offset, not both");
  alignas(64) uint8_t codes[64][2][64];  // step (4 elements), vector, lane * 4 + element
  alignas(64) int32_t sc[kSubs][2][16];
  alignas(64) int32_t pairs[kPairs][2][16];
  alignas(64) float d[2][16], dmin[2][16];
};

// Weight rows [0, rows) of a tile (rows `stride` bytes apart, rows <= 32; the others are zero) into one Packed per
// super-block: sixteen rows' blocks decoded (the GEMV's register decode), then each 16 x 16 block of int32 words
// (code words, scales, pairs) transposed in registers. Per-row scatters took 4x as long.
template <class F>
void pack_tile(const uint8_t* w, int64_t stride, int rows, int64_t nb, Packed<F>* out) {
  using P = Packed<F>;
  alignas(64) int32_t words[16][64 + 16 + 16];  // per row: 64 code words, the scales and the pairs as int32
  alignas(64) float d[16], dmin[16];
  __m512i r[16];
  for (int v = 0; v < 2; ++v) {
    const int n = std::clamp(rows - 16 * v, 0, 16);
    for (int64_t b = 0; b < nb; ++b) {
      P& p = out[b];
      for (int i = 0; i < 16; ++i) {
        if (i >= n) {
          std::memset(words[i], 0, sizeof(words[i])), d[i] = dmin[i] = 0.0f;
          continue;
        }
        Regs g;
        regs(F{}, w + (16 * v + i) * stride + b * F::kBytes, g);
        for (int c = 0; c < 4; ++c) _mm512_store_si512(words[i] + 16 * c, g.u[c]);
        const __m256i pairs = F::kMins ? g.m : _mm256_mullo_epi16(g.sc, _mm256_set1_epi16(-F::kOffset));
        _mm512_store_si512(words[i] + 64, _mm512_cvtepi16_epi32(g.sc));
        _mm512_store_si512(words[i] + 80, _mm512_castsi256_si512(pairs));
        d[i] = g.d, dmin[i] = g.dmin;
      }
      for (int c = 0; c < 6; ++c) {  // code words 16c..16c+15, then the scales, then the pairs
        for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512(words[i] + 16 * c);
        tiles::transpose16(r);
        for (int j = 0; j < 16; ++j) {
          if (c < 4) _mm512_store_si512(p.codes[16 * c + j][v], r[j]);
          else if (c == 4 && j < P::kSubs) _mm512_store_si512(p.sc[j][v], r[j]);
          else if (c == 5 && j < P::kPairs) _mm512_store_si512(p.pairs[j][v], r[j]);
        }
      }
      _mm512_store_ps(p.d[v], _mm512_load_ps(d)), _mm512_store_ps(p.dmin[v], _mm512_load_ps(dmin));
    }
  }
}

// R activation rows (q rows K bytes apart) against one packed tile, all super-blocks: out (R, 32) fp32.
template <class F, int R>
void tile_rows(const Packed<F>* p, const Q8KRows& x, int64_t m0, float* out) {
  using P = Packed<F>;
  const int64_t K = x.nb * kQK;
  const int16_t* bsums = (F::kSub32 ? x.bsums32 : x.bsums16).data();
  __m512 acc[R][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t b = 0; b < x.nb; ++b, ++p) {
    const int8_t* q = x.q.data() + m0 * K + b * kQK;
    __m512i s[R][2];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) s[r][0] = s[r][1] = _mm512_setzero_si512();
    for (int j = 0; j < P::kSubs; ++j) {
      __m512i t[R][2];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) t[r][0] = t[r][1] = _mm512_setzero_si512();
#pragma GCC unroll 8
      for (int i = 0; i < P::kStepsPerSub; ++i) {
        const int step = j * P::kStepsPerSub + i;
        const __m512i w0 = _mm512_load_si512(p->codes[step][0]), w1 = _mm512_load_si512(p->codes[step][1]);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          int32_t word;
          std::memcpy(&word, q + r * K + 4 * step, 4);
          const __m512i a = _mm512_set1_epi32(word);
          t[r][0] = _mm512_dpbusd_epi32(t[r][0], w0, a), t[r][1] = _mm512_dpbusd_epi32(t[r][1], w1, a);
        }
      }
      const __m512i c0 = _mm512_load_si512(p->sc[j][0]), c1 = _mm512_load_si512(p->sc[j][1]);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
        s[r][0] = _mm512_add_epi32(s[r][0], _mm512_mullo_epi32(t[r][0], c0)),
        s[r][1] = _mm512_add_epi32(s[r][1], _mm512_mullo_epi32(t[r][1], c1));
    }
    // the offset's -offset * sum_j sc_j * bsum_j, or (into zeroed sums) the mins' sum_j m_j * bsum_j
    const auto pair_sums = [&](__m512i (&into)[R][2]) {
      for (int j = 0; j < P::kPairs; ++j) {
        const __m512i e0 = _mm512_load_si512(p->pairs[j][0]), e1 = _mm512_load_si512(p->pairs[j][1]);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          int32_t word;
          std::memcpy(&word, bsums + ((m0 + r) * x.nb + b) * 16 + 2 * j, 4);
          const __m512i a = _mm512_set1_epi32(word);
          into[r][0] = _mm512_dpwssd_epi32(into[r][0], a, e0), into[r][1] = _mm512_dpwssd_epi32(into[r][1], a, e1);
        }
      }
    };
    if constexpr (F::kOffset != 0) pair_sums(s);
    const __m512 d0 = _mm512_load_ps(p->d[0]), d1 = _mm512_load_ps(p->d[1]);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 dx = _mm512_set1_ps(x.d[(m0 + r) * x.nb + b]);
      acc[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[r][0]), _mm512_mul_ps(d0, dx), acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[r][1]), _mm512_mul_ps(d1, dx), acc[r][1]);
    }
    if constexpr (F::kMins) {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) s[r][0] = s[r][1] = _mm512_setzero_si512();
      pair_sums(s);
      const __m512 e0 = _mm512_load_ps(p->dmin[0]), e1 = _mm512_load_ps(p->dmin[1]);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512 dx = _mm512_set1_ps(x.d[(m0 + r) * x.nb + b]);
        acc[r][0] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(s[r][0]), _mm512_mul_ps(e0, dx), acc[r][0]);
        acc[r][1] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(s[r][1]), _mm512_mul_ps(e1, dx), acc[r][1]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + 32 * r, acc[r][0]), _mm512_storeu_ps(out + 32 * r + 16, acc[r][1]);
}

// y (M, N) = x @ W.T for x already in Q8_K rows and W (N, nb super-blocks of F).
template <class F>
void gemm_tiled(const Q8KRows& x, const uint8_t* w, int64_t N, float* y) {
  tiles::for_tiles<Packed<F>>(
      x.M, x.nb, w, x.nb * F::kBytes, N, y,
      [&](const uint8_t* t, int64_t stride, int cols, Packed<F>* p) { pack_tile<F>(t, stride, cols, x.nb, p); },
      [&](const Packed<F>* p, int64_t m0, auto rows, float* out) {
        tile_rows<F, decltype(rows)::value>(p, x, m0, out);
      });
}

}  // namespace kq

#endif
