// Per-tensor 8-bit activation codes for the integer convolution (lowbit/kernels/int8_conv.py):
// u = clamp(round_half_even(x / scale) + zero, 0, 255) as uint8, in x's own memory layout
// (quantize_u8); and the same codes back in float32, (u - zero)·scale (fake_quantize_u8: the
// input a W8A8 convolution computes with where no integer convolution takes it,
// lowbit/nn/kernel_conv.py).
//
// Why hand-written: in PyTorch the codes are five passes over the tensor (divide, round, add,
// clamp, cast), which measured longer than oneDNN's int8 convolutions themselves on waifu2x
// (about 250 ms against 173 ms per 256x256 image on 2 threads), and the float values seven;
// torch's one-pass quantizers (quantize_per_tensor, fake_quantize_per_tensor_affine) multiply by
// 1/scale, which differs from the reference's division in the last bit. The references are
// lowbit.primitives.activations.act_codes and fake_quantize_static.
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "common.h"

namespace {

// Float: (u - zero)·scale as float32; else the codes u as uint8.
template <bool Float>
at::Tensor rounded(const at::Tensor& x, double scale, int64_t zero, const char* op) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": float32 input only");
  TORCH_CHECK(x.is_non_overlapping_and_dense(), op, ": a dense input");
  TORCH_CHECK(zero >= 0 && zero <= 255, op, ": zero point outside 0..255");
  auto out = Float ? at::empty_like(x) : at::empty_like(x, x.options().dtype(at::kByte));
  const float* xp = x.data_ptr<float>();
  float* fp = Float ? static_cast<float*>(out.data_ptr()) : nullptr;
  uint8_t* up = Float ? nullptr : static_cast<uint8_t*>(out.data_ptr());
  const float s = static_cast<float>(scale), z = static_cast<float>(zero);
  const int64_t n = x.numel();
  at::parallel_for(0, n, 1 << 16, [&](int64_t begin, int64_t end) {
    const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z);
    const __m256 lo = _mm256_setzero_ps(), hi = _mm256_set1_ps(255.f);
    int64_t i = begin;
    for (; i + 8 <= end; i += 8) {
      __m256 v = _mm256_div_ps(_mm256_loadu_ps(xp + i), vs);
      v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      v = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(v, vz), lo), hi);  // NaN -> 0
      if constexpr (Float) {
        _mm256_storeu_ps(fp + i, _mm256_mul_ps(_mm256_sub_ps(v, vz), vs));
      } else {
        const __m256i w = _mm256_cvtps_epi32(v);  // integral already: exact
        const __m128i w16 = _mm_packus_epi32(_mm256_castsi256_si128(w),
                                             _mm256_extracti128_si256(w, 1));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(up + i), _mm_packus_epi16(w16, w16));
      }
    }
    for (; i < end; ++i) {  // the default rounding mode rounds half to even, as torch.round
      float v = std::nearbyint(xp[i] / s) + z;
      v = v >= 0.f ? std::min(v, 255.f) : 0.f;  // NaN -> 0, as above
      if constexpr (Float) fp[i] = (v - z) * s;
      else up[i] = static_cast<uint8_t>(v);
    }
  });
  return out;
}

at::Tensor quantize_u8(const at::Tensor& x, double scale, int64_t zero) {
  return rounded<false>(x, scale, zero, "lowbit::quantize_u8");
}

at::Tensor fake_quantize_u8(const at::Tensor& x, double scale, int64_t zero) {
  return rounded<true>(x, scale, zero, "lowbit::fake_quantize_u8");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowbit_cpu, m) {
  m.def("quantize_u8(Tensor x, float scale, int zero) -> Tensor");
  m.def("fake_quantize_u8(Tensor x, float scale, int zero) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit_cpu, CPU, m) {
  m.impl("quantize_u8", &quantize_u8);
  m.impl("fake_quantize_u8", &fake_quantize_u8);
}
