// The small operations of one decode step of a Llama-like block, each fused into one call:
// RMSNorm (with the residual add before it), SiLU(gate)·up, and attention of one new token
// (q/k norms, RoPE, the KV-cache write and softmax(q·Kᵀ)·V over the cached slots) over a
// float32 cache or a float16 one (kv_bits 16: half the bytes to read per step). A prompt's
// rows take the same RMSNorm and SiLU·up over threads, and its q/k norms + RoPE (rope_qk).
//
// Why hand-written: at decode these are tensors of a few hundred floats, and each aten op
// costs 2-10 µs of dispatch on the CPUs measured here, so a block's ~35 small ops cost more
// than its matmuls on a 135M model. torch.compile of the whole step was measured slower than
// eager on such a CPU (benchmarks/decode_loop.py). Each op's result is defined by the
// plain-PyTorch reference beside its wrapper in lowbit/kernels/decode.py.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"
#include "decode_api.h"
#include "decode_part.h"

namespace lowbit_kernels {

static void check_rows(const at::Tensor& x, const at::Tensor& w, const char* op) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, op,
              ": float32 tensors only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && x.size(-1) == w.numel(), op,
              ": contiguous (..., C) input and a (C) weight");
}

// Rows per task of the row-wise ops: one task for a decode step's few rows (no thread
// handoff), a prompt's rows split over torch's threads.
static int64_t row_grain(int64_t floats_per_row) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, floats_per_row));
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_rows(x, w, "lowbit::rms_norm");
  auto y = at::empty_like(x);
  const int64_t C = w.numel(), M = x.numel() / C;
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, M, row_grain(C), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      lowbit_kernels::rms_row(xp + m * C, wp, static_cast<float>(eps), C, yp + m * C);
  });
  return y;
}

// x += d (in place: the residual stream), then RMSNorm(x).
at::Tensor add_rms_norm(at::Tensor& x, const at::Tensor& d, const at::Tensor& w, double eps) {
  check_rows(x, w, "lowbit::add_rms_norm");
  TORCH_CHECK(d.sizes() == x.sizes() && d.is_contiguous() && d.scalar_type() == at::kFloat,
              "lowbit::add_rms_norm: the addend must match x");
  float* xp = x.data_ptr<float>();
  const float* dp = d.data_ptr<float>();
#pragma omp simd
  for (int64_t i = 0; i < x.numel(); ++i) xp[i] += dp[i];
  return rms_norm(x, w, eps);
}

// (M, 2n) [gate | up] -> (M, n) silu(gate) * up.
at::Tensor silu_mul(const at::Tensor& gu) {
  TORCH_CHECK(gu.scalar_type() == at::kFloat && gu.is_contiguous() && gu.size(-1) % 2 == 0,
              "lowbit::silu_mul: contiguous float32 (..., 2n) input");
  const int64_t n = gu.size(-1) / 2, M = gu.numel() / (2 * n);
  auto sizes = gu.sizes().vec();
  sizes.back() = n;
  auto y = at::empty(sizes, gu.options());
  const float* g = gu.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // exp8 (decode_part.h) 8 at a time: a libm call per element cost more than the rest of the
  // op. Its input is kept under 88 (e^88 is finite); below a gate of -88 the result is gate · 0
  // (-0, or NaN at -inf), what the scalar tail and torch give (e^-gate overflows there), since
  // gate / (1 + e^88) is not ~0 for gates near float32's largest.
  at::parallel_for(0, M, row_grain(2 * n), [&](int64_t m0, int64_t m1) {
    const __m256 one = _mm256_set1_ps(1.f), cap = _mm256_set1_ps(88.f), sign = _mm256_set1_ps(-0.f);
    const __m256 low = _mm256_set1_ps(-88.f), zero = _mm256_setzero_ps();
    for (int64_t m = m0; m < m1; ++m) {
      const float *gate = g + m * 2 * n, *up = gate + n;
      float* out = yp + m * n;
      int64_t i = 0;
      for (; i + 8 <= n; i += 8) {
        const __m256 a = _mm256_loadu_ps(gate + i);
        const __m256 e = lowbit_kernels::exp8(_mm256_min_ps(cap, _mm256_xor_ps(a, sign)));
        const __m256 s = _mm256_blendv_ps(_mm256_div_ps(a, _mm256_add_ps(one, e)),
                                          _mm256_mul_ps(a, zero), _mm256_cmp_ps(a, low, _CMP_LT_OQ));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(s, _mm256_loadu_ps(up + i)));
      }
      for (; i < n; ++i) out[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
    }
  });
  return y;
}

