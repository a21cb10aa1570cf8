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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lut_gemm", &lut_gemm, "y = x @ W.T by table lookup for W packed by edgellm.kernels.lut");
}
