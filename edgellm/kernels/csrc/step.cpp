// The fused decode step of a Llama-family model: every layer of one token in one native call, as llama.cpp runs it.
//
// Op at a time, a decode step costs ~20 Python/ATen dispatches per layer and a fork/join of the thread pool per op;
// on a small model that overhead outweighs reading the weights. Here one OpenMP region runs the whole step: threads
// split the rows of every projection (q/k/v together, gate/up together) and meet at a barrier between ops, while the
// small per-token work (norms, RoPE, the K/V write, preparing the activations for the weight format) runs on one.
// A layer's feed-forward block is dense or a sparse mixture of experts (router, softmax top-k, the chosen experts
// and an optional sigmoid-gated shared expert, as models/moe.py computes it); only the chosen experts are read.
// Activations stay fp32 throughout, around weights in fp32, bf16, GGUF 32-blocks (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
// IQ4_NL, MXFP4) or k-quant super-blocks, with the same row kernels as the op-at-a-time path.
// The K/V caches are dense (fp32, bf16, fp16) or packed low-bit codes with a full-precision window (the quantized
// caches: kvcodec.h quantizes the token on store, kvattn.h attends over the codes), as the op-at-a-time path holds
// them: contiguous, or paged in the block pool (K/V rows reached through one page table per layer).

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "attention.h"
#include "gemv_bf16.h"
#include "ggml_blocks.h"
#include "kquants.h"
#include "kvattn.h"
#include "kvcodec.h"
#include "lut.h"

namespace {

enum class WKind { kF32, kBF16, kQ8_0, kQ4_0, kQ4_1, kQ5_0, kQ5_1, kIq4Nl, kMxfp4, kQ2K, kQ3K, kQ4K, kQ5K, kQ6K, kLut };

WKind parse_kind(const std::string& s) {
  static const std::pair<const char*, WKind> names[] = {
      {"f32", WKind::kF32},     {"bf16", WKind::kBF16},     {"q8_0", WKind::kQ8_0},     {"q4_0", WKind::kQ4_0},
      {"q4_1", WKind::kQ4_1},   {"q5_0", WKind::kQ5_0},     {"q5_1", WKind::kQ5_1},     {"iq4_nl", WKind::kIq4Nl},
      {"mxfp4", WKind::kMxfp4}, {"q2_k", WKind::kQ2K},      {"q3_k", WKind::kQ3K},      {"q4_k", WKind::kQ4K},
      {"q5_k", WKind::kQ5K},    {"q6_k", WKind::kQ6K},      {"lut", WKind::kLut}};
  for (const auto& [name, kind] : names)
    if (s == name) return kind;
  TORCH_CHECK(false, "fused step: unsupported weight kind ", s);
}

// One projection: its weight as stored (fp32 / bf16 rows, quantized blocks, or the table-lookup kernel's bit planes
// with their fp16 group scales and biases), an optional fp32 bias, and the activation data the format reads,
// prepared once per token for the input it projects.
struct Proj {
  WKind kind;
  torch::Tensor weight, bias;
  int64_t N = 0, K = 0, row_bytes = 0;
  // activation forms, one of which is filled by prepare()
  const float* x = nullptr;
  std::vector<float> packed;
  int64_t kpad = 0;
  ggml::ActX gx;
  kq::Q8K q8k;
  // the table-lookup format: group scales and biases, bits, group, and per token x's tables
  torch::Tensor lut_scale, lut_bias;
  int64_t bits = 0, group = 0, Kp = 0, C = 0, G = 0;
  std::vector<float> xpad, ts, xsum;
  std::vector<int8_t> tables;
  // an unmerged LoRA side path (models/lora.py's stacks: A (S*rank, K) and B^T (S*rank, N), fp32 or bf16), the slot of
  // the adapter this token uses (-1: none) and its scale; prepare() fills lora_h = scale * A_slot x
  torch::Tensor lora_a, lora_bt;
  int64_t lora_rank = 0, lora_slot = -1;
  float lora_scale = 0.0f;
  std::vector<float> lora_h;

  Proj(const std::string& kind_name, torch::Tensor w, const c10::optional<torch::Tensor>& b, int64_t n, int64_t k)
      : kind(parse_kind(kind_name)), weight(w.contiguous()), N(n), K(k) {
    if (b) bias = b->to(torch::kFloat).contiguous();
    TORCH_CHECK(kind == WKind::kF32 ? weight.scalar_type() == torch::kFloat
                : kind == WKind::kBF16 ? weight.scalar_type() == torch::kBFloat16
                                       : weight.scalar_type() == torch::kUInt8,
                "fused step: weight dtype does not match its kind ", kind_name);
    if (kind == WKind::kLut) return;  // set_lut() completes it
    row_bytes = weight.numel() * weight.element_size() / N;
    TORCH_CHECK(weight.size(0) == N, "fused step: weight rows != N");
  }

  void set_lut(torch::Tensor scale, torch::Tensor lbias, int64_t b, int64_t g) {
    TORCH_CHECK(b >= 1 && b <= 4 && g > 0 && g % lut::kChunk == 0, "fused step: bad table-lookup bits or group");
    bits = b, group = g;
    Kp = (K + lut::kChunk - 1) / lut::kChunk * lut::kChunk, C = Kp / lut::kChunk, G = (K + g - 1) / g;
    const int64_t blocks = (N + lut::kBlockRows - 1) / lut::kBlockRows;
    TORCH_CHECK(weight.numel() == blocks * C * lut::kTiles * b * lut::kChunkBytes && weight.is_contiguous(),
                "fused step: table-lookup planes have the wrong size");
    lut_scale = scale.to(torch::kHalf).contiguous(), lut_bias = lbias.to(torch::kHalf).contiguous();
    TORCH_CHECK(lut_scale.numel() == blocks * G * lut::kBlockRows && lut_bias.numel() == lut_scale.numel(),
                "fused step: table-lookup scales have the wrong size");
    row_bytes = C * lut::kTiles * b * lut::kChunkBytes;  // per block of kBlockRows rows
    xpad.assign(Kp, 0.0f), tables.resize(Kp * 4), ts.resize(G), xsum.resize(G);
  }

  // Whose activation data rows() reads: this projection's, or that of an earlier one prepared for the same input
  // in the same form (q/k/v, gate/up, every chosen expert's gate/up): quantized once, not once per projection.
  const Proj* src = this;

  bool same_form(const Proj& o) const {
    return o.kind == kind && o.K == K && (kind != WKind::kLut || o.group == group);
  }

  // `like`: a projection prepared just before, whose data this one reuses when it read the same input in its form.
  void prepare(const float* in, const Proj* like = nullptr) {
    x = in;
    if (like && like->src->x == in && same_form(*like->src)) {
      src = like->src;
      if (lora_slot >= 0) lora(in);
      return;
    }
    src = this;
    switch (kind) {
      case WKind::kF32: break;
      case WKind::kBF16:
        kpad = (K + bf16::kChunk - 1) / bf16::kChunk * bf16::kChunk;
        packed = bf16::pack_x(in, 1, K, kpad);
        break;
      case WKind::kQ8_0: gx = ggml::act_x<ggml::Kind::kQ8_0>(in, K / ggml::kBlock); break;
      case WKind::kQ4_0: gx = ggml::act_x<ggml::Kind::kQ4_0>(in, K / ggml::kBlock); break;
      case WKind::kQ4_1: gx = ggml::act_x<ggml::Kind::kQ4_1>(in, K / ggml::kBlock); break;
      case WKind::kQ5_0: gx = ggml::act_x<ggml::Kind::kQ5_0>(in, K / ggml::kBlock); break;
      case WKind::kQ5_1: gx = ggml::act_x<ggml::Kind::kQ5_1>(in, K / ggml::kBlock); break;
      case WKind::kIq4Nl: gx = ggml::act_x<ggml::Kind::kIq4Nl>(in, K / ggml::kBlock); break;
      case WKind::kMxfp4: gx = ggml::act_x<ggml::Kind::kMxfp4>(in, K / ggml::kBlock); break;
      case WKind::kLut:
        std::copy(in, in + K, xpad.begin());
        lut::build_tables(xpad.data(), Kp, group, G, tables.data(), ts.data(), xsum.data());
        break;
      default: q8k = kq::quantize_q8k(in, K / kq::kQK);
    }
    if (lora_slot >= 0) lora(in);
  }

  void lora(const float* in) {
    if (lora_a.scalar_type() == torch::kFloat)
      lora_down(lora_a.data_ptr<float>(), in);
    else
      lora_down(lora_a.data_ptr<at::BFloat16>(), in);
  }

  template <typename W>
  void lora_down(const W* a, const float* in) {
    a += lora_slot * lora_rank * K;
    for (int64_t j = 0; j < lora_rank; ++j) {
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t k = 0; k < K; ++k) dot += in[k] * static_cast<float>(a[j * K + k]);
      lora_h[j] = dot * lora_scale;
    }
  }

