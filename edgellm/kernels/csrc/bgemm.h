// Prefill's GEMM straight on GGUF's 32-element blocks (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, MXFP4): kgemm.h's tiled
// int8 GEMM for the block formats. x is quantized per 32-block as the GEMV does (quantize_x's numbers, vectorised);
// a tile of 32 weight rows is repacked once, two blocks at a time, into steps of 4 unsigned codes per row lane
// (Q8_0, IQ4_NL and MXFP4 levels with their sign bit flipped: + 128), and vpdpbusd adds 4 products per lane. The
// codes' excess (128, 8 or 16 times the block's sum of x's quants) is preloaded into each block's accumulator, then
// one conversion and one multiply-add by d_w * d_x per block (plus m_w * s_x for Q4_1 and Q5_1).

#pragma once

#include "ggml_blocks.h"

#ifdef EDGELLM_VNNI

#include <ATen/Parallel.h>

#include "tiles.h"

namespace ggml {

// x in blocks, flat: int8 q (M, K), and per (row, block) d (fp16-rounded), -excess * sum(q), and q8_1's s.
struct BlockRows {
  int64_t M = 0, nb = 0;
  std::vector<int8_t> q;
  std::vector<float> d, s;
  std::vector<int32_t> corr;
};

// quantize_x on one row, 32 elements per block in two vectors: the same amax, d = amax / 127, q = nearbyint(x / d)
// with the exact 1/d, fp16 d and q8_1's s from the unrounded d.
template <class T>
inline void quantize_block_row(const T* x, int64_t nb, int excess, int8_t* q, float* d, int32_t* corr, float* s) {
  const __m512 sign = _mm512_set1_ps(-0.0f);
  for (int64_t b = 0; b < nb; ++b) {
    const __m512 v0 = simd::load16(x + b * kBlock), v1 = simd::load16(x + b * kBlock + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, v0), _mm512_andnot_ps(sign, v1)));
    const float db = amax / 127.0f, id = db != 0.0f ? 1.0f / db : 0.0f;
    const auto codes = [&](__m512 v) {
      return _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(id)),
                                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    };
    const __m512i q0 = codes(v0), q1 = codes(v1);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * kBlock), _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * kBlock + 16), _mm512_cvtepi32_epi8(q1));
    const int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    d[b] = static_cast<float>(c10::Half(db));
    corr[b] = -excess * sum;
    s[b] = static_cast<float>(c10::Half(static_cast<float>(sum) * db));
  }
}

template <class T>
BlockRows quantize_block_rows(const T* x, int64_t M, int64_t K, int excess) {
  BlockRows r;
  r.M = M, r.nb = K / kBlock;
  r.q.resize(M * K), r.d.resize(M * r.nb), r.s.resize(M * r.nb), r.corr.resize(M * r.nb);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      quantize_block_row(x + m * K, r.nb, excess, r.q.data() + m * K, r.d.data() + m * r.nb,
                         r.corr.data() + m * r.nb, r.s.data() + m * r.nb);
  });
  return r;
}

// The excess a kind's unsigned codes carry.
template <Kind kind>
constexpr int code_excess() {
  if constexpr (kind == Kind::kQ8_0 || kind == Kind::kMxfp4 || kind == Kind::kIq4Nl) return 128;
  else return layout(kind).excess;
}

// One block of one row as 32 unsigned codes (excess code_excess), its d and its min (0 without one).
template <Kind kind>
inline __m256i block_codes(const uint8_t* blk, float& d, float& m) {
  m = 0.0f;
  if constexpr (kind == Kind::kQ8_0) {
    d = half_to_float(blk);
    return _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2)),
                            _mm256_set1_epi8(static_cast<char>(0x80)));
  } else {
    constexpr int qs = kind == Kind::kMxfp4 ? 1 : layout(kind).qs;
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + qs));
    const __m128i low = _mm_set1_epi8(15);
    __m256i c = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(b, low)),
                                        _mm_and_si128(_mm_srli_epi16(b, 4), low), 1);
    if constexpr (kind == Kind::kMxfp4 || kind == Kind::kIq4Nl) {
      alignas(16) int8_t table[16];
      for (int i = 0; i < 16; ++i)
        table[i] = static_cast<int8_t>((kind == Kind::kMxfp4 ? kMxfp4Levels[i] : kIq4NlLevels[i]) + 128);
      c = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(table))), c);
      d = kind == Kind::kMxfp4 ? e8m0_half(blk[0]) : half_to_float(blk);
      return c;
    } else {
      constexpr Layout l = layout(kind);
      d = half_to_float(blk + l.d);
      if constexpr (l.m >= 0) m = half_to_float(blk + l.m);
      if constexpr (l.qh >= 0) {  // bit i of the word is element i's fifth bit
        uint32_t qh;
        std::memcpy(&qh, blk + l.qh, 4);
        c = _mm256_or_si256(c, _mm256_maskz_mov_epi8(qh, _mm256_set1_epi8(16)));
      }
      return c;
    }
  }
}

