// A whole one-token decode step of a Llama-like decoder (lowbit.runtime.llama) in one call:
// the layers' ops that LlamaForward._decode would call one by one from Python, run here back
// to back (the same functions in the same order, so the result is the same to the bit).
//
// Why: on a 135M model each op takes 10-50 us and the Python around it (the wrapper's checks,
// the dispatcher) another ~5 us, for 8 ops per layer. A layer's linear layers come as "slots"
// (q/k/v, o, gate/up, down), each one or more parts side by side; a part is float weights or
// affine codes (the ops' own arguments), so the step runs every format the loop runs natively.
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
  // 1 = affine codes (codes, scale, offset; 4-bit parts round their inputs to int8).
  at::Tensor linear(const at::Tensor& x) {
    const int64_t parts = next_int();
    TORCH_CHECK(parts >= 1, "lowbit::decode_step: a slot needs at least one part");
    std::vector<at::Tensor> outs;
    for (int64_t p = 0; p < parts; ++p) {
      const int64_t kind = next_int(), group = next_int(), bits = next_int();
      if (kind == 0) {
        outs.push_back(lowbit_kernels::float_linear(x, next_tensor()));
      } else {
        TORCH_CHECK(kind == 1, "lowbit::decode_step: part kind ", kind, " is not 0 or 1");
        const at::Tensor& w = next_tensor();
        const at::Tensor& scale = next_tensor();
        const at::Tensor& offset = next_tensor();
        outs.push_back(lowbit_kernels::affine_linear(x, w, scale, offset, group, bits, true));
      }
    }
    return parts == 1 ? outs[0] : at::cat(outs, 1);
  }
};

// x (B, C): the residual stream after the embedding, added to in place; h (B, C): the first
// layer's normed input. norms: per layer q_norm, k_norm (empty: none), the post-attention
// norm and the next one (the final norm last); eps: per layer that of q/k, of the
// post-attention norm, of the next. Caches (layers, B, Hkv, T, D). Returns the final normed
// hidden state (B, C).
at::Tensor decode_step(at::Tensor& x, const at::Tensor& h0, at::TensorList weights,
                       at::IntArrayRef layout, at::TensorList norms, at::ArrayRef<double> eps,
                       at::Tensor& kc, at::Tensor& vc, const at::Tensor& cos,
                       const at::Tensor& sin, const at::Tensor& pad, int64_t pos, int64_t H,
                       int64_t Hkv, double scale) {
  const int64_t L = kc.dim() == 5 ? kc.size(0) : -1;
  TORCH_CHECK(L >= 1 && vc.sizes() == kc.sizes() && kc.is_contiguous() && vc.is_contiguous(),
              "lowbit::decode_step: caches must be contiguous (layers, B, Hkv, T, D)");
  TORCH_CHECK(static_cast<int64_t>(norms.size()) == 4 * L &&
                  static_cast<int64_t>(eps.size()) == 3 * L,
              "lowbit::decode_step: 4 norms and 3 eps per layer");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat &&
                  h0.sizes() == x.sizes(),
              "lowbit::decode_step: x and h must be contiguous float32 (B, C)");
  Slots slots{weights, layout};
  at::Tensor h = h0;
  for (int64_t i = 0; i < L; ++i) {
    at::Tensor k = kc.select(0, i), v = vc.select(0, i);
    const at::Tensor qkv = slots.linear(h);
    const at::Tensor a = lowbit_kernels::decode_attention(qkv, k, v, cos, sin, pad, pos, H, Hkv,
                                                          scale, norms[4 * i], norms[4 * i + 1],
                                                          eps[3 * i]);
    const at::Tensor o = slots.linear(a);
    h = lowbit_kernels::add_rms_norm(x, o, norms[4 * i + 2], eps[3 * i + 1]);
    const at::Tensor gate_up = slots.linear(h);
    const at::Tensor d = slots.linear(lowbit_kernels::silu_mul(gate_up));
    h = lowbit_kernels::add_rms_norm(x, d, norms[4 * i + 3], eps[3 * i + 2]);
  }
  TORCH_CHECK(slots.t == weights.size() && slots.l == layout.size(),
              "lowbit::decode_step: more weights or layout than the layers use");
  return h;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowbit_cpu, m) {
  m.def(
      "decode_step(Tensor(a!) x, Tensor h, Tensor[] weights, int[] layout, Tensor[] norms, "
      "float[] eps, Tensor(b!) k_cache, Tensor(c!) v_cache, Tensor cos, Tensor sin, Tensor pad, "
      "int pos, int heads, int kv_heads, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit_cpu, CPU, m) { m.impl("decode_step", &decode_step); }