  template <typename W>
  void lora_up(const W* bt, int64_t n0, int64_t n1, float* y) const {
    bt += lora_slot * lora_rank * N;
    for (int64_t j = 0; j < lora_rank; ++j) {
      const float hj = lora_h[j];
#pragma omp simd
      for (int64_t n = n0; n < n1; ++n) y[n] += hj * static_cast<float>(bt[j * N + n]);
    }
  }

  // Several rows of activations at once (forward_many): fp32 and bf16 weights only, each weight byte read once for
  // up to bf16::kGroupRows rows; row t's outputs bit for bit those of prepare(x_t) + rows() (the same per-row sums).
  const float* xs = nullptr;
  int64_t nrows = 0;
  std::vector<float> packed_rows;

  bool reads_many() const { return kind == WKind::kF32 || kind == WKind::kBF16; }

  void prepare_many(const float* in, int64_t T) {
    xs = in, nrows = T;
    if (kind == WKind::kBF16) {
      kpad = (K + bf16::kChunk - 1) / bf16::kChunk * bf16::kChunk;
      packed_rows = bf16::pack_x(in, T, K, kpad);
    }
  }

  // y (T, N): rows [n0, n1) of every row's output.
  void rows_many(int64_t n0, int64_t n1, float* y) const {
    if (n0 >= n1) return;
    if (kind == WKind::kBF16) {
      const auto* w = reinterpret_cast<const uint16_t*>(weight.data_ptr());
      for (int64_t g = 0; g < nrows; g += bf16::kGroupRows)
        bf16::gemv_group(std::min(bf16::kGroupRows, nrows - g), packed_rows.data() + g * kpad, kpad, w, nullptr,
                         y + g * N, N, K, n0, n1);
    } else {  // each weight row once from memory, then from L1 for the other rows of x
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t t = 0; t < nrows; ++t) y[t * N + n] = simd::dot(xs + t * K, weight.data_ptr<float>() + n * K, K);
    }
    if (bias.defined())
      for (int64_t t = 0; t < nrows; ++t)
        for (int64_t n = n0; n < n1; ++n) y[t * N + n] += bias.data_ptr<float>()[n];
  }

  template <class F>
  void kquant_rows(const uint8_t* w, int64_t n0, int64_t n1, float* y) const {
    kq::gemv<F>(false, w, row_bytes, src->q8k, K / kq::kQK, n0, n1, y);
  }

  template <ggml::Kind G>
  void block_rows(const uint8_t* w, int64_t n0, int64_t n1, float* y) const {
    ggml::gemv_rows<G>(w, row_bytes, src->gx, K / ggml::kBlock, n0, n1, y);
  }

  // Rows [n0, n1) of the table-lookup kernel, which computes whole blocks of kBlockRows rows (split_rows hands
  // it block-aligned ranges; a range that is not gets its edge blocks computed in full and clipped).
  template <int P>
  void lut_rows(const uint8_t* w, int64_t n0, int64_t n1, float* y) const {
    const auto* sc = lut_scale.data_ptr<c10::Half>();
    const auto* bi = lut_bias.data_ptr<c10::Half>();
    float out[lut::kBlockRows];
    for (int64_t b = n0 / lut::kBlockRows; b * lut::kBlockRows < n1; ++b) {
      lut::lut_block<P>(w + b * row_bytes, sc + b * G * lut::kBlockRows, bi + b * G * lut::kBlockRows,
                        src->tables.data(), src->ts.data(), src->xsum.data(), C, G, group / lut::kChunk, out);
      const int64_t r0 = std::max(n0, b * lut::kBlockRows), r1 = std::min(n1, (b + 1) * lut::kBlockRows);
      std::copy(out + (r0 - b * lut::kBlockRows), out + (r1 - b * lut::kBlockRows), y + r0);
    }
  }

  // y[n] = W[n] . x + bias[n] for n in [n0, n1).
  void rows(int64_t n0, int64_t n1, float* y) const {
    if (n0 >= n1) return;
    const auto* w = static_cast<const uint8_t*>(weight.data_ptr());
    switch (kind) {
      case WKind::kF32:
        for (int64_t n = n0; n < n1; ++n) y[n] = simd::dot(x, weight.data_ptr<float>() + n * K, K);
        break;
      case WKind::kBF16:
        bf16::gemv_range<1, float>(src->packed.data(), src->kpad, reinterpret_cast<const uint16_t*>(w), nullptr, y, N,
                                   K, n0, n1);
        break;
      case WKind::kQ8_0: block_rows<ggml::Kind::kQ8_0>(w, n0, n1, y); break;
      case WKind::kQ4_0: block_rows<ggml::Kind::kQ4_0>(w, n0, n1, y); break;
      case WKind::kQ4_1: block_rows<ggml::Kind::kQ4_1>(w, n0, n1, y); break;
      case WKind::kQ5_0: block_rows<ggml::Kind::kQ5_0>(w, n0, n1, y); break;
      case WKind::kQ5_1: block_rows<ggml::Kind::kQ5_1>(w, n0, n1, y); break;
      case WKind::kIq4Nl: block_rows<ggml::Kind::kIq4Nl>(w, n0, n1, y); break;
      case WKind::kMxfp4: block_rows<ggml::Kind::kMxfp4>(w, n0, n1, y); break;
      case WKind::kQ2K: kquant_rows<kq::Q2K>(w, n0, n1, y); break;
      case WKind::kQ3K: kquant_rows<kq::Q3K>(w, n0, n1, y); break;
      case WKind::kQ4K: kquant_rows<kq::Q4K>(w, n0, n1, y); break;
      case WKind::kQ5K: kquant_rows<kq::Q5K>(w, n0, n1, y); break;
      case WKind::kQ6K: kquant_rows<kq::Q6K>(w, n0, n1, y); break;
      case WKind::kLut:
        switch (bits) {
          case 1: lut_rows<1>(w, n0, n1, y); break;
          case 2: lut_rows<2>(w, n0, n1, y); break;
          case 3: lut_rows<3>(w, n0, n1, y); break;
          default: lut_rows<4>(w, n0, n1, y);
        }
        break;
    }
    if (bias.defined())
      for (int64_t n = n0; n < n1; ++n) y[n] += bias.data_ptr<float>()[n];
    if (lora_slot >= 0) {
      if (lora_bt.scalar_type() == torch::kFloat)
        lora_up(lora_bt.data_ptr<float>(), n0, n1, y);
      else
        lora_up(lora_bt.data_ptr<at::BFloat16>(), n0, n1, y);
    }
  }
};

// Thread `tid` of `nth`'s share of the rows of some projections of one input, each into its own output: a slice of
// their concatenation, rounded to 16 rows (the bf16 kernel's blocks). With `add`, the rows are added into the output
// (a residual) instead of stored, through `scratch`. With T > 0, forward_many's T rows (prepare_many): each output
// (T, N) row-major, `scratch` T * N floats.
void split_rows(const std::vector<std::pair<Proj*, float*>>& outs, int tid, int nth, float* scratch,
                bool add = false, int64_t T = 0) {
  int64_t total = 0;
  int64_t align = 16;  // the bf16 kernel's blocks; the table-lookup kernel's are kBlockRows
  for (const auto& [proj, y] : outs) {
    total += proj->N;
    if (proj->kind == WKind::kLut) align = lut::kBlockRows;
  }
  const int64_t per = (total + nth - 1) / nth;
  const int64_t chunk = (per + align - 1) / align * align;
  const int64_t lo = std::min(total, tid * chunk), hi = std::min(total, lo + chunk);
  int64_t base = 0;
  for (const auto& [proj, y] : outs) {
    const int64_t n = proj->N, a = std::max(lo - base, int64_t{0}), b = std::min(hi - base, n);
    if (a < b) {
      if (T)
        proj->rows_many(a, b, add ? scratch : y);
      else
        proj->rows(a, b, add ? scratch : y);
      if (add)
        for (int64_t t = 0; t < std::max<int64_t>(T, 1); ++t)
          for (int64_t r = a; r < b; ++r) y[t * n + r] += scratch[t * n + r];
    }
    base += n;
  }
}

// fp32 RMS norm of x (D) into out as F.rms_norm computes it (the sum in ATen's order): the op-at-a-time path's bits,
// so both quantize the same activations for the weight kernels. `sq` holds D floats.
void rms_norm(const float* x, const float* w, int64_t D, float eps, float* out, float* sq) {
  for (int64_t d = 0; d < D; ++d) sq[d] = x[d] * x[d];
  const float inv = 1.0f / std::sqrt(simd::aten_sum(sq, D) / static_cast<float>(D) + eps);
  for (int64_t d = 0; d < D; ++d) out[d] = x[d] * inv * w[d];
}