// A block of a 32-row tile, repacked: per step (4 elements) two vectors of 16 rows x 4 codes, d and the min.
struct PackedBlock {
  alignas(64) uint8_t codes[8][2][64];
  alignas(64) float d[2][16], m[2][16];
};

// Rows [0, rows) of a tile (`stride` bytes apart; the others zero), two blocks per 16 x 16 transpose of code words.
template <Kind kind>
void pack_blocks(const uint8_t* w, int64_t stride, int rows, int64_t nb, PackedBlock* out) {
  constexpr int64_t bytes = block_bytes<kind>();
  alignas(64) int32_t words[16][16];
  alignas(64) float d[2][16], m[2][16];
  __m512i r[16];
  for (int v = 0; v < 2; ++v) {
    const int n = std::clamp(rows - 16 * v, 0, 16);
    for (int64_t b = 0; b < nb; b += 2) {
      const int pair = b + 1 < nb ? 2 : 1;
      for (int i = 0; i < 16; ++i) {
        for (int h = 0; h < 2; ++h) {
          __m256i c = _mm256_setzero_si256();
          d[h][i] = m[h][i] = 0.0f;
          if (i < n && h < pair) c = block_codes<kind>(w + (16 * v + i) * stride + (b + h) * bytes, d[h][i], m[h][i]);
          _mm256_store_si256(reinterpret_cast<__m256i*>(words[i] + 8 * h), c);
        }
        r[i] = _mm512_load_si512(words[i]);
      }
      tiles::transpose16(r);
      for (int h = 0; h < pair; ++h) {
        PackedBlock& p = out[b + h];
        for (int s = 0; s < 8; ++s) _mm512_store_si512(p.codes[s][v], r[8 * h + s]);
        _mm512_store_ps(p.d[v], _mm512_load_ps(d[h])), _mm512_store_ps(p.m[v], _mm512_load_ps(m[h]));
      }
    }
  }
}

// R rows of x against one packed tile, all blocks: out (R, 32) fp32.
template <Kind kind, int R>
void block_tile_rows(const PackedBlock* p, const BlockRows& x, int64_t m0, float* out) {
  constexpr bool kMins = layout(kind).m >= 0;  // Q4_1, Q5_1 (Q8_0 and MXFP4 take the default layout: none)
  const int64_t K = x.nb * kBlock;
  __m512 acc[R][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t b = 0; b < x.nb; ++b, ++p) {
    const int8_t* q = x.q.data() + m0 * K + b * kBlock;
    __m512i t[R][2];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) t[r][0] = t[r][1] = _mm512_set1_epi32(x.corr[(m0 + r) * x.nb + b]);
#pragma GCC unroll 8
    for (int s = 0; s < 8; ++s) {
      const __m512i w0 = _mm512_load_si512(p->codes[s][0]), w1 = _mm512_load_si512(p->codes[s][1]);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        int32_t word;
        std::memcpy(&word, q + r * K + 4 * s, 4);
        const __m512i a = _mm512_set1_epi32(word);
        t[r][0] = _mm512_dpbusd_epi32(t[r][0], w0, a), t[r][1] = _mm512_dpbusd_epi32(t[r][1], w1, a);
      }
    }
    const __m512 d0 = _mm512_load_ps(p->d[0]), d1 = _mm512_load_ps(p->d[1]);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 dx = _mm512_set1_ps(x.d[(m0 + r) * x.nb + b]);
      acc[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t[r][0]), _mm512_mul_ps(d0, dx), acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t[r][1]), _mm512_mul_ps(d1, dx), acc[r][1]);
      if constexpr (kMins) {
        const __m512 sx = _mm512_set1_ps(x.s[(m0 + r) * x.nb + b]);
        acc[r][0] = _mm512_fmadd_ps(_mm512_load_ps(p->m[0]), sx, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(_mm512_load_ps(p->m[1]), sx, acc[r][1]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + 32 * r, acc[r][0]), _mm512_storeu_ps(out + 32 * r + 16, acc[r][1]);
}

// y (M, N) = x @ W.T for W (N rows of nb blocks of `kind`).
template <Kind kind>
void gemm_blocks_tiled(const BlockRows& x, const uint8_t* w, int64_t N, float* y) {
  tiles::for_tiles<PackedBlock>(x.M, x.nb, w, x.nb * block_bytes<kind>(), N, y,
                             [&](const uint8_t* t, int64_t stride, int cols, PackedBlock* p) {
                               pack_blocks<kind>(t, stride, cols, x.nb, p);
                             },
                             [&](const PackedBlock* p, int64_t m0, auto rows, float* out) {
                               block_tile_rows<kind, decltype(rows)::value>(p, x, m0, out);
                             });
}

}  // namespace ggml

#endif
