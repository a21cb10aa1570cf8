// The fused decode step of a Llama-family model: every layer of one token in one native call, as llama.cpp runs it.
//
// Op at a time, a decode step costs ~20 Python/ATen dispatches per layer and a fork/join of the thread pool per op;
// on a small model that overhead outweighs reading the weights. Here one OpenMP region runs the whole step: threads
// split the rows of every projection (q/k/v together, gate/up together) and meet at a barrier between ops, while the
// small per-token work (norms, RoPE, the K/V write, preparing the activations for the weight format) runs on one.
// Activations stay fp32 throughout, around weights in fp32, bf16, GGUF 32-blocks (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
// IQ4_NL, MXFP4) or k-quant super-blocks, with the same row kernels as the op-at-a-time path.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "attention.h"
#include "gemv_bf16.h"
#include "ggml_blocks.h"
#include "kquants.h"

namespace {

enum class WKind { kF32, kBF16, kQ8_0, kQ4_0, kQ4_1, kQ5_0, kQ5_1, kIq4Nl, kMxfp4, kQ2K, kQ3K, kQ4K, kQ5K, kQ6K };

WKind parse_kind(const std::string& s) {
  static const std::pair<const char*, WKind> names[] = {
      {"f32", WKind::kF32},     {"bf16", WKind::kBF16},     {"q8_0", WKind::kQ8_0},     {"q4_0", WKind::kQ4_0},
      {"q4_1", WKind::kQ4_1},   {"q5_0", WKind::kQ5_0},     {"q5_1", WKind::kQ5_1},     {"iq4_nl", WKind::kIq4Nl},
      {"mxfp4", WKind::kMxfp4}, {"q2_k", WKind::kQ2K},      {"q3_k", WKind::kQ3K},      {"q4_k", WKind::kQ4K},
      {"q5_k", WKind::kQ5K},    {"q6_k", WKind::kQ6K}};
  for (const auto& [name, kind] : names)
    if (s == name) return kind;
  TORCH_CHECK(false, "fused step: unsupported weight kind ", s);
}

// One projection: its weight as stored (fp32 / bf16 rows or quantized blocks), an optional fp32 bias, and the
// activation data the format reads, prepared once per token for the input it projects.
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

  Proj(const std::string& kind_name, torch::Tensor w, const c10::optional<torch::Tensor>& b, int64_t n, int64_t k)
      : kind(parse_kind(kind_name)), weight(w.contiguous()), N(n), K(k) {
    if (b) bias = b->to(torch::kFloat).contiguous();
    TORCH_CHECK(kind == WKind::kF32 ? weight.scalar_type() == torch::kFloat
                : kind == WKind::kBF16 ? weight.scalar_type() == torch::kBFloat16
                                       : weight.scalar_type() == torch::kUInt8,
                "fused step: weight dtype does not match its kind ", kind_name);
    row_bytes = weight.numel() * weight.element_size() / N;
    TORCH_CHECK(weight.size(0) == N, "fused step: weight rows != N");
  }

  void prepare(const float* in) {
    x = in;
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
      default: q8k = kq::quantize_q8k(in, K / kq::kQK);
    }
  }

  template <class F>
  void kquant_rows(const uint8_t* w, int64_t n0, int64_t n1, float* y) const {
    const kq::Q8K* xs[1] = {&q8k};
    for (int64_t n = n0; n < n1; ++n) kq::rows<F, 1>(false, w + n * row_bytes, xs, K / kq::kQK, y + n);
  }

  template <ggml::Kind G>
  void block_rows(const uint8_t* w, int64_t n0, int64_t n1, float* y) const {
    for (int64_t n = n0; n < n1; ++n) y[n] = ggml::row_dot<G>(w + n * row_bytes, gx, K / ggml::kBlock);
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
        bf16::gemv_range<1, float>(packed.data(), kpad, reinterpret_cast<const uint16_t*>(w), nullptr, y, N, K, n0,
                                   n1);
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
    }
    if (bias.defined())
      for (int64_t n = n0; n < n1; ++n) y[n] += bias.data_ptr<float>()[n];
  }
};

