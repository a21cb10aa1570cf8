// GEMV on llama.cpp's 32-element blocks as stored in GGUF files, with int8 activations and AVX512-VNNI.
//
// Q8_0 block: fp16 d, 32 int8 (w = d * q). Q4_0 block: fp16 d, 16 bytes whose low nibbles are elements 0..15 and
// high nibbles 16..31 (w = d * (q - 8)). Q4_1 adds an fp16 min m after d (w = d * q + m); Q5_0 and Q5_1 add a 32-bit
// word of fifth bits (bit i for element i) before the nibbles (w = d * (q - 16), w = d * q + m); IQ4_NL is Q4_0's
// layout with each code mapping to a non-linear int8 level (w = d * level). x is quantized per 32-block like
// llama.cpp's q8_0 activations (d = amax / 127, q = round(x / d), then d rounded to fp16); against the formats with a
// min, as its q8_1, which adds s = d * sum(q) rounded to fp16, so a block's min term is m * s.
//
// vpdpbusd multiplies unsigned by signed bytes. Q8_0 weights become unsigned by flipping their sign bit (w + 128) and
// Q4_0/Q5_0 codes already are (q, not q - 8 or q - 16); the excess, 128, 8 or 16 * sum(x_q), depends on x alone, so it
// is computed once per call and preloaded (negated) into the accumulator: no extra instruction per block.
// Two loads and one vpermt2b gather the quants of 2 (Q8_0) or 4 (the others) blocks into one register, and another
// lays their scales out lane by lane.

// Shared by the op-at-a-time extension and the fused decode step (step.cpp).

#pragma once

#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "simd.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI__) && defined(__AVX512VNNI__)
#define EDGELLM_VNNI 1
#include <immintrin.h>
#endif

namespace ggml {

constexpr int64_t kBlock = 32;

using simd::half_to_float;

// x quantized per block: q (nb * 32 int8), d (fp32), the sum of q and q8_1's s per block.
struct QuantizedX {
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int32_t> sum;
  std::vector<float> s;
};

QuantizedX quantize_x(const float* x, int64_t nb) {
  QuantizedX r{std::vector<int8_t>(nb * kBlock), std::vector<float>(nb), std::vector<int32_t>(nb),
               std::vector<float>(nb)};
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * kBlock;
    float amax = 0.0f;
    for (int i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    int32_t s = 0;
    for (int i = 0; i < kBlock; ++i) {
      const int8_t q = static_cast<int8_t>(std::nearbyint(xb[i] * id));  // round half to even, as torch.round
      r.q[b * kBlock + i] = q;
      s += q;
    }
    r.d[b] = static_cast<float>(c10::Half(d));  // llama.cpp keeps the x scale in fp16
    r.sum[b] = s;
    r.s[b] = static_cast<float>(c10::Half(static_cast<float>(s) * d));  // from the unrounded d, as quantize_row_q8_1
  }
  return r;
}

// Per-call activation data in the order one weight register consumes it: `per` blocks per step, lanes/`per` lanes
// of each block's scale in `scale`, the negated excess in the first lane of each block's lanes in `corr`, and q8_1's
// s there in `mins` (the other lanes 0, so a block's min counts once). A last step with fewer than `per` blocks
// (K = 576 leaves 2 of 18) is padded with zero quants and scales, so the kernels run it as a whole one.
struct StepX {
  std::vector<int8_t> q;  // Q8_0: the blocks as they are; others: per step, the low halves of 4 blocks, then the highs
  std::vector<float> scale;
  std::vector<int32_t> corr;
  std::vector<float> mins;
};

StepX step_x(const QuantizedX& qx, int64_t nb, int per, int excess, bool split_halves) {
  const int64_t steps = (nb + per - 1) / per;
  const int lanes = 16 / per;
  StepX s{std::vector<int8_t>(steps * per * kBlock), std::vector<float>(steps * 16), std::vector<int32_t>(steps * 16),
          std::vector<float>(steps * 16)};
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t st = b / per, j = b % per;
    for (int l = 0; l < lanes; ++l) s.scale[st * 16 + j * lanes + l] = qx.d[b];
    s.corr[st * 16 + j * lanes] = -excess * qx.sum[b];
    s.mins[st * 16 + j * lanes] = qx.s[b];
    for (int i = 0; i < kBlock; ++i) {
      const int64_t at = split_halves ? st * 128 + (i / 16) * 64 + j * 16 + i % 16 : b * kBlock + i;
      s.q[at] = qx.q[b * kBlock + i];
    }
  }
  return s;
}

