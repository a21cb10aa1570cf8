// The small per-token ops of a decode step: one-query attention and RMS norm, on fp32 or bf16 tensors (K/V also
// fp16), computed in fp32 and returned in the input's dtype.
//
// At one token per step these ops carry no arithmetic worth the name, but through ATen each costs a dispatch,
// allocations and, for attention, batched GEMMs of one row (SDPA on 16 heads x 270 cached positions: ~120 us,
// against ~15 us for the loops below). The PyTorch code paths they replace stay the reference and the fallback.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)
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
const float* widen(const T* row, float* buf, int64_t n) {
  int64_t d = 0;
#if defined(__AVX512F__)
  for (; d + 16 <= n; d += 16) _mm512_storeu_ps(buf + d, load16(row + d));
#endif
  for (; d < n; ++d) buf[d] = static_cast<float>(row[d]);
  return buf;
}

// fp32 values out in T, rounded to nearest even as PyTorch's casts round.
template <typename T>
void narrow(const float* src, T* dst, int64_t n) {
  for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<T>(src[d]);
}

// scores[t] = exp(scores[t] - max) in place; returns their sum.
float exp_and_sum(float* scores, int64_t T, float max) {
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

// q (B, H, 1, D) and k, v (B, Hkv, T, D), any strides but a unit stride along D; H a multiple of Hkv (GQA:
// query head h reads kv head h / (H / Hkv)). Returns softmax(q k^T * scale) v as (B, H, 1, D) in q's dtype, no
// mask: a single query may see every cached position. Q is fp32 or bf16, KV fp32, bf16 or fp16; all arithmetic
// is fp32 (each K/V row is widened once for the whole GQA group), rounded to Q once at the end.
template <typename Q, typename KV>
torch::Tensor attend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, double scale) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hkv = k.size(1), T = k.size(2);
  auto out = torch::empty({B, H, 1, D}, q.options());
  const Q* qp = q.data_ptr<Q>();
  const KV* kp = k.data_ptr<KV>();
  const KV* vp = v.data_ptr<KV>();
  Q* op = out.data_ptr<Q>();
  const int64_t group = H / Hkv;
  // Strides hoisted: Tensor::stride() wraps and checks its dimension on every call, in the inner loops too.
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  const float s = static_cast<float>(scale);
  // One task per (batch, kv head): the K/V rows of a position are read once for all `group` query heads that
  // share them (GQA).
  const int64_t tasks = B * Hkv;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, T * D * group));
  at::parallel_for(0, tasks, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> p(group * T), m(group), inv(group), qbuf(group * D), obuf(group * D), kvbuf(16 * D);
    std::vector<const float*> qf(group);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / Hkv, g = i % Hkv;
      const KV* kh = kp + b * ks0 + g * ks1;
      const KV* vh = vp + b * vs0 + g * vs1;
      const Q* qb = qp + b * qs0 + g * group * qs1;
      for (int64_t j = 0; j < group; ++j) qf[j] = widen(qb + j * qs1, qbuf.data() + j * D, D);
      std::fill(m.begin(), m.end(), -INFINITY);
      int64_t t = 0;
#if defined(__AVX512F__)
      if (D % 16 == 0) {  // 16 keys at a time, widened once for the group: 16 dot products per hsum16
        for (; t + 16 <= T; t += 16) {
          const float* kt[16];
          for (int r = 0; r < 16; ++r) kt[r] = widen(kh + (t + r) * ks2, kvbuf.data() + r * D, D);
          for (int64_t j = 0; j < group; ++j) {
            __m512 acc[16];
            for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
            for (int64_t d = 0; d < D; d += 16) {
              const __m512 qv = _mm512_loadu_ps(qf[j] + d);
              for (int r = 0; r < 16; ++r) acc[r] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(kt[r] + d), acc[r]);
            }
            const __m512 score = _mm512_mul_ps(hsum16(acc), _mm512_set1_ps(s));
            _mm512_storeu_ps(p.data() + j * T + t, score);
            m[j] = std::max(m[j], _mm512_reduce_max_ps(score));
          }
        }
      }
#endif
      for (; t < T; ++t) {  // each key row is read once (then from L1) for all query heads
        const float* kt = widen(kh + t * ks2, kvbuf.data(), D);
        for (int64_t j = 0; j < group; ++j) {
          const float score = dot(qf[j], kt, D) * s;
          p[j * T + t] = score;
          m[j] = std::max(m[j], score);
        }
      }
      for (int64_t j = 0; j < group; ++j) inv[j] = 1.0f / exp_and_sum(p.data() + j * T, T, m[j]);
      float* ob = obuf.data();
      Q* oq = op + (b * H + g * group) * D;
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
        narrow(ob, oq, group * D);
        continue;
      }
