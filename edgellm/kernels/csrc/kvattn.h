// Attention of a few queries (a decode step: the query heads sharing one KV head) straight over a KV cache held
// as packed low-bit codes with fp16 scales/zeros (edgellm/kv/quantized_cache.py, edgellm/kv/pool.py).
//
// The PyTorch path dequantizes every block of K/V to fp32 and runs batched GEMMs of a few rows on it: 40-136 ms a
// step. Here key codes are widened to floats a tile at a time in L1, value codes in registers as they are
// accumulated, and the scales are applied after the dot products (dequantize in registers):
//   per-token keys:   q.k = sum_g s_g (q_g . c_g) + z_g sum(q_g)
//   per-channel keys: q.k = (q * s) . c + q . z           (s, z per channel, shared by a group of tokens)
//   per-token values: sum_t p_t v_t = sum_t (p_t s_tg) c_t + sum_t p_t z_tg
// with an online softmax in fp32, one task per (batch, kv head, span of tokens), the spans merged at the end by
// their log-sum-exp. The PyTorch path stays the reference and the fallback.
//
// 4-bit rows are widened in split-nibble order within each block of 32 codes (its 16 low nibbles, then its 16
// high ones: two masks and a shift for 32 codes, no byte shuffle); the queries are permuted to match and the
// value accumulators permuted back at the end. The stored layout (edgellm/kv/codec.py `pack`) does not change.
//
// Shared by the op-at-a-time extension (kvattn.cpp: any batch, paged caches, spans of tokens merged by their
// log-sum-exp) and the fused decode step (step.cpp: one Worker per KV head over packed tokens, then the window).

#pragma once

#include <torch/extension.h>

#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "simd.h"

namespace kvattn {

using simd::exp_and_sum;
#if defined(__AVX512F__)
using simd::hsum16;
#endif

#if defined(__AVX512F__)
constexpr bool kSplitNibbles = true;
#else
constexpr bool kSplitNibbles = false;  // the plain build widens codes one at a time, in natural order
#endif
constexpr int64_t kTile = 64;  // per-token tokens widened at a time: a tile of K and V codes stays in L1

#if defined(__AVX512F__)
// 16 consecutive codes packed lowest bits first (codec.pack) as fp32: each lane picks its byte, shifts, masks.
template <int BITS>
inline __m512 codes16(const uint8_t* p) {
  if constexpr (BITS == 8)
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  __m128i bytes;
  __m512i shifts;
  if constexpr (BITS == 4) {
    bytes = _mm_shuffle_epi8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)),
                             _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7));
    shifts = _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
  } else {
    int32_t word;
    std::memcpy(&word, p, 4);
    bytes = _mm_shuffle_epi8(_mm_cvtsi32_si128(word), _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3));
    shifts = _mm512_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6);
  }
  const __m512i codes = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(bytes), shifts);
  return _mm512_cvtepi32_ps(_mm512_and_si512(codes, _mm512_set1_epi32((1 << BITS) - 1)));
}
#endif

#if defined(__AVX512F__)
// 32 4-bit codes (16 bytes) as fp32 in split order: dst[0..16) the low nibbles (codes 0, 2, .., 30), dst[16..32)
// the high ones (codes 1, 3, .., 31).
// The bytes are widened once (a load-and-extend) and split in the dword lanes: one cross-lane widening per 32 codes.
inline __m512i bytes16(const uint8_t* p) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline void codes32_split(const uint8_t* p, float* dst) {
  const __m512i bytes = bytes16(p);
  _mm512_storeu_ps(dst, _mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(0x0f))));
  _mm512_storeu_ps(dst + 16, _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4)));
}

inline float max16(__m512 v) { return _mm512_reduce_max_ps(v); }

// Codes [16 c, 16 c + 16) of a row as fp32, in split order for SPLIT 4-bit rows (codes32_split's halves).
template <int BITS, bool SPLIT>
inline __m512 chunk16(const uint8_t* row, int c) {
  if constexpr (BITS == 4 && SPLIT) {
    const __m512i bytes = bytes16(row + (c >> 1) * 16);
    return _mm512_cvtepi32_ps(c & 1 ? _mm512_srli_epi32(bytes, 4) : _mm512_and_si512(bytes, _mm512_set1_epi32(0x0f)));
  } else {
    return codes16<BITS>(row + c * 16 * BITS / 8);
  }
}
#endif

