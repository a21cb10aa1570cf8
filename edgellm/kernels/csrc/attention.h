// One-query attention for the query heads that share one KV head (GQA), all in fp32 over K/V rows of fp32, bf16 or
// fp16, of a contiguous cache or a paged one (the block pool). Shared by decode.cpp (op at a time) and the fused
// decode step (step.cpp).

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "simd.h"

namespace simd {

// Per-thread buffers of attend_group, sized for `group` heads over T positions.
struct AttentionScratch {
  std::vector<float> p, m, inv, kv;
  AttentionScratch(int64_t group, int64_t T, int64_t D) : p(group * T), m(group), inv(group), kv(16 * D) {}
};

// K or V rows of one kv head in token order, `stride` elements apart (a contiguous cache, or any strided view).
template <typename KV>
struct StridedRows {
  const KV* base;
  int64_t stride;

  struct Cursor {
    const KV* p;
    int64_t stride;
    const KV* next() { return std::exchange(p, p + stride); }
  };
  Cursor cursor() const { return {base, stride}; }
};

// K or V rows of one kv head in a paged cache (the block pool, edgellm/kv/pool.py): token t is row t % page_tokens
// of page table[t / page_tokens], pages `page_stride` elements apart from `base` (the head's row 0 in page 0), rows
// `stride` apart within a page. The cursor steps page by page: a division per row would cost as much as its dot.
template <typename KV>
struct PagedRows {
  const KV* base;
  const int64_t* table;
  int64_t page_stride, page_tokens, stride;

