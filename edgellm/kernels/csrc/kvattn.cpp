// The op-at-a-time attention over packed KV caches (see kvattn.h): any batch, paged caches; each (batch, kv head)
// splits its tokens into spans run as parallel tasks, merged at the end by their log-sum-exp.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kvattn.h"

namespace {

using kvattn::field;
using kvattn::kTile;
using kvattn::Problem;
using kvattn::Worker;

template <int BITS>
void run_spans(const Problem& p, int64_t tasks, int64_t spans, int64_t span, float* pm, float* pl, float* pacc) {
  const int64_t M = p.M, D = p.D;
  at::parallel_for(0, tasks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t bh = i / spans, c = i % spans;
      Worker w(p, bh / p.Hkv, bh % p.Hkv, pm + i * M, pl + i * M, pacc + i * M * D);
      if (c * span < p.tokens)
        w.run<BITS>(c * span, std::min(p.tokens, (c + 1) * span));
      else
        w.run_window();
    }
  });
}

void check_side(const torch::Tensor& data, const torch::Tensor& scales, const torch::Tensor& zeros, int64_t Hkv,
                const char* name) {
  TORCH_CHECK(data.dim() == 4 && scales.dim() == 4 && zeros.dim() == 4, "attend_packed: ", name, " must be 4-D");
  TORCH_CHECK(data.scalar_type() == torch::kUInt8 && scales.scalar_type() == torch::kHalf &&
                  zeros.scalar_type() == torch::kHalf, "attend_packed: ", name, " codes uint8, scales/zeros fp16");
  TORCH_CHECK(data.stride(3) == 1 && scales.stride(3) == 1 && zeros.stride(3) == 1 && data.size(1) == Hkv &&
                  scales.sizes() == zeros.sizes(), "attend_packed: ", name, " layout mismatch");
}

