// A decoded token's experts in one call: the 4-bit x int8-input GEMV (gemv_q8's kernels,
// affine_q8.cpp) over several weight matrices of one shape, each against its own row of x or
// all against one row.
//
// Why: a mixture-of-experts block runs, per token, its top-k experts' three linears (OLMoE:
// 8 x 3 = 24 GEMVs of 1.2 MB per block). Called one by one from Python, each GEMV cost
// 110-115 us in the decode loop against ~75 us back to back in C++ (the Python between the
// calls, and a parallel region per 1.2 MB). Here each distinct row of x is quantized once
// and one parallel region runs every matrix's rows, as llama.cpp's mul_mat_id does. Every
// output element is computed by the same kernel from the same prepared input as in a
// separate affine_linear call, so the results are equal to the bit.
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <utility>

#include "common.h"
#include "decode_api.h"

using namespace lowbit_kernels;

namespace {

// out[n] = sum_e route[e] * y[e, n], added in order from 0, each product rounded on its own:
// what a loop of `out += y_e * route[e]` in torch computes (no fused multiply-add).
LOWBIT_NO_CONTRACT void route_sum(const float* y, const float* route, int64_t E, int64_t N,
                                  float* out) {
  for (int64_t n = 0; n < N; ++n) out[n] = 0.f;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t n = 0; n < N; ++n) {
      const float p = y[e * N + n] * route[e];
      out[n] = out[n] + p;
    }
}

template <typename P>
void run_experts(const std::vector<std::unique_ptr<Q8Inputs>>& ins, at::TensorList w,
                 at::TensorList scale, at::TensorList offset, int64_t N, float* y) {
  const int64_t E = static_cast<int64_t>(w.size());
  std::vector<const uint8_t*> wp(E);
  std::vector<const P*> sp(E), op(E);
  for (int64_t e = 0; e < E; ++e) {
    wp[e] = w[e].data_ptr<uint8_t>();
    sp[e] = params<P>(scale[e]);
    op[e] = params<P>(offset[e]);
  }
  // the E matrices' rows as one range; a chunk crossing matrices runs a part of each
  lowbit_kernels::parallel_for(0, E * N, 16, [&](int64_t v0, int64_t v1) {
    for (int64_t v = v0; v < v1;) {
      const int64_t e = v / N, n0 = v - e * N, n1 = std::min(N, n0 + (v1 - v));
      const Q8Inputs& in = *ins[ins.size() == 1 ? 0 : e];
      in.rows(wp[e], sp[e], op[e], y + e * N, N, n0, n1);
      v += n1 - n0;
    }
  });
}

// x (1, K): one row for every matrix (a token's gate and up projections), or (E, K): row e
// for matrix e (their down projections). w, scale, offset: E matrices of one shape (N, K) and
// layout (4-bit codes; float16 or float32 params; offsets stored by all or none). route:
// empty, or E float32 weights: then the result is sum_e route[e] * y_e (1, N) (route_sum),
// else the outputs y (E, N).
at::Tensor affine_experts(const at::Tensor& x_in, at::TensorList w, at::TensorList scale,
                          at::TensorList offset, int64_t group, int64_t bits,
                          const at::Tensor& route_in) {
  const at::Tensor x = x_in.contiguous();
  const int64_t E = static_cast<int64_t>(w.size());
  TORCH_CHECK(E >= 1 && static_cast<int64_t>(scale.size()) == E &&
                  static_cast<int64_t>(offset.size()) == E,
              "lowbit::affine_experts: as many scales and offsets as weights (at least one)");
  TORCH_CHECK(bits == 4, "lowbit::affine_experts: 4-bit codes only (the int8-input GEMV)");
  TORCH_CHECK(x.dim() == 2 && (x.size(0) == 1 || x.size(0) == E),
              "lowbit::affine_experts: x must be (1, K) or (weights, K)");
  const int64_t N = w[0].size(0);
  const bool half = scale[0].scalar_type() == at::kHalf, offsets = offset[0].numel() > 0;
  for (int64_t e = 0; e < E; ++e) {
    check_affine(x, w[e], scale[e], offset[e], group, bits);
    TORCH_CHECK(w[e].size(0) == N && (scale[e].scalar_type() == at::kHalf) == half &&
                    (offset[e].numel() > 0) == offsets,
                "lowbit::affine_experts: the weights differ in rows or layout");
  }
  const at::Tensor route = route_in.contiguous();
  TORCH_CHECK(route.numel() == 0 ||
                  (route.dim() == 1 && route.size(0) == E && route.scalar_type() == at::kFloat),
              "lowbit::affine_experts: route must be empty or E float32 weights");
  std::vector<std::unique_ptr<Q8Inputs>> ins;
  for (int64_t r = 0; r < x.size(0); ++r)
    ins.push_back(std::make_unique<Q8Inputs>(x.narrow(0, r, 1), group, 4, offsets));
  at::Tensor y = at::empty({E, N}, x.options());
  if (half)
    run_experts<uint16_t>(ins, w, scale, offset, N, y.data_ptr<float>());
  else
    run_experts<float>(ins, w, scale, offset, N, y.data_ptr<float>());
  if (route.numel() == 0) return y;
  at::Tensor out = at::empty({1, N}, x.options());
  route_sum(y.data_ptr<float>(), route.data_ptr<float>(), E, N, out.data_ptr<float>());
  return out;
}

}  // namespace

