// Vector helpers of the decode ops: exp of non-positive values, sixteen horizontal sums at once, fp32 widening of
// bf16/fp16 rows, dot products. Shared by decode.cpp and the fused decode step (step.cpp).

#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace simd {

// An fp16 stored at p (any alignment), as fp32.
inline float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

#if defined(__AVX512F__)
// How far ahead of its reads a weight GEMV asks for bytes into L2 (_mm_prefetch, T1 hint): one core streaming
// weights from DRAM is bound by the misses it has in flight, and the hardware prefetcher alone keeps too few. Measured
// on a Xeon, a DRAM-resident Q4_0 GEMV ran at 5.6 GB/s without, 10-16 GB/s with it (2 KB ahead: 7-8 GB/s).
constexpr int kPrefetchBytes = 8192;

inline void prefetch_l2(const uint8_t* p, int bytes) {
  for (int off = 0; off < bytes; off += 64) _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes + off,
                                                         _MM_HINT_T1);
}

// exp(x) for x <= 0 (scores minus their max): x = n ln2 + r, |r| <= ln2 / 2, degree-6 Taylor polynomial for
// exp(r) (relative error ~2e-7), scaled by 2^n with vscalefps. std::exp one score at a time cost more than the
// whole rest of the attention.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-103.0f));  // below this expf is 0 anyway
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.442695040888963f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln 2 split (Cody-Waite)
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  for (const float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// Lane i of the result is the sum of v[i]'s lanes: sixteen horizontal sums in 45 shuffles and adds, where
// _mm512_reduce_add_ps costs about 8 instructions (and a latency chain) for each.
inline __m512 hsum16(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: v[2i] and v[2i+1] halved to 2 partial sums each
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: one partial sum of each of 4 vectors
    const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)  // across the 128-bit lanes, twice
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {  // bf16 is fp32's top half: widen and shift (plain AVX-512F)
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#endif

// A row of n values as fp32: the row itself when it is fp32, else converted (exactly) into buf.
inline const float* widen(const float* row, float*, int64_t) { return row; }

template <typename T>
inline const float* widen(const T* row, float* buf, int64_t n) {
  int64_t d = 0;
#if defined(__AVX512F__)
  for (; d + 16 <= n; d += 16) _mm512_storeu_ps(buf + d, load16(row + d));
#endif
  for (; d < n; ++d) buf[d] = static_cast<float>(row[d]);
  return buf;
}

// fp32 values out in T, rounded to nearest even as PyTorch's casts round.
template <typename T>
inline void narrow(const float* src, T* dst, int64_t n) {
  for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<T>(src[d]);
}

#if defined(__AVX512F__)
// 16 fp32 values as bf16 with c10::BFloat16's own rounding (bits + 0x7fff + lsb, NaN to 0x7fc0).
inline __m256i to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}
#endif

// The same for bf16, 16 at a time.
inline void narrow(const float* src, c10::BFloat16* dst, int64_t n) {
  int64_t d = 0;
#if defined(__AVX512F__)
  for (; d + 16 <= n; d += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d), to_bf16(_mm512_loadu_ps(src + d)));
#endif
  for (; d < n; ++d) dst[d] = static_cast<c10::BFloat16>(src[d]);
}

// scores[t] = exp(scores[t] - max) in place; returns their sum.
inline float exp_and_sum(float* scores, int64_t T, float max) {
  int64_t t = 0;
  float sum = 0.0f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  const __m512 vm = _mm512_set1_ps(max);
  for (; t + 16 <= T; t += 16) {
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(scores + t), vm));
    _mm512_storeu_ps(scores + t, e);
    acc = _mm512_add_ps(acc, e);
  }
  sum = _mm512_reduce_add_ps(acc);
#endif
  for (; t < T; ++t) {
    scores[t] = std::exp(scores[t] - max);
    sum += scores[t];
  }
  return sum;
}

inline float dot(const float* a, const float* b, int64_t D) {
  int64_t d = 0;
  float r = 0.0f;
#if defined(__AVX512F__)
  if (D >= 16) {
    __m512 acc = _mm512_setzero_ps();
    for (; d + 16 <= D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
    r = _mm512_reduce_add_ps(acc);
  }
#endif
  for (; d < D; ++d) r += a[d] * b[d];
  return r;
}

// ATen's sum groups its terms by the lanes of the Vectorized<float> it runs on: 8, as sum_stub registers no
// AVX-512 kernel (an AVX512 torch runs the AVX2 one) and the default and NEON vectors hold 8 floats too.
constexpr int kSumLanes = 8;

// Lane sums of n vectors of w (<= kSumLanes) lanes at x, added in the order of ATen's row_sum/multi_row_sum
// (aten/src/ATen/native/cpu/SumKernel.cpp): four interleaved accumulators, folded level by level every 16+ steps.
inline void row_sum(const float* x, int64_t n, int w, float* out) {
  constexpr int levels = 4, ilp = 4;
  const int64_t rows = n / ilp;
  int log2 = 0;
  while ((int64_t{1} << log2) < rows) ++log2;
  const int power = std::max(4, log2 / levels);
  const int64_t step = int64_t{1} << power, mask = step - 1;
  float acc[levels][ilp][kSumLanes] = {};
  auto add_rows = [&](int64_t i) {
    for (int k = 0; k < ilp; ++k)
      for (int l = 0; l < w; ++l) acc[0][k][l] += x[(i * ilp + k) * w + l];
  };
  int64_t i = 0;
  while (i + step <= rows) {
    for (int64_t j = 0; j < step; ++j, ++i) add_rows(i);
    for (int lv = 1; lv < levels; ++lv) {
      for (int k = 0; k < ilp; ++k)
        for (int l = 0; l < w; ++l) acc[lv][k][l] += std::exchange(acc[lv - 1][k][l], 0.0f);
      if ((i & (mask << (lv * power))) != 0) break;
    }
  }
  for (; i < rows; ++i) add_rows(i);
  for (int lv = 1; lv < levels; ++lv)
    for (int k = 0; k < ilp; ++k)
      for (int l = 0; l < w; ++l) acc[0][k][l] += acc[lv][k][l];
  for (int64_t r = rows * ilp; r < n; ++r)
    for (int l = 0; l < w; ++l) acc[0][0][l] += x[r * w + l];
  for (int k = 1; k < ilp; ++k)
    for (int l = 0; l < w; ++l) acc[0][0][l] += acc[0][k][l];
  std::copy(acc[0][0], acc[0][0] + w, out);
}

// sum(x) as torch.sum adds a contiguous fp32 row: whole vectors through row_sum, then the scalar tail, then
// the lanes one by one (vectorized_inner_sum); a row shorter than a vector goes through row_sum one lane wide.
inline float aten_sum(const float* x, int64_t D) {
  constexpr int w = kSumLanes;
  float total = 0.0f;
  if (D < w) {
    row_sum(x, D, 1, &total);
    return total;
  }
  float lanes[w];
  row_sum(x, D / w, w, lanes);
  for (int64_t d = D / w * w; d < D; ++d) total += x[d];
  for (const float l : lanes) total += l;
  return total;
}

}  // namespace simd