// Plain dot of one block, for builds without VNNI (with it, a partial last step runs as masked loads). Not
// auto-vectorized: GCC 12 -O3 -march=native turns this signed x signed byte dot into vpdpbusd (unsigned x signed)
// and gets negative weights wrong.
#define EDGELLM_SCALAR __attribute__((optimize("no-tree-vectorize")))
EDGELLM_SCALAR inline int32_t dot_q8_0(const uint8_t* blk, const int8_t* xq) {
  int32_t s = 0;
  for (int i = 0; i < kBlock; ++i) s += static_cast<int8_t>(blk[2 + i]) * xq[i];
  return s;
}

enum class Kind { kQ8_0, kQ4_0, kMxfp4, kQ4_1, kQ5_0, kQ5_1, kIq4Nl };

// Where the fields of a block with fp16 d and nibbles sit (byte offsets; -1 for a field the format lacks), the
// excess its unsigned codes carry, and whether codes index a table of int8 levels instead.
struct Layout {
  int bytes, d, m, qh, qs, excess;
  bool levels;
};

constexpr Layout layout(Kind kind) {
  switch (kind) {
    case Kind::kQ4_1: return {20, 0, 2, -1, 4, 0, false};
    case Kind::kQ5_0: return {22, 0, -1, 2, 6, 16, false};
    case Kind::kQ5_1: return {24, 0, 2, 4, 8, 0, false};
    case Kind::kIq4Nl: return {18, 0, -1, -1, 2, 0, true};
    default: return {18, 0, -1, -1, 2, 8, false};  // Q4_0 (Q8_0 and MXFP4 have kernels of their own)
  }
}

// IQ4_NL's levels, as ggml's kvalues_iq4nl.
constexpr int8_t kIq4NlLevels[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

// The code of element i (0..31) of a nibble block: low nibbles first, plus the fifth bit where the format has one.
template <Kind kind>
inline int code(const uint8_t* blk, int i) {
  constexpr Layout l = layout(kind);
  int c = (blk[l.qs + i % 16] >> (4 * (i / 16))) & 15;
  if constexpr (l.qh >= 0) c |= ((blk[l.qh + i / 8] >> (i % 8)) & 1) << 4;
  return c;
}

// sum_i w_i x_i / d_w over one block (without Q4_1/Q5_1's min, which the caller adds as m * s).
template <Kind kind>
EDGELLM_SCALAR inline int32_t dot_nibbles(const uint8_t* blk, const int8_t* xq) {
  constexpr Layout l = layout(kind);
  int32_t s = 0;
  for (int i = 0; i < kBlock; ++i) {
    const int c = code<kind>(blk, i);
    s += (l.levels ? kIq4NlLevels[c] : c - l.excess) * xq[i];
  }
  return s;
}

// MXFP4: the doubled E2M1 level of each 4-bit code (sign in bit 3), and the block scale 2^(e - 128), as ggml's
// kvalues_mxfp4 and ggml_e8m0_to_fp32_half.
constexpr int8_t kMxfp4Levels[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

inline float e8m0_half(uint8_t e) {
  const uint32_t bits = e < 2 ? uint32_t{0x00200000} << e : static_cast<uint32_t>(e - 1) << 23;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

EDGELLM_SCALAR inline int32_t dot_mxfp4(const uint8_t* blk, const int8_t* xq) {
  int32_t s = 0;
  for (int i = 0; i < 16; ++i)
    s += kMxfp4Levels[blk[1 + i] & 15] * xq[i] + kMxfp4Levels[blk[1 + i] >> 4] * xq[16 + i];
  return s;
}

#ifdef EDGELLM_VNNI
// Every kernel below computes R rows (row_bytes apart) at once against one x: x's quants, corrections and scales are
// loaded once per step for all of them, each row keeps one accumulator (so a row's result does not depend on R), and
// one reduction ends each row. A step reads `StepBytes` bytes of a row as two overlapping registers (its first 64 and
// its last 64); the last step of a row whose block count is not a multiple of the step's reads only the bytes of the
// blocks it has (masked loads: zeros, never the next row), and x's padding is zero there too.
template <int StepBytes>
struct StepLoads {
  __mmask64 first = ~__mmask64{0}, second = ~__mmask64{0};
  __mmask16 lanes = 0xffff;  // the fp32 lanes of the blocks that exist
  static StepLoads partial(int valid, int valid_lanes) {  // the first `valid` bytes of the step exist
    const auto ones = [](int n) { return n <= 0 ? __mmask64{0} : n >= 64 ? ~__mmask64{0} : (__mmask64{1} << n) - 1; };
    return {ones(valid), ones(valid - (StepBytes - 64)), static_cast<__mmask16>(ones(valid_lanes))};
  }
  // Also asks for the bytes simd::kPrefetchBytes ahead of these.
  template <bool Full>
  void load(const uint8_t* p, __m512i& z0, __m512i& z1) const {
    simd::prefetch_l2(p, StepBytes);
    if constexpr (Full) {
      z0 = _mm512_loadu_si512(p);
      z1 = _mm512_loadu_si512(p + StepBytes - 64);
    } else {
      z0 = _mm512_maskz_loadu_epi8(first, p);
      z1 = _mm512_maskz_loadu_epi8(second, p + StepBytes - 64);
    }
  }
};

// Runs `step(st, loads, full)` over a row's whole steps, then its partial one if any; `full` is a std::bool_constant.
template <int StepBytes, int BlockBytes, int PerStep, class Step>
inline void for_steps(int64_t nb, Step step) {
  const int64_t whole = nb / PerStep;
  for (int64_t st = 0; st < whole; ++st) step(st, StepLoads<StepBytes>{}, std::true_type{});
  if (const int rest = static_cast<int>(nb % PerStep))
    step(whole, StepLoads<StepBytes>::partial(rest * BlockBytes, rest * 16 / PerStep), std::false_type{});
}

// The sums of four accumulators' lanes, in one transposing reduction (a quarter of four separate ones' work); a
// group of fewer rows pads with zeros, so a row's sum is the same bits whichever group it was computed in.
inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  __m512 q = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));  // row r: lane r
  q = _mm512_add_ps(q, _mm512_permute_ps(q, 0x4E));
  q = _mm512_add_ps(q, _mm512_permute_ps(q, 0xB1));
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), q));
}