// A prompt's q/k/v rows (B, T, (H + 2·Hkv)·D): each query and key head normed (Qwen3's q_norm /
// k_norm, when given) and rotated (RoPE, rotate-half) in place, position t taking row t of
// cos/sin (T, D). The decode attention's norm_rope per head (decode_part.h), over threads.
void rope_qk(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t H,
             int64_t Hkv, const at::Tensor& q_norm, const at::Tensor& k_norm, double eps) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.is_contiguous() && qkv.scalar_type() == at::kFloat,
              "lowbit::rope_qk: contiguous float32 (B, T, (H + 2 Hkv) D) q/k/v rows");
  const int64_t T = qkv.size(1), W = qkv.size(2), D = W / std::max<int64_t>(1, H + 2 * Hkv);
  TORCH_CHECK(H >= 1 && Hkv >= 1 && D * (H + 2 * Hkv) == W && D % 2 == 0 && D <= 512,
              "lowbit::rope_qk: the rows are not H + 2 Hkv heads of an even size up to 512");
  for (const at::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == T && t->size(1) == D && t->is_contiguous() &&
                    t->scalar_type() == at::kFloat,
                "lowbit::rope_qk: cos and sin must be contiguous float32 (T, D)");
  for (const at::Tensor* t : {&q_norm, &k_norm})
    TORCH_CHECK(t->numel() == 0 || (t->numel() == D && t->is_contiguous() &&
                                    t->scalar_type() == at::kFloat),
                "lowbit::rope_qk: a q/k norm weight is (D) float32, or empty");
  float* base = qkv.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  const float* qn = q_norm.numel() ? q_norm.data_ptr<float>() : nullptr;
  const float* kn = k_norm.numel() ? k_norm.data_ptr<float>() : nullptr;
  at::parallel_for(0, qkv.size(0) * T, row_grain(W), [&](int64_t r0, int64_t r1) {
    float head[512];  // norm_rope reads its source while it writes: rotate a copy
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r % T;
      for (int64_t h = 0; h < H + Hkv; ++h) {
        float* x = base + r * W + h * D;
        std::copy(x, x + D, head);
        lowbit_kernels::norm_rope(head, h < H ? qn : kn, static_cast<float>(eps), cp + t * D,
                                  sp + t * D, D, x);
      }
    }
  });
}

// One query against the slots first..last of one head's cache (see Part in decode_part.h);
// T: float32 keys and values, or float16 ones (uint16_t bits, a float16 cache: each load
// converts 8 at a time, so the cache is read at half the bytes).
template <typename T>
static Part attend_part(const float* q, const T* keys, const T* vals, int64_t first,
                        int64_t last, int64_t D, float scale, float* score, float* out) {
  using lowbit_kernels::load8;
  float top = -INFINITY;
  int64_t s = first;
  for (; s + 4 <= last + 1 && D % 8 == 0; s += 4) {  // four keys at once: independent chains
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const T* k = keys + s * D;
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 qd = _mm256_loadu_ps(q + d);
      a0 = _mm256_fmadd_ps(qd, load8(k + d), a0);
      a1 = _mm256_fmadd_ps(qd, load8(k + D + d), a1);
      a2 = _mm256_fmadd_ps(qd, load8(k + 2 * D + d), a2);
      a3 = _mm256_fmadd_ps(qd, load8(k + 3 * D + d), a3);
    }
    // the four sums at once: pairwise adds leave [a0 a1 a2 a3] in the two halves
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    const __m128 d4 = _mm_mul_ps(
        _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)), _mm_set1_ps(scale));
    _mm_storeu_ps(score + s, d4);
    top = std::max(top, std::max(std::max(score[s], score[s + 1]),
                                 std::max(score[s + 2], score[s + 3])));
  }
  for (; s <= last; ++s) top = std::max(top, score[s] = lowbit_kernels::dot(q, keys + s * D, D) * scale);
  const float total = lowbit_kernels::exp_sum(score + first, last - first + 1, top);
  int64_t d0 = 0;
  for (; d0 + 64 <= D; d0 += 64) {  // 64 outputs in eight registers while the values stream by
    __m256 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
    for (s = first; s <= last; ++s) {
      const __m256 w = _mm256_set1_ps(score[s]);
      const T* v = vals + s * D + d0;
      for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(w, load8(v + 8 * i), acc[i]);
    }
    for (int i = 0; i < 8; ++i) _mm256_storeu_ps(out + d0 + 8 * i, acc[i]);
  }
  if (d0 < D) {  // head sizes that are not a multiple of 64
    std::fill(out + d0, out + D, 0.f);
    for (s = first; s <= last; ++s) {
      const float w = score[s];
      const T* v = vals + s * D;
#pragma omp simd
      for (int64_t d = d0; d < D; ++d) out[d] += w * lowbit_kernels::load1(v + d);
    }
  }
  return {top, total};
}

