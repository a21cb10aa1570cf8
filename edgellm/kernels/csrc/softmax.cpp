// Two-pass softmax (Dukhan & Ablavatski, 2020): no pass to find the max first.
//
// exp(x) = p * 2^n with n = round(x / ln 2) and p = exp(x - n ln 2) in [0.7, 1.42], so it never overflows as a
// pair. Pass 1 keeps per lane a running (sum of p, exponent) and rescales the sum with vscalefps whenever a larger
// exponent arrives; pass 2 recomputes each p * 2^n and scales it by 2^-E / sum. Two reads of x and one write, where
// the three-pass softmax (max, sum of exp, normalise) reads x three times.
// Logits are clamped at -1e30 first so -inf (a masked logit) becomes an exponent far below the others: exactly 0.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

constexpr float kLog2e = 1.442695040888963f;
constexpr float kLn2Hi = 0.693145751953125f;  // ln 2 split so n * kLn2Hi is exact (Cody-Waite)
constexpr float kLn2Lo = 1.428606765330187e-06f;
constexpr float kFloor = -1e30f;
constexpr float kReduced = 0.35f;  // |r| <= ln(2) / 2 for finite x; the clamp only bites for clamped logits

#if defined(__AVX512F__)
// x -> (p, n) with exp(x) = p * 2^n; degree-6 Taylor polynomial on |r| <= 0.35: relative error ~2e-7.
inline void exp_split(__m512 x, __m512& p, __m512& n) {
  x = _mm512_max_ps(x, _mm512_set1_ps(kFloor));
  n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  r = _mm512_min_ps(_mm512_max_ps(r, _mm512_set1_ps(-kReduced)), _mm512_set1_ps(kReduced));
  p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
}

void softmax_row(const float* x, float* y, int64_t V) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 sum[4], ex[4];  // four chains: each step waits ~16 cycles on its chain's previous exponent
  for (int c = 0; c < 4; ++c) sum[c] = _mm512_setzero_ps(), ex[c] = ninf;
  auto accumulate = [](__m512 v, __m512& sum, __m512& e) {
    __m512 p, n;
    exp_split(v, p, n);
    const __m512 top = _mm512_max_ps(e, n);
    sum = _mm512_add_ps(_mm512_scalef_ps(sum, _mm512_sub_ps(e, top)), _mm512_scalef_ps(p, _mm512_sub_ps(n, top)));
    e = top;
  };
  int64_t i = 0;
  for (; i + 64 <= V; i += 64)
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) accumulate(_mm512_loadu_ps(x + i + 16 * c), sum[c], ex[c]);
  for (; i < V; i += 16) {
    const __mmask16 mask = _cvtu32_mask16(V - i >= 16 ? 0xffffu : (1u << (V - i)) - 1u);
    accumulate(_mm512_mask_loadu_ps(ninf, mask, x + i), sum[0], ex[0]);
  }
  const __m512 top = _mm512_max_ps(_mm512_max_ps(ex[0], ex[1]), _mm512_max_ps(ex[2], ex[3]));
  __m512 lanes = _mm512_setzero_ps();
  for (int c = 0; c < 4; ++c) lanes = _mm512_add_ps(lanes, _mm512_scalef_ps(sum[c], _mm512_sub_ps(ex[c], top)));
  const float e = _mm512_reduce_max_ps(top);
  const float s = _mm512_reduce_add_ps(_mm512_scalef_ps(lanes, _mm512_sub_ps(top, _mm512_set1_ps(e))));
  const __m512 inv = _mm512_set1_ps(1.0f / s), ve = _mm512_set1_ps(e);
  for (i = 0; i < V; i += 16) {
    const __mmask16 mask = _cvtu32_mask16(V - i >= 16 ? 0xffffu : (1u << (V - i)) - 1u);
    __m512 p, n;
    exp_split(_mm512_maskz_loadu_ps(mask, x + i), p, n);
    _mm512_mask_storeu_ps(y + i, mask, _mm512_scalef_ps(_mm512_mul_ps(p, inv), _mm512_sub_ps(n, ve)));
  }
}
#else
inline void exp_split(float x, float& p, float& n) {
  x = std::max(x, kFloor);
  n = std::nearbyint(x * kLog2e);
  const float r = std::clamp(std::fma(-n, kLn2Lo, std::fma(-n, kLn2Hi, x)), -kReduced, kReduced);
  p = std::exp(r);
}

void softmax_row(const float* x, float* y, int64_t V) {
  float sum = 0.0f, e = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < V; ++i) {
    float p, n;
    exp_split(x[i], p, n);
    const float top = std::max(e, n);
    const auto shift = [](float d) { return static_cast<int>(std::max(d, -300.0f)); };  // below -300: 0 anyway
    sum = std::ldexp(sum, shift(e - top)) + std::ldexp(p, shift(n - top));
    e = top;
  }
  for (int64_t i = 0; i < V; ++i) {
    float p, n;
    exp_split(x[i], p, n);
    y[i] = std::ldexp(p / sum, static_cast<int>(std::max(n - e, -300.0f)));
  }
}
#endif

// softmax over the last dim of an fp32 tensor, rows in parallel.
torch::Tensor two_pass_softmax(const torch::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.dim() >= 1, "two_pass_softmax: x must be fp32");
  const torch::Tensor xc = x.contiguous();
  torch::Tensor y = torch::empty_like(xc);
  const int64_t V = x.size(-1), rows = V ? xc.numel() / V : 0;
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) softmax_row(xp + r * V, yp + r * V, V);
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("two_pass_softmax", &two_pass_softmax, "softmax over the last dim in two passes over x (fp32)");
}