#if defined(__AVX512F__)
// The 16 dot products of q[d0, d1) with rows k, k + D, .., k + 15 D over the same dims. DD > 0 fixes D at compile
// time: each row is then a constant offset from one pointer, where 16 runtime row pointers spilled registers.
template <int DD>
__attribute__((always_inline)) inline __m512 dots16(const float* k, const float* q, int64_t D, int64_t d0,
                                                    int64_t d1) {
  const int64_t stride = DD > 0 ? DD : D;
  __m512 acc[16];
  for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t d = d0; d < d1; d += 16) {
    const __m512 qv = _mm512_loadu_ps(q + d);
    for (int r = 0; r < 16; ++r) acc[r] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k + r * stride + d), acc[r]);
  }
  return hsum16(acc);
}
#endif

// Position of dim d in split order (blocks of 32: even dims first, then odd ones), and back.
inline int64_t split_pos(int64_t d) { return (d & ~int64_t{31}) + (d & 1) * 16 + (d & 31) / 2; }

// The largest of n scores.
inline float row_max(const float* s, int64_t n) {
  float mx = -INFINITY;
  int64_t i = 0;
#if defined(__AVX512F__)
  if (n >= 16) {
    __m512 m = _mm512_loadu_ps(s);
    for (i = 16; i + 16 <= n; i += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(s + i));
    mx = max16(m);
  }
#endif
  for (; i < n; ++i) mx = std::max(mx, s[i]);
  return mx;
}

template <int BITS>
inline float code_at(const uint8_t* p, int64_t i) {
  constexpr int per = 8 / BITS;
  return static_cast<float>((p[i / per] >> ((i % per) * BITS)) & ((1 << BITS) - 1));
}

// The n codes of one per-token row as fp32.
template <int BITS>
void unpack_row(const uint8_t* p, float* dst, int64_t n) {
  int64_t d = 0;
#if defined(__AVX512F__)
  for (; d + 16 <= n; d += 16) _mm512_storeu_ps(dst + d, codes16<BITS>(p + d * BITS / 8));
#endif
  for (; d < n; ++d) dst[d] = code_at<BITS>(p, d);
}

// One of codes, scales or zeros: base pointer and element strides of (page, kv head, row).
inline float to_float(c10::Half h) {
#if defined(__F16C__)
  return _cvtsh_ss(h.x);  // one instruction; c10's portable conversion is a dozen
#else
  return static_cast<float>(h);
#endif
}

struct Field {
  const void* ptr;
  int64_t s0, s1, s2;
  template <typename T>
  const T* row(int64_t page, int64_t head, int64_t r) const {
    return static_cast<const T*>(ptr) + page * s0 + head * s1 + r * s2;
  }
};

inline Field field(const torch::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

struct Side {  // K or V: group = elements per scale along head_dim, or tokens per scale for per-channel keys
  Field data, scales, zeros;
  int64_t group;
};

struct Problem {
  const float* q;  // (B, Hkv, M, D) contiguous, already rotated for Hadamard keys
  int64_t Hkv, M, D;
  const int64_t* table;  // (B, pages): the page holding tokens [i * page_tokens, (i + 1) * page_tokens)
  int64_t table_stride, page_tokens, tokens;
  Side k, v;
  bool per_channel;
  const float* rk;  // full-precision recent K/V (B, Hkv, held, D) contiguous, after the packed tokens
  const float* rv;
  int64_t held;
  float scale;
  int bits;
};

// Scratch that is written before it is read: a vector without the zero fill (a decode step builds a few workers
// per layer, and zeroing their tiles cost more than attending over a short cache).
template <typename T>
struct Uninitialized : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = Uninitialized<U>;
  };
  template <typename U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};
using Scratch = std::vector<float, Uninitialized<float>>;

// The online-softmax state of one (batch, kv head)'s M query rows over one span of tokens, fed a tile at a time.
// start() points it at another (batch, kv head), or another Problem of the same shapes, keeping its scratch: the
// fused step keeps one per thread for every layer.
class Worker {
 public:
  Worker(const Problem& p, int64_t b, int64_t h, float* m, float* l, float* acc) { start(p, b, h, m, l, acc); }

