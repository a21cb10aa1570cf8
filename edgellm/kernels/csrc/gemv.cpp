// Python entry points of the bf16-weight GEMV kernels in gemv_bf16.h.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "gemv_bf16.h"

using namespace bf16;

template <typename T>
void gemv(int64_t rows, const float* x, int64_t kpad, const uint16_t* w, const float* bias, T* y, int64_t N,
          int64_t K) {
  // ~256 KB of weights: enough work per thread to be worth the fork, and small enough to stay in L2 while
  // each group of kGroupRows rows of x passes over it, so the weights come from DRAM once for any row count.
  const int64_t panel = std::max<int64_t>(1, (int64_t{128} << 10) / K);
  at::parallel_for(0, N, panel, [&](int64_t n0, int64_t n1) {
    const int64_t step = rows > kGroupRows ? panel : n1 - n0;
    for (int64_t p = n0; p < n1; p += step)
      for (int64_t g = 0; g < rows; g += kGroupRows)
        gemv_group(std::min(kGroupRows, rows - g), x + g * kpad, kpad, w, bias, y + g * N, N, K, p,
                   std::min(n1, p + step));
  });
}

// y (..., N) = x (..., K) @ weight (N, K).T + bias; y has x's dtype. Meant for few rows (decode), where reading
// the weights is the cost; for many rows a blocked GEMM reuses registers better.
torch::Tensor gemv_bf16(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kBFloat16 && weight.device().is_cpu(),
              "gemv_bf16: weight must be a 2-D bf16 CPU tensor");
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16,
              "gemv_bf16: x must be fp32 or bf16");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "gemv_bf16: x's last dim must equal weight's K");
  const int64_t rows = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);

  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  torch::Tensor y = torch::empty(out_shape, x.options());
  if (K == 0) return bias ? y.copy_(bias->expand_as(y)) : y.zero_();
  if (rows == 0 || N == 0) return y;

  const torch::Tensor xc = x.contiguous(), wc = weight.contiguous();
  torch::Tensor b;
  if (bias) {
    TORCH_CHECK(bias->numel() == N, "gemv_bf16: bias must have N elements");
    b = bias->to(torch::kFloat).contiguous();
  }
  const int64_t kpad = (K + kChunk - 1) / kChunk * kChunk;
  const std::vector<float> packed = x.scalar_type() == torch::kFloat
                                        ? pack_x(xc.data_ptr<float>(), rows, K, kpad)
                                        : pack_x(xc.data_ptr<at::BFloat16>(), rows, K, kpad);
  const auto* w = reinterpret_cast<const uint16_t*>(wc.data_ptr<at::BFloat16>());
  const float* bp = bias ? b.data_ptr<float>() : nullptr;
  if (x.scalar_type() == torch::kFloat)
    gemv(rows, packed.data(), kpad, w, bp, y.data_ptr<float>(), N, K);
  else
    gemv(rows, packed.data(), kpad, w, bp, y.data_ptr<at::BFloat16>(), N, K);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_bf16", &gemv_bf16, "y = x @ weight.T + bias for a bf16 weight and few rows of x, with fp32 accumulation",
        py::arg("x"), py::arg("weight"), py::arg("bias") = py::none());
}
