// A whole one-token decode step of a Llama-like decoder (lowbit.runtime.llama) in one call:
// the layers' ops that LlamaForward._decode would call one by one from Python, run here back
// to back (the same functions in the same order, so the result is the same to the bit).
//
// Why: on a 135M model each op takes 10-50 us and the Python around it (the wrapper's checks,
// the dispatcher) another ~5 us, for 8 ops per layer. A cache of low-bit codes (QuantKVCache)
// takes decode_attention_codes in place of decode_attention. A layer's linear layers come as "slots"
// (q/k/v, o, gate/up, down), each one or more parts side by side; a part is float weights,
// affine codes or W8A8 codes (the ops' own arguments), so the step runs every format the loop
// runs natively. A layer's MLP may instead be a mixture block (MixtureBlock, one
// mixture_step call, its rows one by one), its q/k norms may span all heads (OLMoE's), and its block may be
// post-norm (OLMo 2's: the attention's and the MLP's outputs normed before their residual adds).
#include <torch/custom_class.h>
#include <torch/library.h>

#include <vector>

#include "decode_api.h"

namespace {

// Reads the slots in order from the flat weights and layout lists.
struct Slots {
  at::TensorList weights;
  at::IntArrayRef layout;
  size_t t = 0, l = 0;

  int64_t next_int() {
    TORCH_CHECK(l < layout.size(), "lowbit::decode_step: the layout ends before the layers");
    return layout[l++];
  }
  const at::Tensor& next_tensor() {
    TORCH_CHECK(t < weights.size(), "lowbit::decode_step: the weights end before the layers");
    return weights[t++];
  }
  // The next slot on x: per part (kind, group, bits); kind 0 = float weights (one tensor),
  // 1 = affine codes (codes, scale, offset; inputs rounded to int8 per block of 32), 2 = W8A8
  // (int8 panels (3-D) or row-major codes (2-D), per-row scales; inputs rounded per row).
  at::Tensor linear(const at::Tensor& x) {
    const int64_t parts = next_int();
    TORCH_CHECK(parts >= 1, "lowbit::decode_step: a slot needs at least one part");
    std::vector<at::Tensor> outs;
    for (int64_t p = 0; p < parts; ++p) {
      const int64_t kind = next_int(), group = next_int(), bits = next_int();
      if (kind == 0) {
        outs.push_back(lowbit_kernels::float_linear(x, next_tensor()));
      } else if (kind == 2) {
        const at::Tensor& w = next_tensor();
        const at::Tensor& scale = next_tensor();
        outs.push_back(w.dim() == 3 ? lowbit_kernels::int8_linear(x, w, scale)
                                    : lowbit_kernels::int8_linear_mm(x, w, scale));
      } else {
        TORCH_CHECK(kind == 1, "lowbit::decode_step: part kind ", kind, " is not 0, 1 or 2");
        const at::Tensor& w = next_tensor();
        const at::Tensor& scale = next_tensor();
        const at::Tensor& offset = next_tensor();
        outs.push_back(lowbit_kernels::affine_linear(x, w, scale, offset, group, bits, true));
      }
    }
    return parts == 1 ? outs[0] : at::cat(outs, 1);
  }
};

// A model's fixed decode arguments, held once (torch class lowbit_cpu.DecodePlan): the slots'
// weights and layout, per layer 4 norms and 3 eps (below), and optional per-layer parts set
// after construction: q/k norms over all heads at once (set_whole) and a mixture block in
// place of the gate/up and down slots (set_mixture). Why a class: as lists, the ~500 tensors
// of a 30-layer model were converted from Python at every token.
struct DecodePlan : torch::CustomClassHolder {
  DecodePlan(std::vector<at::Tensor> weights_, std::vector<int64_t> layout_,
             std::vector<at::Tensor> norms_, std::vector<double> eps_)
      : weights(std::move(weights_)), layout(std::move(layout_)), norms(std::move(norms_)),
        eps(std::move(eps_)) {
    TORCH_CHECK(norms.size() % 4 == 0 && eps.size() == norms.size() / 4 * 3,
                "lowbit::decode_step: 4 norms and 3 eps per layer");
    const size_t L = norms.size() / 4;
    whole.resize(2 * L);
    whole_eps.resize(2 * L);
    post.resize(2 * L);
    post_eps.resize(2 * L);
    mixtures.resize(L);
  }
  // Layer i's queries and keys are RMS-normed over all heads (weights (H·D), (Hkv·D)) before
  // RoPE, as the per-op loop's LlamaForward._whole does.
  void set_whole(int64_t i, at::Tensor q, at::Tensor k, double eps_q, double eps_k) {
    set_pair(whole, whole_eps, i, std::move(q), std::move(k), eps_q, eps_k);
  }
  // Layer i is post-norm: x += rms(attention's output, wa); x += rms(MLP's output, wm); the
  // next layer reads x itself (its plan norms: the post-attention one unused, the next one
  // empty but the last layer's, the final norm).
  void set_post(int64_t i, at::Tensor wa, at::Tensor wm, double eps_a, double eps_m) {
    set_pair(post, post_eps, i, std::move(wa), std::move(wm), eps_a, eps_m);
  }
  // Layer i's MLP is this mixture block: the layout has no gate/up or down slot.
  void set_mixture(int64_t i, c10::intrusive_ptr<lowbit_kernels::MixtureBlock> block) {
    TORCH_CHECK(i >= 0 && i < static_cast<int64_t>(mixtures.size()),
                "lowbit::DecodePlan: no layer ", i);
    mixtures[i] = std::move(block);
  }