  void start(const Problem& p, int64_t b, int64_t h, float* m, float* l, float* acc) {
    p_ = &p, b_ = b, h_ = h, M_ = p.M, D_ = p.D, cap_ = std::max(kTile, p.per_channel ? p.k.group : kTile);
    m_ = m, l_ = l, acc_ = acc, q_ = p.q + (b * p.Hkv + h) * p.M * p.D;
    kbuf_.resize(cap_ * D_), vbuf_.resize(cap_ * D_), ks_.resize(cap_ * (p.per_channel ? 1 : D_ / p.k.group));
    kz_.resize(ks_.size()), vs_.resize(cap_ * (D_ / p.v.group)), vz_.resize(vs_.size()), scores_.resize(M_ * cap_);
    w_.resize(std::max(M_ * cap_ * (D_ / p.v.group), D_)), zsum_.resize(std::max(M_ * (D_ / p.v.group), D_));
    qs_.resize(p.per_channel ? M_ * D_ : 0), bias_.resize(M_), qsum_.resize(M_ * D_);
    split_ = kSplitNibbles && p.bits == 4 && D_ % 32 == 0 && p.v.group % 32 == 0 &&
             (p.per_channel || p.k.group % 32 == 0);
#if defined(__AVX512F__)
    fuse_v_ = p.v.group % 16 == 0 && ((D_ == 64 && M_ <= 6) || (D_ == 128 && M_ <= 3));
    fuse_k_ = (D_ == 64 || D_ == 128) &&
              (p.per_channel || (p.k.group % 16 == 0 && (p.bits != 4 || split_)));
#else
    fuse_v_ = fuse_k_ = false;
#endif
    krows_.resize(cap_), vrows_.resize(cap_);
    if (!p.per_channel) {  // sum(q_g) per key group, the factor of each group's zero
      const int64_t kg = p.k.group, G = D_ / kg;
      for (int64_t j = 0; j < M_; ++j)
        for (int64_t g = 0; g < G; ++g) {
          float s = 0.0f;
          for (int64_t d = g * kg; d < (g + 1) * kg; ++d) s += q_[j * D_ + d];
          qsum_[j * G + g] = s;
        }
    }
    qsplit_.clear();
    if (split_ && !p.per_channel) {  // the keys' codes come in split order: so must the queries
      qsplit_.resize(M_ * D_);
      for (int64_t j = 0; j < M_; ++j)
        for (int64_t d = 0; d < D_; ++d) qsplit_[j * D_ + split_pos(d)] = q_[j * D_ + d];
    }
    if (fuse_k_ && !p.per_channel) {  // each key group's sum(q_g) under the lanes (row j % 4, token r) of its
      const int64_t G = D_ / p.k.group;  // block of four rows in scores_from_codes: [block][group][16]
      qsum_lanes_.assign((M_ + 3) / 4 * G * 16, 0.0f);
      for (int64_t j = 0; j < M_; ++j)
        for (int64_t g = 0; g < G; ++g)
          for (int r = 0; r < 4; ++r) qsum_lanes_[(j / 4 * G + g) * 16 + j % 4 * 4 + r] = qsum_[j * G + g];
    }
  }

  // Packed tokens [t0, t1): t0 a multiple of the tile (per-channel: of the key group).
  template <int BITS>
  void run(int64_t t0, int64_t t1) {
    const int64_t step = p_->per_channel ? p_->k.group : kTile;
    for (int64_t t = t0; t < t1; t += step) {
      const int64_t n = std::min(step, t1 - t);
      load_values<BITS>(t, n);
      if (p_->per_channel) {
        load_channel_keys<BITS>(t, n);
        attend<BITS>(n, kbuf_.data(), qs_.data(), bias_.data(), D_, false, vbuf_.data(), p_->v.group, true);
      } else {
        load_token_keys<BITS>(t, n);
        attend<BITS>(n, kbuf_.data(), qsplit_.empty() ? q_ : qsplit_.data(), nullptr, p_->k.group, true,
                     vbuf_.data(), p_->v.group, true);
      }
    }
    if (split_) {  // the value accumulators back to natural order
      std::vector<float> row(D_);
      for (int64_t j = 0; j < M_; ++j) {
        float* aj = acc_ + j * D_;
        for (int64_t d = 0; d < D_; ++d) row[d] = aj[split_pos(d)];
        std::copy(row.begin(), row.end(), aj);
      }
    }
  }

  // The full-precision recent tokens, read in place.
  void run_window() {
    const int64_t at = (b_ * p_->Hkv + h_) * p_->held * D_;
    run_rows(p_->rk + at, p_->rv + at, p_->held);
  }

  // n full-precision K/V rows (D apart), fp32 read in place, bf16/fp16 widened a tile at a time (exactly).
  template <typename T>
  void run_rows(const T* rk, const T* rv, int64_t n) {
    std::fill(ks_.begin(), ks_.begin() + cap_, 1.0f);
    std::fill(vs_.begin(), vs_.begin() + cap_, 1.0f);
    for (int64_t t = 0; t < n; t += cap_) {
      const int64_t m = std::min(cap_, n - t);
      if constexpr (std::is_same_v<T, float>) {
        attend<0>(m, rk + t * D_, q_, nullptr, D_, false, rv + t * D_, D_, false);
      } else {
        simd::widen(rk + t * D_, kbuf_.data(), m * D_);
        simd::widen(rv + t * D_, vbuf_.data(), m * D_);
        attend<0>(m, kbuf_.data(), q_, nullptr, D_, false, vbuf_.data(), D_, false);
      }
    }
  }

