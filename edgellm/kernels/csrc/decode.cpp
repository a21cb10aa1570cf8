// The small per-token ops of a decode step: one-query attention (over a contiguous or a paged cache) and RMS norm,
// on fp32 or bf16 tensors (K/V also fp16), computed in fp32 and returned in the input's dtype.
//
// At one token per step these ops carry no arithmetic worth the name, but through ATen each costs a dispatch,
// allocations and, for attention, batched GEMMs of one row (SDPA on 16 heads x 270 cached positions: ~120 us,
// against ~15 us for the loops below). The PyTorch code paths they replace stay the reference and the fallback.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "attention.h"

namespace {

using namespace simd;

// softmax(q k^T * scale) v for q (B, H, 1, D) over the T positions whose K/V rows of (batch b, kv head g) rows(b, g)
// gives as a (K, V) pair of row cursors (attention.h); H a multiple of Hkv (GQA: query head h reads kv head
// h / (H / Hkv)). Returns (B, H, 1, D) in q's dtype, no mask: a single query may see every cached position. Q is
// fp32 or bf16, KV fp32, bf16 or fp16; all arithmetic is fp32, rounded to Q once at the end.
template <typename Q, typename KV, typename RowsOf>
torch::Tensor attend(const torch::Tensor& q, int64_t Hkv, int64_t T, const RowsOf& rows, double scale) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3);
  auto out = torch::empty({B, H, 1, D}, q.options());
  const Q* qp = q.data_ptr<Q>();
  Q* op = out.data_ptr<Q>();
  const int64_t group = H / Hkv;
  // Strides hoisted: Tensor::stride() wraps and checks its dimension on every call, in the inner loops too.
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1);
  // One task per (batch, kv head): the K/V rows of a position are read once for all `group` query heads that
  // share them (GQA).
  const int64_t tasks = B * Hkv;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, T * D * group));
  at::parallel_for(0, tasks, grain, [&](int64_t i0, int64_t i1) {
    AttentionScratch scratch(group, T, D);
    std::vector<float> qbuf(group * D), obuf(group * D);
    std::vector<const float*> qf(group);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / Hkv, g = i % Hkv;
      const Q* qb = qp + b * qs0 + g * group * qs1;
      for (int64_t j = 0; j < group; ++j) qf[j] = widen(qb + j * qs1, qbuf.data() + j * D, D);
      const auto [k, v] = rows(b, g);
      attend_group(qf.data(), group, k, v, T, D, static_cast<float>(scale), obuf.data(), scratch);
      narrow(obuf.data(), op + (b * H + g * group) * D, group * D);
    }
  });
  return out;
}

// k, v (B, Hkv, T, D), any strides but a unit stride along D.
template <typename Q, typename KV>
torch::Tensor attend_strided(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, double scale) {
  const KV* kp = k.data_ptr<KV>();
  const KV* vp = v.data_ptr<KV>();
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  return attend<Q, KV>(q, k.size(1), k.size(2), [&](int64_t b, int64_t g) {
    return std::pair{StridedRows<KV>{kp + b * ks0 + g * ks1, ks2}, StridedRows<KV>{vp + b * vs0 + g * vs1, vs2}};
  }, scale);
}

// k, v the block pool's fields (blocks, Hkv, page_tokens, D), unit stride along D; batch 1, its `tokens` positions
// in the pages `table` lists.
template <typename Q, typename KV>
torch::Tensor attend_pages(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                           const torch::Tensor& table, int64_t tokens, double scale) {
  const KV* kp = k.data_ptr<KV>();
  const KV* vp = v.data_ptr<KV>();
  const int64_t* pages = table.data_ptr<int64_t>();
  const int64_t bt = k.size(2), ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  return attend<Q, KV>(q, k.size(1), tokens, [&](int64_t, int64_t g) {
    return std::pair{PagedRows<KV>{kp + g * ks1, pages, ks0, bt, ks2}, PagedRows<KV>{vp + g * vs1, pages, vs0, bt, vs2}};
  }, scale);
}

// The dispatch on (q, K/V) dtypes: fn(Q{}, KV{}) for Q fp32/bf16, KV fp32/bf16/fp16 (the values only name types).
template <typename Fn>
torch::Tensor dispatch(const char* name, const torch::Tensor& q, const torch::Tensor& k, const Fn& fn) {
  auto on_kv = [&](auto q_tag) {
    switch (k.scalar_type()) {
      case torch::kFloat: return fn(q_tag, float{});
      case torch::kBFloat16: return fn(q_tag, c10::BFloat16{});
      case torch::kHalf: return fn(q_tag, c10::Half{});
      default: TORCH_CHECK(false, name, ": k and v must be fp32, bf16 or fp16");
    }
  };
  if (q.scalar_type() == torch::kFloat) return on_kv(float{});
  TORCH_CHECK(q.scalar_type() == torch::kBFloat16, name, ": q must be fp32 or bf16");
  return on_kv(c10::BFloat16{});
}

