// Python entry points of the bf16-weight GEMV kernels in gemv_bf16.h, and LoRA's batched gather GEMV (BGMV).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

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

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) {  // the high half of an fp32: a shift the compiler vectorizes
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

template <typename X, typename W>
void bgmv(const X* x, const W* a, const W* bt, const int64_t* slots, const float* scales, X* y, int64_t ys0,
          int64_t ys1, int64_t rows, int64_t tokens, int64_t K, int64_t N, int64_t rank) {
  // per token: h = scale * A_slot x (rank dots over K), then y += Bt_slot^T h (rank axpys over N), all in fp32
  std::vector<float> h(rank), xr(K), acc(N);
  for (int64_t r = 0; r < rows * tokens; ++r) {
    const int64_t slot = slots[r / tokens];
    if (slot < 0) continue;
    for (int64_t k = 0; k < K; ++k) xr[k] = to_float(x[r * K + k]);
    for (int64_t j = 0; j < rank; ++j) {
      const W* aj = a + (slot * rank + j) * K;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t k = 0; k < K; ++k) dot += xr[k] * to_float(aj[k]);
      h[j] = dot * scales[r / tokens];
    }
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t j = 0; j < rank; ++j) {
      const W* bj = bt + (slot * rank + j) * N;
      const float hj = h[j];
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) acc[n] += hj * to_float(bj[n]);
    }
    X* yr = y + r / tokens * ys0 + r % tokens * ys1;
    for (int64_t n = 0; n < N; ++n) yr[n] = static_cast<X>(to_float(yr[n]) + acc[n]);
  }
}

// Punica's BGMV for unmerged LoRA: y (B, T, N) += scales[b] * (x[b] A_s^T) B_s^T with s = slots[b] (-1: none), in
// place. a (S*rank, K) and bt (S*rank, N) stack S adapters' A and B^T, each padded to `rank`: every row reads only
// its own adapter's slices, in one call instead of a handful of ops over every resident adapter. y may be a column
// slice of a wider output (fused q/k/v). Single-threaded: an adapter's slices are ~1/20 of the base weight's
// bytes, too little work to split.
torch::Tensor lora_bgmv(torch::Tensor y, const torch::Tensor& x, const torch::Tensor& a, const torch::Tensor& bt,
                        const torch::Tensor& slots, const torch::Tensor& scales, int64_t rank) {
  TORCH_CHECK(x.dim() == 3 && y.dim() == 3 && x.is_contiguous() && y.stride(2) == 1 && x.scalar_type() ==
              y.scalar_type() && x.size(0) == y.size(0) && x.size(1) == y.size(1),
              "lora_bgmv: x (B, T, K) contiguous, y (B, T, N) with unit stride along N");
  TORCH_CHECK(a.dim() == 2 && bt.dim() == 2 && a.is_contiguous() && bt.is_contiguous() && a.scalar_type() ==
              bt.scalar_type() && rank > 0 && a.size(0) % rank == 0 && a.size(0) == bt.size(0) &&
              a.size(1) == x.size(2) && bt.size(1) == y.size(2), "lora_bgmv: a (S*rank, K), bt (S*rank, N)");
  TORCH_CHECK(slots.scalar_type() == torch::kLong && scales.scalar_type() == torch::kFloat && slots.is_contiguous()
              && scales.is_contiguous() && slots.numel() == x.size(0) && scales.numel() == x.size(0),
              "lora_bgmv: int64 slots and fp32 scales, one per row");
  const int64_t S = a.size(0) / rank;
  for (int64_t i = 0; i < slots.numel(); ++i)
    TORCH_CHECK(slots.data_ptr<int64_t>()[i] < S, "lora_bgmv: slot out of range");
  const bool xf = x.scalar_type() == torch::kFloat, wf = a.scalar_type() == torch::kFloat;
  TORCH_CHECK((xf || x.scalar_type() == torch::kBFloat16) && (wf || a.scalar_type() == torch::kBFloat16),
              "lora_bgmv: fp32 or bf16 tensors");
  auto run = [&](auto* xp, auto* yp, auto* ap, auto* bp) {
    bgmv(xp, ap, bp, slots.data_ptr<int64_t>(), scales.data_ptr<float>(), yp, y.stride(0), y.stride(1), x.size(0),
         x.size(1), x.size(2), y.size(2), rank);
  };
  using bf = at::BFloat16;
  if (xf && wf) run(x.data_ptr<float>(), y.data_ptr<float>(), a.data_ptr<float>(), bt.data_ptr<float>());
  if (xf && !wf) run(x.data_ptr<float>(), y.data_ptr<float>(), a.data_ptr<bf>(), bt.data_ptr<bf>());
  if (!xf && wf) run(x.data_ptr<bf>(), y.data_ptr<bf>(), a.data_ptr<float>(), bt.data_ptr<float>());
  if (!xf && !wf) run(x.data_ptr<bf>(), y.data_ptr<bf>(), a.data_ptr<bf>(), bt.data_ptr<bf>());
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_bf16", &gemv_bf16, "y = x @ weight.T + bias for a bf16 weight and few rows of x, with fp32 accumulation",
        py::arg("x"), py::arg("weight"), py::arg("bias") = py::none());
  m.def("lora_bgmv", &lora_bgmv, "y (B, T, N) += scales[b] * x[b] A_s^T B_s^T, s = slots[b] (-1: none), in place; "
        "bt holds B^T");
}
