// Python entry points of the bf16-weight GEMV kernels in gemv_bf16.h, and LoRA's batched gather GEMV (BGMV).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cstring>
#include <memory>
#include <vector>

#include "gemv_bf16.h"

using namespace bf16;

// pack_x for bf16 x: a bf16 pair in a 32-bit lane splits into the pair layout with two integer ops (load_pairs),
// where the generic loop costs ~2 ns an element: as much as the GEMV itself for a small weight.
std::vector<float> pack_x(const at::BFloat16* x, int64_t rows, int64_t K, int64_t kpad) {
  std::vector<float> packed(rows * kpad, 0.0f);
  const auto* xs = reinterpret_cast<const uint16_t*>(x);
  for (int64_t r = 0; r < rows; ++r) {
    vfloat even, odd;
    int64_t k = 0;
    for (; k + kChunk <= K; k += kChunk) {
      load_pairs(xs + r * K + k, even, odd);
      std::memcpy(packed.data() + r * kpad + k, &even, sizeof even);
      std::memcpy(packed.data() + r * kpad + k + kLanes, &odd, sizeof odd);
    }
    if (k < K) {
      load_pairs_tail(xs + r * K + k, K - k, even, odd);
      std::memcpy(packed.data() + r * kpad + k, &even, sizeof even);
      std::memcpy(packed.data() + r * kpad + k + kLanes, &odd, sizeof odd);
    }
  }
  return packed;
}

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

// y[c] += acc[c], rounded as c10 rounds to bf16 (nearest even, NaN to 0x7fc0); vectorized by hand, as GCC leaves
// the branchy scalar form (a quarter of a BGMV call's time) scalar
inline uint16_t round_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return f != f ? uint16_t{0x7fc0} : static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline void add_into(float* y, const float* acc, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) y[c] += acc[c];
}
inline void add_into(at::BFloat16* y, const float* acc, int64_t n) {
  auto* bits = reinterpret_cast<uint16_t*>(y);
  int64_t c = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  for (; c < n; c += 16) {
    const __mmask16 m = n - c >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - c)) - 1u);
    const __m512i in = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, bits + c));
    const __m512 f = _mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(in, 16)), _mm512_maskz_loadu_ps(m, acc + c));
    const __m512i u = _mm512_castps_si512(f);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i out = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd), 16);
    out = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), out, _mm512_set1_epi32(0x7fc0));
    _mm512_mask_cvtepi32_storeu_epi16(bits + c, m, out);
  }
#endif
  for (; c < n; ++c) {
    const uint32_t in = static_cast<uint32_t>(bits[c]) << 16;
    float f;
    std::memcpy(&f, &in, sizeof f);
    bits[c] = round_bf16(f + acc[c]);
  }
}

// One projection's adapters in a BGMV call: its stacks, each row's slot (-1: none) and scale, its columns of y.
struct Segment {
  const void* a;   // (S*rank, K)
  const void* bt;  // (S*rank, N)
  const int64_t* slots;
  const float* scales;
  int64_t rank, N, start;
};

// Prefetches [p, p + bytes): an adapter's slices are a few KB at scattered places, too short and too many for the
// hardware prefetcher to ramp up on each, so each run's slices are requested while the one before computes.
inline void prefetch_span(const void* p, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(static_cast<const char*>(p) + b, 0, 3);
}

template <typename X, typename W>
void bgmv(const X* x, const std::vector<Segment>& segs, X* y, int64_t ys0, int64_t ys1, int64_t rows,
          int64_t tokens, int64_t K) {
  // x is converted to fp32 once, for every segment (q, k and v read the same input); all sums in fp32
  const int64_t n = rows * tokens;
  std::vector<float> xf(n * K);
#pragma omp simd
  for (int64_t i = 0; i < n * K; ++i) xf[i] = to_float(x[i]);
  // runs: rows with one adapter on one segment (a row's tokens, rows sharing an adapter) read its slices once
  struct Run {
    const Segment* s;
    const W *a, *bt;  // the adapter's slices
    int64_t i, g;
  };
  std::vector<Run> runs;
  int64_t max_rank = 0, max_n = 0;
  for (const Segment& s : segs) {
    max_rank = std::max(max_rank, s.rank), max_n = std::max(max_n, s.N);
    for (int64_t i = 0, g; i < n; i += g) {
      const int64_t slot = s.slots[i / tokens];
      for (g = 1; g < kGroupRows && i + g < n && s.slots[(i + g) / tokens] == slot;) ++g;
      if (slot >= 0)
        runs.push_back({&s, static_cast<const W*>(s.a) + slot * s.rank * K,
                        static_cast<const W*>(s.bt) + slot * s.rank * s.N, i, g});
    }
  }
  const int64_t most = std::min(kGroupRows, n);
  std::vector<float> h(most * max_rank);
  const std::unique_ptr<float[]> acc(new float[most * max_n]);  // cleared per run, only as far as it is used
  for (size_t q = 0; q < runs.size(); ++q) {
    const Run& u = runs[q];
    const int64_t rank = u.s->rank, N = u.s->N, i = u.i, g = u.g;
    for (int64_t j = 0; j < rank; ++j) {  // h = scale * A_s x, each row of A from memory once for the run
      prefetch_span(u.bt + j * N, N * sizeof(W));
      const W* aj = u.a + j * K;
      for (int64_t r = 0; r < g; ++r) {
        const float* xr = xf.data() + (i + r) * K;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t k = 0; k < K; ++k) dot += xr[k] * to_float(aj[k]);
        h[r * rank + j] = dot * u.s->scales[(i + r) / tokens];
      }
    }
    if (q + 1 < runs.size()) prefetch_span(runs[q + 1].a, runs[q + 1].s->rank * K * sizeof(W));
    std::fill(acc.get(), acc.get() + g * N, 0.0f);
    for (int64_t j = 0; j < rank; ++j) {  // each row of B^T from memory once, into every row of the run
      const W* bj = u.bt + j * N;
      for (int64_t r = 0; r < g; ++r) {
        const float hj = h[r * rank + j];
        float* ar = acc.get() + r * N;
#pragma omp simd
        for (int64_t c = 0; c < N; ++c) ar[c] += hj * to_float(bj[c]);
      }
    }
    for (int64_t r = 0; r < g; ++r)
      add_into(y + (i + r) / tokens * ys0 + (i + r) % tokens * ys1 + u.s->start, acc.get() + r * N, N);
  }
}