torch::Tensor attend_one(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attend_one: q, k and v must be 4-D");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "attend_one: k and v must share a dtype");
  TORCH_CHECK(q.size(2) == 1, "attend_one: one query position");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hkv = k.size(1), T = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == Hkv && v.size(2) == T && k.size(3) == D &&
                  v.size(3) == D && Hkv > 0 && H % Hkv == 0 && T > 0, "attend_one: shape mismatch");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "attend_one: D must be contiguous");
  return dispatch("attend_one", q, k, [&](auto qt, auto kt) {
    return attend_strided<decltype(qt), decltype(kt)>(q, k, v, scale);
  });
}

torch::Tensor attend_paged(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                           const torch::Tensor& table, int64_t tokens, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attend_paged: q, k and v must be 4-D");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "attend_paged: k and v must share a dtype");
  const int64_t H = q.size(1), D = q.size(3), Hkv = k.size(1), bt = k.size(2);
  TORCH_CHECK(q.size(0) == 1 && q.size(2) == 1, "attend_paged: one query of one sequence");
  TORCH_CHECK(v.sizes() == k.sizes() && k.size(3) == D && Hkv > 0 && H % Hkv == 0,
              "attend_paged: k and v must be (blocks, kv_heads, block_tokens, head_dim) fields of one pool");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "attend_paged: D must be contiguous");
  TORCH_CHECK(table.dim() == 1 && table.scalar_type() == torch::kLong && table.is_contiguous(),
              "attend_paged: table must be contiguous int64 (pages)");
  TORCH_CHECK(tokens > 0 && tokens <= table.numel() * bt, "attend_paged: tokens do not fit the table");
  const int64_t* pages = table.data_ptr<int64_t>();
  for (int64_t i = 0; i < table.numel(); ++i)
    TORCH_CHECK(pages[i] >= 0 && pages[i] < k.size(0), "attend_paged: page ", pages[i], " is not in the pool");
  return dispatch("attend_paged", q, k, [&](auto qt, auto kt) {
    return attend_pages<decltype(qt), decltype(kt)>(q, k, v, table, tokens, scale);
  });
}

// x (..., D) contiguous, weight (D), both T: transformers' RMS norm, bit for bit. The norm runs in fp32 as
// F.rms_norm computes it (x * rsqrt(mean(x^2) + eps), the sum in ATen's order), is rounded to T, and only then
// scaled by the weight in T; for fp32 the roundings vanish and this is F.rms_norm(x, weight) exactly.
template <typename T>
torch::Tensor norm_rows(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  const int64_t D = weight.numel();
  auto out = torch::empty_like(x);
  const T* xp = x.data_ptr<T>();
  const T* wp = weight.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t rows = D ? x.numel() / D : 0;
  std::vector<float> xbuf(D), sq(D);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = widen(xp + r * D, xbuf.data(), D);
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) sq[d] = xr[d] * xr[d];
    const float inv = 1.0f / std::sqrt(aten_sum(sq.data(), D) / static_cast<float>(D) + static_cast<float>(eps));
    T* orow = op + r * D;
    for (int64_t d = 0; d < D; ++d)
      orow[d] = static_cast<T>(static_cast<float>(static_cast<T>(xr[d] * inv)) * static_cast<float>(wp[d]));
  }
  return out;
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "rms_norm: x and weight must share a dtype");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "rms_norm: contiguous tensors only");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.numel(), "rms_norm: x's last dimension must match the weight");
  if (x.scalar_type() == torch::kFloat) return norm_rows<float>(x, weight, eps);
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16, "rms_norm: fp32 or bf16 only");
  return norm_rows<c10::BFloat16>(x, weight, eps);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attend_one", &attend_one, "one-query attention over a KV cache (q fp32/bf16, K/V fp32/bf16/fp16, GQA)");
  m.def("attend_paged", &attend_paged,
        "one-query attention over a paged KV cache: the block pool's K/V fields through one sequence's page table");
  m.def("rms_norm", &rms_norm, "row-wise RMS norm as transformers computes it (fp32 or bf16)");
}
