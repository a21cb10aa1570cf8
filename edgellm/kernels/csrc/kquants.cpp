// Python entry points of the k-quant GEMV and dequantization kernels in kquants.h.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <string>

#include "kquants.h"

using namespace kq;

int64_t check_blocks(const torch::Tensor& blocks, int64_t K, int64_t bytes) {
  TORCH_CHECK(K % kQK == 0, "K must be a multiple of 256");
  TORCH_CHECK(blocks.dim() == 2 && blocks.size(1) == K / kQK * bytes && blocks.scalar_type() == torch::kUInt8,
              "blocks must be uint8 (N, K / 256 * ", bytes, ")");
  return K / kQK;
}

// y (M, N) fp32 = x (M, K) @ W.T; `portable` forces the plain C++ path (to test it on a machine with AVX-512).
template <class F>
torch::Tensor gemm(const torch::Tensor& x, const torch::Tensor& blocks, int64_t K, bool portable) {
  const int64_t nb = check_blocks(blocks, K, F::kBytes);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.scalar_type() == torch::kFloat, "x must be fp32 (M, K)");
  const int64_t M = x.size(0), N = blocks.size(0);
  torch::Tensor y = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const torch::Tensor xc = x.contiguous(), wc = blocks.contiguous();
  std::vector<Q8K> qx;
  for (int64_t m = 0; m < M; ++m) qx.push_back(quantize_q8k(xc.data_ptr<float>() + m * K, nb));
  std::vector<const Q8K*> xs;
  for (const Q8K& q : qx) xs.push_back(&q);
  const uint8_t* w = wc.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const int64_t row_bytes = nb * F::kBytes;
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
// by default; the pragma, unlike a function attribute, also covers the lambda that parallel_for runs.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
template <class F>
void dequantize(const torch::Tensor& blocks, int64_t K, torch::Tensor& out) {
  const int64_t nb = check_blocks(blocks, K, F::kBytes), N = blocks.size(0);
  const bool bf16 = out.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(out.is_contiguous() && out.numel() == N * K && (bf16 || out.scalar_type() == torch::kFloat),
              "out must be a contiguous fp32 or bf16 tensor of N * K elements");
  const torch::Tensor wc = blocks.contiguous();
  const uint8_t* w = wc.data_ptr<uint8_t>();
  float* of = bf16 ? nullptr : out.data_ptr<float>();
  c10::BFloat16* ob = bf16 ? out.data_ptr<c10::BFloat16>() : nullptr;
  at::parallel_for(0, N * nb, 64, [&](int64_t b0, int64_t b1) {
    Decoded dec;
    float buf[kQK];
    for (int64_t b = b0; b < b1; ++b) {
      F::decode(w + b * F::kBytes, dec);
      float* y = bf16 ? buf : of + b * kQK;
      for (int j = 0; j < 16; ++j) {
        const float scale = dec.d * static_cast<float>(dec.sc[j]), min = dec.dmin * static_cast<float>(dec.m[j]);
        for (int i = 0; i < 16; ++i) {
          const float v = scale * static_cast<float>(dec.u[16 * j + i] - F::kOffset);
          y[16 * j + i] = F::kMins ? v - min : v;
        }
      }
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
  m.def("dequantize_into", [](const torch::Tensor& blocks, int64_t K, const std::string& kind, torch::Tensor out) {
    dispatch(kind, [&](auto f) { dequantize<decltype(f)>(blocks, K, out); });
  }, "GGUF k-quant blocks (N, K / 256 * bytes) into out, fp32 or bf16 (N, K)");
  m.def("simd", []() {
#ifdef EDGELLM_KQ_AVX512
    return true;
#else
    return false;
#endif
  }, "whether the AVX-512 VNNI path was compiled in");
}
