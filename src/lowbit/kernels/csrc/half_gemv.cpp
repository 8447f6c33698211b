// 16-bit float weights (float16 or bfloat16) x float32 inputs, float32 results.
//
// Why hand-written: torch's CPU linear either wants the weight in the inputs' dtype (so a
// float32 copy of the whole weight per call, or half-precision inputs and arithmetic) or is
// slower than float32 with half inputs on AVX2 CPUs. At decode the work is reading the weight,
// so holding 2 bytes per weight only pays when the kernel converts each weight as it reads it:
// that is this GEMV. Results equal F.linear(x, w.float()) up to the order of the float sums.
//
// Small batches (decode, at most kGemvMaxM rows of x): up to kMaxM rows per pass over the
// weight. Larger batches convert the weight tile by tile into a per-thread float buffer that
// stays in cache and call torch's GEMM (as gemm_tiled in affine_gemv.cpp).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <immintrin.h>

#include <cstring>
#include <vector>

namespace {

constexpr int64_t kMaxM = 4;
constexpr int64_t kGemvMaxM = 32;
constexpr int64_t kPrefetch = 4096;  // weights ahead (8 KB), as the affine kernels do

template <bool BF16>
inline __m256 load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

template <bool BF16>
inline float load1(const uint16_t* p) {
  if constexpr (BF16) {
    const uint32_t bits = static_cast<uint32_t>(*p) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  return _cvtsh_ss(*p);
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
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
      const __m256 w0 = load8<BF16>(row + k), w1 = load8<BF16>(row + k + 8);
      for (int m = 0; m < M; ++m) {
        acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * K + k + 8), acc[m][1]);
      }
    }
    float tail[M] = {};
    for (; k < K; ++k)
      for (int m = 0; m < M; ++m) tail[m] += load1<BF16>(row + k) * x[m * K + k];
    for (int m = 0; m < M; ++m) y[m * N + n] = hsum8(_mm256_add_ps(acc[m][0], acc[m][1])) + tail[m];
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
void to_float(const uint16_t* w, int64_t K, float* out, int64_t n0, int64_t n1) {
  for (int64_t i = n0 * K; i < n1 * K; ++i) out[i - n0 * K] = load1<BF16>(w + i);
}

template <bool BF16>
at::Tensor half_linear_as(const at::Tensor& x, const at::Tensor& w) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const float* xp = x.data_ptr<float>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  if (M <= kGemvMaxM) {
    auto y = at::empty({M, N}, x.options());
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t m0 = 0; m0 < M; m0 += kMaxM)
        rows_any<BF16>(xp + m0 * K, std::min(kMaxM, M - m0), K, wp, yp + m0 * N, N, n0, n1);
    });
    return y;
  }
  // y^T tile by tile: each tile of weight rows (about 8 MB as floats) converted, then GEMM.
  const int64_t T = std::max<int64_t>(16, ((int64_t{1} << 21) / K) / 16 * 16);
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < std::min(T, N) * K) buffer.resize(std::min(T, N) * K);
  const at::Tensor tile =
      at::from_blob(buffer.data(), {std::min(T, N), K}, at::TensorOptions().dtype(at::kFloat));
  float* dst = buffer.data();  // the calling thread's buffer, filled by every thread
  auto yt = at::empty({N, M}, x.options());
  const at::Tensor xt = x.t();
  for (int64_t t0 = 0; t0 < N; t0 += T) {
    const int64_t rows = std::min(T, N - t0);
    at::parallel_for(0, rows, 8, [&](int64_t a, int64_t b) {
      to_float<BF16>(wp + t0 * K, K, dst + a * K, a, b);
    });
    at::Tensor out = yt.narrow(0, t0, rows);
    at::mm_out(out, tile.narrow(0, 0, rows), xt);
  }
  return yt.t().contiguous();
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
