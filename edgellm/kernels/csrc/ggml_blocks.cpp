// Python entry points of the GGUF 32-block GEMV kernels in ggml_blocks.h.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <string>

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
  const int64_t panel = std::max<int64_t>(4, (int64_t{16} << 10) / row_bytes / 4 * 4);  // whole groups of 4 rows
  at::parallel_for(0, N, std::max<int64_t>(panel, (int64_t{32} << 10) / row_bytes), [&](int64_t n0, int64_t n1) {
    for (int64_t p0 = n0; p0 < n1; p0 += panel)
      for (int64_t m = 0; m < M; ++m)
        gemv_rows<kind>(w, row_bytes, ax[m], nb, p0, std::min(n1, p0 + panel), yp + m * N);
  });
  return y;
}

// One block's 32 weights as gguf.quants.dequantize computes them: d * q, then + m, each product and sum rounded on
// its own (GCC would contract d * q + m into one fused multiply-add; the pragma keeps them apart).
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
template <Kind kind>
void dequant_block(const uint8_t* blk, float* out) {
  if constexpr (kind == Kind::kQ8_0) {
    const float d = half_to_float(blk);
    for (int i = 0; i < kBlock; ++i) out[i] = d * static_cast<float>(static_cast<int8_t>(blk[2 + i]));
  } else if constexpr (kind == Kind::kMxfp4) {
    const float d = e8m0_half(blk[0]);
    for (int i = 0; i < 16; ++i) {
      out[i] = static_cast<float>(kMxfp4Levels[blk[1 + i] & 15]) * d;
      out[16 + i] = static_cast<float>(kMxfp4Levels[blk[1 + i] >> 4]) * d;
    }
  } else {
    constexpr Layout l = layout(kind);
    const float d = half_to_float(blk + l.d);
    for (int i = 0; i < kBlock; ++i) {
      const int c = code<kind>(blk, i);
      out[i] = d * static_cast<float>(l.levels ? kIq4NlLevels[c] : c - l.excess);
      if constexpr (l.m >= 0) out[i] = out[i] + half_to_float(blk + l.m);
    }
  }
}
#pragma GCC pop_options

// W (N, K) from N rows of K / 32 blocks, in fp32 (bit-identical to gguf's dequantize) or bf16 (that, rounded): what
// prefill's GEMM reads, a few rows at a time.
template <Kind kind>
torch::Tensor blocks_dequantize(const torch::Tensor& blocks, int64_t K, bool bf16) {
  constexpr int64_t bytes = block_bytes<kind>();
  TORCH_CHECK(K % kBlock == 0 && blocks.dim() == 2 && blocks.size(1) == K / kBlock * bytes &&
                  blocks.scalar_type() == torch::kUInt8, "blocks must be uint8 (N, K / 32 * ", bytes, ")");
  const int64_t N = blocks.size(0), nb = K / kBlock;
  torch::Tensor out = torch::empty({N, K}, torch::dtype(bf16 ? torch::kBFloat16 : torch::kFloat));
  const torch::Tensor wc = blocks.contiguous();
  const uint8_t* w = wc.data_ptr<uint8_t>();
  at::parallel_for(0, N * nb, 256, [&](int64_t b0, int64_t b1) {
    float buf[kBlock];
    for (int64_t b = b0; b < b1; ++b) {
      if (bf16) {
        dequant_block<kind>(w + b * bytes, buf);
        c10::BFloat16* o = out.data_ptr<c10::BFloat16>() + b * kBlock;
        for (int i = 0; i < kBlock; ++i) o[i] = c10::BFloat16(buf[i]);
      } else {
        dequant_block<kind>(w + b * bytes, out.data_ptr<float>() + b * kBlock);
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q8_0_gemm", &blocks_gemm<Kind::kQ8_0>, "y = x @ W.T for W in GGUF Q8_0 blocks, int8 activations");
  m.def("q4_0_gemm", &blocks_gemm<Kind::kQ4_0>, "y = x @ W.T for W in GGUF Q4_0 blocks, int8 activations");
  m.def("mxfp4_gemm", &blocks_gemm<Kind::kMxfp4>, "y = x @ W.T for W in GGUF MXFP4 blocks, int8 activations");
  m.def("q4_1_gemm", &blocks_gemm<Kind::kQ4_1>, "y = x @ W.T for W in GGUF Q4_1 blocks, q8_1 activations");
  m.def("q5_0_gemm", &blocks_gemm<Kind::kQ5_0>, "y = x @ W.T for W in GGUF Q5_0 blocks, int8 activations");
  m.def("q5_1_gemm", &blocks_gemm<Kind::kQ5_1>, "y = x @ W.T for W in GGUF Q5_1 blocks, q8_1 activations");
  m.def("iq4_nl_gemm", &blocks_gemm<Kind::kIq4Nl>, "y = x @ W.T for W in GGUF IQ4_NL blocks, int8 activations");
  m.def("dequantize", [](const torch::Tensor& blocks, int64_t K, const std::string& kind, bool bf16) {
    if (kind == "q8_0") return blocks_dequantize<Kind::kQ8_0>(blocks, K, bf16);
    if (kind == "q4_0") return blocks_dequantize<Kind::kQ4_0>(blocks, K, bf16);
    if (kind == "mxfp4") return blocks_dequantize<Kind::kMxfp4>(blocks, K, bf16);
    if (kind == "q4_1") return blocks_dequantize<Kind::kQ4_1>(blocks, K, bf16);
    if (kind == "q5_0") return blocks_dequantize<Kind::kQ5_0>(blocks, K, bf16);
    if (kind == "q5_1") return blocks_dequantize<Kind::kQ5_1>(blocks, K, bf16);
    TORCH_CHECK(kind == "iq4_nl", "unknown 32-block kind ", kind);
    return blocks_dequantize<Kind::kIq4Nl>(blocks, K, bf16);
  }, "GGUF 32-blocks (N, K / 32 * bytes) to fp32 or bf16 (N, K)");
  m.def("simd", []() {
#ifdef EDGELLM_VNNI
    return true;
#else
    return false;
#endif
  }, "whether the AVX512-VNNI path was compiled in (else every block runs the plain C++ dot)");
}