template <int R>
inline void reduce_rows(const __m512* acc, float* out) {
  static_assert(R == 1 || R == 2 || R == 4, "rows come in groups of 1, 2 or 4");
  const __m512 zero = _mm512_setzero_ps();
  const __m128 sums = reduce4(acc[0], R > 1 ? acc[1] : zero, R > 2 ? acc[2] : zero, R > 3 ? acc[3] : zero);
  if constexpr (R == 4) _mm_storeu_ps(out, sums);
  else _mm_mask_storeu_ps(out, (1 << R) - 1, sums);
}

// Two Q8_0 blocks (68 bytes) per step: quants of both and their scales [d0 x8, d1 x8].
template <int R>
inline void rows_q8_0(const uint8_t* row, int64_t row_bytes, const StepX& sx, int64_t nb, float* out) {
  alignas(64) static const uint8_t kQuants[64] = {
      2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23,
      24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 96, 97, 98, 99, 100, 101, 102, 103, 104, 105, 106, 107,
      108, 109, 110, 111, 112, 113, 114, 115, 116, 117, 118, 119, 120, 121, 122, 123, 124, 125, 126, 127};
  alignas(64) static const uint8_t kScales[64] = {
      0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 34, 35, 34, 35, 34, 35, 34, 35, 34, 35, 34, 35, 34, 35, 34, 35};
  const __m512i quants = _mm512_load_si512(kQuants), scales = _mm512_load_si512(kScales);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for_steps<68, 34, 2>(nb, [&](int64_t st, StepLoads<68> loads, auto full) {
    const __m512i xq = _mm512_loadu_si512(sx.q.data() + st * 64);
    const __m512i corr = _mm512_loadu_si512(sx.corr.data() + st * 16);
    const __m512 xs = _mm512_loadu_ps(sx.scale.data() + st * 16);
    for (int r = 0; r < R; ++r) {
      const uint8_t* p = row + r * row_bytes + st * 68;
      __m512i z0, z1, q;
      loads.template load<decltype(full)::value>(p, z0, z1);
      if constexpr (decltype(full)::value) {  // two 32-byte loads and an insert: cheaper than vpermt2b (+22% on a
        // cache-resident Zen 4 GEMV); the partial last step keeps the masked loads and the permute
        q = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2))),
                               _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 36)), 1);
      } else {
        q = _mm512_permutex2var_epi8(z0, quants, z1);
      }
      const __m512i w = _mm512_xor_si512(q, flip);
      const __m512 d = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutexvar_epi8(scales, z0)));
      const __m512i dot = _mm512_dpbusd_epi32(corr, w, xq);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(d, xs), acc[r]);
    }
  });
  reduce_rows<R>(acc, out);
}

