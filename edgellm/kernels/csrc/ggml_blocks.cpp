// Python entry points of the GGUF 32-block GEMV kernels in ggml_blocks.h.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "ggml_blocks.h"

using namespace ggml;

// y (M, N) fp32 = x (M, K) @ W.T for W given as N rows of K / 32 blocks of `block_bytes` bytes.
template <Kind kind>
torch::Tensor blocks_gemm(const torch::Tensor& x, const torch::Tensor& blocks, int64_t K) {
  constexpr int64_t bytes = block_bytes<kind>();
  TORCH_CHECK(K % kBlock == 0, "K must be a multiple of 32");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.scalar_type() == torch::kFloat, "x must be fp32 (M, K)");
  const int64_t nb = K / kBlock;
  TORCH_CHECK(blocks.dim() == 2 && blocks.size(1) == nb * bytes && blocks.scalar_type() == torch::kUInt8,
              "blocks must be uint8 (N, K / 32 * ", bytes, ")");
  const int64_t M = x.size(0), N = blocks.size(0);
  torch::Tensor y = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const torch::Tensor xc = x.contiguous(), wc = blocks.contiguous();
  std::vector<ActX> ax;
  for (int64_t m = 0; m < M; ++m) ax.push_back(act_x<kind>(xc.data_ptr<float>() + m * K, nb));
  const uint8_t* w = wc.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const int64_t row_bytes = nb * bytes;
  // Rows of W per panel: ~16 KB stay in L1 while each row of x (its per-call data is ~5 bytes per weight column)
  // passes over them; looping x rows inside one weight row instead streams every x row's data from L2 per row of W.
  const int64_t panel = std::max<int64_t>(1, (int64_t{16} << 10) / row_bytes);
  at::parallel_for(0, N, std::max<int64_t>(panel, (int64_t{32} << 10) / row_bytes), [&](int64_t n0, int64_t n1) {
    for (int64_t p0 = n0; p0 < n1; p0 += panel)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = p0; n < std::min(n1, p0 + panel); ++n)
          yp[m * N + n] = row_dot<kind>(w + n * row_bytes, ax[m], nb);
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q8_0_gemm", &blocks_gemm<Kind::kQ8_0>, "y = x @ W.T for W in GGUF Q8_0 blocks, int8 activations");
  m.def("q4_0_gemm", &blocks_gemm<Kind::kQ4_0>, "y = x @ W.T for W in GGUF Q4_0 blocks, int8 activations");
  m.def("mxfp4_gemm", &blocks_gemm<Kind::kMxfp4>, "y = x @ W.T for W in GGUF MXFP4 blocks, int8 activations");
  m.def("q4_1_gemm", &blocks_gemm<Kind::kQ4_1>, "y = x @ W.T for W in GGUF Q4_1 blocks, q8_1 activations");
  m.def("q5_0_gemm", &blocks_gemm<Kind::kQ5_0>, "y = x @ W.T for W in GGUF Q5_0 blocks, int8 activations");
  m.def("q5_1_gemm", &blocks_gemm<Kind::kQ5_1>, "y = x @ W.T for W in GGUF Q5_1 blocks, q8_1 activations");
  m.def("iq4_nl_gemm", &blocks_gemm<Kind::kIq4Nl>, "y = x @ W.T for W in GGUF IQ4_NL blocks, int8 activations");
  m.def("simd", []() {
#ifdef EDGELLM_VNNI
    return true;
#else
    return false;
#endif
  }, "whether the AVX512-VNNI path was compiled in (else every block runs the plain C++ dot)");
}