// HF's half-split rotation of one head (x[i] pairs with x[i + half]), rounded per product as torch's ops round.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
void rope(float* x, const float* cos, const float* sin, int64_t hd) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}
#pragma GCC pop_options

// OLMoE's clamp of q, k (after their norms) and v; a no-op at infinity.
void clamp(float* x, int64_t n, float c) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::min(std::max(x[i], -c), c);
}

// The RMS norm of q or k: per head when the weight spans one head (Qwen3), else over the whole projection (OLMoE).
void qk_norm(float* x, const torch::Tensor& w, int64_t heads, int64_t hd, float eps, float* sq) {
  if (w.numel() == hd)
    for (int64_t hh = 0; hh < heads; ++hh) rms_norm(x + hh * hd, w.data_ptr<float>(), hd, eps, x + hh * hd, sq);
  else
    rms_norm(x, w.data_ptr<float>(), heads * hd, eps, x, sq);
}

// (kind, weight, bias, N, K), and for the table-lookup kind also (scale, bias of the groups, bits, group).
std::unique_ptr<Proj> make_proj(const py::tuple& t) {
  auto p = std::make_unique<Proj>(t[0].cast<std::string>(), t[1].cast<torch::Tensor>(),
                                  t[2].cast<c10::optional<torch::Tensor>>(), t[3].cast<int64_t>(), t[4].cast<int64_t>());
  if (p->kind == WKind::kLut) {
    TORCH_CHECK(t.size() == 9, "fused step: a table-lookup projection needs its scales, biases, bits and group");
    p->set_lut(t[5].cast<torch::Tensor>(), t[6].cast<torch::Tensor>(), t[7].cast<int64_t>(), t[8].cast<int64_t>());
  }
  return p;
}

// A SwiGLU feed-forward block: down(silu(gate(x)) * up(x)).
struct Mlp {
  std::unique_ptr<Proj> gate, up, down;

  explicit Mlp(const std::vector<py::tuple>& projs) {
    TORCH_CHECK(projs.size() == 3, "fused step: an MLP has 3 projections (gate, up, down)");
    gate = make_proj(projs[0]), up = make_proj(projs[1]), down = make_proj(projs[2]);
  }
};

// A sparse MoE block: softmax over the router's logits, the top k (renormalised or not), Σ weight · expert(x) over
// them, plus the shared expert scaled by sigmoid(shared_gate(x)) where there is one.
struct Moe {
  std::unique_ptr<Proj> router, shared_gate;
  std::vector<Mlp> experts;
  std::unique_ptr<Mlp> shared;
  int64_t top_k = 0;
  bool renormalize = false;
  int64_t groups = 0;  // MoGE: top_k / groups experts from each contiguous group, weight = probability x scale
  torch::Tensor scale;
};

struct Layer {
  torch::Tensor in_norm, post_norm, q_norm, k_norm;  // fp32; q/k norms undefined without them
  float clip = std::numeric_limits<float>::infinity();
  std::vector<std::unique_ptr<Proj>> attn;  // q, k, v, o
  std::unique_ptr<Mlp> mlp;  // the dense block, or
  std::unique_ptr<Moe> moe;  // the sparse one
};

// Softmax of the router's logits, then the top k by probability (the lower index first on a tie, as torch.topk),
// renormalised to sum 1 if asked; returns them in ascending expert order, the order mix_experts adds them in.
std::vector<std::pair<int64_t, float>> route(const float* logits, const Moe& M) {
  const int64_t E = M.router->N, k = M.top_k;
  std::vector<float> probs(logits, logits + E);
  const float mx = *std::max_element(probs.begin(), probs.end());
  float sum = 0.0f;
  for (auto& p : probs) sum += (p = std::exp(p - mx));
  for (auto& p : probs) p /= sum;
  std::vector<int64_t> order(E);
  for (int64_t e = 0; e < E; ++e) order[e] = e;
  const auto higher = [&](int64_t a, int64_t b) { return probs[a] > probs[b] || (probs[a] == probs[b] && a < b); };
  std::vector<std::pair<int64_t, float>> chosen;
  if (M.groups) {  // MoGE (models/moe.py's grouped_topk): the best of each group, scaled, not renormalised
    const int64_t width = E / M.groups, per = k / M.groups;
    const float* scale = M.scale.data_ptr<float>();
    for (int64_t g = 0; g < M.groups; ++g) {
      const auto first = order.begin() + g * width;
      std::partial_sort(first, first + per, first + width, higher);
      for (auto it = first; it != first + per; ++it) chosen.emplace_back(*it, probs[*it] * scale[*it]);
    }
    std::sort(chosen.begin(), chosen.end());
    return chosen;
  }
  std::partial_sort(order.begin(), order.begin() + k, order.end(), higher);
  float total = 0.0f;
  for (int64_t j = 0; j < k; ++j) total += probs[order[j]];
  for (int64_t j = 0; j < k; ++j) {
    const float p = probs[order[j]];
    chosen.emplace_back(order[j], M.renormalize ? p / total : p);
  }
  std::sort(chosen.begin(), chosen.end());
  return chosen;
}

// One token's routing in a MoE layer: the chosen experts (and the shared one last) and their projections' outputs.
struct Routing {
  std::vector<std::pair<int64_t, float>> chosen;
  std::vector<Mlp*> blocks;
  std::vector<std::pair<Proj*, float*>> outs;
};