// Stores a head's D floats in the cache: as they are, or as float16 rounded to nearest even
// after clamping to float16's range (+-65504, NaN kept), as the cache's Python writer stores them.
static void store_row(const float* src, int64_t D, float* dst) { std::copy_n(src, D, dst); }
static void store_row(const float* src, int64_t D, uint16_t* dst) {
  const __m256 hi = _mm256_set1_ps(65504.f), lo = _mm256_set1_ps(-65504.f);
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    const __m256 x = _mm256_max_ps(lo, _mm256_min_ps(hi, _mm256_loadu_ps(src + d)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + d),
                     _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  for (; d < D; ++d) {
    const float x = std::isnan(src[d]) ? src[d] : std::min(65504.f, std::max(-65504.f, src[d]));
    dst[d] = _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
}

// One new token per row: qkv (B, (H + 2·Hkv)·D); caches (B, Hkv, T, D) of one layer (float32,
// or float16 as T = uint16_t), written at slot `pos`; cos/sin (T, D) tables indexed by position
// (slot minus the row's left padding); keys of slots pad[b]..pos are attended to. Returns (B, H·D).
template <typename T>
static at::Tensor attention_over(const at::Tensor& qkv, T* kp, T* vp, int64_t T_, int64_t D,
                                 const at::Tensor& cos, const at::Tensor& sin,
                                 const at::Tensor& pad, int64_t pos, int64_t H, int64_t Hkv,
                                 double scale, const at::Tensor& q_norm, const at::Tensor& k_norm,
                                 double eps) {
  const int64_t B = qkv.size(0);
  const float* in = qkv.data_ptr<float>();
  const float *cs = cos.data_ptr<float>(), *sn = sin.data_ptr<float>();
  const int64_t* pd = pad.data_ptr<int64_t>();
  const float* qn = q_norm.numel() ? q_norm.data_ptr<float>() : nullptr;
  const float* kn = k_norm.numel() ? k_norm.data_ptr<float>() : nullptr;
  const int64_t row = (H + 2 * Hkv) * D;
  const float e = static_cast<float>(eps);
  auto p_of = [&](int64_t b) { return std::max<int64_t>(pos - pd[b], 0); };
  float key[512];
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < Hkv; ++g) {
      const int64_t slot = ((b * Hkv + g) * T_ + pos) * D, p = p_of(b);
      lowbit_kernels::norm_rope(in + b * row + (H + g) * D, kn, e, cs + p * D, sn + p * D, D, key);
      store_row(key, D, kp + slot);
      store_row(in + b * row + (H + Hkv + g) * D, D, vp + slot);
    }
  auto out = at::empty({B, H * D}, qkv.options());
  float* op = out.data_ptr<float>();
  // The queries, normed and rotated once.
  std::vector<float> qs(B * H * D);
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const int64_t b = bh / H, p = p_of(b);
    lowbit_kernels::norm_rope(in + b * row + (bh % H) * D, qn, e, cs + p * D, sn + p * D, D, qs.data() + bh * D);
  }
  // Work items: one (row, KV head) and a range of its slots (decode_part.h).
  const int64_t threads = lowbit_kernels::pool_threads();
  const int64_t S = lowbit_kernels::ranges_for(pos, threads);
  const int64_t Q = H / Hkv;
  std::vector<float> part_out(B * H * S * D);
  std::vector<lowbit_kernels::Part> parts(B * H * S);
  lowbit_kernels::parallel_for(0, B * Hkv * S, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> score(pos + 9);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (Hkv * S), g = item / S % Hkv, c = item % S;
      int64_t lo, hi;
      lowbit_kernels::range_of(pd[b], pos, c, S, &lo, &hi);
      const T* keys = kp + (b * Hkv + g) * T_ * D;
      const T* vals = vp + (b * Hkv + g) * T_ * D;
      for (int64_t j = 0; j < Q; ++j) {
        const int64_t bh = b * H + g * Q + j;
        if (hi < lo) {  // an empty range (more ranges than slots): adds nothing
          parts[bh * S + c] = {-INFINITY, 0.f};
          std::fill_n(part_out.data() + (bh * S + c) * D, D, 0.f);
          continue;
        }
        parts[bh * S + c] = attend_part(qs.data() + bh * D, keys, vals, lo, hi, D,
                                        static_cast<float>(scale), score.data(),
                                        part_out.data() + (bh * S + c) * D);
      }
    }
  });
  lowbit_kernels::combine_parts(parts.data(), part_out.data(), B * H, S, D, op);
  return out;
}