// Punica's BGMV for unmerged LoRA, for the projections of one fused output (q/k/v, gate/up) at once: for each
// projection p, y[b, :, starts[p]:starts[p]+N_p] += scales[p, b] * (x[b] A_ps^T) B_ps^T with s = slots[p, b]
// (-1: none), in place. a[p] (S_p*ranks[p], K) and bt[p] (S_p*ranks[p], N_p) stack its adapters' A and B^T, each
// padded to its rank: every row reads only its own adapters' slices, and x is read and converted once, in one call.
// Single-threaded: an adapter's slices are ~1/20 of the base weight's bytes, too little work to split.
torch::Tensor lora_bgmv(torch::Tensor y, const torch::Tensor& x, const std::vector<torch::Tensor>& a,
                        const std::vector<torch::Tensor>& bt, const torch::Tensor& slots, const torch::Tensor& scales,
                        const std::vector<int64_t>& ranks, const std::vector<int64_t>& starts) {
  TORCH_CHECK(x.dim() == 3 && y.dim() == 3 && x.is_contiguous() && y.stride(2) == 1 && x.scalar_type() ==
              y.scalar_type() && x.size(0) == y.size(0) && x.size(1) == y.size(1),
              "lora_bgmv: x (B, T, K) contiguous, y (B, T, N) with unit stride along N");
  const size_t P = a.size();
  TORCH_CHECK(P > 0 && bt.size() == P && ranks.size() == P && starts.size() == P, "lora_bgmv: one a, bt, rank and "
              "start per projection");
  TORCH_CHECK(slots.scalar_type() == torch::kLong && scales.scalar_type() == torch::kFloat && slots.is_contiguous()
              && scales.is_contiguous() && slots.dim() == 2 && slots.size(0) == static_cast<int64_t>(P) &&
              slots.size(1) == x.size(0) && scales.sizes() == slots.sizes(),
              "lora_bgmv: int64 slots and fp32 scales (projections, B)");
  const bool xf = x.scalar_type() == torch::kFloat, wf = a[0].scalar_type() == torch::kFloat;
  TORCH_CHECK((xf || x.scalar_type() == torch::kBFloat16) && (wf || a[0].scalar_type() == torch::kBFloat16),
              "lora_bgmv: fp32 or bf16 tensors");
  std::vector<Segment> segs;
  for (size_t p = 0; p < P; ++p) {
    const int64_t rank = ranks[p];
    TORCH_CHECK(a[p].dim() == 2 && bt[p].dim() == 2 && a[p].is_contiguous() && bt[p].is_contiguous() &&
                a[p].scalar_type() == a[0].scalar_type() && bt[p].scalar_type() == a[0].scalar_type() && rank > 0 &&
                a[p].size(0) % rank == 0 && a[p].size(0) == bt[p].size(0) && a[p].size(1) == x.size(2) &&
                starts[p] >= 0 && starts[p] + bt[p].size(1) <= y.size(2),
                "lora_bgmv: a (S*rank, K) and bt (S*rank, N) of one dtype, columns within y");
    const int64_t* sp = slots.data_ptr<int64_t>() + p * x.size(0);
    for (int64_t i = 0; i < x.size(0); ++i)
      TORCH_CHECK(sp[i] < a[p].size(0) / rank, "lora_bgmv: slot out of range");
    segs.push_back({a[p].data_ptr(), bt[p].data_ptr(), sp, scales.data_ptr<float>() + p * x.size(0), rank,
                    bt[p].size(1), starts[p]});
  }
  auto run = [&](auto* xp, auto* yp, auto* wp) {
    using X = std::remove_pointer_t<decltype(xp)>;
    bgmv<X, std::remove_pointer_t<decltype(wp)>>(xp, segs, yp, y.stride(0), y.stride(1), x.size(0), x.size(1),
                                                 x.size(2));
  };
  using bf = at::BFloat16;
  if (xf && wf) run(x.data_ptr<float>(), y.data_ptr<float>(), static_cast<float*>(nullptr));
  if (xf && !wf) run(x.data_ptr<float>(), y.data_ptr<float>(), static_cast<bf*>(nullptr));
  if (!xf && wf) run(x.data_ptr<bf>(), y.data_ptr<bf>(), static_cast<float*>(nullptr));
  if (!xf && !wf) run(x.data_ptr<bf>(), y.data_ptr<bf>(), static_cast<bf*>(nullptr));
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_bf16", &gemv_bf16, "y = x @ weight.T + bias for a bf16 weight and few rows of x, with fp32 accumulation",
        py::arg("x"), py::arg("weight"), py::arg("bias") = py::none());
  m.def("lora_bgmv", &lora_bgmv, "for each projection p: y[..., its columns] += scales[p, b] * x[b] A_ps^T B_ps^T, "
        "s = slots[p, b] (-1: none), in place; bt holds B^T");
}
