// The loop both tiled int8 GEMMs share (kgemm.h on k-quant super-blocks, bgemm.h on 32-element blocks): threads take
// tiles of 32 weight rows, each repacked once into a per-thread buffer (lanes are weight rows: two vectors of 16) and
// run against every activation row, 6 rows per register tile.

#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace tiles {

constexpr int kRows = 6;   // activation rows per register tile: 6 x 2 int32 accumulators and their sums fit
constexpr int kCols = 32;  // weight rows per packed tile

// Sixteen rows of 16 int32 in registers transposed: r[i] lane j becomes r[j] lane i (4 rounds of 16 shuffles).
inline void transpose16(__m512i* r) {
  __m512i t[16];
  for (int a = 0; a < 8; ++a)  // per 128-bit lane L: rows 2a, 2a+1 interleaved, columns 4L, 4L+1 / 4L+2, 4L+3
    t[2 * a] = _mm512_unpacklo_epi32(r[2 * a], r[2 * a + 1]), t[2 * a + 1] = _mm512_unpackhi_epi32(r[2 * a], r[2 * a + 1]);
  for (int q = 0; q < 4; ++q)  // u[4q + c] lane L: column 4L + c of rows 4q..4q+3
    for (int h = 0; h < 2; ++h) {
      r[4 * q + 2 * h] = _mm512_unpacklo_epi64(t[4 * q + h], t[4 * q + 2 + h]);
      r[4 * q + 2 * h + 1] = _mm512_unpackhi_epi64(t[4 * q + h], t[4 * q + 2 + h]);
    }
  for (int c = 0; c < 4; ++c) {  // the 4 x 4 transpose of 128-bit lanes of u[c], u[4 + c], u[8 + c], u[12 + c]
    const __m512i x0 = _mm512_shuffle_i32x4(r[c], r[4 + c], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i x1 = _mm512_shuffle_i32x4(r[c], r[4 + c], _MM_SHUFFLE(3, 2, 3, 2));
    const __m512i y0 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i y1 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], _MM_SHUFFLE(3, 2, 3, 2));
    t[c] = _mm512_shuffle_i32x4(x0, y0, _MM_SHUFFLE(2, 0, 2, 0));
    t[4 + c] = _mm512_shuffle_i32x4(x0, y0, _MM_SHUFFLE(3, 1, 3, 1));
    t[8 + c] = _mm512_shuffle_i32x4(x1, y1, _MM_SHUFFLE(2, 0, 2, 0));
    t[12 + c] = _mm512_shuffle_i32x4(x1, y1, _MM_SHUFFLE(3, 1, 3, 1));
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// f(std::integral_constant<int, r>{}) for r = rows (1..kRows).
template <class F>
void with_rows(int64_t rows, F f) {
  switch (rows) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    default: return f(std::integral_constant<int, kRows>{});
  }
}

// y (M, N) = x @ W.T: `pack(tile_bytes, stride, cols, Packed*)` repacks a tile's `units` blocks (cols <= 32 rows
// `stride` bytes apart), `rows(const Packed*, m0, std::integral_constant<int, r>, out)` runs r <= 6 activation rows
// from m0 into out (r, 32), the row count a compile-time constant so the register tile unrolls.
template <class Packed, class Pack, class Rows>
void for_tiles(int64_t M, int64_t units, const uint8_t* w, int64_t row_bytes, int64_t N, float* y, Pack pack,
               Rows rows) {
  const int64_t count = (N + kCols - 1) / kCols;
  at::parallel_for(0, count, 1, [&](int64_t t0, int64_t t1) {
    std::vector<Packed> packed(units);
    alignas(64) float out[kRows * kCols];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kCols;
      const int cols = static_cast<int>(std::min<int64_t>(kCols, N - n0));
      pack(w + n0 * row_bytes, row_bytes, cols, packed.data());
      // the next tile's bytes into L2 while this one runs (its repacking waited on DRAM), a slice per row tile: all
      // at once, most of the requests found the miss queue full and were dropped
      const uint8_t* next = w + (n0 + kCols) * row_bytes;
      const int64_t ahead = t + 1 < t1 ? std::min<int64_t>(kCols, N - n0 - kCols) * row_bytes : 0;
      const int64_t slice = (ahead * kRows / M + 64) / 64 * 64;
      for (int64_t m0 = 0, done = 0; m0 < M; m0 += kRows) {
        for (const int64_t end = std::min(ahead, done + slice); done < end; done += 64)
          _mm_prefetch(reinterpret_cast<const char*>(next) + done, _MM_HINT_T1);
        const int64_t r = std::min<int64_t>(kRows, M - m0);
        with_rows(r, [&](auto rc) { rows(packed.data(), m0, rc, out); });
        for (int64_t i = 0; i < r; ++i) std::memcpy(y + (m0 + i) * N + n0, out + kCols * i, cols * sizeof(float));
      }
    }
  });
}

}  // namespace tiles