// Byte indices (into two registers: a step's first 64 bytes, then its last 64) of what one step of four nibble
// blocks needs: their 64 quant bytes, the scale and min fp16 pairs lane by lane ([d0 x4, .., d3 x4]), and for each
// quant byte the fifth-bit byte of its low and of its high nibble, with the bit to test.
struct NibbleTables {
  alignas(64) uint8_t quants[64] = {}, scales[64] = {}, mins[64] = {};
  alignas(64) uint8_t high_lo[64] = {}, high_hi[64] = {}, bit[64] = {};
  explicit NibbleTables(Layout l) {
    const int second = 4 * l.bytes - 64;  // where the second register starts
    const auto at = [&](int addr) { return static_cast<uint8_t>(addr < 64 ? addr : 64 + addr - second); };
    for (int lane = 0; lane < 64; ++lane) {
      const int blk = lane / 16 * l.bytes, i = lane % 16;
      quants[lane] = at(blk + l.qs + i);
      high_lo[lane] = at(blk + std::max(l.qh, 0) + i / 8);
      high_hi[lane] = at(blk + std::max(l.qh, 0) + 2 + i / 8);
      bit[lane] = static_cast<uint8_t>(1 << (i % 8));
    }
    for (int byte = 0; byte < 32; ++byte) {  // fp32 lane byte / 2 belongs to block byte / 8
      scales[byte] = at(byte / 8 * l.bytes + l.d + byte % 2);
      mins[byte] = at(byte / 8 * l.bytes + std::max(l.m, 0) + byte % 2);
    }
  }
};

// Four blocks of Q4_0, Q4_1, Q5_0, Q5_1 or IQ4_NL per step: their 64 quant bytes, low nibbles then high, with the
// fifth bits OR-ed in from the qh words, against x's low and high halves. IQ4_NL's codes become signed levels
// through a byte shuffle, multiplied as MXFP4's are (|level| times x carrying the level's sign).
// Bytes picked by `idx` from a step's two registers; when they all lie in the first, a one-source vpermb (cheaper
// than the two-source vpermt2b: +18% for a cache-resident Q4_0 GEMV on a Zen 4 core, where it is compute-bound).
template <bool InFirst>
inline __m512i gather_first(__m512i idx, __m512i z0, __m512i z1) {
  if constexpr (InFirst) return _mm512_permutexvar_epi8(idx, z0);
  else return _mm512_permutex2var_epi8(z0, idx, z1);
}