 private:
  // Codes of n per-token rows as fp32 into buf, except that rows before widen_from only have their address put in
  // rows; their scales/zeros transposed to [group][token]. The page and row step along (an int64 division per token cost more
  // than unpacking its codes).
  template <int BITS>
  void load_rows(const Side& side, int64_t t0, int64_t n, float* buf, float* sc, float* ze,
                 const uint8_t** rows = nullptr, int64_t widen_from = 0) {
    // Everything the loop reads, in locals: the stores into buf could alias the Problem for all the compiler
    // knows, and it reloaded these after every row.
    const int64_t G = D_ / side.group, P = p_->page_tokens, D = D_, cap = cap_, h = h_;
    const Field data = side.data, scales = side.scales, zeros = side.zeros;
    const bool split = BITS == 4 && split_;
    const int64_t* pages = p_->table + b_ * p_->table_stride + t0 / P;
    for (int64_t i = 0, r = t0 % P; i < n; r = 0, ++pages) {  // one run of rows within one page at a time
      const int64_t run = std::min(n - i, P - r), step = data.s2;
      const uint8_t* first = data.row<uint8_t>(*pages, h, r);
      const int64_t listed = std::clamp(widen_from - i, int64_t{0}, run);
      for (int64_t k = 0; k < listed; ++k) rows[i + k] = first + k * step;
      for (int64_t k = listed; k < run; ++k) {
        const uint8_t* codes = first + k * step;
        float* out = buf + (i + k) * D;
#if defined(__AVX512F__)
        // The same row of the next tile, asked for now: otherwise the loads wait on memory (a prefetch never
        // faults, so one past the page's last row is harmless).
        _mm_prefetch(reinterpret_cast<const char*>(codes + kTile * data.s2), _MM_HINT_T0);
        if (split)
          for (int64_t d = 0; d < D; d += 32) codes32_split(codes + d / 2, out + d);
        else
#endif
          unpack_row<BITS>(codes, out, D);
      }
      const c10::Half* s = scales.row<c10::Half>(*pages, h, r);
      const c10::Half* z = zeros.row<c10::Half>(*pages, h, r);
      int64_t k = 0;
#if defined(__AVX512F__)
      if (G == 1 && scales.s2 == 1 && zeros.s2 == 1)  // one pair per token, consecutive: 16 widened at once
        for (; k + 16 <= run; k += 16) {
          _mm512_storeu_ps(sc + i + k, simd::load16(s + k));
          _mm512_storeu_ps(ze + i + k, simd::load16(z + k));
        }
#endif
      for (; k < run; ++k)
        for (int64_t g = 0; g < G; ++g) {
          sc[g * cap + i + k] = to_float(s[k * scales.s2 + g]);
          ze[g * cap + i + k] = to_float(z[k * zeros.s2 + g]);
        }
      i += run;
    }
  }

  template <int BITS>
  void load_values(int64_t t0, int64_t n) {
    load_rows<BITS>(p_->v, t0, n, vbuf_.data(), vs_.data(), vz_.data(), vrows_.data(), fuse_v_ ? n : 0);
  }

  template <int BITS>
  void load_token_keys(int64_t t0, int64_t n) {
    load_rows<BITS>(p_->k, t0, n, kbuf_.data(), ks_.data(), kz_.data(), krows_.data(), fuse_k_ ? n / 4 * 4 : 0);
  }

  // One whole group of per-channel keys: byte row r holds tokens r * 8/BITS + i at bits i * BITS, every channel.
  // The channel scales fold into the queries (qs = q * s) and the zeros into one bias per row (q . z).
  template <int BITS>
  void load_channel_keys(int64_t t0, int64_t n) {
    constexpr int per = 8 / BITS;
    constexpr int mask = (1 << BITS) - 1;
    const int64_t page = p_->table[b_ * p_->table_stride];
    const c10::Half* s = p_->k.scales.row<c10::Half>(page, h_, t0 / p_->k.group);
    const c10::Half* z = p_->k.zeros.row<c10::Half>(page, h_, t0 / p_->k.group);
    for (int64_t d = 0; d < D_; ++d) w_[d] = to_float(s[d]), zsum_[d] = to_float(z[d]);
    for (int64_t j = 0; j < M_; ++j) {
      float bias = 0.0f;
      for (int64_t d = 0; d < D_; ++d) {
        qs_[j * D_ + d] = q_[j * D_ + d] * w_[d];
        bias += q_[j * D_ + d] * zsum_[d];
      }
      bias_[j] = bias;
    }
    std::fill(ks_.begin(), ks_.begin() + cap_, 1.0f);
    kc_rows_ = p_->k.data.row<uint8_t>(page, h_, t0 * BITS / 8);
    for (int64_t r = fuse_k_ ? n / 4 * 4 / per : 0; r < n / per; ++r) {  // rows scored from codes stay packed
      const uint8_t* row = kc_rows_ + r * p_->k.data.s2;
      float* out = kbuf_.data() + r * per * D_;
      int64_t d = 0;
#if defined(__AVX512F__)
      for (; d + 16 <= D_; d += 16) {
        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + d)));
        for (int i = 0; i < per; ++i)
          _mm512_storeu_ps(out + i * D_ + d, _mm512_cvtepi32_ps(_mm512_and_si512(
                                                 _mm512_srlv_epi32(bytes, _mm512_set1_epi32(i * BITS)), _mm512_set1_epi32(mask))));
      }
