// The ops a decode step is made of, callable from C++ (decode_step.cpp runs a whole step
// without going back to Python between them). Each is also registered as a torch op.
#pragma once

#include <ATen/ATen.h>
#include <torch/custom_class.h>

#include <vector>

namespace lowbit_kernels {

// affine_gemv.cpp: codes w with per-group scale/offset; act8 rounds the inputs to int8 per
// block of 32 (4- and 8-bit codes).
at::Tensor affine_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                         const at::Tensor& offset, int64_t group, int64_t bits, bool act8);
// int8_gemm.cpp: W8A8, x rounded to int8 per row, times int8 weights with per-row scales held
// as lowbit's panels (N/8, Kp/4 + 1, 32) or as row-major codes (N, K) for oneDNN's matmul.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& panels, const at::Tensor& w_scale);
at::Tensor int8_linear_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& w_scale);
// float_gemv.cpp: x (M, K) times a float32/16 weight (N, K).
at::Tensor float_linear(const at::Tensor& x, const at::Tensor& w);
// decode_ops.cpp
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
at::Tensor add_rms_norm(at::Tensor& x, const at::Tensor& d, const at::Tensor& w, double eps);
at::Tensor silu_mul(const at::Tensor& gu);
at::Tensor decode_attention(const at::Tensor& qkv, at::Tensor& kc, at::Tensor& vc,
                            const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& pad,
                            int64_t pos, int64_t H, int64_t Hkv, double scale,
                            const at::Tensor& q_norm, const at::Tensor& k_norm, double eps);
// decode_codes.cpp: the same over a cache of codes (lowbit's QuantKVCache).
at::Tensor decode_attention_codes(
    const at::Tensor& qkv, at::Tensor& k_codes, at::Tensor& k_scale, at::Tensor& k_min,
    at::Tensor& v_codes, at::Tensor& v_scale, at::Tensor& v_min, const at::Tensor& cos,
    const at::Tensor& sin, const at::Tensor& pad, int64_t pos, int64_t H, int64_t Hkv,
    double scale, const at::Tensor& q_norm, const at::Tensor& k_norm, double eps,
    const at::Tensor& center, const at::Tensor& rotation, int64_t bits, int64_t query_bits);

// affine_experts.cpp: a mixture block's fixed arguments, held once (torch class
// lowbit_cpu.MixtureBlock): the router (E, C) float32, its top k and whether it renormalises,
// the 3E expert matrices (every expert's gate, then every up, then every down; 4-bit kernel
// layout) and the groups of the gate/up and of the down matrices. Why a class: passed as lists
// at every call, the 9E tensors (OLMoE: 576 a block) cost ~0.12 us each to convert from
// Python, ~6% of a decode step on OLMoE's shape (perf).
struct MixtureBlock : torch::CustomClassHolder {
  MixtureBlock(at::Tensor router, int64_t top_k, bool norm, std::vector<at::Tensor> w,
               std::vector<at::Tensor> scale, std::vector<at::Tensor> offset, int64_t group_up,
               int64_t group_down);
  at::Tensor router;
  int64_t top_k;
  bool norm;
  std::vector<at::Tensor> w, scale, offset;
  int64_t group_up, group_down;
};
// A decoded token's block output (1, C) for its input h (1, C).
at::Tensor mixture_step(const at::Tensor& h, const c10::intrusive_ptr<MixtureBlock>& block);

}  // namespace lowbit_kernels