void swiglu(const float* gate, const float* up, int64_t F, float* act) {
  for (int64_t i = 0; i < F; ++i) act[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

// out = Σ_j y_j · w_j in the order given, then + sigmoid(g) · shared, then h += out: mix_experts' roundings.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
void mix(float* h, const std::vector<std::pair<int64_t, float>>& chosen, const float* y, const float* shared,
         float shared_logit, int64_t D) {
  const float s = 1.0f / (1.0f + std::exp(-shared_logit));
  for (int64_t d = 0; d < D; ++d) {
    float out = 0.0f;
    for (size_t j = 0; j < chosen.size(); ++j) out += y[j * D + d] * chosen[j].second;
    if (shared) out += s * shared[d];
    h[d] += out;
  }
}
#pragma GCC pop_options

// Where a layer's K/V go and how they are attended: a policy run() calls once per layer, store() on one thread
// after RoPE, attend() on every thread (each its share of the KV heads) with its own Scratch.

// Dense caches of fp32, bf16 or fp16: (1, kv_heads, capacity, head_dim) as DenseKVCache holds them, or with page
// tables (layers, pages) the block pool's fields (blocks, kv_heads, block_tokens, head_dim), token t of layer li in
// block tables[li][t / block_tokens] (PagedKVCache). A contiguous cache is the one page 0 of `capacity` tokens.
template <typename KV>
struct DenseKV {
  const std::vector<torch::Tensor>& keys;
  const std::vector<torch::Tensor>& values;
  int64_t pos, Hkv, hd, group;
  const int64_t* tables;  // nullptr for contiguous caches
  int64_t pages;  // table entries per layer

  struct Scratch {
    simd::AttentionScratch att;
    std::vector<const float*> qf;
  };

  Scratch scratch() const { return {simd::AttentionScratch(group, pos + 1, hd), std::vector<const float*>(group)}; }

  KV* row(const torch::Tensor& c, size_t li, int64_t g, int64_t t) const {
    const int64_t bt = c.size(2), page = tables ? tables[li * pages + t / bt] : 0;
    return c.data_ptr<KV>() + page * c.stride(0) + g * c.stride(1) + t % bt * c.stride(2);
  }

  void store(size_t li, const float* k, const float* v) const {
    for (int64_t g = 0; g < Hkv; ++g) {
      simd::narrow(k + g * hd, row(keys[li], li, g, pos), hd);
      simd::narrow(v + g * hd, row(values[li], li, g, pos), hd);
    }
  }

  void attend(size_t li, const float* q, float* att, int tid, int n, Scratch& s) const {
    const torch::Tensor &kt = keys[li], &vt = values[li];
    const KV* kc = kt.data_ptr<KV>();
    const KV* vc = vt.data_ptr<KV>();
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    for (int64_t g = tid; g < Hkv; g += n) {  // the query heads of one KV head attend together (GQA)
      for (int64_t j = 0; j < group; ++j) s.qf[j] = q + (g * group + j) * hd;
      const KV* kh = kc + g * kt.stride(1);
      const KV* vh = vc + g * vt.stride(1);
      if (tables) {
        const int64_t* table = tables + li * pages;
        simd::attend_group(s.qf.data(), group, simd::PagedRows<KV>{kh, table, kt.stride(0), kt.size(2), kt.stride(2)},
                           simd::PagedRows<KV>{vh, table, vt.stride(0), vt.size(2), vt.stride(2)}, pos + 1, hd, scale,
                           att + g * group * hd, s.att);
      } else {
        simd::attend_group(s.qf.data(), group, kh, kt.stride(2), vh, vt.stride(2), pos + 1, hd, scale,
                           att + g * group * hd, s.att);
      }
    }
  }
};

// One layer of a QuantizedKVCache (edgellm/kv/quantized_cache.py), batch 1: K and V as uint8 codes with fp16
// scales/zeros (_PackedBuffer's tensors), then the full-precision window of K and V (1, kv_heads, capacity,
// head_dim) in the model's dtype.
struct PackedLayer {
  torch::Tensor kd, ks, kz, vd, vs, vz, wk, wv;
};

// How a step stores its token in a packed cache: quantized at once (no window), into the window, or into a full
// per-token window whose oldest token is quantized to make room (QuantizedKVCache._store with one token).
enum class Store { kQuantize, kWindow, kShift };

// The packed caches of every layer, one format: the new token stored as QuantizedKVCache._store stores it
// (Hadamard-rotated keys, rounded to the window's dtype W, quantized bit-exactly as kvcodec does), then attention
// over the packed tokens and the window as kvattn computes it, one Worker per KV head: the packed tokens, then the
// window in the same online softmax. With page tables (layers, pages), the codes, scales and zeros are the block
// pool's fields (blocks, kv_heads, block_tokens, width), token t of layer li in block tables[li][t / block_tokens]
// (PagedKVCache: per-token, no window); without, one page 0 holds every token.
template <typename W>
struct PackedKV {
  const std::vector<PackedLayer>& layers;
  int64_t Hkv, hd, group, quantized, held;  // GQA group; quantized and window tokens before this one
  int bits;
  int64_t kgroup, vgroup;  // per-token: elements along head_dim a scale; per-channel keys: tokens a scale
  bool per_channel, hadamard;
  float* tap;  // the K/V rows stored, before any rotation (layers, 2, kv_heads * head_dim), or nullptr
  const int64_t* tables;  // nullptr for contiguous caches
  int64_t pages;  // table entries per layer
  int64_t wcap = layers[0].wk.size(2);
  Store mode = wcap == 0 ? Store::kQuantize : held < wcap ? Store::kWindow : Store::kShift;
  int64_t tokens = quantized + (mode == Store::kWindow ? 0 : 1);  // quantized after the store
  int64_t recent = mode == Store::kWindow ? held + 1 : held;  // window tokens after it
  // codec.hadamard's scale n ** -0.5 (C's pow, as Python's), also the attention's head_dim ** -0.5
  float rot = static_cast<float>(std::pow(static_cast<double>(hd), -0.5));

  struct Scratch {
    std::vector<float> qr, m, l, acc;
    std::optional<kvattn::Worker> worker;
  };

  Scratch scratch() const {
    return {std::vector<float>(hadamard ? Hkv * group * hd : 0), std::vector<float>(group),
            std::vector<float>(group), std::vector<float>(group * hd), std::nullopt};
  }

  // A row as the cache's dtype holds it (an fp32 row is itself).
  static void round(float* x, int64_t n) {
    if constexpr (!std::is_same_v<W, float>)
      for (int64_t d = 0; d < n; ++d) x[d] = static_cast<float>(static_cast<W>(x[d]));
  }

  // fp32 row x quantized into row t of page `page` of kv head g, per-token groups of `group` (codes: hd bytes of
  // scratch).
  void quantize(const torch::Tensor& data, const torch::Tensor& scales, const torch::Tensor& zeros, int64_t page,
                int64_t g, int64_t t, int64_t grp, const float* x, uint8_t* codes) const {
    auto off = [&](const torch::Tensor& f) { return page * f.stride(0) + g * f.stride(1) + t * f.stride(2); };
    auto* sc = reinterpret_cast<uint16_t*>(scales.data_ptr<at::Half>());
    auto* ze = reinterpret_cast<uint16_t*>(zeros.data_ptr<at::Half>());
    kvcodec::quantize_row(x, hd, bits, grp, codes, data.data_ptr<uint8_t>() + off(data), sc + off(scales),
                          ze + off(zeros));
  }

  // Row x of kv head g into the window; a full one first quantizes its oldest row into token `quantized` and
  // moves the others down one.
  void to_window(const torch::Tensor& window, const torch::Tensor& data, const torch::Tensor& scales,
                 const torch::Tensor& zeros, int64_t grp, int64_t g, const float* x, float* row, uint8_t* codes) const {
    W* rows = window.data_ptr<W>() + g * wcap * hd;
    if (mode == Store::kShift) {
      for (int64_t d = 0; d < hd; ++d) row[d] = static_cast<float>(rows[d]);
      quantize(data, scales, zeros, 0, g, quantized, grp, row, codes);
      std::memmove(rows, rows + hd, (held - 1) * hd * sizeof(W));
    }
    simd::narrow(x, rows + (recent - 1) * hd, hd);
  }

  void store(size_t li, float* k, float* v) const {
    const PackedLayer& c = layers[li];
    if (tap) {
      std::copy(k, k + Hkv * hd, tap + li * 2 * Hkv * hd);
      std::copy(v, v + Hkv * hd, tap + (li * 2 + 1) * Hkv * hd);
    }
    std::vector<float> row(hd);
    std::vector<uint8_t> codes(hd);
    const int64_t bt = c.kd.size(2), page = tables ? tables[li * pages + quantized / bt] : 0;
    const int64_t slot = tables ? quantized % bt : quantized;  // the token's row in its page (a quantizing store)
    for (int64_t g = 0; g < Hkv; ++g) {
      float* kh = k + g * hd;
      float* vh = v + g * hd;
      if (hadamard) kvcodec::hadamard_row(kh, hd, rot);
      if (mode == Store::kQuantize) {
        round(kh, hd), round(vh, hd);
        quantize(c.kd, c.ks, c.kz, page, g, slot, kgroup, kh, codes.data());
        quantize(c.vd, c.vs, c.vz, page, g, slot, vgroup, vh, codes.data());
      } else {
        to_window(c.wk, c.kd, c.ks, c.kz, kgroup, g, kh, row.data(), codes.data());
        to_window(c.wv, c.vd, c.vs, c.vz, vgroup, g, vh, row.data(), codes.data());
      }
    }
  }

  void attend(size_t li, const float* q, float* att, int tid, int n, Scratch& s) const {
    const PackedLayer& c = layers[li];
    static const int64_t page = 0;  // contiguous: batch row 0's tokens all in "page" 0, which holds them all
    const kvattn::Problem p{hadamard ? s.qr.data() : q, Hkv, group, hd, tables ? tables + li * pages : &page,
                            tables ? pages : 1, tables ? c.kd.size(2) : tokens + 1, tokens,
                            {kvattn::field(c.kd), kvattn::field(c.ks), kvattn::field(c.kz), kgroup},
                            {kvattn::field(c.vd), kvattn::field(c.vs), kvattn::field(c.vz), vgroup},
                            per_channel, nullptr, nullptr, 0, rot, bits};
    for (int64_t g = tid; g < Hkv; g += n) {
      const int64_t at = g * group * hd;
      if (hadamard) {  // the keys were stored rotated: rotate the queries instead of un-rotating the keys
        std::copy(q + at, q + at + group * hd, s.qr.data() + at);
        for (int64_t j = 0; j < group; ++j) kvcodec::hadamard_row(s.qr.data() + at + j * hd, hd, rot);
      }
      std::fill(s.m.begin(), s.m.end(), -INFINITY);
      std::fill(s.l.begin(), s.l.end(), 0.0f);
      std::fill(s.acc.begin(), s.acc.end(), 0.0f);
      if (!s.worker)
        s.worker.emplace(p, 0, g, s.m.data(), s.l.data(), s.acc.data());
      else
        s.worker->start(p, 0, g, s.m.data(), s.l.data(), s.acc.data());
      switch (bits) {
        case 8: s.worker->template run<8>(0, tokens); break;
        case 4: s.worker->template run<4>(0, tokens); break;
        default: s.worker->template run<2>(0, tokens);
      }
      const int64_t w = g * wcap * hd;
      if (recent) s.worker->run_rows(c.wk.data_ptr<W>() + w, c.wv.data_ptr<W>() + w, recent);
      for (int64_t j = 0; j < group; ++j)
        for (int64_t d = 0; d < hd; ++d) att[at + j * hd + d] = s.acc[j * hd + d] / s.l[j];
    }
  }
};

class Plan {
 public:
  Plan(int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, double eps, torch::Tensor final_norm,
       int64_t vocab)
      : D_(hidden), H_(heads), Hkv_(kv_heads), hd_(head_dim), eps_(static_cast<float>(eps)),
        final_norm_(final_norm.to(torch::kFloat).contiguous()), vocab_(vocab) {}

  // Called after each MoE layer's routing, before its experts run, with (layer, its normalised input (1, D) fp32,
  // the chosen experts (1, top_k) int64): where expert residency is managed between layers (models/offload.py).
  void set_hook(py::object fn) { hook_ = std::move(fn); }

  // A layer's norms and attention; its feed-forward block follows by set_mlp or set_moe.
  void add_layer(torch::Tensor in_norm, torch::Tensor post_norm, c10::optional<torch::Tensor> q_norm,
                 c10::optional<torch::Tensor> k_norm, c10::optional<double> clip,
                 const std::vector<py::tuple>& projs) {
    TORCH_CHECK(projs.size() == 4, "fused step: attention has 4 projections (q, k, v, o)");
    TORCH_CHECK(layers_.empty() || layers_.back().mlp || layers_.back().moe, "fused step: a layer without an MLP");
    Layer l;
    l.in_norm = in_norm.to(torch::kFloat).contiguous();
    l.post_norm = post_norm.to(torch::kFloat).contiguous();
    if (q_norm) {
      l.q_norm = q_norm->to(torch::kFloat).contiguous(), l.k_norm = k_norm->to(torch::kFloat).contiguous();
      TORCH_CHECK((l.q_norm.numel() == hd_ || l.q_norm.numel() == H_ * hd_) &&
                      (l.k_norm.numel() == hd_ || l.k_norm.numel() == Hkv_ * hd_),
                  "fused step: q/k norms span one head or the whole projection");
    }
    if (clip) l.clip = static_cast<float>(*clip);
    for (const auto& t : projs) l.attn.push_back(make_proj(t));
    layers_.push_back(std::move(l));
  }

  void set_mlp(const std::vector<py::tuple>& projs) {
    auto& l = open_layer();
    l.mlp = std::make_unique<Mlp>(projs);
    ffn_ = std::max(ffn_, l.mlp->gate->N);
  }

  void set_moe(const py::tuple& router, const std::vector<std::vector<py::tuple>>& experts, int64_t top_k,
               bool renormalize, const std::vector<py::tuple>& shared, c10::optional<py::tuple> shared_gate) {
    auto& layer = open_layer();
    auto moe = std::make_unique<Moe>();
    moe->router = make_proj(router);
    TORCH_CHECK(moe->router->N == static_cast<int64_t>(experts.size()) && top_k >= 1 &&
                    top_k <= moe->router->N && shared.empty() == !shared_gate,
                "fused step: one router row per expert, 1 <= top_k <= experts, a shared expert with its gate");
    for (const auto& e : experts) {
      moe->experts.emplace_back(e);
      ffn_ = std::max(ffn_, moe->experts.back().gate->N);
    }
    if (shared_gate) {
      moe->shared = std::make_unique<Mlp>(shared);
      moe->shared_gate = make_proj(*shared_gate);
      ffn_ = std::max(ffn_, moe->shared->gate->N);
    }
    moe->top_k = top_k, moe->renormalize = renormalize;
    slots_ = std::max(slots_, top_k + (shared_gate ? 1 : 0));
    experts_ = std::max(experts_, moe->router->N);
    layer.moe = std::move(moe);
  }

  void set_moe_groups(int64_t groups, const torch::Tensor& scale) {
    TORCH_CHECK(!layers_.empty() && layers_.back().moe, "fused step: set_moe_groups follows set_moe");
    Moe& M = *layers_.back().moe;
    const int64_t E = M.router->N;
    TORCH_CHECK(groups >= 1 && E % groups == 0 && M.top_k % groups == 0 && scale.numel() == E,
                "fused step: MoGE needs groups dividing the experts and top_k, and one scale per expert");
    M.groups = groups, M.scale = scale.to(torch::kFloat).contiguous();
  }

  void set_head(const std::string& kind, torch::Tensor w, int64_t n, int64_t k) {
    head_ = std::make_unique<Proj>(kind, w, c10::nullopt, n, k);
  }

  // Gives the projection whose weight is `weight` (the tensor its tuple passed) a LoRA side path over the stacks a
  // (S*rank, K) and bt (S*rank, N); returns its index among them for select_lora. No adapter is selected yet.
  int64_t set_lora(const torch::Tensor& weight, torch::Tensor a, torch::Tensor bt, int64_t rank) {
    Proj* p = nullptr;
    auto visit = [&](Proj* q) {
      if (q && q->weight.data_ptr() == weight.data_ptr()) p = q;
    };
    for (auto& l : layers_) {
      for (auto& q : l.attn) visit(q.get());
      if (l.mlp) visit(l.mlp->gate.get()), visit(l.mlp->up.get()), visit(l.mlp->down.get());
    }
    TORCH_CHECK(p, "fused step: set_lora names no attention or dense MLP projection of the plan");
    TORCH_CHECK(rank > 0 && a.dim() == 2 && bt.dim() == 2 && a.size(0) == bt.size(0) && a.size(0) % rank == 0 &&
                    a.size(1) == p->K && bt.size(1) == p->N && a.is_contiguous() && bt.is_contiguous() &&
                    a.scalar_type() == bt.scalar_type() &&
                    (a.scalar_type() == torch::kFloat || a.scalar_type() == torch::kBFloat16),
                "fused step: LoRA stacks must be contiguous fp32/bf16 A (S*rank, K) and B^T (S*rank, N)");
    std::lock_guard<std::mutex> guard(mutex_);
    p->lora_a = a, p->lora_bt = bt, p->lora_rank = rank, p->lora_slot = -1, p->lora_h.assign(rank, 0.0f);
    loras_.push_back(p);
    return static_cast<int64_t>(loras_.size()) - 1;
  }

  // The adapter each LoRA projection (in set_lora order) applies from the next step on: its slot (-1: none), scale.
  void select_lora(const std::vector<int64_t>& slots, const std::vector<double>& scales) {
    TORCH_CHECK(slots.size() == loras_.size() && scales.size() == loras_.size(),
                "fused step: one slot and one scale per LoRA projection");
    std::lock_guard<std::mutex> guard(mutex_);
    for (size_t i = 0; i < loras_.size(); ++i) {
      TORCH_CHECK(slots[i] < loras_[i]->lora_a.size(0) / loras_[i]->lora_rank, "fused step: LoRA slot out of range");
      loras_[i]->lora_slot = slots[i], loras_[i]->lora_scale = static_cast<float>(scales[i]);
    }
  }

  // Whether forward_many covers this plan: dense feed-forward blocks, fp32/bf16 weights, no adapter selected.
  bool covers_many() const {
    if (!head_ || !head_->reads_many()) return false;
    for (const auto& l : layers_) {
      if (!l.mlp) return false;
      for (const Proj* p : {l.attn[0].get(), l.attn[1].get(), l.attn[2].get(), l.attn[3].get(), l.mlp->gate.get(),
                            l.mlp->up.get(), l.mlp->down.get()})
        if (!p->reads_many() || p->lora_slot >= 0) return false;
    }
    return true;
  }

  // T tokens (h (T, D) fp32, their embeddings) at positions pos..pos+T-1 through every layer, as T calls of forward
  // would run them (row t's logits bit for bit forward's at pos + t) but with each weight read once for the T rows:
  // a speculative check of T - 1 drafted tokens, or a short prompt. Contiguous dense caches; returns (T, vocab).
  torch::Tensor forward_many(torch::Tensor h, const torch::Tensor& cos, const torch::Tensor& sin,
                             const std::vector<torch::Tensor>& keys, const std::vector<torch::Tensor>& values,
                             int64_t pos) {
    TORCH_CHECK(covers_many(), "fused step: forward_many needs dense MLPs and fp32/bf16 weights, no adapter");
    TORCH_CHECK(h.scalar_type() == torch::kFloat && h.is_contiguous() && h.dim() == 2 && h.size(1) == D_,
                "fused step: h must be (T, D) fp32");
    const int64_t T = h.size(0);
    TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 2 && cos.size(0) == T && cos.size(1) == hd_ &&
                    cos.is_contiguous() && sin.is_contiguous(), "fused step: cos/sin must be (T, head_dim)");
    TORCH_CHECK(keys.size() == layers_.size() && values.size() == layers_.size(), "fused step: K/V per layer");
    const auto kv_type = keys[0].scalar_type();
    for (size_t i = 0; i < keys.size(); ++i)
      TORCH_CHECK(keys[i].dim() == 4 && keys[i].size(0) == 1 && keys[i].size(1) == Hkv_ && keys[i].size(3) == hd_ &&
                      keys[i].size(2) >= pos + T && values[i].sizes() == keys[i].sizes() &&
                      keys[i].scalar_type() == kv_type && values[i].scalar_type() == kv_type &&
                      keys[i].is_contiguous() && values[i].is_contiguous(),
                  "fused step: K/V caches must be contiguous (1, kv_heads, capacity >= pos + T, head_dim)");
    auto logits = torch::empty({T, vocab_}, torch::kFloat);
    pybind11::gil_scoped_release release;
    std::lock_guard<std::mutex> guard(mutex_);
    switch (kv_type) {
      case torch::kFloat: run_many<float>(h, cos, sin, keys, values, pos, logits); break;
      case torch::kBFloat16: run_many<c10::BFloat16>(h, cos, sin, keys, values, pos, logits); break;
      case torch::kHalf: run_many<c10::Half>(h, cos, sin, keys, values, pos, logits); break;
      default: TORCH_CHECK(false, "fused step: K/V must be fp32, bf16 or fp16");
    }
    return logits;
  }

  template <typename KV>
  void run_many(torch::Tensor& h_t, const torch::Tensor& cos_t, const torch::Tensor& sin_t,
                const std::vector<torch::Tensor>& keys, const std::vector<torch::Tensor>& values, int64_t pos,
                torch::Tensor& logits_t) {
    const int64_t T = h_t.size(0), qd = H_ * hd_, kvd = Hkv_ * hd_, group = H_ / Hkv_;
    std::vector<float> xn(T * std::max(D_, qd)), q(T * qd), k(T * kvd), v(T * kvd), att(T * qd), gate(T * ffn_),
        up(T * ffn_), act(T * ffn_);
    std::vector<DenseKV<KV>> caches;
    for (int64_t t = 0; t < T; ++t) caches.push_back(DenseKV<KV>{keys, values, pos + t, Hkv_, hd_, group, nullptr, 0});
    float* h = h_t.data_ptr<float>();
    const float* cos = cos_t.data_ptr<float>();
    const float* sin = sin_t.data_ptr<float>();
    const int nth = std::max(1, at::get_num_threads());
#pragma omp parallel num_threads(nth)
    {
      const int tid = omp_get_thread_num(), n = omp_get_num_threads();
      std::vector<float> scratch(T * D_), sq(std::max(D_, qd));
      std::vector<typename DenseKV<KV>::Scratch> cs;
      for (const auto& c : caches) cs.push_back(c.scratch());
      for (size_t li = 0; li < layers_.size(); ++li) {
        Layer& L = layers_[li];
#pragma omp single
        {
          for (int64_t t = 0; t < T; ++t)
            rms_norm(h + t * D_, L.in_norm.data_ptr<float>(), D_, eps_, xn.data() + t * D_, sq.data());
          for (int i = 0; i < 3; ++i) L.attn[i]->prepare_many(xn.data(), T);
        }
        split_rows({{L.attn[0].get(), q.data()}, {L.attn[1].get(), k.data()}, {L.attn[2].get(), v.data()}}, tid, n,
                   scratch.data(), false, T);
#pragma omp barrier
#pragma omp single
        for (int64_t t = 0; t < T; ++t) {
          float *qt = q.data() + t * qd, *kt = k.data() + t * kvd, *vt = v.data() + t * kvd;
          if (L.q_norm.defined()) {
            qk_norm(qt, L.q_norm, H_, hd_, eps_, sq.data());
            qk_norm(kt, L.k_norm, Hkv_, hd_, eps_, sq.data());
          }
          if (std::isfinite(L.clip)) clamp(qt, qd, L.clip), clamp(kt, kvd, L.clip), clamp(vt, kvd, L.clip);
          for (int64_t hh = 0; hh < H_; ++hh) rope(qt + hh * hd_, cos + t * hd_, sin + t * hd_, hd_);
          for (int64_t g = 0; g < Hkv_; ++g) rope(kt + g * hd_, cos + t * hd_, sin + t * hd_, hd_);
          caches[t].store(li, kt, vt);
        }
        for (int64_t t = 0; t < T; ++t) caches[t].attend(li, q.data() + t * qd, att.data() + t * qd, tid, n, cs[t]);
#pragma omp barrier
#pragma omp single
        L.attn[3]->prepare_many(att.data(), T);
        split_rows({{L.attn[3].get(), h}}, tid, n, scratch.data(), true, T);
#pragma omp barrier
#pragma omp single
        {
          for (int64_t t = 0; t < T; ++t)
            rms_norm(h + t * D_, L.post_norm.data_ptr<float>(), D_, eps_, xn.data() + t * D_, sq.data());
          L.mlp->gate->prepare_many(xn.data(), T), L.mlp->up->prepare_many(xn.data(), T);
        }
        split_rows({{L.mlp->gate.get(), gate.data()}, {L.mlp->up.get(), up.data()}}, tid, n, scratch.data(), false, T);
#pragma omp barrier
#pragma omp single
        {
          const int64_t F = L.mlp->gate->N;
          for (int64_t t = 0; t < T; ++t) swiglu(gate.data() + t * F, up.data() + t * F, F, act.data() + t * F);
          L.mlp->down->prepare_many(act.data(), T);
        }
        split_rows({{L.mlp->down.get(), h}}, tid, n, scratch.data(), true, T);
#pragma omp barrier
      }
#pragma omp single
      {
        for (int64_t t = 0; t < T; ++t)
          rms_norm(h + t * D_, final_norm_.data_ptr<float>(), D_, eps_, xn.data() + t * D_, sq.data());
        head_->prepare_many(xn.data(), T);
      }
      split_rows({{head_.get(), logits_t.data_ptr<float>()}}, tid, n, scratch.data(), false, T);
    }
  }

  // Runs every layer for the token whose embedding is h (D, fp32, updated in place) at position `pos`, writing its
  // K/V into each layer's cache at `pos` and attending over [0, pos]; returns the logits (vocab, fp32). The caches
  // are contiguous (1, kv_heads, capacity, head_dim), or with `tables` (layers, pages) int64 the block pool's K/V
  // fields (blocks, kv_heads, block_tokens, head_dim), layer li's token t in block tables[li][t / block_tokens].
  torch::Tensor forward(torch::Tensor h, const torch::Tensor& cos, const torch::Tensor& sin,
                        const std::vector<torch::Tensor>& keys, const std::vector<torch::Tensor>& values,
                        int64_t pos, const c10::optional<torch::Tensor>& tables) {
    TORCH_CHECK(head_ && keys.size() == layers_.size() && values.size() == layers_.size() &&
                    (layers_.back().mlp || layers_.back().moe),
                "fused step: one K and one V tensor per layer, an MLP per layer, and a head");
    TORCH_CHECK(h.scalar_type() == torch::kFloat && h.is_contiguous() && h.numel() == D_, "fused step: h");
    const auto kv_type = keys[0].scalar_type();
    for (size_t i = 0; i < keys.size(); ++i) {
      TORCH_CHECK(keys[i].dim() == 4 && keys[i].size(1) == Hkv_ && keys[i].size(3) == hd_ &&
                      values[i].sizes() == keys[i].sizes() && keys[i].scalar_type() == kv_type &&
                      values[i].scalar_type() == kv_type,
                  "fused step: K/V caches must be (1 or blocks, kv_heads, tokens, head_dim), one dtype");
      TORCH_CHECK(tables ? keys[i].stride(3) == 1 && values[i].stride(3) == 1
                         : keys[i].size(0) == 1 && keys[i].size(2) > pos && keys[i].is_contiguous() &&
                               values[i].is_contiguous(),
                  "fused step: K/V caches must be contiguous (1, kv_heads, capacity > pos, head_dim), or paged "
                  "fields with a unit stride along head_dim");
    }
    const auto [table, pages] = check_tables(tables, keys, pos + 1);
    auto logits = torch::empty({vocab_}, torch::kFloat);
    pybind11::gil_scoped_release release;  // first: a thread waiting for the lock must not hold the GIL (the hook
    std::lock_guard<std::mutex> guard(mutex_);  // takes it back inside the step)
    const int64_t group = H_ / Hkv_;
    switch (kv_type) {
      case torch::kFloat:
        run(h, cos, sin, DenseKV<float>{keys, values, pos, Hkv_, hd_, group, table, pages}, logits);
        break;
      case torch::kBFloat16:
        run(h, cos, sin, DenseKV<c10::BFloat16>{keys, values, pos, Hkv_, hd_, group, table, pages}, logits);
        break;
      case torch::kHalf:
        run(h, cos, sin, DenseKV<c10::Half>{keys, values, pos, Hkv_, hd_, group, table, pages}, logits);
        break;
      default: TORCH_CHECK(false, "fused step: K/V must be fp32, bf16 or fp16");
    }
    return logits;
  }

  // forward() over QuantizedKVCaches (batch 1, one format): per layer (K codes, scales, zeros, V codes, scales,
  // zeros, K window, V window), `quantized` tokens packed and `held` in the window before this one. The token is
  // quantized at `quantized` (no window), written into the window at `held`, or, the per-token window being full,
  // written after its oldest token is quantized at `quantized`; a per-channel (KIVI) window must have room (a step
  // that closes a key group runs op at a time). `tap` (layers, 2, kv_heads * head_dim) fp32, if given, receives the
  // K/V rows stored, before any rotation. With `tables` (layers, pages) int64 the codes, scales and zeros are the
  // block pool's fields (blocks, kv_heads, block_tokens, width), layer li's token t in block
  // tables[li][t / block_tokens]: per-token, no window (empty ones give the model's dtype), every token quantized.
  torch::Tensor forward_packed(torch::Tensor h, const torch::Tensor& cos, const torch::Tensor& sin,
                               const std::vector<std::vector<torch::Tensor>>& caches, int64_t pos, int64_t quantized,
                               int64_t held, int64_t bits, int64_t kgroup, int64_t vgroup, bool per_channel,
                               bool hadamard, const c10::optional<torch::Tensor>& tap,
                               const c10::optional<torch::Tensor>& tables) {
    TORCH_CHECK(head_ && caches.size() == layers_.size() && (layers_.back().mlp || layers_.back().moe),
                "fused step: one packed cache per layer, an MLP per layer, and a head");
    TORCH_CHECK(h.scalar_type() == torch::kFloat && h.is_contiguous() && h.numel() == D_, "fused step: h");
    TORCH_CHECK(bits == 8 || bits == 4 || bits == 2, "fused step: 8, 4 or 2-bit K/V");
    const int64_t per = 8 / bits, width = hd_ * bits / 8;
    TORCH_CHECK(vgroup > 0 && hd_ % vgroup == 0 && vgroup % per == 0 && kgroup > 0 && kgroup % per == 0 &&
                    (per_channel || hd_ % kgroup == 0) && (!hadamard || (hd_ & (hd_ - 1)) == 0),
                "fused step: K/V groups must divide head_dim (a power of 2 for Hadamard keys)");
    TORCH_CHECK(quantized >= 0 && held >= 0 && (!per_channel || quantized % kgroup == 0),
                "fused step: bad token counts");
    std::vector<PackedLayer> layers;
    for (const auto& t : caches) {
      TORCH_CHECK(t.size() == 8, "fused step: a packed cache is K codes, scales, zeros, V codes, scales, zeros, "
                  "K window, V window");
      layers.push_back({t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7]});
    }
    const int64_t wcap = layers[0].wk.size(2);
    const auto w_type = layers[0].wk.scalar_type();
    const bool window_store = wcap > 0 && held < wcap;
    TORCH_CHECK(held <= wcap && (window_store || !per_channel) && (wcap > 0 || held == 0),
                "fused step: a per-channel window must have room for the token");
    const bool paged = tables.has_value();
    TORCH_CHECK(!paged || (!per_channel && wcap == 0), "fused step: paged K/V are per-token without a window");
    // tokens the codes must hold after this step (the new one, or the window's oldest) and before it
    const int64_t need = window_store ? quantized : quantized + 1;
    for (const auto& c : layers) {
      auto side = [&](const torch::Tensor& d, const torch::Tensor& sc, const torch::Tensor& ze, bool channels,
                      int64_t grp) {
        const int64_t rows = channels ? need * bits / 8 : need, srows = channels ? need / grp : need;
        TORCH_CHECK(d.dim() == 4 && sc.dim() == 4 && d.scalar_type() == torch::kUInt8 &&
                        sc.scalar_type() == torch::kHalf && ze.scalar_type() == torch::kHalf &&
                        sc.sizes() == ze.sizes() && d.size(1) == Hkv_ && sc.size(1) == Hkv_ &&
                        d.size(3) == (channels ? hd_ : width) && sc.size(3) == (channels ? hd_ : hd_ / grp) &&
                        d.stride(3) == 1 && sc.stride(3) == 1 && ze.stride(3) == 1 &&
                        (paged ? sc.size(0) == d.size(0) && sc.size(2) == d.size(2)
                               : d.size(0) == 1 && d.size(2) >= rows && sc.size(2) >= srows),
                    "fused step: packed K/V must be (1, kv_heads, rows, width) codes and fp16 scales/zeros holding "
                    "every token, or the block pool's fields of them");
      };
      side(c.kd, c.ks, c.kz, per_channel, kgroup);
      side(c.vd, c.vs, c.vz, false, vgroup);
      TORCH_CHECK(!paged || (c.vd.size(0) == c.kd.size(0) && c.vd.size(2) == c.kd.size(2)),
                  "fused step: paged K and V must be fields of one pool");
      TORCH_CHECK(c.wk.dim() == 4 && c.wk.size(0) == 1 && c.wk.size(1) == Hkv_ && c.wk.size(2) == wcap &&
                      c.wk.size(3) == hd_ && c.wk.is_contiguous() && c.wv.is_contiguous() &&
                      c.wv.sizes() == c.wk.sizes() && c.wk.scalar_type() == w_type && c.wv.scalar_type() == w_type,
                  "fused step: windows must be contiguous (1, kv_heads, capacity, head_dim), one dtype");
    }
    std::vector<torch::Tensor> codes;
    for (const auto& c : layers) codes.push_back(c.kd);
    const auto [table, pages] = check_tables(tables, codes, need);
    float* tap_ptr = nullptr;
    if (tap) {
      TORCH_CHECK(tap->scalar_type() == torch::kFloat && tap->is_contiguous() &&
                      tap->numel() == static_cast<int64_t>(layers.size()) * 2 * Hkv_ * hd_,
                  "fused step: tap must be contiguous fp32 (layers, 2, kv_heads * head_dim)");
      tap_ptr = tap->data_ptr<float>();
    }
    auto logits = torch::empty({vocab_}, torch::kFloat);
    pybind11::gil_scoped_release release;  // first: a thread waiting for the lock must not hold the GIL (the hook
    std::lock_guard<std::mutex> guard(mutex_);  // takes it back inside the step)
    const int64_t group = H_ / Hkv_;
    const int b = static_cast<int>(bits);
    switch (w_type) {
      case torch::kFloat:
        run(h, cos, sin, PackedKV<float>{layers, Hkv_, hd_, group, quantized, held, b, kgroup, vgroup, per_channel,
                                         hadamard, tap_ptr, table, pages}, logits);
        break;
      case torch::kBFloat16:
        run(h, cos, sin, PackedKV<c10::BFloat16>{layers, Hkv_, hd_, group, quantized, held, b, kgroup, vgroup,
                                                 per_channel, hadamard, tap_ptr, table, pages}, logits);
        break;
      case torch::kHalf:
        run(h, cos, sin, PackedKV<c10::Half>{layers, Hkv_, hd_, group, quantized, held, b, kgroup, vgroup,
                                             per_channel, hadamard, tap_ptr, table, pages}, logits);
        break;
      default: TORCH_CHECK(false, "fused step: the window must be fp32, bf16 or fp16");
    }
    return logits;
  }

 private:
  // The page tables' data and entries per layer (nullptr, 0 without tables), checked: one row per layer, enough
  // pages for `tokens` tokens of `fields[li]` (blocks, kv_heads, block_tokens, ...), every entry a block of it.
  std::pair<const int64_t*, int64_t> check_tables(const c10::optional<torch::Tensor>& tables,
                                                  const std::vector<torch::Tensor>& fields, int64_t tokens) const {
    if (!tables) return {nullptr, 0};
    const auto& t = *tables;
    TORCH_CHECK(t.dim() == 2 && t.size(0) == static_cast<int64_t>(layers_.size()) &&
                    t.scalar_type() == torch::kLong && t.is_contiguous(),
                "fused step: page tables must be contiguous int64 (layers, pages)");
    const int64_t pages = t.size(1);
    const int64_t* p = t.data_ptr<int64_t>();
    for (size_t li = 0; li < fields.size(); ++li) {
      const auto& f = fields[li];
      TORCH_CHECK(f.dim() == 4 && f.size(2) > 0 && pages * f.size(2) >= tokens,
                  "fused step: the page tables hold fewer than ", tokens, " tokens");
      for (int64_t i = 0; i < pages; ++i)
        TORCH_CHECK(p[li * pages + i] >= 0 && p[li * pages + i] < f.size(0), "fused step: layer ", li, "'s page ",
                    p[li * pages + i], " is not a block of the pool");
    }
    return {p, pages};
  }

  Layer& open_layer() {
    TORCH_CHECK(!layers_.empty() && !layers_.back().mlp && !layers_.back().moe,
                "fused step: a feed-forward block follows add_layer, one per layer");
    return layers_.back();
  }

  template <class Cache>
  void run(torch::Tensor& h_t, const torch::Tensor& cos_t, const torch::Tensor& sin_t, const Cache& cache,
           torch::Tensor& logits_t) {
    const int64_t qd = H_ * hd_, kvd = Hkv_ * hd_;
    const int64_t slots = std::max<int64_t>(1, slots_);  // feed-forward blocks run at once: the chosen experts
    std::vector<float> xn(std::max(D_, qd)), q(qd), k(kvd), v(kvd), att(qd), gate(slots * ffn_), up(slots * ffn_),
        act(slots * ffn_), ys(slots * D_), router(experts_ + 1);
    Routing routing;  // set by one thread, read by all
    std::exception_ptr hook_error;  // raised after the parallel region: nothing may leave an OpenMP block
    float* h = h_t.data_ptr<float>();
    const float* cos = cos_t.data_ptr<float>();
    const float* sin = sin_t.data_ptr<float>();
    const int nth = std::max(1, at::get_num_threads());
#pragma omp parallel num_threads(nth)
    {
      const int tid = omp_get_thread_num(), n = omp_get_num_threads();
      std::vector<float> scratch(D_), sq(std::max(D_, qd));  // a projection's rows before they are added into h
      auto cache_scratch = cache.scratch();
      for (size_t li = 0; li < layers_.size(); ++li) {
        Layer& L = layers_[li];
#pragma omp single
        {
          rms_norm(h, L.in_norm.data_ptr<float>(), D_, eps_, xn.data(), sq.data());
          for (int i = 0; i < 3; ++i) L.attn[i]->prepare(xn.data(), i ? L.attn[i - 1].get() : nullptr);
        }
        split_rows({{L.attn[0].get(), q.data()}, {L.attn[1].get(), k.data()}, {L.attn[2].get(), v.data()}}, tid, n,
                   scratch.data());
#pragma omp barrier
#pragma omp single
        {
          if (L.q_norm.defined()) {
            qk_norm(q.data(), L.q_norm, H_, hd_, eps_, sq.data());
            qk_norm(k.data(), L.k_norm, Hkv_, hd_, eps_, sq.data());
          }
          if (std::isfinite(L.clip)) {
            clamp(q.data(), qd, L.clip), clamp(k.data(), kvd, L.clip), clamp(v.data(), kvd, L.clip);
          }
          for (int64_t hh = 0; hh < H_; ++hh) rope(q.data() + hh * hd_, cos, sin, hd_);
          for (int64_t g = 0; g < Hkv_; ++g) rope(k.data() + g * hd_, cos, sin, hd_);
          cache.store(li, k.data(), v.data());
        }
        cache.attend(li, q.data(), att.data(), tid, n, cache_scratch);
#pragma omp barrier
#pragma omp single
        L.attn[3]->prepare(att.data());
        split_rows({{L.attn[3].get(), h}}, tid, n, scratch.data(), true);
#pragma omp barrier
#pragma omp single
        {
          rms_norm(h, L.post_norm.data_ptr<float>(), D_, eps_, xn.data(), sq.data());
          if (L.mlp) {
            L.mlp->gate->prepare(xn.data()), L.mlp->up->prepare(xn.data(), L.mlp->gate.get());
          } else {
            L.moe->router->prepare(xn.data());
            if (L.moe->shared_gate) L.moe->shared_gate->prepare(xn.data(), L.moe->router.get());
          }
        }
        if (L.mlp) {
          split_rows({{L.mlp->gate.get(), gate.data()}, {L.mlp->up.get(), up.data()}}, tid, n, scratch.data());
#pragma omp barrier
#pragma omp single
          {
            swiglu(gate.data(), up.data(), L.mlp->gate->N, act.data());
            L.mlp->down->prepare(act.data());
          }
          split_rows({{L.mlp->down.get(), h}}, tid, n, scratch.data(), true);
#pragma omp barrier
        } else {
          Moe& M = *L.moe;
          const int64_t E = M.router->N;
          std::vector<std::pair<Proj*, float*>> logits{{M.router.get(), router.data()}};
          if (M.shared_gate) logits.emplace_back(M.shared_gate.get(), router.data() + E);
          split_rows(logits, tid, n, scratch.data());
#pragma omp barrier
#pragma omp single
          {
            routing.chosen = route(router.data(), M);
            if (!hook_.is_none() && !hook_error) call_hook(li, xn.data(), routing.chosen, hook_error);
            routing.blocks.clear();
            for (const auto& [e, w] : routing.chosen) routing.blocks.push_back(&M.experts[e]);
            if (M.shared) routing.blocks.push_back(M.shared.get());
            routing.outs.clear();
            const Proj* like = nullptr;  // x quantized once for every block's gate and up
            for (size_t j = 0; j < routing.blocks.size(); ++j) {  // gate/up of every block as one concatenation
              Mlp* b = routing.blocks[j];
              b->gate->prepare(xn.data(), like), b->up->prepare(xn.data(), b->gate.get());
              like = b->up.get();
              routing.outs.emplace_back(b->gate.get(), gate.data() + j * ffn_);
              routing.outs.emplace_back(b->up.get(), up.data() + j * ffn_);
            }
          }
          split_rows(routing.outs, tid, n, scratch.data());
#pragma omp barrier
#pragma omp single
          {
            routing.outs.clear();
            for (size_t j = 0; j < routing.blocks.size(); ++j) {  // then every down
              Mlp* b = routing.blocks[j];
              swiglu(gate.data() + j * ffn_, up.data() + j * ffn_, b->gate->N, act.data() + j * ffn_);
              b->down->prepare(act.data() + j * ffn_);
              routing.outs.emplace_back(b->down.get(), ys.data() + j * D_);
            }
          }
          split_rows(routing.outs, tid, n, scratch.data());
#pragma omp barrier
#pragma omp single
          mix(h, routing.chosen, ys.data(), M.shared ? ys.data() + routing.chosen.size() * D_ : nullptr, router[E],
              D_);
        }
      }
#pragma omp single
      {
        rms_norm(h, final_norm_.data_ptr<float>(), D_, eps_, xn.data(), sq.data());
        head_->prepare(xn.data());
      }
      split_rows({{head_.get(), logits_t.data_ptr<float>()}}, tid, n, scratch.data());
    }
    if (hook_error) std::rethrow_exception(hook_error);
  }

  void call_hook(size_t li, float* xn, const std::vector<std::pair<int64_t, float>>& chosen,
                 std::exception_ptr& error) {
    try {
      py::gil_scoped_acquire gil;
      auto ids = torch::empty({1, static_cast<int64_t>(chosen.size())}, torch::kLong);
      for (size_t j = 0; j < chosen.size(); ++j) ids[0][j] = chosen[j].first;
      hook_(li, torch::from_blob(xn, {1, D_}, torch::kFloat), ids);  // xn outlives the call, not the step
    } catch (...) {
      error = std::current_exception();
    }
  }

  int64_t D_, H_, Hkv_, hd_;
  float eps_;
  torch::Tensor final_norm_;
  int64_t vocab_, ffn_ = 0, slots_ = 0, experts_ = 0;  // the widest feed-forward block, most blocks at once, router
  std::vector<Layer> layers_;
  std::unique_ptr<Proj> head_;
  std::vector<Proj*> loras_;  // projections with a LoRA side path, in set_lora order
  std::mutex mutex_;
  py::object hook_ = py::none();
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Plan>(m, "Plan")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, double, torch::Tensor, int64_t>())
      .def("add_layer", &Plan::add_layer, "norm weights, q/k/v clip and (kind, weight, bias, N, K) for q, k, v, o")
      .def("set_mlp", &Plan::set_mlp, "the last layer's dense block: gate, up, down")
      .def("set_moe", &Plan::set_moe,
           "the last layer's MoE block: router, experts' (gate, up, down), top_k, renormalize, shared expert, its gate")
      .def("set_moe_groups", &Plan::set_moe_groups,
           "the last MoE block routes MoGE-style: top_k / groups from each contiguous group, weights x scale")
      .def("set_head", &Plan::set_head, "the output projection (kind, weight, N, K)")
      .def("covers_many", &Plan::covers_many, "whether forward_many runs this plan (dense MLPs, fp32/bf16 weights)")
      .def("forward_many", &Plan::forward_many,
           "T tokens at pos..pos+T-1 through every layer and the head, each weight read once; (T, vocab) logits")
      .def("set_lora", &Plan::set_lora, "a LoRA side path (A, B^T stacks, rank) on the projection of this weight",
           py::call_guard<py::gil_scoped_release>())
      .def("select_lora", &Plan::select_lora, "each LoRA projection's adapter slot (-1: none) and scale",
           py::call_guard<py::gil_scoped_release>())
      .def("set_hook", &Plan::set_hook, "fn(layer, x, chosen) after each MoE layer's routing (expert offload)")
      .def("forward", &Plan::forward, "one token through every layer and the head; K/V written at pos (paged with "
           "tables)", py::arg("h"), py::arg("cos"), py::arg("sin"), py::arg("keys"), py::arg("values"), py::arg("pos"),
           py::arg("tables") = py::none())
      .def("forward_packed", &Plan::forward_packed,
           "forward over packed (quantized) K/V caches and their full-precision windows", py::arg("h"),
           py::arg("cos"), py::arg("sin"), py::arg("caches"), py::arg("pos"), py::arg("quantized"), py::arg("held"),
           py::arg("bits"), py::arg("kgroup"), py::arg("vgroup"), py::arg("per_channel"), py::arg("hadamard"),
           py::arg("tap") = py::none(), py::arg("tables") = py::none());
}