  std::vector<at::Tensor> weights;
  std::vector<int64_t> layout;
  std::vector<at::Tensor> norms;
  std::vector<double> eps;
  std::vector<at::Tensor> whole;  // per layer q then k weight (undefined: per-head norms only)
  std::vector<double> whole_eps;
  std::vector<at::Tensor> post;  // per layer attention then MLP output norm (undefined: pre-norm)
  std::vector<double> post_eps;
  std::vector<c10::intrusive_ptr<lowbit_kernels::MixtureBlock>> mixtures;  // per layer or null

 private:
  // Layer i's two norm weights and eps in one of the per-layer pairs above.
  void set_pair(std::vector<at::Tensor>& w, std::vector<double>& e, int64_t i, at::Tensor a,
                at::Tensor b, double eps_a, double eps_b) {
    TORCH_CHECK(i >= 0 && i < static_cast<int64_t>(mixtures.size()),
                "lowbit::DecodePlan: no layer ", i);
    w[2 * i] = std::move(a);
    w[2 * i + 1] = std::move(b);
    e[2 * i] = eps_a;
    e[2 * i + 1] = eps_b;
  }
};

// qkv (B, (H + 2·Hkv)·D) with the queries and keys RMS-normed over all heads.
at::Tensor whole_norms(const at::Tensor& qkv, const at::Tensor& wq, const at::Tensor& wk,
                       double eps_q, double eps_k) {
  const int64_t hq = wq.numel(), hk = wk.numel();
  const auto parts = qkv.split_with_sizes({hq, hk, qkv.size(1) - hq - hk}, 1);
  return at::cat({lowbit_kernels::rms_norm(parts[0].contiguous(), wq, eps_q),
                  lowbit_kernels::rms_norm(parts[1].contiguous(), wk, eps_k), parts[2]},
                 1);
}

// x (B, C): the residual stream after the embedding, added to in place; h (B, C): the first
// layer's normed input (x itself for a post-norm first layer). The plan's norms: per layer q_norm, k_norm (per head; empty: none),
// the post-attention norm and the next one (the final norm last); eps: per layer that of
// q/k, of the post-attention norm, of the next. cache: what the KV cache stores, each
// (layers, B, Hkv, T, ...): keys and values (kv_bits 0), or codes, scales and minimums of
// keys, then of values (kv_bits 2-8: decode_attention_codes, with per layer the key centres
// `centers` (empty: none), the heads' turn `rotation` (empty: none) and the queries'
// `query_bits`). Returns the final normed hidden state (B, C).
at::Tensor decode_step(at::Tensor& x, const at::Tensor& h0,
                       const c10::intrusive_ptr<DecodePlan>& plan, at::TensorList cache,
                       at::TensorList centers, const at::Tensor& rotation, const at::Tensor& cos,
                       const at::Tensor& sin, const at::Tensor& pad, int64_t pos, int64_t H,
                       int64_t Hkv, double scale, int64_t kv_bits, int64_t query_bits) {
  const size_t stored = kv_bits == 0 ? 2 : 6;
  TORCH_CHECK(cache.size() == stored, "lowbit::decode_step: a cache of ",
              kv_bits == 0 ? "keys and values" : "codes, scales and minimums per side", " (",
              stored, " tensors), not ", cache.size());
  const int64_t L = cache[0].dim() >= 4 ? cache[0].size(0) : -1;
  bool contiguous = true;
  for (const at::Tensor& t : cache) contiguous = contiguous && t.is_contiguous() && t.size(0) == L;
  TORCH_CHECK(L >= 1 && contiguous,
              "lowbit::decode_step: the cache's tensors must be contiguous (layers, B, Hkv, T, ...)");
  TORCH_CHECK(kv_bits == 0 || static_cast<int64_t>(centers.size()) == L,
              "lowbit::decode_step: one key centre tensor (or an empty one) per layer");
  const std::vector<at::Tensor>& norms = plan->norms;
  const std::vector<double>& eps = plan->eps;
  TORCH_CHECK(static_cast<int64_t>(norms.size()) == 4 * L,
              "lowbit::decode_step: 4 norms and 3 eps per layer");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat &&
                  h0.sizes() == x.sizes(),
              "lowbit::decode_step: x and h must be contiguous float32 (B, C)");
  Slots slots{plan->weights, plan->layout};
  at::Tensor h = h0;
  for (int64_t i = 0; i < L; ++i) {
    std::vector<at::Tensor> c;  // this layer's part of every stored tensor
    for (const at::Tensor& t : cache) c.push_back(t.select(0, i));
    at::Tensor qkv = slots.linear(h);
    if (plan->whole[2 * i].defined())
      qkv = whole_norms(qkv, plan->whole[2 * i], plan->whole[2 * i + 1], plan->whole_eps[2 * i],
                        plan->whole_eps[2 * i + 1]);
    const at::Tensor& qn = norms[4 * i];
    const at::Tensor& kn = norms[4 * i + 1];
    const at::Tensor a =
        kv_bits == 0
            ? lowbit_kernels::decode_attention(qkv, c[0], c[1], cos, sin, pad, pos, H, Hkv, scale,
                                               qn, kn, eps[3 * i])
            : lowbit_kernels::decode_attention_codes(qkv, c[0], c[1], c[2], c[3], c[4], c[5], cos,
                                                     sin, pad, pos, H, Hkv, scale, qn, kn,
                                                     eps[3 * i], centers[i], rotation, kv_bits,
                                                     query_bits);
    const at::Tensor o = slots.linear(a);
    const bool post = plan->post[2 * i].defined();
    if (post) {  // (the per-op loop's x + rms(...), in place: the same float adds)
      x.add_(lowbit_kernels::rms_norm(o, plan->post[2 * i], plan->post_eps[2 * i]));
      h = x;
    } else {
      h = lowbit_kernels::add_rms_norm(x, o, norms[4 * i + 2], eps[3 * i + 1]);
    }
    at::Tensor d;
    if (plan->mixtures[i]) {
      d = lowbit_kernels::mixture_step(h, plan->mixtures[i]);
    } else {
      const at::Tensor gate_up = slots.linear(h);
      d = slots.linear(lowbit_kernels::silu_mul(gate_up));
    }
    if (!post) {
      h = lowbit_kernels::add_rms_norm(x, d, norms[4 * i + 3], eps[3 * i + 2]);
      continue;
    }
    x.add_(lowbit_kernels::rms_norm(d.contiguous(), plan->post[2 * i + 1], plan->post_eps[2 * i + 1]));
    h = i + 1 < L ? x : lowbit_kernels::rms_norm(x, norms[4 * i + 3], eps[3 * i + 2]);
  }
  TORCH_CHECK(slots.t == plan->weights.size() && slots.l == plan->layout.size(),
              "lowbit::decode_step: more weights or layout than the layers use");
  return h;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowbit_cpu, m) {
  // (the classes here, before the schemas and methods that name them: one file, in order)
  m.class_<lowbit_kernels::MixtureBlock>("MixtureBlock")
      .def(torch::init<at::Tensor, int64_t, bool, std::vector<at::Tensor>, std::vector<at::Tensor>,
                       std::vector<at::Tensor>, int64_t, int64_t>());
  m.def("mixture_step(Tensor h, __torch__.torch.classes.lowbit_cpu.MixtureBlock block) -> Tensor");
  m.class_<DecodePlan>("DecodePlan")
      .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, std::vector<at::Tensor>,
                       std::vector<double>>())
      .def("set_whole", &DecodePlan::set_whole)
      .def("set_post", &DecodePlan::set_post)
      .def("set_mixture", &DecodePlan::set_mixture);
  m.def(
      "decode_step(Tensor(a!) x, Tensor h, __torch__.torch.classes.lowbit_cpu.DecodePlan plan, "
      "Tensor(b!)[] cache, Tensor[] centers, Tensor rotation, Tensor cos, "
      "Tensor sin, Tensor pad, int pos, int heads, int kv_heads, float scale, int kv_bits, "
      "int query_bits) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit_cpu, CPU, m) {
  m.impl("decode_step", &decode_step);
  m.impl("mixture_step", &lowbit_kernels::mixture_step);
}