namespace lowbit_kernels {

MixtureBlock::MixtureBlock(at::Tensor router_, int64_t top_k_, bool norm_,
                           std::vector<at::Tensor> w_, std::vector<at::Tensor> scale_,
                           std::vector<at::Tensor> offset_, int64_t group_up_, int64_t group_down_)
    : router(std::move(router_)), top_k(top_k_), norm(norm_), w(std::move(w_)),
      scale(std::move(scale_)), offset(std::move(offset_)), group_up(group_up_),
      group_down(group_down_) {
  TORCH_CHECK(router.dim() == 2 && router.scalar_type() == at::kFloat && top_k >= 1 &&
                  top_k <= router.size(0),
              "lowbit::MixtureBlock: router must be (E, C) float32, 1 <= top_k <= E");
  const auto E = static_cast<size_t>(router.size(0));
  TORCH_CHECK(w.size() == 3 * E && scale.size() == 3 * E && offset.size() == 3 * E,
              "lowbit::MixtureBlock: 3 matrices per expert (gates, ups, downs)");
}

// A decoded token's mixture block, router included: transformers' top-k router of OLMoE,
// Mixtral and Qwen3-MoE (logits = h·Wᵀ, softmax in float32, the top k, renormalised where
// `norm`), then the chosen experts in ascending order: gate and up projections, SiLU(gate)·up,
// down projections summed with the routing weights. Why: called from Python, the block's
// router, routing and the checks around the two expert calls cost ~270 us per block on
// OLMoE's shape (a seventh of a decode step). The router, softmax, top-k and activation are
// ATen's own ops, as the modules call them, so the experts and the bits are the same.
// h (1, C) float32.
namespace {

// One token's block output (h (1, C)).
at::Tensor mixture_row(const at::Tensor& h, const MixtureBlock& b) {
  const int64_t E = b.router.size(0), top_k = b.top_k;
  const at::Tensor logits = at::mm(h, b.router.t());  // F.linear(h, W) without a bias
  auto [top, index] = at::topk(at::softmax(logits, -1, at::kFloat), top_k, -1);
  if (b.norm) top.div_(top.sum(-1, true));
  const float* values = top.data_ptr<float>();
  const int64_t* ids = index.data_ptr<int64_t>();
  std::vector<std::pair<int64_t, int64_t>> picked;  // (expert, slot), ascending
  for (int64_t k = 0; k < top_k; ++k) picked.emplace_back(ids[k], k);
  std::sort(picked.begin(), picked.end());
  std::vector<at::Tensor> uw, us, uo, dw, ds, dof;
  at::Tensor route = at::empty({top_k}, h.options());
  for (int part = 0; part < 2; ++part)
    for (const auto& [e, k] : picked) {
      uw.push_back(b.w[part * E + e]);
      us.push_back(b.scale[part * E + e]);
      uo.push_back(b.offset[part * E + e]);
    }
  int64_t i = 0;
  for (const auto& [e, k] : picked) {
    dw.push_back(b.w[2 * E + e]);
    ds.push_back(b.scale[2 * E + e]);
    dof.push_back(b.offset[2 * E + e]);
    route.data_ptr<float>()[i++] = values[k];
  }
  const at::Tensor gate_up =
      affine_experts(h, uw, us, uo, b.group_up, 4, at::empty({0}, h.options()));
  const at::Tensor mid = at::silu(gate_up.narrow(0, 0, top_k)) * gate_up.narrow(0, top_k, top_k);
  return affine_experts(mid, dw, ds, dof, b.group_down, 4, route);
}

}  // namespace

// Tokens are independent in a mixture block: each row of h (B, C) takes its own experts, one
// row after another (a row's result does not depend on the others': the same bits as alone).
at::Tensor mixture_step(const at::Tensor& h, const c10::intrusive_ptr<MixtureBlock>& block) {
  const MixtureBlock& b = *block;
  TORCH_CHECK(h.dim() == 2 && h.size(0) >= 1 && h.size(1) == b.router.size(1),
              "lowbit::mixture_step: h must be (B, C), C the router's inputs");
  const at::Tensor x = h.contiguous();
  if (x.size(0) == 1) return mixture_row(x, b);
  std::vector<at::Tensor> rows;
  for (int64_t r = 0; r < x.size(0); ++r) rows.push_back(mixture_row(x.narrow(0, r, 1), b));
  return at::cat(rows, 0);
}

}  // namespace lowbit_kernels

TORCH_LIBRARY_FRAGMENT(lowbit_cpu, m) {
  m.def(
      "affine_experts(Tensor x, Tensor[] w, Tensor[] scale, Tensor[] offset, int group, "
      "int bits, Tensor route) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit_cpu, CPU, m) {
  m.impl("affine_experts", &affine_experts);
}