template <Kind kind, int R>
inline void rows_nibbles(const uint8_t* row, int64_t row_bytes, const StepX& sx, int64_t nb, float* out) {
  constexpr Layout l = layout(kind);
  constexpr int kStep = 4 * l.bytes;
  constexpr bool kScalesInFirst = 3 * l.bytes + l.d + 2 <= 64, kMinsInFirst = 3 * l.bytes + l.m + 2 <= 64;
  static const NibbleTables t(l);
  const __m512i quants = _mm512_load_si512(t.quants), scales = _mm512_load_si512(t.scales);
  const __m512i mins = _mm512_load_si512(t.mins), high_lo = _mm512_load_si512(t.high_lo);
  const __m512i high_hi = _mm512_load_si512(t.high_hi), bit = _mm512_load_si512(t.bit);
  const __m512i nibble = _mm512_set1_epi8(0x0f), sixteen = _mm512_set1_epi8(16), zero = _mm512_setzero_si512();
  const __m512i levels = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kIq4NlLevels)));
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  auto dot_codes = [&](__m512i acc, __m512i codes, __m512i x) {
    if constexpr (!l.levels) return _mm512_dpbusd_epi32(acc, codes, x);
    const __m512i w = _mm512_shuffle_epi8(levels, codes);
    const __m512i xs = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), zero, x);
    return _mm512_dpbusd_epi32(acc, _mm512_abs_epi8(w), xs);
  };
  for_steps<kStep, l.bytes, 4>(nb, [&](int64_t st, StepLoads<kStep> loads, auto full) {
    const int8_t* xq = sx.q.data() + st * 128;
    const __m512i xlo = _mm512_loadu_si512(xq), xhi = _mm512_loadu_si512(xq + 64);
    const __m512i corr = l.excess ? _mm512_loadu_si512(sx.corr.data() + st * 16) : zero;
    const __m512 xs = _mm512_loadu_ps(sx.scale.data() + st * 16);
    for (int r = 0; r < R; ++r) {
      __m512i z0, z1;
      loads.template load<decltype(full)::value>(row + r * row_bytes + st * kStep, z0, z1);
      const __m512i v = _mm512_permutex2var_epi8(z0, quants, z1);
      __m512i lo = _mm512_and_si512(v, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
      if constexpr (l.qh >= 0) {  // + 16 where the element's bit in its qh word is set
        const __mmask64 set_lo = _mm512_test_epi8_mask(_mm512_permutex2var_epi8(z0, high_lo, z1), bit);
        const __mmask64 set_hi = _mm512_test_epi8_mask(_mm512_permutex2var_epi8(z0, high_hi, z1), bit);
        lo = _mm512_mask_add_epi8(lo, set_lo, lo, sixteen);
        hi = _mm512_mask_add_epi8(hi, set_hi, hi, sixteen);
      }
      const __m512i dot = dot_codes(dot_codes(corr, lo, xlo), hi, xhi);
      const __m512 d = _mm512_cvtph_ps(_mm512_castsi512_si256(gather_first<kScalesInFirst>(scales, z0, z1)));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(d, xs), acc[r]);
      if constexpr (l.m >= 0) {
        const __m512 m = _mm512_cvtph_ps(_mm512_castsi512_si256(gather_first<kMinsInFirst>(mins, z0, z1)));
        acc[r] = _mm512_fmadd_ps(m, _mm512_loadu_ps(sx.mins.data() + st * 16), acc[r]);
      }
    }
  });
  reduce_rows<R>(acc, out);
}

// Four MXFP4 blocks (68 bytes): their 64 code bytes, low nibbles then high, as in Q4_0; the codes become signed
// levels through a byte shuffle. vpdpbusd wants unsigned x signed, so it multiplies |level| by x carrying the
// level's sign: no excess to correct. Scales [2^(e0-128) x4, ..] come from the E8M0 bytes via vscalefps.
template <int R>
inline void rows_mxfp4(const uint8_t* row, int64_t row_bytes, const StepX& sx, int64_t nb, float* out) {
  alignas(64) static const uint8_t kQuants[64] = {
      1,  2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12, 13, 14, 15, 16, 18, 19, 20, 21, 22, 23,
      24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46,
      47, 48, 49, 50, 112, 113, 114, 115, 116, 117, 118, 119, 120, 121, 122, 123, 124, 125, 126, 127};
  alignas(64) static const uint8_t kExps[64] = {0,  0, 0, 0, 0,  0, 0, 0, 0,  0, 0, 0, 0,  0, 0, 0,
                                                17, 0, 0, 0, 17, 0, 0, 0, 17, 0, 0, 0, 17, 0, 0, 0,
                                                34, 0, 0, 0, 34, 0, 0, 0, 34, 0, 0, 0, 34, 0, 0, 0,
                                                51, 0, 0, 0, 51, 0, 0, 0, 51, 0, 0, 0, 51, 0, 0, 0};
  const __m512i quants = _mm512_load_si512(kQuants), exps = _mm512_load_si512(kExps);
  const __m512i levels = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kMxfp4Levels)));
  const __m512i nibble = _mm512_set1_epi8(0x0f), zero = _mm512_setzero_si512();
  const __mmask64 low_bytes = 0x1111111111111111ULL;
  const __m512 half = _mm512_set1_ps(0.5f), bias = _mm512_set1_ps(127.0f);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  auto signed_dot = [&](__m512i acc, __m512i codes, __m512i x) {
    const __m512i w = _mm512_shuffle_epi8(levels, codes);
    const __m512i xs = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), zero, x);
    return _mm512_dpbusd_epi32(acc, _mm512_abs_epi8(w), xs);
  };
  for_steps<68, 17, 4>(nb, [&](int64_t st, StepLoads<68> loads, auto full) {
    const int8_t* xq = sx.q.data() + st * 128;
    const __m512i xlo = _mm512_loadu_si512(xq), xhi = _mm512_loadu_si512(xq + 64);
    const __m512 xs = _mm512_loadu_ps(sx.scale.data() + st * 16);
    for (int r = 0; r < R; ++r) {
      __m512i z0, z1;
      loads.template load<decltype(full)::value>(row + r * row_bytes + st * 68, z0, z1);
      const __m512i v = _mm512_permutex2var_epi8(z0, quants, z1);
      __m512i e = _mm512_maskz_permutexvar_epi8(low_bytes, exps, z0);
      // a padded block's x scale is 0; its e = 0 would make a denormal 2^-128, which costs a microcode assist
      if constexpr (!decltype(full)::value) e = _mm512_mask_blend_epi32(loads.lanes, _mm512_set1_epi32(127), e);
      const __m512 d = _mm512_scalef_ps(half, _mm512_sub_ps(_mm512_cvtepi32_ps(e), bias));  // 2^(e-127) / 2
      const __m512i lo = _mm512_and_si512(v, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
      const __m512i dot = signed_dot(signed_dot(zero, lo, xlo), hi, xhi);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(d, xs), acc[r]);
    }
  });
  reduce_rows<R>(acc, out);
}
#endif