#endif
      for (; d < D_; ++d)
        for (int i = 0; i < per; ++i) out[i * D_ + d] = static_cast<float>((row[d] >> (i * BITS)) & mask);
    }
  }

  // One tile of n tokens: K rows in k (codes or values), scaled per [group][token] by ks_ (kg elements a group),
  // plus kz_ * sum(q_g) when kzero; the same for V with vs_, vz_; bias (or nothing) added to every score of a row.
  template <int BITS>
  void attend(int64_t n, const float* k, const float* qk, const float* bias, int64_t kg, bool kzero,
              const float* v, int64_t vg, bool vscaled) {
    const int64_t D = D_, Gk = D / kg, Gv = D / vg;
    int64_t scored = 0;  // tokens scored from their codes, for every row
#if defined(__AVX512F__)
    if constexpr (BITS > 0) {
      if (fuse_k_) {
        scored = n / 4 * 4;
        if (p_->per_channel)
          scores_codes<BITS>(scored, qk, kg, bias);
        else
          scores_codes<BITS>(scored, qk, kg, nullptr);
      }
    }
#endif
    for (int64_t j = 0; j < M_; ++j) {
      const float* qj = qk + j * D;
      float* sj = scores_.data() + j * cap_;
      const float b0 = bias ? bias[j] : 0.0f;
      int64_t t = scored;
#if defined(__AVX512F__)
      if (kg % 16 == 0 && scored == 0) {  // 16 tokens at a time: 16 dot products per hsum16
        for (; t + 16 <= n; t += 16) {
          __m512 total = _mm512_set1_ps(b0);
          for (int64_t g = 0; g < Gk; ++g) {
            const float* kt = k + t * D;
            const int64_t d0 = g * kg, d1 = d0 + kg;
            const __m512 dots = D == 64    ? dots16<64>(kt, qj, D, d0, d1)
                                : D == 128 ? dots16<128>(kt, qj, D, d0, d1)
                                           : dots16<0>(kt, qj, D, d0, d1);
            total = _mm512_fmadd_ps(dots, _mm512_loadu_ps(ks_.data() + g * cap_ + t), total);
            if (kzero)
              total = _mm512_fmadd_ps(_mm512_loadu_ps(kz_.data() + g * cap_ + t),
                                      _mm512_set1_ps(qsum_[j * Gk + g]), total);
          }
          _mm512_storeu_ps(sj + t, _mm512_mul_ps(total, _mm512_set1_ps(p_->scale)));
        }
      }
#endif
      for (; t < n; ++t) {
        float total = b0;
        for (int64_t g = 0; g < Gk; ++g) {
          float dot = 0.0f;
          for (int64_t d = g * kg; d < (g + 1) * kg; ++d) dot += qj[d] * k[t * D + d];
          total += ks_[g * cap_ + t] * dot;
          if (kzero) total += kz_[g * cap_ + t] * qsum_[j * Gk + g];
        }
        sj[t] = total * p_->scale;
      }

      const float new_max = std::max(m_[j], row_max(sj, n));
      const float rescale = std::exp(m_[j] - new_max);  // 0 on a row's first tile (m = -inf)
      l_[j] = l_[j] * rescale + exp_and_sum(sj, n, new_max);
      m_[j] = new_max;
      float* aj = acc_ + j * D;
      if (rescale != 1.0f)
        for (int64_t d = 0; d < D; ++d) aj[d] *= rescale;

      // V weights p_t * s_tg per [row][group][token], and sum_t p_t z_tg per [row][group], added at the end.
      for (int64_t g = 0; g < Gv; ++g) {
        float* wg = w_.data() + (j * Gv + g) * cap_;
        const float* vs = vs_.data() + g * cap_;
        const float* vz = vz_.data() + g * cap_;
        float zs = 0.0f;
        int64_t i = 0;
#if defined(__AVX512F__)
        __m512 za = _mm512_setzero_ps();
        for (; i + 16 <= n; i += 16) {
          const __m512 pi = _mm512_loadu_ps(sj + i);
          _mm512_storeu_ps(wg + i, _mm512_mul_ps(pi, _mm512_loadu_ps(vs + i)));
          if (vscaled) za = _mm512_fmadd_ps(pi, _mm512_loadu_ps(vz + i), za);
        }
        zs = _mm512_reduce_add_ps(za);
#endif
        for (; i < n; ++i) {
          wg[i] = sj[i] * vs[i];
          if (vscaled) zs += sj[i] * vz[i];
        }
        zsum_[j * Gv + g] = zs;
      }
    }
    accumulate_values<BITS>(n, v, vg);
    if (vscaled)  // groups are whole blocks of 32, so split order leaves each dim in its group
      for (int64_t j = 0; j < M_; ++j)
        for (int64_t g = 0; g < Gv; ++g) {
          const float z = zsum_[j * Gv + g];
          for (float *a = acc_ + j * D + g * vg, *end = a + vg; a < end; ++a) *a += z;
        }
  }

