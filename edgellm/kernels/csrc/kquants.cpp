// Python entry points of the k-quant GEMV and dequantization kernels in kquants.h.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <string>

#include "kgemm.h"
#include "kquants.h"

using namespace kq;

int64_t check_blocks(const torch::Tensor& blocks, int64_t K, int64_t bytes) {
  TORCH_CHECK(K % kQK == 0, "K must be a multiple of 256");
  TORCH_CHECK(blocks.dim() == 2 && blocks.size(1) == K / kQK * bytes && blocks.scalar_type() == torch::kUInt8,
              "blocks must be uint8 (N, K / 256 * ", bytes, ")");
  return K / kQK;
}

// y (M, N) fp32 = x (M, K) @ W.T, x fp32 or bf16; `portable` forces the plain C++ path (to test it on a machine
// with AVX-512). From kTiledRows rows on, the tiled GEMM (kgemm.h): below that, its repacking costs more than it saves.
constexpr int64_t kTiledRows = 8;

template <class F>
torch::Tensor gemm(const torch::Tensor& x, const torch::Tensor& blocks, int64_t K, bool portable) {
  const int64_t nb = check_blocks(blocks, K, F::kBytes);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && (x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16),
              "x must be fp32 or bf16 (M, K)");
  const int64_t M = x.size(0), N = blocks.size(0);
  torch::Tensor y = torch::empty({M, N}, x.options().dtype(torch::kFloat));
  if (M == 0 || N == 0) return y;
  const torch::Tensor wc = blocks.contiguous();
#ifdef EDGELLM_KQ_AVX512
  if (!portable && M >= kTiledRows) {
    const torch::Tensor xc = x.contiguous();
    const Q8KRows q = xc.scalar_type() == torch::kFloat ? quantize_rows(xc.data_ptr<float>(), M, K)
                                                        : quantize_rows(xc.data_ptr<c10::BFloat16>(), M, K);
    gemm_tiled<F>(q, wc.data_ptr<uint8_t>(), N, y.data_ptr<float>());
    return y;
  }
#endif
  const torch::Tensor xc = x.to(torch::kFloat).contiguous();
  std::vector<Q8K> qx;
  for (int64_t m = 0; m < M; ++m) qx.push_back(quantize_q8k(xc.data_ptr<float>() + m * K, nb));
  std::vector<const Q8K*> xs;
  for (const Q8K& q : qx) xs.push_back(&q);
  const uint8_t* w = wc.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const int64_t row_bytes = nb * F::kBytes;
  if (M == 1) {  // decode: weight rows tiled instead
    at::parallel_for(0, N, std::max<int64_t>(kColTile, (int64_t{32} << 10) / row_bytes), [&](int64_t n0, int64_t n1) {
      gemv<F>(portable, w, row_bytes, qx[0], nb, n0, n1, yp);
    });
    return y;
  }
  at::parallel_for(0, N, std::max<int64_t>(1, (int64_t{32} << 10) / row_bytes), [&](int64_t n0, int64_t n1) {
    float out[kRowTile];
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t m0 = 0; m0 < M; m0 += kRowTile) {
        const uint8_t* row = w + n * row_bytes;
        const int64_t r = std::min<int64_t>(kRowTile, M - m0);
        switch (r) {
          case 1: rows<F, 1>(portable, row, xs.data() + m0, nb, out); break;
          case 2: rows<F, 2>(portable, row, xs.data() + m0, nb, out); break;
          case 3: rows<F, 3>(portable, row, xs.data() + m0, nb, out); break;
          default: rows<F, 4>(portable, row, xs.data() + m0, nb, out);
        }
        for (int64_t i = 0; i < r; ++i) yp[(m0 + i) * N + n] = out[i];
      }
  });
  return y;
}

// The weight (N, K) into `out`: in fp32 bit-identical to gguf's dequantize, (d * sc) * (u - offset) - dmin * m, each
// product rounded on its own; in bf16 that, rounded. GCC contracts a * b - c into one fused multiply-add (rounded once)
// by default, intrinsics included; the pragma, unlike a function attribute, also covers the lambdas.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
template <class F>
void dequantize_portable(const uint8_t* b, float* y) {
  Decoded dec;
  F::decode(b, dec);
  for (int j = 0; j < 16; ++j) {
    const float scale = dec.d * static_cast<float>(dec.sc[j]), min = dec.dmin * static_cast<float>(dec.m[j]);
    for (int i = 0; i < 16; ++i) {
      const float v = scale * static_cast<float>(dec.u[16 * j + i] - F::kOffset);
      y[16 * j + i] = F::kMins ? v - min : v;
    }
  }
}

#ifdef EDGELLM_KQ_AVX512
// Codes g*16..g*16+15 of a 64-code vector as the fp32 bit patterns of 2^23 + u: vpermb puts each byte under an
// exponent byte in one shuffle, and subtracting 2^23 + offset in fp32 is then exact, where widening, subtracting and
// converting took four instructions.
template <int g>
inline __m512 codes_plus_2p23(__m512i u) {
  const __m512i exponent = _mm512_set1_epi32(0x4b000000);
#ifdef __AVX512VBMI__
  const __m512i idx = _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                       _mm512_set1_epi32(16 * g));
  return _mm512_castsi512_ps(_mm512_mask_permutexvar_epi8(exponent, 0x1111111111111111, idx, u));
#else
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(u, g)), exponent));
#endif
}

inline void store32(float* y, __m512 lo, __m512 hi, bool) { _mm512_storeu_ps(y, lo), _mm512_storeu_ps(y + 16, hi); }

