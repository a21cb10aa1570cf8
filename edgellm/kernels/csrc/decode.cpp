// The small per-token ops of a decode step, for fp32 tensors: one-query attention and RMS norm.
//
// At one token per step these ops carry no arithmetic worth the name, but through ATen each costs a dispatch,
// allocations and, for attention, batched GEMMs of one row (SDPA on 16 heads x 270 cached positions: ~120 us,
// against ~15 us for the loops below). The PyTorch code paths they replace stay the reference and the fallback.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
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
#endif

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
// query head h reads kv head h / (H / Hkv)). Returns softmax(q k^T * scale) v as (B, H, 1, D), no mask: a
// single query may see every cached position.
torch::Tensor attend_one(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attend_one: q, k and v must be 4-D");
  TORCH_CHECK(q.scalar_type() == torch::kFloat && k.scalar_type() == torch::kFloat &&
                  v.scalar_type() == torch::kFloat, "attend_one: fp32 tensors only");
  TORCH_CHECK(q.size(2) == 1, "attend_one: one query position");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hkv = k.size(1), T = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == Hkv && v.size(2) == T && k.size(3) == D &&
                  v.size(3) == D && Hkv > 0 && H % Hkv == 0 && T > 0, "attend_one: shape mismatch");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "attend_one: D must be contiguous");
  auto out = torch::empty({B, H, 1, D}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
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
    std::vector<float> p(group * T), m(group), inv(group);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / Hkv, g = i % Hkv;
      const float* kh = kp + b * ks0 + g * ks1;
      const float* vh = vp + b * vs0 + g * vs1;
      const float* qb = qp + b * qs0 + g * group * qs1;
      std::fill(m.begin(), m.end(), -INFINITY);
      for (int64_t t = 0; t < T; ++t) {  // each key row is read once (then from L1) for all query heads
        const float* kt = kh + t * ks2;
        for (int64_t j = 0; j < group; ++j) {
          const float score = dot(qb + j * qs1, kt, D) * s;
          p[j * T + t] = score;
          m[j] = std::max(m[j], score);
        }
      }
      for (int64_t j = 0; j < group; ++j) inv[j] = 1.0f / exp_and_sum(p.data() + j * T, T, m[j]);
      float* ob = op + (b * H + g * group) * D;
#if defined(__AVX512F__)
      const int64_t n = D / 16;
      if (D % 16 == 0 && n <= 16 && group * n <= 24) {  // every output row of the group stays in registers across T
        __m512 acc[24];
        for (int64_t r = 0; r < group * n; ++r) acc[r] = _mm512_setzero_ps();
        for (int64_t t = 0; t < T; ++t) {
          const float* vt = vh + t * vs2;
          __m512 vv[16];
          for (int64_t c = 0; c < n; ++c) vv[c] = _mm512_loadu_ps(vt + 16 * c);
          for (int64_t j = 0; j < group; ++j) {
            const __m512 w = _mm512_set1_ps(p[j * T + t]);
            for (int64_t c = 0; c < n; ++c) acc[j * n + c] = _mm512_fmadd_ps(w, vv[c], acc[j * n + c]);
          }
        }
        for (int64_t j = 0; j < group; ++j)
          for (int64_t c = 0; c < n; ++c)
            _mm512_storeu_ps(ob + j * D + 16 * c, _mm512_mul_ps(acc[j * n + c], _mm512_set1_ps(inv[j])));
        continue;
      }
#endif
      std::fill(ob, ob + group * D, 0.0f);
      for (int64_t t = 0; t < T; ++t) {
        const float* vt = vh + t * vs2;
        for (int64_t j = 0; j < group; ++j) {
          const float w = p[j * T + t] * inv[j];
          float* oj = ob + j * D;
          for (int64_t d = 0; d < D; ++d) oj[d] += w * vt[d];
        }
      }
    }
  });
  return out;
}

// x (..., D) contiguous fp32, weight (D): x / sqrt(mean(x^2) + eps) * weight, row by row.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && weight.scalar_type() == torch::kFloat, "rms_norm: fp32 only");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "rms_norm: contiguous tensors only");
  const int64_t D = weight.numel();
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == D, "rms_norm: x's last dimension must match the weight");
  auto out = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t rows = D ? x.numel() / D : 0;
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = xp + r * D;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t d = 0; d < D; ++d) ss += xr[d] * xr[d];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
    float* orow = op + r * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) orow[d] = xr[d] * inv * wp[d];
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attend_one", &attend_one, "one-query attention over a KV cache (fp32, GQA)");
  m.def("rms_norm", &rms_norm, "row-wise RMS norm (fp32)");
}
