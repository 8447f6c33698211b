// 16-bit float weights (float16 or bfloat16) x float32 inputs, float32 results.
//
// Why hand-written: torch's CPU linear either wants the weight in the inputs' dtype (so a
// float32 copy of the whole weight per call, or half-precision inputs and arithmetic) or is
// slower than float32 with half inputs on AVX2 CPUs. At decode the work is reading the weight,
// so holding 2 bytes per weight only pays when the kernel converts each weight as it reads it:
// that is this GEMV. Results equal F.linear(x, w.float()) up to the order of the float sums.
//
// Small batches (decode, at most kGemvMaxM rows of x): up to kMaxM rows per pass over the
// weight. Larger batches widen the weight tile by tile and call torch's GEMM (tiled_gemm).
#include <torch/library.h>

#include <cstring>

#include "common.h"

using lowbit_kernels::hsum;
using lowbit_kernels::kGemvMaxM;

namespace {

constexpr int64_t kMaxM = 4;
constexpr int64_t kPrefetch = lowbit_kernels::kPrefetch / 2;  // in 2-byte weights

template <bool BF16>
inline __m256 widen8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

template <bool BF16>
inline float widen1(const uint16_t* p) {
  if constexpr (BF16) {
    const uint32_t bits = static_cast<uint32_t>(*p) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  return _cvtsh_ss(*p);
}

// y[m, n0:n1] for M rows of x (row stride K, output stride N); two accumulators per row.
template <bool BF16, int M>
void rows16(const float* x, int64_t K, const uint16_t* w, float* y, int64_t N, int64_t n0,
            int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* row = w + n * K;
    __m256 acc[M][2];
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      _mm_prefetch(reinterpret_cast<const char*>(row + k + kPrefetch), _MM_HINT_T1);
      const __m256 w0 = widen8<BF16>(row + k), w1 = widen8<BF16>(row + k + 8);
      for (int m = 0; m < M; ++m) {
        acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * K + k + 8), acc[m][1]);
      }
    }
    float tail[M] = {};
    for (; k < K; ++k)
      for (int m = 0; m < M; ++m) tail[m] += widen1<BF16>(row + k) * x[m * K + k];
    for (int m = 0; m < M; ++m) y[m * N + n] = hsum(_mm256_add_ps(acc[m][0], acc[m][1])) + tail[m];
  }
}

template <bool BF16>
void rows_any(const float* x, int64_t M, int64_t K, const uint16_t* w, float* y, int64_t N,
              int64_t n0, int64_t n1) {
  switch (M) {
    case 1: return rows16<BF16, 1>(x, K, w, y, N, n0, n1);
    case 2: return rows16<BF16, 2>(x, K, w, y, N, n0, n1);
    case 3: return rows16<BF16, 3>(x, K, w, y, N, n0, n1);
    case 4: return rows16<BF16, 4>(x, K, w, y, N, n0, n1);
    default: TORCH_CHECK(false, "half_linear: rows out of range");
  }
}

template <bool BF16>
at::Tensor half_linear_as(const at::Tensor& x, const at::Tensor& w) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  if (M > kGemvMaxM)  // prefill: tiles widened to float, then torch's GEMM
    return lowbit_kernels::tiled_gemm(x, N, [&](float* out, int64_t row0, int64_t n0, int64_t n1) {
      for (int64_t i = n0 * K; i < n1 * K; ++i) out[i - row0 * K] = widen1<BF16>(wp + i);
    });
  const float* xp = x.data_ptr<float>();
  auto y = at::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += kMaxM)
      rows_any<BF16>(xp + m0 * K, std::min(kMaxM, M - m0), K, wp, yp + m0 * N, N, n0, n1);
  });
  return y;
}

at::Tensor half_linear(const at::Tensor& x_in, const at::Tensor& w) {
  const at::Tensor x = x_in.contiguous();
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be a float32 matrix");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() &&
                  (w.scalar_type() == at::kHalf || w.scalar_type() == at::kBFloat16),
              "w must be a contiguous float16 or bfloat16 matrix");
  TORCH_CHECK(w.size(1) == x.size(1), "weight width does not match x");
  return w.scalar_type() == at::kBFloat16 ? half_linear_as<true>(x, w) : half_linear_as<false>(x, w);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowbit_cpu, m) {
  m.def("half_linear(Tensor x, Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit_cpu, CPU, m) {
  m.impl("half_linear", &half_linear);
}