// vcvtne2ps2bf16 rounds to nearest even as c10 does (it would flush fp32 subnormals, but every nonzero weight is a
// multiple of 2^-24), except that it keeps a NaN's sign and payload where c10 writes 0x7fc0: blocks whose d or dmin
// is not finite (the only way to a NaN) round through simd::to_bf16 instead.
inline void store32(c10::BFloat16* y, __m512 lo, __m512 hi, bool finite) {
#ifdef __AVX512BF16__
  if (finite) return _mm512_storeu_si512(y, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
#endif
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), simd::to_bf16(lo));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + 16), simd::to_bf16(hi));
}

// dequantize_portable from the GEMV's register decode, one 16-element sub-block per vector, with its operations in
// its order: (d * sc) * (u - offset), then minus dmin * m. The scalar decode and loop were ~16% of a Q6_K prefill;
// this is 4-5x faster to bf16.
template <class F, class T>
inline void dequantize_avx512(const uint8_t* b, T* y) {
  Regs w;
  regs(F{}, b, w);
  const __m256i per16 = F::kSub32 ? _mm256_setr_epi16(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7)
                                  : _mm256_setr_epi16(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const auto scaled = [&](__m256i v, float f, float* o) {  // f * v per 16 elements
    const __m512 x = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm256_permutexvar_epi16(per16, v)));
    _mm512_store_ps(o, _mm512_mul_ps(_mm512_set1_ps(f), x));
  };
  alignas(64) float scale[16], min[16];
  scaled(w.sc, w.d, scale);
  if constexpr (F::kMins) scaled(w.m, w.dmin, min);
  // Read each sub-block's scale back as a broadcast operand (a load, no ALU work): left to itself GCC turns the
  // broadcasts into three-instruction permutes.
  asm volatile("" ::: "memory");
  const __m512 bias = _mm512_set1_ps(8388608.0f + F::kOffset);
  const auto sub_block = [&](__m512 c, int j) {
    const __m512 v = _mm512_mul_ps(_mm512_set1_ps(scale[j]), _mm512_sub_ps(c, bias));
    return F::kMins ? _mm512_sub_ps(v, _mm512_set1_ps(min[j])) : v;
  };
  const bool finite = std::isfinite(w.d) && std::isfinite(w.dmin);
  for (int v = 0; v < 4; ++v) {
    const __m512 y0 = sub_block(codes_plus_2p23<0>(w.u[v]), 4 * v);
    const __m512 y1 = sub_block(codes_plus_2p23<1>(w.u[v]), 4 * v + 1);
    const __m512 y2 = sub_block(codes_plus_2p23<2>(w.u[v]), 4 * v + 2);
    const __m512 y3 = sub_block(codes_plus_2p23<3>(w.u[v]), 4 * v + 3);
    store32(y + 64 * v, y0, y1, finite), store32(y + 64 * v + 32, y2, y3, finite);
  }
}
#endif

// `portable` forces the scalar path (to test it on a machine with AVX-512).
template <class F>
void dequantize(const torch::Tensor& blocks, int64_t K, torch::Tensor& out, bool portable) {
  const int64_t nb = check_blocks(blocks, K, F::kBytes), N = blocks.size(0);
  const bool bf16 = out.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(out.is_contiguous() && out.numel() == N * K && (bf16 || out.scalar_type() == torch::kFloat),
              "out must be a contiguous fp32 or bf16 tensor of N * K elements");
  const torch::Tensor wc = blocks.contiguous();
  const uint8_t* w = wc.data_ptr<uint8_t>();
  float* of = bf16 ? nullptr : out.data_ptr<float>();
  c10::BFloat16* ob = bf16 ? out.data_ptr<c10::BFloat16>() : nullptr;
  at::parallel_for(0, N * nb, 64, [&](int64_t b0, int64_t b1) {
#ifdef EDGELLM_KQ_AVX512
    if (!portable) {
      for (int64_t b = b0; b < b1; ++b) {
        if (bf16)
          dequantize_avx512<F>(w + b * F::kBytes, ob + b * kQK);
        else
          dequantize_avx512<F>(w + b * F::kBytes, of + b * kQK);
      }
      return;
    }
#endif
    float buf[kQK];
    for (int64_t b = b0; b < b1; ++b) {
      float* y = bf16 ? buf : of + b * kQK;
      dequantize_portable<F>(w + b * F::kBytes, y);
      if (bf16) simd::narrow(buf, ob + b * kQK, kQK);
    }
  });
}
#pragma GCC pop_options

template <class Fn>
auto dispatch(const std::string& kind, Fn fn) {
  if (kind == "q4_k") return fn(Q4K{});
  if (kind == "q5_k") return fn(Q5K{});
  if (kind == "q6_k") return fn(Q6K{});
  if (kind == "q2_k") return fn(Q2K{});
  TORCH_CHECK(kind == "q3_k", "unknown k-quant kind ", kind);
  return fn(Q3K{});
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemm", [](const torch::Tensor& x, const torch::Tensor& blocks, int64_t K, const std::string& kind,
                   bool portable) {
    return dispatch(kind, [&](auto f) { return gemm<decltype(f)>(x, blocks, K, portable); });
  }, "y = x @ W.T for W in GGUF k-quant blocks, Q8_K activations");
  m.def("dequantize_into", [](const torch::Tensor& blocks, int64_t K, const std::string& kind, torch::Tensor out,
                              bool portable) {
    dispatch(kind, [&](auto f) { dequantize<decltype(f)>(blocks, K, out, portable); });
  }, "GGUF k-quant blocks (N, K / 256 * bytes) into out, fp32 or bf16 (N, K)", py::arg("blocks"), py::arg("K"),
        py::arg("kind"), py::arg("out"), py::arg("portable") = false);
  m.def("simd", []() {
#ifdef EDGELLM_KQ_AVX512
    return true;
#else
    return false;
#endif
  }, "whether the AVX-512 VNNI path was compiled in");
}