// Thread `tid` of `nth`'s share of the rows of some projections of one input, each into its own output: a slice of
// their concatenation, rounded to 16 rows (the bf16 kernel's blocks). With `add`, the rows are added into the output
// (a residual) instead of stored, through `scratch`.
void split_rows(std::initializer_list<std::pair<Proj*, float*>> outs, int tid, int nth, float* scratch,
                bool add = false) {
  int64_t total = 0;
  for (const auto& [proj, y] : outs) total += proj->N;
  const int64_t per = (total + nth - 1) / nth;
  const int64_t chunk = (per + 15) / 16 * 16;
  const int64_t lo = std::min(total, tid * chunk), hi = std::min(total, lo + chunk);
  int64_t base = 0;
  for (const auto& [proj, y] : outs) {
    const int64_t n = proj->N, a = std::max(lo - base, int64_t{0}), b = std::min(hi - base, n);
    if (a < b) {
      proj->rows(a, b, add ? scratch : y);
      if (add)
        for (int64_t r = a; r < b; ++r) y[r] += scratch[r];
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

struct Layer {
  torch::Tensor in_norm, post_norm, q_norm, k_norm;  // fp32; q/k norms undefined without them
  std::vector<std::unique_ptr<Proj>> p;  // q, k, v, o, gate, up, down
};

class Plan {
 public:
  Plan(int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, double eps, torch::Tensor final_norm,
       int64_t vocab)
      : D_(hidden), H_(heads), Hkv_(kv_heads), hd_(head_dim), eps_(static_cast<float>(eps)),
        final_norm_(final_norm.to(torch::kFloat).contiguous()), vocab_(vocab) {}

  void add_layer(torch::Tensor in_norm, torch::Tensor post_norm, c10::optional<torch::Tensor> q_norm,
                 c10::optional<torch::Tensor> k_norm, const std::vector<py::tuple>& projs) {
    TORCH_CHECK(projs.size() == 7, "fused step: a layer has 7 projections (q, k, v, o, gate, up, down)");
    Layer l;
    l.in_norm = in_norm.to(torch::kFloat).contiguous();
    l.post_norm = post_norm.to(torch::kFloat).contiguous();
    if (q_norm) l.q_norm = q_norm->to(torch::kFloat).contiguous(), l.k_norm = k_norm->to(torch::kFloat).contiguous();
    for (const auto& t : projs)
      l.p.push_back(std::make_unique<Proj>(t[0].cast<std::string>(), t[1].cast<torch::Tensor>(),
                                           t[2].cast<c10::optional<torch::Tensor>>(), t[3].cast<int64_t>(),
                                           t[4].cast<int64_t>()));
    ffn_ = std::max(ffn_, l.p[4]->N);
    layers_.push_back(std::move(l));
  }

  void set_head(const std::string& kind, torch::Tensor w, int64_t n, int64_t k) {
    head_ = std::make_unique<Proj>(kind, w, c10::nullopt, n, k);
  }

  // Runs every layer for the token whose embedding is h (D, fp32, updated in place) at position `pos`, writing its
  // K/V into each layer's cache at `pos` and attending over [0, pos]; returns the logits (vocab, fp32).
  torch::Tensor forward(torch::Tensor h, const torch::Tensor& cos, const torch::Tensor& sin,
                        const std::vector<torch::Tensor>& keys, const std::vector<torch::Tensor>& values,
                        int64_t pos) {
    TORCH_CHECK(head_ && keys.size() == layers_.size() && values.size() == layers_.size(),
                "fused step: one K and one V tensor per layer, and a head");
    TORCH_CHECK(h.scalar_type() == torch::kFloat && h.is_contiguous() && h.numel() == D_, "fused step: h");
    const auto kv_type = keys[0].scalar_type();
    for (size_t i = 0; i < keys.size(); ++i)
      TORCH_CHECK(keys[i].dim() == 4 && keys[i].size(0) == 1 && keys[i].size(1) == Hkv_ && keys[i].size(3) == hd_ &&
                      keys[i].size(2) > pos && keys[i].is_contiguous() && values[i].is_contiguous() &&
                      values[i].sizes() == keys[i].sizes() && keys[i].scalar_type() == kv_type &&
                      values[i].scalar_type() == kv_type,
                  "fused step: K/V caches must be contiguous (1, kv_heads, capacity > pos, head_dim), one dtype");
    auto logits = torch::empty({vocab_}, torch::kFloat);
    std::lock_guard<std::mutex> guard(mutex_);
    pybind11::gil_scoped_release release;
    switch (kv_type) {
      case torch::kFloat: run<float>(h, cos, sin, keys, values, pos, logits); break;
      case torch::kBFloat16: run<c10::BFloat16>(h, cos, sin, keys, values, pos, logits); break;
      case torch::kHalf: run<c10::Half>(h, cos, sin, keys, values, pos, logits); break;
      default: TORCH_CHECK(false, "fused step: K/V must be fp32, bf16 or fp16");
    }
    return logits;
  }

 private:
  template <typename KV>
  void run(torch::Tensor& h_t, const torch::Tensor& cos_t, const torch::Tensor& sin_t,
           const std::vector<torch::Tensor>& keys, const std::vector<torch::Tensor>& values, int64_t pos,
           torch::Tensor& logits_t) {
    const int64_t qd = H_ * hd_, kvd = Hkv_ * hd_, group = H_ / Hkv_, T = pos + 1;
    std::vector<float> xn(std::max(D_, qd)), q(qd), k(kvd), v(kvd), att(qd), gate(ffn_), up(ffn_), act(ffn_);
    float* h = h_t.data_ptr<float>();
    const float* cos = cos_t.data_ptr<float>();
    const float* sin = sin_t.data_ptr<float>();
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd_));
    const int nth = std::max(1, at::get_num_threads());
#pragma omp parallel num_threads(nth)
    {
      const int tid = omp_get_thread_num(), n = omp_get_num_threads();
      std::vector<float> scratch(D_), sq(std::max(D_, hd_));  // a projection's rows before they are added into h
      simd::AttentionScratch att_scratch(group, T, hd_);
      std::vector<const float*> qf(group);
      for (size_t li = 0; li < layers_.size(); ++li) {
        Layer& L = layers_[li];
        KV* kc = keys[li].data_ptr<KV>();
        KV* vc = values[li].data_ptr<KV>();
        const int64_t cap = keys[li].size(2);
#pragma omp single
        {
          rms_norm(h, L.in_norm.data_ptr<float>(), D_, eps_, xn.data(), sq.data());
          for (int i = 0; i < 3; ++i) L.p[i]->prepare(xn.data());
        }
        split_rows({{L.p[0].get(), q.data()}, {L.p[1].get(), k.data()}, {L.p[2].get(), v.data()}}, tid, n,
                   scratch.data());
#pragma omp barrier
#pragma omp single
        {
          for (int64_t hh = 0; hh < H_; ++hh) {
            float* qh = q.data() + hh * hd_;
            if (L.q_norm.defined()) rms_norm(qh, L.q_norm.data_ptr<float>(), hd_, eps_, qh, sq.data());
            rope(qh, cos, sin, hd_);
          }
          for (int64_t g = 0; g < Hkv_; ++g) {
            float* kh = k.data() + g * hd_;
            if (L.k_norm.defined()) rms_norm(kh, L.k_norm.data_ptr<float>(), hd_, eps_, kh, sq.data());
            rope(kh, cos, sin, hd_);
            simd::narrow(kh, kc + (g * cap + pos) * hd_, hd_);
            simd::narrow(v.data() + g * hd_, vc + (g * cap + pos) * hd_, hd_);
          }
        }
        for (int64_t g = tid; g < Hkv_; g += n) {  // the query heads of one KV head attend together (GQA)
          for (int64_t j = 0; j < group; ++j) qf[j] = q.data() + (g * group + j) * hd_;
          simd::attend_group(qf.data(), group, kc + g * cap * hd_, hd_, vc + g * cap * hd_, hd_, T, hd_, scale,
                             att.data() + g * group * hd_, att_scratch);
        }
#pragma omp barrier
#pragma omp single
        L.p[3]->prepare(att.data());
        split_rows({{L.p[3].get(), h}}, tid, n, scratch.data(), true);
#pragma omp barrier
#pragma omp single
        {
          rms_norm(h, L.post_norm.data_ptr<float>(), D_, eps_, xn.data(), sq.data());
          L.p[4]->prepare(xn.data());
          L.p[5]->prepare(xn.data());
        }
        split_rows({{L.p[4].get(), gate.data()}, {L.p[5].get(), up.data()}}, tid, n, scratch.data());
#pragma omp barrier
#pragma omp single
        {
          const int64_t F = L.p[4]->N;
          for (int64_t i = 0; i < F; ++i) act[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
          L.p[6]->prepare(act.data());
        }
        split_rows({{L.p[6].get(), h}}, tid, n, scratch.data(), true);
#pragma omp barrier
      }
#pragma omp single
      {
        rms_norm(h, final_norm_.data_ptr<float>(), D_, eps_, xn.data(), sq.data());
        head_->prepare(xn.data());
      }
      split_rows({{head_.get(), logits_t.data_ptr<float>()}}, tid, n, scratch.data());
    }
  }

  int64_t D_, H_, Hkv_, hd_;
  float eps_;
  torch::Tensor final_norm_;
  int64_t vocab_, ffn_ = 0;
  std::vector<Layer> layers_;
  std::unique_ptr<Proj> head_;
  std::mutex mutex_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Plan>(m, "Plan")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, double, torch::Tensor, int64_t>())
      .def("add_layer", &Plan::add_layer, "norm weights and (kind, weight, bias, N, K) for q, k, v, o, gate, up, down")
      .def("set_head", &Plan::set_head, "the output projection (kind, weight, N, K)")
      .def("forward", &Plan::forward, "one token through every layer and the head; K/V written at pos");
}
