// bf16-weight GEMV / small GEMM for decode: y = x @ weight.T + bias with fp32 accumulation.
//
// Decode is bound by reading the weights, so the kernel reads each weight byte once, converts it
// to fp32 in registers and reuses it for every row of x. A bf16 is the high half of an fp32, so a
// 32-bit lane holding two bf16 weights (w0 low, w1 high) yields w0 as `lane << 16` and w1 as
// `lane & 0xffff0000`: two cheap integer ops instead of a widening shuffle. x is pre-converted to
// fp32 in the matching layout: per chunk of 2*kLanes elements, the even elements then the odd ones.

// Shared by the op-at-a-time extension and the fused decode step (step.cpp).

#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace bf16 {

// An empty asm that claims to change v: the compiler must hold v in a register, so a value loaded once is not
// re-read from memory by every instruction that uses it (GCC folds x's loads into each FMA at some block shapes,
// e.g. 4 x 4: 32 loads for 24 FMAs, half the speed of the 3 x 5 block).
template <typename V>
inline void keep_in_register(V& v) {
#if defined(__AVX512F__) || defined(__AVX2__)
  asm("" : "+v"(v));
#else
  (void)v;
#endif
}

#if defined(__AVX512F__) && defined(__AVX512BW__)

constexpr int64_t kLanes = 16;
constexpr int kRegs = 28;  // of 32 zmm registers, leaving room for constants and temporaries
using vfloat = __m512;

inline vfloat vzero() { return _mm512_setzero_ps(); }
inline vfloat vload(const float* p) { return _mm512_loadu_ps(p); }
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(vfloat v) { return _mm512_reduce_add_ps(v); }

inline void split_pairs(__m512i w, vfloat& even, vfloat& odd) {
  even = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}
// Prefetch never faults, so running past the end of the weight is harmless.
inline void prefetch(const uint16_t* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1); }
inline void load_pairs(const uint16_t* p, vfloat& even, vfloat& odd) {
  __m512i w = _mm512_loadu_si512(p);
  keep_in_register(w);  // one load, not one per split
  split_pairs(w, even, odd);
}
// Masked so the tail never reads past the row (the bytes beyond may be NaN patterns or unmapped).
inline void load_pairs_tail(const uint16_t* p, int64_t n, vfloat& even, vfloat& odd) {
  split_pairs(_mm512_maskz_loadu_epi16(_cvtu32_mask32((1u << n) - 1u), p), even, odd);
}

#elif defined(__AVX2__) && defined(__FMA__)

constexpr int64_t kLanes = 8;
constexpr int kRegs = 14;  // of 16 ymm registers
using vfloat = __m256;

inline vfloat vzero() { return _mm256_setzero_ps(); }
inline vfloat vload(const float* p) { return _mm256_loadu_ps(p); }
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(vfloat v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline void split_pairs(__m256i w, vfloat& even, vfloat& odd) {
  even = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}
inline void prefetch(const uint16_t* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1); }
inline void load_pairs(const uint16_t* p, vfloat& even, vfloat& odd) {
  split_pairs(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), even, odd);
}
inline void load_pairs_tail(const uint16_t* p, int64_t n, vfloat& even, vfloat& odd) {
  alignas(32) uint16_t buf[2 * kLanes] = {};
  std::memcpy(buf, p, n * sizeof(uint16_t));
  load_pairs(buf, even, odd);
}

#else  // portable scalar build: one "lane", so the pair layout is plain row order

constexpr int64_t kLanes = 1;
constexpr int kRegs = 14;
using vfloat = float;

inline vfloat vzero() { return 0.0f; }
inline vfloat vload(const float* p) { return *p; }
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return a * b + c; }
inline float vsum(vfloat v) { return v; }

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline void prefetch(const uint16_t* /*p*/) {}
inline void load_pairs(const uint16_t* p, vfloat& even, vfloat& odd) {
  even = bf16_to_float(p[0]);
  odd = bf16_to_float(p[1]);
}
inline void load_pairs_tail(const uint16_t* p, int64_t /*n == 1*/, vfloat& even, vfloat& odd) {
  even = bf16_to_float(p[0]);
  odd = 0.0f;
}

#endif

constexpr int64_t kChunk = 2 * kLanes;
constexpr int64_t kGroupRows = 8;  // rows of x per pass over the weights

// Output rows per block: as many as fit in registers without spilling, counting R accumulators and an
// even/odd weight pair per output row (the weights stay live while every row of x passes over them).
constexpr int block_rows(int R) { return std::max(1, std::min(8, kRegs / (R + 2))); }

// Up to this K, one row of x reads the weight rows one after another: a single sequential stream, which the
// hardware prefetcher follows at the core's full read rate while x (<= 12 KB in fp32) stays in L1. Zen 4,
// DRAM-resident weights, one core: K = 1024-2816 at 21-24 GB/s against 19-21 for 8 rows per block with software
// prefetch; at K = 4096 and 8192, x no longer fits beside the stream and it falls to 12-16 against 20-24.
constexpr int64_t kStreamMaxK = 3072;