// q (B, Hkv, M, D) fp32: the M query rows of each kv head (GQA heads x positions). K/V: codes (pages, Hkv, rows,
// width) uint8 and fp16 scales/zeros, token i of row b in page table[b, i / page_tokens]; per-channel keys in
// one page per row. Then `held` full-precision tokens rk, rv (B, Hkv, held, D) fp32. No mask: every query sees
// every token. Returns softmax(q k^T scale) v (B, Hkv, M, D) and its log-sum-exp (B, Hkv, M), both fp32.
std::vector<torch::Tensor> attend_packed(const torch::Tensor& q, const torch::Tensor& kdata,
                                         const torch::Tensor& kscales, const torch::Tensor& kzeros,
                                         const torch::Tensor& vdata, const torch::Tensor& vscales,
                                         const torch::Tensor& vzeros, const torch::Tensor& table, int64_t page_tokens,
                                         int64_t tokens, int64_t bits, int64_t kgroup, int64_t vgroup,
                                         bool per_channel, const torch::Tensor& rk, const torch::Tensor& rv,
                                         double scale) {
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == torch::kFloat && q.is_contiguous(),
              "attend_packed: q must be contiguous fp32 (B, Hkv, M, D)");
  const int64_t B = q.size(0), Hkv = q.size(1), M = q.size(2), D = q.size(3);
  check_side(kdata, kscales, kzeros, Hkv, "keys");
  check_side(vdata, vscales, vzeros, Hkv, "values");
  TORCH_CHECK(bits == 8 || bits == 4 || bits == 2, "attend_packed: 8, 4 or 2 bits");
  TORCH_CHECK(vgroup > 0 && D % vgroup == 0 && kgroup > 0 && kgroup % (8 / bits) == 0 &&
                  (per_channel || D % kgroup == 0), "attend_packed: groups must divide head_dim");
  TORCH_CHECK(table.dim() == 2 && table.size(0) == B && table.scalar_type() == torch::kLong && table.is_contiguous(),
              "attend_packed: table must be contiguous int64 (B, pages)");
  TORCH_CHECK(page_tokens > 0 && tokens >= 0 && tokens <= table.size(1) * page_tokens &&
                  (!per_channel || (table.size(1) == 1 && tokens % kgroup == 0)),
              "attend_packed: tokens do not fit the table (per-channel keys: one page, whole groups)");
  TORCH_CHECK(rk.scalar_type() == torch::kFloat && rv.scalar_type() == torch::kFloat && rk.is_contiguous() &&
                  rv.is_contiguous() && rk.dim() == 4 && rk.sizes() == rv.sizes() && rk.size(0) == B &&
                  rk.size(1) == Hkv && rk.size(3) == D, "attend_packed: recent K/V must be contiguous fp32");
  if (tokens > 0) {
    const int64_t* tp = table.data_ptr<int64_t>();
    for (int64_t i = 0; i < table.numel(); ++i)
      TORCH_CHECK(tp[i] >= 0 && tp[i] < kdata.size(0) && tp[i] < vdata.size(0), "attend_packed: page out of range");
  }

  const Problem p{q.data_ptr<float>(), Hkv, M, D, table.data_ptr<int64_t>(), table.size(1), page_tokens, tokens,
                  {field(kdata), field(kscales), field(kzeros), kgroup}, {field(vdata), field(vscales), field(vzeros),
                  vgroup}, per_channel, rk.data_ptr<float>(), rv.data_ptr<float>(), rk.size(2),
                  static_cast<float>(scale), static_cast<int>(bits)};
  // Spans of tokens per (batch, kv head): enough tasks for every thread, whole tiles (key groups) each.
  const int64_t BH = B * Hkv, align = per_channel ? kgroup : kTile;
  const int64_t want = std::max<int64_t>(1, (2 * at::get_num_threads() + BH - 1) / std::max<int64_t>(BH, 1));
  const int64_t span = std::max(align, (tokens + want - 1) / want + align - 1) / align * align;
  const int64_t spans = (tokens + span - 1) / span + (p.held > 0);
  auto pm = torch::full({BH, spans, M}, -INFINITY, q.options());
  auto pl = torch::zeros({BH, spans, M}, q.options());
  auto pacc = torch::zeros({BH, spans, M, D}, q.options());
  float *pmp = pm.data_ptr<float>(), *plp = pl.data_ptr<float>(), *pap = pacc.data_ptr<float>();
  switch (bits) {
    case 8: run_spans<8>(p, BH * spans, spans, span, pmp, plp, pap); break;
    case 4: run_spans<4>(p, BH * spans, spans, span, pmp, plp, pap); break;
    default: run_spans<2>(p, BH * spans, spans, span, pmp, plp, pap); break;
  }

  auto out = torch::zeros({B, Hkv, M, D}, q.options());
  auto lse = torch::full({B, Hkv, M}, -INFINITY, q.options());
  float *op = out.data_ptr<float>(), *lp = lse.data_ptr<float>();
  for (int64_t bh = 0; bh < BH; ++bh)
    for (int64_t j = 0; j < M; ++j) {
      float mx = -INFINITY;
      for (int64_t c = 0; c < spans; ++c) mx = std::max(mx, pmp[(bh * spans + c) * M + j]);
      if (mx == -INFINITY) continue;  // no token at all
      float total = 0.0f;
      float* o = op + (bh * M + j) * D;
      for (int64_t c = 0; c < spans; ++c) {
        const int64_t i = (bh * spans + c) * M + j;
        if (plp[i] == 0.0f) continue;
        const float w = std::exp(pmp[i] - mx);
        total += plp[i] * w;
        for (int64_t d = 0; d < D; ++d) o[d] += w * pap[i * D + d];
      }
      for (int64_t d = 0; d < D; ++d) o[d] /= total;
      lp[bh * M + j] = mx + std::log(total);
    }
  return {out, lse};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attend_packed", &attend_packed,
        "attention of a few fp32 queries over packed 8/4/2-bit K/V (per-token or per-channel keys) and a "
        "full-precision window; returns (out, log-sum-exp)");
}