  struct Cursor {  // copies, not a reference: the widened rows stored in between could alias it for the compiler
    const KV* base;
    const int64_t* page;
    int64_t page_stride, page_tokens, stride;
    const KV* p = nullptr;
    int64_t left = 0;  // rows left in the current page
    const KV* next() {
      if (left == 0) p = base + *page++ * page_stride, left = page_tokens;
      --left;
      return std::exchange(p, p + stride);
    }
  };
  Cursor cursor() const { return {base, table, page_stride, page_tokens, stride}; }
};

#if defined(__AVX512F__)
// ob[j][16 c0 ..) = inv[j] * sum_t p[j][t] v_t over CW 16-column slices from c0 for the G heads of a group: all G * CW
// sums stay in registers across T, each V slice loaded once for the group.
template <int G, int CW, typename KV, template <typename> class Rows>
void pv_slices(const float* p, const float* inv, const Rows<KV>& v, int64_t T, int64_t D, int64_t c0, float* ob) {
  __m512 acc[G * CW];
  for (int r = 0; r < G * CW; ++r) acc[r] = _mm512_setzero_ps();
  auto vc = v.cursor();
  for (int64_t t = 0; t < T; ++t) {
    const KV* vt = vc.next() + 16 * c0;
    __m512 vv[CW];
    for (int c = 0; c < CW; ++c) vv[c] = load16(vt + 16 * c);
    for (int j = 0; j < G; ++j) {
      const __m512 w = _mm512_set1_ps(p[j * T + t]);
      for (int c = 0; c < CW; ++c) acc[j * CW + c] = _mm512_fmadd_ps(w, vv[c], acc[j * CW + c]);
    }
  }
  for (int j = 0; j < G; ++j)
    for (int c = 0; c < CW; ++c)
      _mm512_storeu_ps(ob + j * D + 16 * (c0 + c), _mm512_mul_ps(acc[j * CW + c], _mm512_set1_ps(inv[j])));
}

template <int G, typename KV, template <typename> class Rows>
void pv_group(const float* p, const float* inv, const Rows<KV>& v, int64_t T, int64_t D, float* ob) {
  constexpr int most = 24 / G;  // accumulators (of 32 registers) the group may hold, the rest for V and weights
  const int64_t n = D / 16;
  // the widest slice that divides the row: each pass over T reads its own cache lines of every V row
  if (most >= 8 && n % 8 == 0)
    for (int64_t c = 0; c < n; c += 8) pv_slices<G, most >= 8 ? 8 : 1>(p, inv, v, T, D, c, ob);
  else if (most >= 4 && n % 4 == 0)
    for (int64_t c = 0; c < n; c += 4) pv_slices<G, most >= 4 ? 4 : 1>(p, inv, v, T, D, c, ob);
  else if (most >= 2 && n % 2 == 0)
    for (int64_t c = 0; c < n; c += 2) pv_slices<G, most >= 2 ? 2 : 1>(p, inv, v, T, D, c, ob);
  else
    for (int64_t c = 0; c < n; ++c) pv_slices<G, 1>(p, inv, v, T, D, c, ob);
}

// The P.V half of attend_group with register-held sums, for groups of up to 8 query heads; false for wider ones.
template <typename KV, template <typename> class Rows>
bool pv_registers(const float* p, const float* inv, int64_t group, const Rows<KV>& v, int64_t T, int64_t D,
                  float* ob) {
  switch (group) {
    case 1: pv_group<1>(p, inv, v, T, D, ob); return true;
    case 2: pv_group<2>(p, inv, v, T, D, ob); return true;
    case 3: pv_group<3>(p, inv, v, T, D, ob); return true;
    case 4: pv_group<4>(p, inv, v, T, D, ob); return true;
    case 5: pv_group<5>(p, inv, v, T, D, ob); return true;
    case 6: pv_group<6>(p, inv, v, T, D, ob); return true;
    case 7: pv_group<7>(p, inv, v, T, D, ob); return true;
    case 8: pv_group<8>(p, inv, v, T, D, ob); return true;
    default: return false;
  }
}
#endif

// out[j] (D floats each) = softmax(q_j k^T * scale) v for the `group` fp32 queries qf[j], over the T positions of
// one kv head whose K/V rows `k` / `v` give in order (StridedRows or PagedRows, unit stride along D). Each K/V row
// is widened once for the whole group.
template <typename KV, template <typename> class Rows>
void attend_group(const float* const* qf, int64_t group, const Rows<KV>& k, const Rows<KV>& v, int64_t T, int64_t D,
                  float s, float* ob, AttentionScratch& scratch) {
  if (static_cast<int64_t>(scratch.p.size()) < group * T) scratch.p.resize(group * T);
  float* p = scratch.p.data();
  float* m = scratch.m.data();
  float* inv = scratch.inv.data();
  float* kvbuf = scratch.kv.data();
  std::fill(m, m + group, -INFINITY);
  auto kc = k.cursor();
  int64_t t = 0;
#if defined(__AVX512F__)
  if (D % 16 == 0) {  // 16 keys at a time, widened once for the group: 16 dot products per hsum16
    for (; t + 16 <= T; t += 16) {
      const float* kt[16];
      for (int r = 0; r < 16; ++r) kt[r] = widen(kc.next(), kvbuf + r * D, D);
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
    const float* kt = widen(kc.next(), kvbuf, D);
    for (int64_t j = 0; j < group; ++j) {
      const float score = dot(qf[j], kt, D) * s;
      p[j * T + t] = score;
      m[j] = std::max(m[j], score);
    }
  }
  for (int64_t j = 0; j < group; ++j) inv[j] = 1.0f / exp_and_sum(p + j * T, T, m[j]);
#if defined(__AVX512F__)
  if (D % 16 == 0 && pv_registers(p, inv, group, v, T, D, ob)) return;
#endif
  std::fill(ob, ob + group * D, 0.0f);
  auto vc = v.cursor();
  for (int64_t t = 0; t < T; ++t) {
    const float* vt = widen(vc.next(), kvbuf, D);
    for (int64_t j = 0; j < group; ++j) {
      const float w = p[j * T + t] * inv[j];
      float* oj = ob + j * D;
      for (int64_t d = 0; d < D; ++d) oj[d] += w * vt[d];
    }
  }
}

// attend_group over K/V rows ks2 / vs2 elements apart from kh / vh.
template <typename KV>
void attend_group(const float* const* qf, int64_t group, const KV* kh, int64_t ks2, const KV* vh, int64_t vs2,
                  int64_t T, int64_t D, float s, float* ob, AttentionScratch& scratch) {
  attend_group(qf, group, StridedRows<KV>{kh, ks2}, StridedRows<KV>{vh, vs2}, T, D, s, ob, scratch);
}

}  // namespace simd