// Dot products of R rows of x (pair layout, stride xs) with NB weight rows, into out[R][NB]. With several weight
// rows it prefetches the next block: NB interleaved streams of a few KB each are too many and too short for the
// hardware prefetcher (+10-25% measured). Each sum is accumulated in the same order whatever R and NB.
template <int R, int NB>
inline void dot_block(const float* x, int64_t xs, const uint16_t* w, int64_t K, float* out) {
  vfloat acc[R][NB];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) acc[r][j] = vzero();

  const int64_t kfull = K - K % kChunk;
  for (int64_t k = 0; k < kfull; k += kChunk) {
    vfloat we[NB], wo[NB];
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) {
      if constexpr (NB > 1) prefetch(w + (NB + j) * K + k);
      load_pairs(w + j * K + k, we[j], wo[j]);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      vfloat xe = vload(x + r * xs + k), xo = vload(x + r * xs + k + kLanes);
      keep_in_register(xe), keep_in_register(xo);
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) acc[r][j] = vfma(wo[j], xo, vfma(we[j], xe, acc[r][j]));
    }
  }
  if (kfull < K) {
    vfloat we[NB], wo[NB];
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) load_pairs_tail(w + j * K + kfull, K - kfull, we[j], wo[j]);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const vfloat xe = vload(x + r * xs + kfull), xo = vload(x + r * xs + kfull + kLanes);
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) acc[r][j] = vfma(wo[j], xo, vfma(we[j], xe, acc[r][j]));
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) out[r * NB + j] = vsum(acc[r][j]);
}

// Converts x (rows, K) to fp32 in the pair layout, zero-padded to a whole number of chunks.
template <typename T>
std::vector<float> pack_x(const T* x, int64_t rows, int64_t K, int64_t kpad) {
  std::vector<float> packed(rows * kpad, 0.0f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t c = k / kChunk, i = k % kChunk;
      packed[r * kpad + c * kChunk + (i % 2) * kLanes + i / 2] = static_cast<float>(x[r * K + k]);
    }
  return packed;
}

// Output rows [n_begin, n_end) for R rows of x, in blocks of NB rows (single rows for a partial block).
template <int R, int NB, typename T>
void gemv_blocks(const float* x, int64_t kpad, const uint16_t* w, const float* bias, T* y, int64_t N, int64_t K,
                 int64_t n_begin, int64_t n_end) {
  float out[R * NB];
  for (int64_t n0 = n_begin; n0 < n_end; n0 += NB) {
    const int64_t nb = std::min<int64_t>(NB, n_end - n0);
    if (nb == NB) {
      dot_block<R, NB>(x, kpad, w + n0 * K, K, out);
    } else {
      for (int64_t j = 0; j < nb; ++j) {
        float col[R];
        dot_block<R, 1>(x, kpad, w + (n0 + j) * K, K, col);
        for (int r = 0; r < R; ++r) out[r * NB + j] = col[r];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int64_t j = 0; j < nb; ++j)
        y[r * N + n0 + j] = static_cast<T>(out[r * NB + j] + (bias ? bias[n0 + j] : 0.0f));
  }
}

template <int R, typename T>
void gemv_range(const float* x, int64_t kpad, const uint16_t* w, const float* bias, T* y, int64_t N, int64_t K,
                int64_t n_begin, int64_t n_end) {
  if (R == 1 && K <= kStreamMaxK) return gemv_blocks<R, 1>(x, kpad, w, bias, y, N, K, n_begin, n_end);
  gemv_blocks<R, block_rows(R)>(x, kpad, w, bias, y, N, K, n_begin, n_end);
}

template <typename T>
void gemv_group(int64_t rows, const float* x, int64_t kpad, const uint16_t* w, const float* bias, T* y, int64_t N,
                int64_t K, int64_t n_begin, int64_t n_end) {
  switch (rows) {
    case 1: return gemv_range<1>(x, kpad, w, bias, y, N, K, n_begin, n_end);
    case 2: return gemv_range<2>(x, kpad, w, bias, y, N, K, n_begin, n_end);
    case 3: return gemv_range<3>(x, kpad, w, bias, y, N, K, n_begin, n_end);
    case 4: return gemv_range<4>(x, kpad, w, bias, y, N, K, n_begin, n_end);
    case 5: return gemv_range<5>(x, kpad, w, bias, y, N, K, n_begin, n_end);
    case 6: return gemv_range<6>(x, kpad, w, bias, y, N, K, n_begin, n_end);
    case 7: return gemv_range<7>(x, kpad, w, bias, y, N, K, n_begin, n_end);
    default: return gemv_range<8>(x, kpad, w, bias, y, N, K, n_begin, n_end);
  }
}

}  // namespace bf16