#if defined(__AVX512F__)
  // Per-token keys (bias nullptr) or a group of per-channel keys (one bias per row), four rows at a time (more
  // rows widen each key vector once per four).
  template <int BITS>
  void scores_codes(int64_t n4, const float* qk, int64_t kg, const float* bias) {
    constexpr bool S = BITS == 4;  // 4-bit per-token keys are fused only in split order
    auto go = [&](auto nc, int64_t j0) {
      constexpr int NC = decltype(nc)::value;
      if (bias) {
        switch (std::min<int64_t>(M_ - j0, 4)) {
          case 1: return scores_from_channel_codes<BITS, NC, 1>(n4, qk, bias, j0);
          case 2: return scores_from_channel_codes<BITS, NC, 2>(n4, qk, bias, j0);
          case 3: return scores_from_channel_codes<BITS, NC, 3>(n4, qk, bias, j0);
          default: return scores_from_channel_codes<BITS, NC, 4>(n4, qk, bias, j0);
        }
      }
      switch (std::min<int64_t>(M_ - j0, 4)) {
        case 1: return scores_from_codes<BITS, S, NC, 1>(n4, qk, kg, j0);
        case 2: return scores_from_codes<BITS, S, NC, 2>(n4, qk, kg, j0);
        case 3: return scores_from_codes<BITS, S, NC, 3>(n4, qk, kg, j0);
        default: return scores_from_codes<BITS, S, NC, 4>(n4, qk, kg, j0);
      }
    };
    for (int64_t j0 = 0; j0 < M_; j0 += 4) {
      if (D_ == 64)
        go(std::integral_constant<int, 4>{}, j0);
      else
        go(std::integral_constant<int, 8>{}, j0);
    }
  }

  // Scores of rows [j0, j0 + M) (M <= 4) over tokens [0, n4) straight from their key codes (krows_), four at a time:
  // the (row, token) dot products in 16 registers, one hsum16 for all 16, each key vector widened once in registers
  // for every row. Widening into kbuf_ and reading it back once per row cost four stores a token. Each dot is summed
  // as dots16 sums it.
  template <int BITS, bool SPLIT, int NC, int M>
  void scores_from_codes(int64_t n4, const float* qk, int64_t kg, int64_t j0) {
    const int64_t Gk = NC * 16 / kg, per = kg / 16, cap = cap_;
    const __m512 scale = _mm512_set1_ps(p_->scale);
    const float *ks = ks_.data(), *kz = kz_.data(), *lanes = qsum_lanes_.data() + j0 / 4 * Gk * 16;
    float* scores = scores_.data() + j0 * cap;
    qk += j0 * NC * 16;
    for (int64_t t = 0; t < n4; t += 4) {
      const uint8_t* rows[4] = {krows_[t], krows_[t + 1], krows_[t + 2], krows_[t + 3]};
      __m512 total = _mm512_setzero_ps();
      for (int64_t g = 0; g < Gk; ++g) {
        __m512 acc[16];
        for (int a = 0; a < 16; ++a) acc[a] = _mm512_setzero_ps();
        for (int64_t c = g * per; c < (g + 1) * per; ++c)
          for (int r = 0; r < 4; ++r) {
            const __m512 kv = chunk16<BITS, SPLIT>(rows[r], static_cast<int>(c));
            for (int j = 0; j < M; ++j)
              acc[j * 4 + r] = _mm512_fmadd_ps(_mm512_loadu_ps(qk + j * NC * 16 + 16 * c), kv, acc[j * 4 + r]);
          }
        // lanes j * 4 + r: each 128-bit lane of scales and zeros the four tokens', the sums row j's
        total = _mm512_fmadd_ps(hsum16(acc), _mm512_broadcast_f32x4(_mm_loadu_ps(ks + g * cap + t)), total);
        total = _mm512_fmadd_ps(_mm512_broadcast_f32x4(_mm_loadu_ps(kz + g * cap + t)),
                                _mm512_loadu_ps(lanes + g * 16), total);
      }
      alignas(64) float out[16];
      _mm512_store_ps(out, _mm512_mul_ps(total, scale));
      for (int j = 0; j < M; ++j) std::memcpy(scores + j * cap + t, out + j * 4, 4 * sizeof(float));
    }
  }
