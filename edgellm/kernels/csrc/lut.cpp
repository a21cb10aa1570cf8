// Python entry point of the table-lookup GEMV in lut.h.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "lut.h"

using namespace lut;

// y (M, N) fp32 = x (M, K) @ W.T for W packed by lut.py: packed uint8 [B, C, kTiles, bits, 64], scale and bias fp16
// [B, G, kTiles, 16] (the group's own; halved and folded for the {-1,+1} bit reading in registers).
torch::Tensor lut_gemm(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scale,
                       const torch::Tensor& bias, int64_t N, int64_t K, int64_t bits, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.scalar_type() == torch::kFloat, "lut_gemm: x must be fp32 (M, K)");
  TORCH_CHECK(bits >= 1 && bits <= 4 && group % kChunk == 0 && group > 0, "lut_gemm: bad bits or group");
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.is_contiguous(), "lut_gemm: packed must be uint8");
  const int64_t M = x.size(0), Kp = (K + kChunk - 1) / kChunk * kChunk, C = Kp / kChunk;
  const int64_t G = (K + group - 1) / group, B = (N + kBlockRows - 1) / kBlockRows;
  TORCH_CHECK(packed.numel() == B * C * kTiles * bits * kChunkBytes, "lut_gemm: packed has the wrong size");
  TORCH_CHECK(scale.numel() == B * G * kBlockRows && bias.numel() == B * G * kBlockRows,
              "lut_gemm: scale and bias have the wrong size");
  const torch::Tensor sc = scale.contiguous().to(torch::kHalf), bc = bias.contiguous().to(torch::kHalf);
  torch::Tensor y = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;

  const torch::Tensor xc = x.contiguous();
  std::vector<float> xpad(Kp, 0.0f);
  std::vector<int8_t> tables(M * Kp * 4);
  std::vector<float> ts(M * G), xsum(M * G);
  for (int64_t m = 0; m < M; ++m) {
    std::memcpy(xpad.data(), xc.data_ptr<float>() + m * K, K * sizeof(float));
    build_tables(xpad.data(), Kp, group, G, tables.data() + m * Kp * 4, ts.data() + m * G, xsum.data() + m * G);
  }
  static constexpr BlockFn kBlocks[] = {lut_block<1>, lut_block<2>, lut_block<3>, lut_block<4>};
  const BlockFn block = kBlocks[bits - 1];
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const c10::Half *sp = sc.data_ptr<c10::Half>(), *bp = bc.data_ptr<c10::Half>();
  float* yp = y.data_ptr<float>();
  const int64_t block_bytes = C * kTiles * bits * kChunkBytes;
  const int64_t grain = std::max<int64_t>(1, (int64_t{32} << 10) / block_bytes);  // >= ~32 KB of weights per task
#ifdef EDGELLM_LUT_AVX512
  static constexpr Block2Fn kBlocks2[] = {lut_block2<1>, lut_block2<2>, lut_block2<3>, lut_block2<4>};
  const Block2Fn block2 = kBlocks2[bits - 1];
#endif
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    float out[2 * kBlockRows];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t rows = std::min(kBlockRows, N - b * kBlockRows);
      const uint8_t* wb = wp + b * block_bytes;
      const c10::Half *sb = sp + b * G * kBlockRows, *bb = bp + b * G * kBlockRows;
      int64_t m = 0;  // the block's weights stay in L2 while every row of x passes over them
#ifdef EDGELLM_LUT_AVX512
      for (; m + 2 <= M; m += 2) {
        block2(wb, sb, bb, tables.data() + m * Kp * 4, tables.data() + (m + 1) * Kp * 4, ts.data() + m * G,
               xsum.data() + m * G, G, C, group / kChunk, out);
        std::memcpy(yp + m * N + b * kBlockRows, out, rows * sizeof(float));
        std::memcpy(yp + (m + 1) * N + b * kBlockRows, out + kBlockRows, rows * sizeof(float));
      }
#endif
      for (; m < M; ++m) {
        block(wb, sb, bb, tables.data() + m * Kp * 4, ts.data() + m * G, xsum.data() + m * G, C, G, group / kChunk,
              out);
        std::memcpy(yp + m * N + b * kBlockRows, out, rows * sizeof(float));
      }
    }
  });
  return y;
}