#endif
      std::fill(ob, ob + group * D, 0.0f);
      for (int64_t t = 0; t < T; ++t) {
        const float* vt = widen(vh + t * vs2, kvbuf.data(), D);
        for (int64_t j = 0; j < group; ++j) {
          const float w = p[j * T + t] * inv[j];
          float* oj = ob + j * D;
          for (int64_t d = 0; d < D; ++d) oj[d] += w * vt[d];
        }
      }
      narrow(ob, oq, group * D);
    }
  });
  return out;
}

template <typename Q>
torch::Tensor attend_kv(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, double scale) {
  switch (k.scalar_type()) {
    case torch::kFloat: return attend<Q, float>(q, k, v, scale);
    case torch::kBFloat16: return attend<Q, c10::BFloat16>(q, k, v, scale);
    case torch::kHalf: return attend<Q, c10::Half>(q, k, v, scale);
    default: TORCH_CHECK(false, "attend_one: k and v must be fp32, bf16 or fp16");
  }
}

torch::Tensor attend_one(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attend_one: q, k and v must be 4-D");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "attend_one: k and v must share a dtype");
  TORCH_CHECK(q.size(2) == 1, "attend_one: one query position");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hkv = k.size(1), T = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == Hkv && v.size(2) == T && k.size(3) == D &&
                  v.size(3) == D && Hkv > 0 && H % Hkv == 0 && T > 0, "attend_one: shape mismatch");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "attend_one: D must be contiguous");
  if (q.scalar_type() == torch::kFloat) return attend_kv<float>(q, k, v, scale);
  TORCH_CHECK(q.scalar_type() == torch::kBFloat16, "attend_one: q must be fp32 or bf16");
  return attend_kv<c10::BFloat16>(q, k, v, scale);
}

// ATen's sum groups its terms by the lanes of the Vectorized<float> it runs on: 8, as sum_stub registers no
// AVX-512 kernel (an AVX512 torch runs the AVX2 one) and the default and NEON vectors hold 8 floats too.
constexpr int kSumLanes = 8;

// Lane sums of n vectors of w (<= kSumLanes) lanes at x, added in the order of ATen's row_sum/multi_row_sum
// (aten/src/ATen/native/cpu/SumKernel.cpp): four interleaved accumulators, folded level by level every 16+ steps.
void row_sum(const float* x, int64_t n, int w, float* out) {
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
float aten_sum(const float* x, int64_t D) {
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

// x (..., D) contiguous, weight (D), both T: transformers' RMS norm, bit for bit. The norm runs in fp32 as
// F.rms_norm computes it (x * rsqrt(mean(x^2) + eps), the sum in ATen's order), is rounded to T, and only then
// scaled by the weight in T; for fp32 the roundings vanish and this is F.rms_norm(x, weight) exactly.
template <typename T>
torch::Tensor norm_rows(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  const int64_t D = weight.numel();
  auto out = torch::empty_like(x);
  const T* xp = x.data_ptr<T>();
  const T* wp = weight.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t rows = D ? x.numel() / D : 0;
  std::vector<float> xbuf(D), sq(D);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = widen(xp + r * D, xbuf.data(), D);
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) sq[d] = xr[d] * xr[d];
    const float inv = 1.0f / std::sqrt(aten_sum(sq.data(), D) / static_cast<float>(D) + static_cast<float>(eps));
    T* orow = op + r * D;
    for (int64_t d = 0; d < D; ++d)
      orow[d] = static_cast<T>(static_cast<float>(static_cast<T>(xr[d] * inv)) * static_cast<float>(wp[d]));
  }
  return out;
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "rms_norm: x and weight must share a dtype");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "rms_norm: contiguous tensors only");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.numel(), "rms_norm: x's last dimension must match the weight");
  if (x.scalar_type() == torch::kFloat) return norm_rows<float>(x, weight, eps);
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16, "rms_norm: fp32 or bf16 only");
  return norm_rows<c10::BFloat16>(x, weight, eps);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attend_one", &attend_one, "one-query attention over a KV cache (q fp32/bf16, K/V fp32/bf16/fp16, GQA)");
  m.def("rms_norm", &rms_norm, "row-wise RMS norm as transformers computes it (fp32 or bf16)");
}