#endif

  // scores_from_codes for one group of per-channel keys (kc_rows_, load_channel_keys' layout) with the channel
  // scales folded into qs and the zeros into one bias per row: token t's codes are bits (t % per) * BITS of byte
  // row t / per, so each byte row is widened once per token it holds.
  template <int BITS, int NC, int M>
  void scores_from_channel_codes(int64_t n4, const float* qs, const float* bias, int64_t j0) {
    constexpr int per = 8 / BITS;
    const int64_t stride = p_->k.data.s2, cap = cap_;
    const __m512 scale = _mm512_set1_ps(p_->scale);
    alignas(64) float lanes[16] = {};
    for (int j = 0; j < M; ++j)
      for (int r = 0; r < 4; ++r) lanes[j * 4 + r] = bias[j0 + j];
    const __m512 biases = _mm512_load_ps(lanes);
    float* scores = scores_.data() + j0 * cap;
    qs += j0 * NC * 16;
    for (int64_t t = 0; t < n4; t += 4) {  // t a multiple of 4, so token t + r sits at bits (r % per) * BITS
      __m512 acc[16];
      for (int a = 0; a < 16; ++a) acc[a] = _mm512_setzero_ps();
      for (int c = 0; c < NC; ++c)
        for (int r = 0; r < 4; ++r) {
          const __m512i bytes = bytes16(kc_rows_ + (t + r) / per * stride + 16 * c);
          const __m512i codes = BITS == 8 ? bytes
                                          : _mm512_and_si512(_mm512_srli_epi32(bytes, (r % per) * BITS),
                                                             _mm512_set1_epi32((1 << BITS) - 1));
          const __m512 kv = _mm512_cvtepi32_ps(codes);
          for (int j = 0; j < M; ++j)
            acc[j * 4 + r] = _mm512_fmadd_ps(_mm512_loadu_ps(qs + j * NC * 16 + 16 * c), kv, acc[j * 4 + r]);
        }
      alignas(64) float out[16];
      _mm512_store_ps(out, _mm512_mul_ps(_mm512_add_ps(hsum16(acc), biases), scale));
      for (int j = 0; j < M; ++j) std::memcpy(scores + j * cap + t, out + j * 4, 4 * sizeof(float));
    }
  }

  // acc[j] += sum_t w[j][g(d)][t] v[t]: each V row is read once for all M rows, which stay in registers when few.
  // BITS > 0: the values are the tile's packed rows (vrows_), widened in registers, never stored as floats.
  template <int BITS>
  void accumulate_values(int64_t n, const float* v, int64_t vg) {
    const int64_t D = D_, Gv = D / vg;
#if defined(__AVX512F__)
    if constexpr (BITS > 0) {
      if (fuse_v_) {
        const uint8_t* const* rows = vrows_.data();
        if (split_)
          return fixed_rows(n, vg, [rows](int64_t i, int c) { return chunk16<BITS, true>(rows[i], c); });
        return fixed_rows(n, vg, [rows](int64_t i, int c) { return chunk16<BITS, false>(rows[i], c); });
      }
    }
    const int64_t nc = D / 16;
    if (vg % 16 == 0 && ((nc == 4 && M_ <= 6) || (nc == 8 && M_ <= 3)))
      return fixed_rows(n, vg, [v, D](int64_t i, int c) { return _mm512_loadu_ps(v + i * D + 16 * c); });
    if (vg % 16 == 0 && M_ * nc <= 24) {
      __m512 a[24];
      const float* wc[24];
      for (int64_t j = 0; j < M_; ++j)
        for (int64_t c = 0; c < nc; ++c) {
          a[j * nc + c] = _mm512_loadu_ps(acc_ + j * D + 16 * c);
          wc[j * nc + c] = w_.data() + (j * Gv + 16 * c / vg) * cap_;
        }
      for (int64_t i = 0; i < n; ++i) {
        __m512 vv[16];
        for (int64_t c = 0; c < nc; ++c) vv[c] = _mm512_loadu_ps(v + i * D + 16 * c);
        for (int64_t j = 0; j < M_; ++j)
          for (int64_t c = 0; c < nc; ++c)
            a[j * nc + c] = _mm512_fmadd_ps(_mm512_set1_ps(wc[j * nc + c][i]), vv[c], a[j * nc + c]);
      }
      for (int64_t r = 0; r < M_ * nc; ++r) _mm512_storeu_ps(acc_ + r / nc * D + 16 * (r % nc), a[r]);
      return;
    }
#endif
    for (int64_t j = 0; j < M_; ++j) {
      float* aj = acc_ + j * D;
      int64_t d = 0;
#if defined(__AVX512F__)
      if (vg % 16 == 0)
        for (; d + 16 <= D; d += 16) {
          __m512 a = _mm512_loadu_ps(aj + d);
          const float* wc = w_.data() + (j * Gv + d / vg) * cap_;
          for (int64_t i = 0; i < n; ++i) a = _mm512_fmadd_ps(_mm512_set1_ps(wc[i]), _mm512_loadu_ps(v + i * D + d), a);
          _mm512_storeu_ps(aj + d, a);
        }
#endif
      for (; d < D; ++d) {
        const float* wc = w_.data() + (j * Gv + d / vg) * cap_;
        float a = aj[d];
        for (int64_t i = 0; i < n; ++i) a += wc[i] * v[i * D + d];
        aj[d] = a;
      }
    }
  }