// W (N, K) from edgellm's affine codes (pack_codes: code j of each 8 at bits j * b of b bytes; fp16 scale and bias
// per group) into `out`, fp32 or bf16: w = code * scale + bias rounded after the product and after the sum, as
// QuantizedTensor.dequantize computes it in PyTorch. Each group's 2^bits values are made once and looked up, 16 codes
// at a time with AVX-512 (two runs of 8 codes, `bits` bytes each, shifted into lanes and permuted from the values).
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
template <int kBits>
void dequantize_codes_row(const uint8_t* c, const c10::Half* sp, const c10::Half* bp, int64_t G, int64_t group,
                          float* w) {
  constexpr int kMask = (1 << kBits) - 1;
  for (int64_t g = 0; g < G; ++g, w += group, c += group * kBits / 8) {
    alignas(64) float values[16] = {};
    const float scale = static_cast<float>(sp[g]), bias = static_cast<float>(bp[g]);
    for (int v = 0; v <= kMask; ++v) {
      const float product = static_cast<float>(v) * scale;
      values[v] = product + bias;
    }
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512 table = _mm512_load_ps(values);
    const __m512i shifts = _mm512_setr_epi32(0, kBits, 2 * kBits, 3 * kBits, 4 * kBits, 5 * kBits, 6 * kBits,
                                             7 * kBits, 0, kBits, 2 * kBits, 3 * kBits, 4 * kBits, 5 * kBits,
                                             6 * kBits, 7 * kBits);
    for (; i + 16 <= group; i += 16) {
      uint32_t a = 0, b = 0;
      std::memcpy(&a, c + i / 8 * kBits, kBits);
      std::memcpy(&b, c + i / 8 * kBits + kBits, kBits);
      const __m512i v = _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(static_cast<int>(a)),
                                                _mm512_set1_epi32(static_cast<int>(b)));
      const __m512i idx = _mm512_and_si512(_mm512_srlv_epi32(v, shifts), _mm512_set1_epi32(kMask));
      _mm512_storeu_ps(w + i, _mm512_permutexvar_ps(idx, table));
    }
#endif
    for (; i < group; i += 8) {
      uint32_t word = 0;
      std::memcpy(&word, c + i / 8 * kBits, kBits);
      for (int j = 0; j < 8; ++j) w[i + j] = values[(word >> (kBits * j)) & kMask];
    }
  }
}

void codes_dequantize_into(const torch::Tensor& codes, const torch::Tensor& scales, const torch::Tensor& biases,
                           int64_t K, int64_t bits, int64_t group, torch::Tensor out) {
  TORCH_CHECK(bits >= 1 && bits <= 4 && group % 8 == 0, "codes_dequantize: bad bits or group");
  const int64_t N = codes.size(0), G = scales.size(1), Kp = G * group;
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.is_contiguous() && codes.size(1) == Kp * bits / 8 &&
                  scales.scalar_type() == torch::kHalf && biases.scalar_type() == torch::kHalf &&
                  scales.is_contiguous() && biases.is_contiguous() && scales.size(0) == N && Kp >= K,
              "codes_dequantize: codes (N, Kp * bits / 8) uint8, scales and biases (N, G) fp16");
  const bool bf16 = out.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(out.is_contiguous() && out.numel() == N * K && (bf16 || out.scalar_type() == torch::kFloat),
              "out must be a contiguous fp32 or bf16 tensor of N * K elements");
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const c10::Half *sp = scales.data_ptr<c10::Half>(), *bp = biases.data_ptr<c10::Half>();
  float* of = bf16 ? nullptr : out.data_ptr<float>();
  c10::BFloat16* ob = bf16 ? out.data_ptr<c10::BFloat16>() : nullptr;
  using RowFn = void (*)(const uint8_t*, const c10::Half*, const c10::Half*, int64_t, int64_t, float*);
  static constexpr RowFn kRows[] = {dequantize_codes_row<1>, dequantize_codes_row<2>, dequantize_codes_row<3>,
                                    dequantize_codes_row<4>};
  const RowFn row_fn = kRows[bits - 1];
  const int64_t row_bytes = Kp * bits / 8;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> row(Kp);
    for (int64_t n = n0; n < n1; ++n) {
      row_fn(cp + n * row_bytes, sp + n * G, bp + n * G, G, group, row.data());
      if (bf16) simd::narrow(row.data(), ob + n * K, K);
      else std::memcpy(of + n * K, row.data(), K * sizeof(float));
    }
  });
}
#pragma GCC pop_options

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lut_gemm", &lut_gemm, "y = x @ W.T by table lookup for W packed by edgellm.kernels.lut");
  m.def("codes_dequantize_into", &codes_dequantize_into,
        "W (N, K) from packed affine codes and fp16 group scales/biases into out (fp32 or bf16)");
}
