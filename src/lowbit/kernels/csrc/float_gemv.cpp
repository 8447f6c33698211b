// Float weights (float32, float16 or bfloat16) x float32 inputs, float32 results.
//
// Why hand-written: at decode (a few rows of x) the work is reading the weight. torch's CPU
// linear either wants a 16-bit weight in the inputs' dtype (so a float32 copy of the whole
// weight per call, or half-precision inputs and arithmetic) or is slower than float32 with half
// inputs on AVX2 CPUs; and for float32 weights its GEMV read them at a third of the machine's
// read bandwidth on a 2-core AMD EPYC VM (smollm2's 113 MB tied output head: 11 GB/s of 33),
// which made the float head most of a W4 model's decode time. This GEMV streams the weight
// once per pass, converting 16-bit weights as it reads them. Results equal
// F.linear(x, w.float()) up to the order of the float sums.
//
// Small batches (decode, at most kGemvMaxM rows of x): up to kMaxM rows per pass over the
// weight. Larger batches call torch's GEMM (16-bit weights widened tile by tile: tiled_gemm).
#include <torch/library.h>

#include <cstring>

#include "common.h"
#include "decode_api.h"

using lowbit_kernels::hsum;
using lowbit_kernels::kGemvMaxM;

namespace {

constexpr int64_t kMaxM = 4;

enum class Store { F32, F16, BF16 };

template <Store S>
using Elem = std::conditional_t<S == Store::F32, float, uint16_t>;

template <Store S>
inline __m256 widen8(const Elem<S>* p) {
  if constexpr (S == Store::F32) {
    return _mm256_loadu_ps(p);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if constexpr (S == Store::BF16)
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
  }
}

template <Store S>
inline float widen1(const Elem<S>* p) {
  if constexpr (S == Store::F32) {
    return *p;
  } else if constexpr (S == Store::BF16) {
    const uint32_t bits = static_cast<uint32_t>(*p) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  } else {
    return _cvtsh_ss(*p);
  }
}

// y[m, n0:n1] for M rows of x (row stride K, output stride N); two accumulators per row.
template <Store S, int M>
void rows(const float* x, int64_t K, const Elem<S>* w, float* y, int64_t N, int64_t n0,
          int64_t n1) {
  constexpr int64_t ahead = lowbit_kernels::kPrefetch / sizeof(Elem<S>);  // in weights
  for (int64_t n = n0; n < n1; ++n) {
    const Elem<S>* row = w + n * K;
    __m256 acc[M][2];
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      _mm_prefetch(reinterpret_cast<const char*>(row + k + ahead), _MM_HINT_T1);
      if constexpr (S == Store::F32)  // 64 bytes a step: a second line to fetch
        _mm_prefetch(reinterpret_cast<const char*>(row + k + ahead + 8), _MM_HINT_T1);
      const __m256 w0 = widen8<S>(row + k), w1 = widen8<S>(row + k + 8);
      for (int m = 0; m < M; ++m) {
        acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * K + k + 8), acc[m][1]);
      }
    }
    float tail[M] = {};
    for (; k < K; ++k)
      for (int m = 0; m < M; ++m) tail[m] += widen1<S>(row + k) * x[m * K + k];
    for (int m = 0; m < M; ++m) y[m * N + n] = hsum(_mm256_add_ps(acc[m][0], acc[m][1])) + tail[m];
  }
}

template <Store S>
void rows_any(const float* x, int64_t M, int64_t K, const Elem<S>* w, float* y, int64_t N,
              int64_t n0, int64_t n1) {
  switch (M) {
    case 1: return rows<S, 1>(x, K, w, y, N, n0, n1);
    case 2: return rows<S, 2>(x, K, w, y, N, n0, n1);
    case 3: return rows<S, 3>(x, K, w, y, N, n0, n1);
    case 4: return rows<S, 4>(x, K, w, y, N, n0, n1);
    default: TORCH_CHECK(false, "float_linear: rows out of range");
  }
}

template <Store S>
at::Tensor float_linear_as(const at::Tensor& x, const at::Tensor& w) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const Elem<S>* wp = reinterpret_cast<const Elem<S>*>(w.data_ptr());
  if (M > kGemvMaxM) {  // prefill: torch's GEMM (16-bit tiles widened to float first)
    if constexpr (S == Store::F32) {
      return at::mm(x, w.t());
    } else {
      return lowbit_kernels::tiled_gemm(x, N, [&](float* out, int64_t row0, int64_t n0, int64_t n1) {
        for (int64_t i = n0 * K; i < n1 * K; ++i) out[i - row0 * K] = widen1<S>(wp + i);
      });
    }
  }
  const float* xp = x.data_ptr<float>();
  auto y = at::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  lowbit_kernels::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += kMaxM)
      rows_any<S>(xp + m0 * K, std::min(kMaxM, M - m0), K, wp, yp + m0 * N, N, n0, n1);
  });
  return y;
}

}  // namespace

at::Tensor lowbit_kernels::float_linear(const at::Tensor& x_in, const at::Tensor& w) {
  const at::Tensor x = x_in.contiguous();
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be a float32 matrix");
  const auto t = w.scalar_type();
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() &&
                  (t == at::kFloat || t == at::kHalf || t == at::kBFloat16),
              "w must be a contiguous float32, float16 or bfloat16 matrix");
  TORCH_CHECK(w.size(1) == x.size(1), "weight width does not match x");
  if (t == at::kFloat) return float_linear_as<Store::F32>(x, w);
  return t == at::kBFloat16 ? float_linear_as<Store::BF16>(x, w) : float_linear_as<Store::F16>(x, w);
}

TORCH_LIBRARY_FRAGMENT(lowbit_cpu, m) {
  m.def("float_linear(Tensor x, Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit_cpu, CPU, m) {
  m.impl("float_linear", &lowbit_kernels::float_linear);
}
