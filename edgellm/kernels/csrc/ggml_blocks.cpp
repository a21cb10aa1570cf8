// Python entry points of the GGUF 32-block GEMV kernels in ggml_blocks.h.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <string>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "bgemm.h"
#include "ggml_blocks.h"

using namespace ggml;

// y (M, N) fp32 = x (M, K) @ W.T for W given as N rows of K / 32 blocks of `block_bytes` bytes; x fp32 or bf16. From
// kTiledRows rows on, the tiled GEMM (bgemm.h): below that, its repacking costs more than it saves.
constexpr int64_t kTiledRows = 8;

template <Kind kind>
torch::Tensor blocks_gemm(const torch::Tensor& x, const torch::Tensor& blocks, int64_t K) {
  constexpr int64_t bytes = block_bytes<kind>();
  TORCH_CHECK(K % kBlock == 0, "K must be a multiple of 32");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && (x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16),
              "x must be fp32 or bf16 (M, K)");
  const int64_t nb = K / kBlock;
  TORCH_CHECK(blocks.dim() == 2 && blocks.size(1) == nb * bytes && blocks.scalar_type() == torch::kUInt8,
              "blocks must be uint8 (N, K / 32 * ", bytes, ")");
  const int64_t M = x.size(0), N = blocks.size(0);
  torch::Tensor y = torch::empty({M, N}, x.options().dtype(torch::kFloat));
  if (M == 0 || N == 0) return y;
  const torch::Tensor wc = blocks.contiguous();
#ifdef EDGELLM_VNNI
  if (M >= kTiledRows) {
    const torch::Tensor xb = x.contiguous();
    const BlockRows q = xb.scalar_type() == torch::kFloat
                            ? quantize_block_rows(xb.data_ptr<float>(), M, K, code_excess<kind>())
                            : quantize_block_rows(xb.data_ptr<c10::BFloat16>(), M, K, code_excess<kind>());
    gemm_blocks_tiled<kind>(q, wc.data_ptr<uint8_t>(), N, y.data_ptr<float>());
    return y;
  }
#endif
  const torch::Tensor xc = x.to(torch::kFloat).contiguous();
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

#if defined(__AVX512F__) && defined(__AVX512BW__)
// Q8_0 and Q4_0 (what most prefills dequantize) 16 weights at a time: d times an exactly converted small integer is
// one rounding, as in dequant_block, so the result has the same bits.
template <Kind kind>
inline void dequant_block_simd(const uint8_t* blk, __m512& lo, __m512& hi) {
  const __m512 d = _mm512_set1_ps(half_to_float(blk));
  if constexpr (kind == Kind::kQ8_0) {
    lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2))));
    hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 18))));
  } else {
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2)));
    const __m512i eight = _mm512_set1_epi32(8);
    lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(q, _mm512_set1_epi32(15)), eight));
    hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(q, 4), eight));
  }
  lo = _mm512_mul_ps(lo, d);
  hi = _mm512_mul_ps(hi, d);
}
#endif

// W (N, K) from N rows of K / 32 blocks into `out` (fp32: bit-identical to gguf's dequantize; bf16: that, rounded):
// what prefill's GEMM reads, a few rows at a time, into one buffer it reuses.
template <Kind kind>
void blocks_dequantize(const torch::Tensor& blocks, int64_t K, torch::Tensor& out) {
  constexpr int64_t bytes = block_bytes<kind>();
  TORCH_CHECK(K % kBlock == 0 && blocks.dim() == 2 && blocks.size(1) == K / kBlock * bytes &&
                  blocks.scalar_type() == torch::kUInt8, "blocks must be uint8 (N, K / 32 * ", bytes, ")");
  const int64_t N = blocks.size(0), nb = K / kBlock;
  const bool bf16 = out.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(out.is_contiguous() && out.numel() == N * K && (bf16 || out.scalar_type() == torch::kFloat),
              "out must be a contiguous fp32 or bf16 tensor of N * K elements");
  const torch::Tensor wc = blocks.contiguous();
  const uint8_t* w = wc.data_ptr<uint8_t>();
  float* of = bf16 ? nullptr : out.data_ptr<float>();
  c10::BFloat16* ob = bf16 ? out.data_ptr<c10::BFloat16>() : nullptr;
  at::parallel_for(0, N * nb, 256, [&](int64_t b0, int64_t b1) {
    alignas(64) float buf[kBlock];
    for (int64_t b = b0; b < b1; ++b) {
      float* dst = bf16 ? buf : of + b * kBlock;
#if defined(__AVX512F__) && defined(__AVX512BW__)
      if constexpr (kind == Kind::kQ8_0 || kind == Kind::kQ4_0) {
        __m512 lo, hi;
        dequant_block_simd<kind>(w + b * bytes, lo, hi);
        _mm512_storeu_ps(dst, lo);
        _mm512_storeu_ps(dst + 16, hi);
      } else {
        dequant_block<kind>(w + b * bytes, dst);
      }
#else
      dequant_block<kind>(w + b * bytes, dst);
#endif
      if (bf16) simd::narrow(buf, ob + b * kBlock, kBlock);
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q8_0_gemm", &blocks_gemm<Kind::kQ8_0>, "y = x @ W.T for W in GGUF Q8_0 blocks, int8 activations");
  m.def("q4_0_gemm", &blocks_gemm<Kind::kQ4_0>, "y = x @ W.T for W in GGUF Q4_0 blocks, int8 activations");
  m.def("mxfp4_gemm", &blocks_gemm<Kind::kMxfp4>, "y = x @ W.T for W in GGUF MXFP4 blocks, int8 activations");
  m.def("q4_1_gemm", &blocks_gemm<Kind::kQ4_1>, "y = x @ W.T for W in GGUF Q4_1 blocks, q8_1 activations");
  m.def("q5_0_gemm", &blocks_gemm<Kind::kQ5_0>, "y = x @ W.T for W in GGUF Q5_0 blocks, int8 activations");
  m.def("q5_1_gemm", &blocks_gemm<Kind::kQ5_1>, "y = x @ W.T for W in GGUF Q5_1 blocks, q8_1 activations");
  m.def("iq4_nl_gemm", &blocks_gemm<Kind::kIq4Nl>, "y = x @ W.T for W in GGUF IQ4_NL blocks, int8 activations");
  m.def("dequantize_into", [](const torch::Tensor& blocks, int64_t K, const std::string& kind, torch::Tensor out) {
    if (kind == "q8_0") return blocks_dequantize<Kind::kQ8_0>(blocks, K, out);
    if (kind == "q4_0") return blocks_dequantize<Kind::kQ4_0>(blocks, K, out);
    if (kind == "mxfp4") return blocks_dequantize<Kind::kMxfp4>(blocks, K, out);
    if (kind == "q4_1") return blocks_dequantize<Kind::kQ4_1>(blocks, K, out);
    if (kind == "q5_0") return blocks_dequantize<Kind::kQ5_0>(blocks, K, out);
    if (kind == "q5_1") return blocks_dequantize<Kind::kQ5_1>(blocks, K, out);
    TORCH_CHECK(kind == "iq4_nl", "unknown 32-block kind ", kind);
    return blocks_dequantize<Kind::kIq4Nl>(blocks, K, out);
  }, "GGUF 32-blocks (N, K / 32 * bytes) into out, fp32 or bf16 (N, K)");
  m.def("simd", []() {
#ifdef EDGELLM_VNNI
    return true;
#else
    return false;
#endif
  }, "whether the AVX512-VNNI path was compiled in (else every block runs the plain C++ dot)");
}
