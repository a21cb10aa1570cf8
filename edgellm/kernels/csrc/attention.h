// One-query attention for the query heads that share one KV head (GQA), all in fp32 over K/V rows of fp32, bf16 or
// fp16. Shared by decode.cpp (op at a time) and the fused decode step (step.cpp).

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "simd.h"

namespace simd {

// Per-thread buffers of attend_group, sized for `group` heads over T positions.
struct AttentionScratch {
  std::vector<float> p, m, inv, kv;
  AttentionScratch(int64_t group, int64_t T, int64_t D) : p(group * T), m(group), inv(group), kv(16 * D) {}
};

// out[j] (D floats each) = softmax(q_j k^T * scale) v for the `group` fp32 queries qf[j], over T positions of the
// kv head at k / v (row strides ks / vs, unit stride along D). Each K/V row is widened once for the whole group.
template <typename KV>
void attend_group(const float* const* qf, int64_t group, const KV* kh, int64_t ks2, const KV* vh, int64_t vs2,
                  int64_t T, int64_t D, float s, float* ob, AttentionScratch& scratch) {
  if (static_cast<int64_t>(scratch.p.size()) < group * T) scratch.p.resize(group * T);
  float* p = scratch.p.data();
  float* m = scratch.m.data();
  float* inv = scratch.inv.data();
  float* kvbuf = scratch.kv.data();
  std::fill(m, m + group, -INFINITY);
  int64_t t = 0;
#if defined(__AVX512F__)
  if (D % 16 == 0) {  // 16 keys at a time, widened once for the group: 16 dot products per hsum16
    for (; t + 16 <= T; t += 16) {
      const float* kt[16];
      for (int r = 0; r < 16; ++r) kt[r] = widen(kh + (t + r) * ks2, kvbuf + r * D, D);
      for (int64_t j = 0; j < group; ++j) {
        __m512 acc[16];
        for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) {
          const __m512 qv = _mm512_loadu_ps(qf[j] + d);
          for (int r = 0; r < 16; ++r) acc[r] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(kt[r] + d), acc[r]);
        }
        const __m512 score = _mm512_mul_ps(hsum16(acc), _mm512_set1_ps(s));
        _mm512_storeu_ps(p + j * T + t, score);
        m[j] = std::max(m[j], _mm512_reduce_max_ps(score));
      }
    }
  }
#endif
  for (; t < T; ++t) {  // each key row is read once (then from L1) for all query heads
    const float* kt = widen(kh + t * ks2, kvbuf, D);
    for (int64_t j = 0; j < group; ++j) {
      const float score = dot(qf[j], kt, D) * s;
      p[j * T + t] = score;
      m[j] = std::max(m[j], score);
    }
  }
  for (int64_t j = 0; j < group; ++j) inv[j] = 1.0f / exp_and_sum(p + j * T, T, m[j]);
#if defined(__AVX512F__)
  const int64_t n = D / 16;
  if (D % 16 == 0 && n <= 16 && group * n <= 24) {  // every output row of the group stays in registers across T
    __m512 acc[24];
    for (int64_t r = 0; r < group * n; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t t = 0; t < T; ++t) {
      const KV* vt = vh + t * vs2;
      __m512 vv[16];
      for (int64_t c = 0; c < n; ++c) vv[c] = load16(vt + 16 * c);
      for (int64_t j = 0; j < group; ++j) {
        const __m512 w = _mm512_set1_ps(p[j * T + t]);
        for (int64_t c = 0; c < n; ++c) acc[j * n + c] = _mm512_fmadd_ps(w, vv[c], acc[j * n + c]);
      }
    }
    for (int64_t j = 0; j < group; ++j)
      for (int64_t c = 0; c < n; ++c)
        _mm512_storeu_ps(ob + j * D + 16 * c, _mm512_mul_ps(acc[j * n + c], _mm512_set1_ps(inv[j])));
    return;
  }
#endif
  std::fill(ob, ob + group * D, 0.0f);
  for (int64_t t = 0; t < T; ++t) {
    const float* vt = widen(vh + t * vs2, kvbuf, D);
    for (int64_t j = 0; j < group; ++j) {
      const float w = p[j * T + t] * inv[j];
      float* oj = ob + j * D;
      for (int64_t d = 0; d < D; ++d) oj[d] += w * vt[d];
    }
  }
}

}  // namespace simd