#if defined(__AVX512F__)
  // The register-held shapes (head_dim 64 with up to 6 rows, 128 with up to 3), row i's vector c from load(i, c).
  template <typename Load>
  void fixed_rows(int64_t n, int64_t vg, Load load) {
    if (D_ == 64) {
      switch (M_) {
        case 1: return accumulate_fixed<1, 4>(n, vg, load);
        case 2: return accumulate_fixed<2, 4>(n, vg, load);
        case 3: return accumulate_fixed<3, 4>(n, vg, load);
        case 4: return accumulate_fixed<4, 4>(n, vg, load);
        case 5: return accumulate_fixed<5, 4>(n, vg, load);
        default: return accumulate_fixed<6, 4>(n, vg, load);
      }
    }
    switch (M_) {
      case 1: return accumulate_fixed<1, 8>(n, vg, load);
      case 2: return accumulate_fixed<2, 8>(n, vg, load);
      default: return accumulate_fixed<3, 8>(n, vg, load);
    }
  }

  // accumulate_values with M rows of NC vectors known at compile time: a runtime-indexed array of accumulators
  // lives on the stack (a load and a store around every FMA); these stay in registers.
  template <int M, int NC, typename Load>
  void accumulate_fixed(int64_t n, int64_t vg, Load load) {
    const int64_t D = D_, Gv = D / vg;
    __m512 a[M][NC];
    const float* wc[M][NC];
    for (int j = 0; j < M; ++j)
      for (int c = 0; c < NC; ++c) {
        a[j][c] = _mm512_loadu_ps(acc_ + j * D + 16 * c);
        wc[j][c] = w_.data() + (j * Gv + 16 * c / vg) * cap_;
      }
    if (vg == D) {  // one weight per row and token: broadcast once, not once per vector
      for (int64_t i = 0; i < n; ++i) {
        __m512 vv[NC];
        for (int c = 0; c < NC; ++c) vv[c] = load(i, c);
        for (int j = 0; j < M; ++j) {
          const __m512 w = _mm512_set1_ps(wc[j][0][i]);
          for (int c = 0; c < NC; ++c) a[j][c] = _mm512_fmadd_ps(w, vv[c], a[j][c]);
        }
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        __m512 vv[NC];
        for (int c = 0; c < NC; ++c) vv[c] = load(i, c);
        for (int j = 0; j < M; ++j)
          for (int c = 0; c < NC; ++c) a[j][c] = _mm512_fmadd_ps(_mm512_set1_ps(wc[j][c][i]), vv[c], a[j][c]);
      }
    }
    for (int j = 0; j < M; ++j)
      for (int c = 0; c < NC; ++c) _mm512_storeu_ps(acc_ + j * D + 16 * c, a[j][c]);
  }
#endif

  const Problem* p_;
  int64_t b_, h_, M_, D_, cap_;
  float *m_, *l_, *acc_;
  const float* q_;
  Scratch kbuf_, vbuf_, ks_, kz_, vs_, vz_, scores_, w_, zsum_, qs_, bias_, qsum_;
  bool split_;  // 4-bit codes widened in split-nibble order (see the top of the file)
  bool fuse_v_;  // packed values widened in registers by accumulate_values, not into vbuf_
  bool fuse_k_;  // keys scored straight from their codes (scores_from_codes, scores_from_channel_codes)
  std::vector<const uint8_t*> krows_, vrows_;  // the tile's packed rows, where fused
  std::vector<float> qsum_lanes_;
  const uint8_t* kc_rows_ = nullptr;  // the first byte row of the tile's per-channel keys
  std::vector<float> qsplit_;  // the query rows in that order, for per-token keys
};

}  // namespace kvattn