// x as one kind of block wants it: quantized per 32-block, and laid out per step of the VNNI loop.
struct ActX {
  QuantizedX qx;
  StepX sx;
};

template <Kind kind>
constexpr int64_t block_bytes() {
  return kind == Kind::kQ8_0 ? 34 : kind == Kind::kMxfp4 ? 17 : layout(kind).bytes;
}

template <Kind kind>
constexpr int blocks_per_step() {
  return kind == Kind::kQ8_0 ? 2 : 4;  // blocks per 64-byte register of quants
}

template <Kind kind>
ActX act_x(const float* x, int64_t nb) {
  constexpr bool Q8 = kind == Kind::kQ8_0, MX = kind == Kind::kMxfp4;
  ActX a{quantize_x(x, nb), {}};
  a.sx = step_x(a.qx, nb, blocks_per_step<kind>(), Q8 ? 128 : MX ? 0 : layout(kind).excess, !Q8);
  return a;
}

// R outputs: the dots of R weight rows (K / 32 blocks each, row_bytes apart) with x.
template <Kind kind, int R>
void rows_dot(const uint8_t* row, int64_t row_bytes, const ActX& a, int64_t nb, float* out) {
#ifdef EDGELLM_VNNI
  if constexpr (kind == Kind::kQ8_0) rows_q8_0<R>(row, row_bytes, a.sx, nb, out);
  else if constexpr (kind == Kind::kMxfp4) rows_mxfp4<R>(row, row_bytes, a.sx, nb, out);
  else rows_nibbles<kind, R>(row, row_bytes, a.sx, nb, out);
#else
  constexpr Layout l = layout(kind);
  constexpr int64_t bytes = block_bytes<kind>();
  for (int r = 0; r < R; ++r) {
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = row + r * row_bytes + b * bytes;
      const int8_t* xq = a.qx.q.data() + b * kBlock;
      if constexpr (kind == Kind::kMxfp4) {
        acc += static_cast<float>(dot_mxfp4(blk, xq)) * (e8m0_half(blk[0]) * a.qx.d[b]);
      } else {
        const int32_t dot = kind == Kind::kQ8_0 ? dot_q8_0(blk, xq) : dot_nibbles<kind>(blk, xq);
        acc += static_cast<float>(dot) * (half_to_float(blk) * a.qx.d[b]);
        if constexpr (l.m >= 0) acc += half_to_float(blk + l.m) * a.qx.s[b];
      }
    }
    out[r] = acc;
  }
#endif
}

// y[n] = W[n] . x for n in [n0, n1): four rows at a time, then one by one.
template <Kind kind>
void gemv_rows(const uint8_t* w, int64_t row_bytes, const ActX& a, int64_t nb, int64_t n0, int64_t n1, float* y) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) rows_dot<kind, 4>(w + n * row_bytes, row_bytes, a, nb, y + n);
  for (; n < n1; ++n) rows_dot<kind, 1>(w + n * row_bytes, row_bytes, a, nb, y + n);
}

}  // namespace ggml