at::Tensor decode_attention(const at::Tensor& qkv, at::Tensor& kc, at::Tensor& vc,
                            const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& pad,
                            int64_t pos, int64_t H, int64_t Hkv, double scale,
                            const at::Tensor& q_norm, const at::Tensor& k_norm, double eps) {
  const int64_t B = qkv.size(0), T = kc.size(2), D = kc.size(3);
  TORCH_CHECK(qkv.is_contiguous() && kc.is_contiguous() && vc.is_contiguous() &&
                  cos.is_contiguous() && sin.is_contiguous() && pad.is_contiguous() &&
                  q_norm.is_contiguous() && k_norm.is_contiguous(),
              "lowbit::decode_attention: contiguous tensors only");
  const bool half = kc.scalar_type() == at::kHalf;
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && (half || kc.scalar_type() == at::kFloat) &&
                  vc.scalar_type() == kc.scalar_type() && pad.scalar_type() == at::kLong,
              "lowbit::decode_attention: float32 q/k/v, float32 or float16 caches, int64 padding");
  TORCH_CHECK(qkv.dim() == 2 && kc.dim() == 4 && Hkv > 0 && qkv.size(-1) == (H + 2 * Hkv) * D &&
                  kc.size(0) == B && kc.size(1) == Hkv && vc.sizes() == kc.sizes() &&
                  D % 2 == 0 && D <= 512 && H % Hkv == 0,
              "lowbit::decode_attention: shapes do not match");
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(1) == D &&
                  cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              "lowbit::decode_attention: float32 (T, D) cos and sin tables");
  for (const at::Tensor* norm : {&q_norm, &k_norm})
    TORCH_CHECK(norm->numel() == 0 || (norm->numel() == D && norm->scalar_type() == at::kFloat),
                "lowbit::decode_attention: float32 norms of D weights, or empty");
  TORCH_CHECK(pos >= 0 && pos < T && cos.size(0) >= T, "lowbit::decode_attention: slot ", pos,
              " outside the cache");
  TORCH_CHECK(pad.numel() == B, "lowbit::decode_attention: int64 (B) padding");
  const int64_t* pd = pad.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(pd[b] >= 0 && pd[b] <= pos, "lowbit::decode_attention: row ", b,
                " has no slot to attend to");
  if (half)
    return attention_over(qkv, reinterpret_cast<uint16_t*>(kc.data_ptr<at::Half>()),
                          reinterpret_cast<uint16_t*>(vc.data_ptr<at::Half>()), T, D, cos, sin,
                          pad, pos, H, Hkv, scale, q_norm, k_norm, eps);
  return attention_over(qkv, kc.data_ptr<float>(), vc.data_ptr<float>(), T, D, cos, sin, pad,
                        pos, H, Hkv, scale, q_norm, k_norm, eps);
}

}  // namespace lowbit_kernels

TORCH_LIBRARY_FRAGMENT(lowbit_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor(a!) x, Tensor d, Tensor w, float eps) -> Tensor");
  m.def("silu_mul(Tensor gu) -> Tensor");
  m.def(
      "rope_qk(Tensor(a!) qkv, Tensor cos, Tensor sin, int heads, int kv_heads, Tensor q_norm, "
      "Tensor k_norm, float eps) -> ()");
  m.def(
      "decode_attention(Tensor qkv, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cos, "
      "Tensor sin, Tensor pad, int pos, int heads, int kv_heads, float scale, Tensor q_norm, "
      "Tensor k_norm, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit_cpu, CPU, m) {
  m.impl("rms_norm", &lowbit_kernels::rms_norm);
  m.impl("add_rms_norm", &lowbit_kernels::add_rms_norm);
  m.impl("silu_mul", &lowbit_kernels::silu_mul);
  m.impl("rope_qk", &lowbit_kernels::rope_qk);
  m.impl("decode_attention", &lowbit_kernels::decode_attention);
}
