// W8A8 on AVX2: int8 weights x symmetric int8 per-token activations, exact int32 sums. The
// product itself (tile, epilogue) is in int8_panels.h, shared with the convolutions of
// int8_conv.cpp.
//
// Why hand-written: fbgemm (torch's int8 GEMM) multiplies uint8 activations by int8 weights
// with vpmaddubsw on CPUs without VNNI, whose int16 pair sums saturate on full 8-bit codes, so
// there it needs 7-bit activations; torch._int_mm is a slow reference on these CPUs. The
// product here cannot saturate, and costs one cheap instruction per 32 products beyond
// vpmaddubsw + vpmaddwd + vpaddd:
//   the unsigned operand is |w| (<= 128), the signed one a ^ neg(w), neg(w) = 0xFF where w < 0:
//   a where w >= 0, -a - 1 where w < 0, so |w| * (a ^ neg(w)) = w * a - [w < 0] * |w|, and a
//   column's sum comes out short by its negative weights' |w| summed, a constant stored with
//   the panel and added back. With a in [-127, 127] every product lies in [-16384, 16129], a
//   pair's sum in [-32768, 32258]: vpmaddubsw is exact whatever the codes.
// llama.cpp's q8_0 dot product flips the activations' signs instead (vpsignb by w, a = sign(w)
// * a): the same exact sums, but vpsignb shares the multiply pipes on the CPUs measured, and
// the GEMM ran at 73 GMAC/s per core against 115 with the xor (benchmarks/avx2_int8_peak.cpp).
//
// Layout (packed once at load, by lowbit.kernels.int8.pack_panels): panels of 8 weight rows
// (output columns) x Kp inputs (K padded to a multiple of 4 with zero codes) and one more step;
// within a panel, step s < Kp / 4 holds 32 bytes: row 0's inputs 4s..4s+3, row 1's, ..., row
// 7's; the last step holds the 8 rows' corrections (int32, sum of |w| over w < 0). One 32-byte
// load is 8 columns x 4 inputs, one broadcast of 4 activation bytes meets all 8 columns, and
// vpmaddubsw + vpmaddwd(ones) leave the 8 column sums of 4 products in int32 lanes.
// A call of kWideRows rows or more first widens each group of panels into |w| and the sign
// mask side by side (int8_panels.h: no vpabsb / vpcmpgtb in the tile's steps).
#include <torch/library.h>

#include <cmath>

#include "common.h"
#include "int8_panels.h"

using namespace lowbit_kernels;

namespace {

using namespace lowbit_kernels::panels;

// x (M, K) -> codes q (M, Kp) int8 and per-row scales: q = round(x * (127 / absmax)) (to
// even, as _mm256_cvtps_epi32 rounds), s = absmax / 127; padded inputs get code 0. A row whose
// 127 / absmax is not finite (absmax below ~4e-37) gets codes 0; a row holding a NaN or an
// infinity gets scale NaN, so its outputs are NaN (as the reference's are).
void quantize_tokens(const float* x, int64_t M, int64_t K, int64_t Kp, int8_t* q, float* s) {
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    const __m256 sign = _mm256_set1_ps(-0.0f), inf = _mm256_set1_ps(INFINITY);
    for (int64_t m = m0; m < m1; ++m) {
      const float* row = x + m * K;
      __m256 amax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
      int64_t k = 0;
      for (; k + 8 <= K; k += 8) {
        const __m256 v = _mm256_andnot_ps(sign, _mm256_loadu_ps(row + k));
        amax = _mm256_max_ps(amax, v);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, inf, _CMP_NLT_UQ));  // NaN or infinite
      }
      float a = 0.f;
      float lanes[8];
      _mm256_storeu_ps(lanes, amax);
      for (float v : lanes) a = std::max(a, v);
      bool finite = _mm256_movemask_ps(bad) == 0;
      for (; k < K; ++k) {
        a = std::max(a, std::abs(row[k]));
        finite = finite && std::isfinite(row[k]);
      }
      float inv = a > 0.f ? 127.f / a : 0.f;
      if (!std::isfinite(inv)) inv = 0.f;
      s[m] = finite ? a / 127.f : NAN;
      int8_t* out = q + m * Kp;
      const __m256 vinv = _mm256_set1_ps(inv);
      for (k = 0; k + 8 <= K; k += 8) {
        const __m256i n = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(row + k), vinv));
        const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(n), _mm256_extracti128_si256(n, 1));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(out + k), _mm_packs_epi16(w16, w16));
      }
      for (; k < K; ++k) out[k] = static_cast<int8_t>(std::nearbyint(row[k] * inv));
      for (; k < Kp; ++k) out[k] = 0;
    }
  });
}

}  // namespace

namespace lowbit_kernels {

at::Tensor int8_linear(const at::Tensor& x_in, const at::Tensor& panels,
                       const at::Tensor& w_scale) {
  const at::Tensor x = x_in.contiguous();
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "lowbit::int8_linear: x must be 2-D float32");
  TORCH_CHECK(panels.dim() == 3 && panels.scalar_type() == at::kChar && panels.size(2) == kPanel * 4,
              "lowbit::int8_linear: panels must be int8 (N/8, Kp/4 + 1, 32) as pack_panels makes them");
  const int64_t M = x.size(0), K = x.size(1), Np = panels.size(0) * kPanel, Kp = (panels.size(1) - 1) * 4;
  const int64_t N = w_scale.numel();
  TORCH_CHECK(K > 0, "lowbit::int8_linear: the layer has no inputs");
  TORCH_CHECK(Kp >= K && Kp < K + 4 && N <= Np && N > Np - kPanel && w_scale.scalar_type() == at::kFloat,
              "lowbit::int8_linear: x, panels and scales do not fit together");
  std::vector<int8_t> q(M * Kp);
  std::vector<float> sx(M);
  quantize_tokens(x.data_ptr<float>(), M, K, Kp, q.data(), sx.data());
  auto y = at::empty({M, N}, x.options());
  const int8_t* wp = panels.data_ptr<int8_t>();
  const float* sw = w_scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t groups = (Np / kPanel + kPanels - 1) / kPanels;
  const int64_t block = std::max<int64_t>(8 * kRowsTile, (kCodesBlock / Kp) / kRowsTile * kRowsTile);
  for (int64_t m0 = 0; m0 < M; m0 += block) {
    const int64_t rows = std::min(block, M - m0);
    const Epilogue e{sx.data(), true, sw, nullptr, nullptr, N};
    const auto panels_of = [&](int64_t g0, int64_t g1) {
      rows_against_all(q.data() + m0 * Kp, rows, Kp, wp, Np, e, m0, g0, g1, N, yp + m0 * N);
    };
    if (M <= kGemvMaxM)  // decode-sized: the spinning pool (pool.h)
      lowbit_kernels::parallel_for(0, groups, 1, panels_of);
    else
      at::parallel_for(0, groups, 1, panels_of);
  }
  return y;
}

}  // namespace lowbit_kernels

namespace {

// Decode-sized inputs (up to kMmGemvRows rows) on the row-major codes of int8_linear_mm: a call
// of oneDNN's matmul costs ~20 us before any work, more than a small layer's whole product.
// VNNI's vpdpbusd multiplies unsigned by signed bytes into int32 without saturating, so the
// activation codes go in shifted, u = q + 128, and q . w = u . w - 128 * sum(w); the weight sums
// come from a second vpdpbusd of ones against the same loaded bytes (no extra memory traffic:
// decode is bound by reading the weights). AVX-512: chunks of 64 inputs, the last one masked;
// AVX-VNNI (below): chunks of 32, the rest in scalar code.
constexpr int64_t kMmGemvRows = 4;

// One chunk of 64 inputs (lanes m) for R activation rows and B weight rows: each activation
// chunk is loaded once for the B rows, each weight chunk once for the R rows.
template <int R, int B>
LOWBIT_AVX512 inline void gemv_chunk_vnni(const uint8_t* u, int64_t K, const int8_t* w, int64_t at,
                                        __mmask64 m, __m512i acc[R][B], __m512i wsum[B]) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i wv[B];
  for (int b = 0; b < B; ++b) {
    // the same line of the rows two blocks ahead (past the last row: prefetches never fault);
    // spread over the chunks, not prefetch_row's whole row at once: that measured slower here
    _mm_prefetch(reinterpret_cast<const char*>(w + (b + 2 * B) * K + at), _MM_HINT_T0);
    wv[b] = _mm512_maskz_loadu_epi8(m, w + b * K + at);
    wsum[b] = _mm512_dpbusd_epi32(wsum[b], ones, wv[b]);
  }
  for (int r = 0; r < R; ++r) {
    const __m512i uv = _mm512_maskz_loadu_epi8(m, u + r * K + at);
    for (int b = 0; b < B; ++b) acc[r][b] = _mm512_dpbusd_epi32(acc[r][b], uv, wv[b]);
  }
}

// R activation rows against B weight rows (independent vpdpbusd chains).
template <int R, int B>
LOWBIT_AVX512 void gemv_block_vnni(const uint8_t* u, int64_t K, const int8_t* w, int64_t n,
                                 int32_t* sums, int64_t N) {
  const int64_t full = K / 64, rest = K % 64;
  __m512i acc[R][B], wsum[B];
  for (int b = 0; b < B; ++b) {
    wsum[b] = _mm512_setzero_si512();
    for (int r = 0; r < R; ++r) acc[r][b] = _mm512_setzero_si512();
  }
  for (int64_t c = 0; c < full; ++c) gemv_chunk_vnni<R, B>(u, K, w, 64 * c, ~0ULL, acc, wsum);
  if (rest) gemv_chunk_vnni<R, B>(u, K, w, 64 * full, ~0ULL >> (64 - rest), acc, wsum);
  for (int b = 0; b < B; ++b) {
    const int32_t shift = 128 * _mm512_reduce_add_epi32(wsum[b]);
    for (int r = 0; r < R; ++r) sums[r * N + n + b] = _mm512_reduce_add_epi32(acc[r][b]) - shift;
  }
}

// The same GEMV with AVX-VNNI's 256-bit vpdpbusd (VNNI without AVX-512: Intel's client CPUs
// from Alder Lake, AMD's from Zen 5): chunks of 32 inputs, the last partial chunk in scalar code.
// AVX2 has 16 vector registers: 4 weight rows per block for one activation row, 2 for more.
#if LOWBIT_HAS_AVXVNNI
LOWBIT_AVXVNNI inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

template <int R, int B>
LOWBIT_AVXVNNI void gemv_block_avxvnni(const uint8_t* u, int64_t K, const int8_t* w, int64_t n,
                                       int32_t* sums, int64_t N) {
  const int64_t full = K / 32 * 32;
  const __m256i ones = _mm256_set1_epi8(1);
  __m256i acc[R][B], wsum[B];
  for (int b = 0; b < B; ++b) {
    wsum[b] = _mm256_setzero_si256();
    for (int r = 0; r < R; ++r) acc[r][b] = _mm256_setzero_si256();
  }
  for (int64_t at = 0; at < full; at += 32) {
    __m256i wv[B];
    for (int b = 0; b < B; ++b) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (b + 2 * B) * K + at), _MM_HINT_T0);
      wv[b] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * K + at));
      wsum[b] = _mm256_dpbusd_avx_epi32(wsum[b], ones, wv[b]);
    }
    for (int r = 0; r < R; ++r) {
      const __m256i uv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u + r * K + at));
      for (int b = 0; b < B; ++b) acc[r][b] = _mm256_dpbusd_avx_epi32(acc[r][b], uv, wv[b]);
    }
  }
  for (int b = 0; b < B; ++b) {
    const int8_t* row = w + b * K;
    int32_t ws = hsum_epi32(wsum[b]);
    for (int64_t k = full; k < K; ++k) ws += row[k];
    for (int r = 0; r < R; ++r) {
      int32_t dot = hsum_epi32(acc[r][b]);
      for (int64_t k = full; k < K; ++k) dot += static_cast<int32_t>(u[r * K + k]) * row[k];
      sums[r * N + n + b] = dot - 128 * ws;
    }
  }
}

#endif

template <int R>
void gemv_rows_of(const uint8_t* u, int64_t K, const int8_t* codes, int64_t n0, int64_t n1,
                  int32_t* sums, int64_t N, bool avx512) {
  int64_t n = n0;
  if (avx512) {
    for (; n + 4 <= n1; n += 4) gemv_block_vnni<R, 4>(u, K, codes + n * K, n, sums, N);
    for (; n < n1; ++n) gemv_block_vnni<R, 1>(u, K, codes + n * K, n, sums, N);
    return;
  }
#if LOWBIT_HAS_AVXVNNI  // else never called: use_avxvnni() is false
  constexpr int B = R == 1 ? 4 : 2;
  for (; n + B <= n1; n += B) gemv_block_avxvnni<R, B>(u, K, codes + n * K, n, sums, N);
  for (; n < n1; ++n) gemv_block_avxvnni<R, 1>(u, K, codes + n * K, n, sums, N);
#endif
}

// avx512: AVX-512 VNNI's kernel, else AVX-VNNI's.
void gemv_rows(const uint8_t* u, int64_t M, int64_t K, const int8_t* codes, int64_t N,
               int32_t* sums, bool avx512) {
  lowbit_kernels::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    switch (M) {
      case 1: gemv_rows_of<1>(u, K, codes, n0, n1, sums, N, avx512); break;
      case 2: gemv_rows_of<2>(u, K, codes, n0, n1, sums, N, avx512); break;
      case 3: gemv_rows_of<3>(u, K, codes, n0, n1, sums, N, avx512); break;
      default: gemv_rows_of<4>(u, K, codes, n0, n1, sums, N, avx512); break;
    }
  });
}

}  // namespace

namespace lowbit_kernels {

// The same arithmetic through oneDNN's integer matmul (torch._int_mm) on weight codes kept
// row-major (N, K): on CPUs where oneDNN multiplies int8 by int8 exactly (VNNI's vpdpbusd,
// AMX's tile products; lowbit.kernels.int8 checks it once) it is far faster than the panels
// above for prompt-sized inputs; decode-sized ones take the GEMV above. The codes, the
// int32 sums and the epilogue ((float(sum) * s_x) * s_w) are int8_linear's: equal bit for bit.
at::Tensor int8_linear_mm(const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& w_scale) {
  const at::Tensor x = x_in.contiguous();
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "lowbit::int8_linear_mm: x must be 2-D float32");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kChar && codes.is_contiguous(),
              "lowbit::int8_linear_mm: codes must be contiguous int8 (N, K)");
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0);
  TORCH_CHECK(K > 0 && codes.size(1) == K && w_scale.numel() == N && w_scale.scalar_type() == at::kFloat,
              "lowbit::int8_linear_mm: x, codes and scales do not fit together");
  if (M == 0) return at::empty({0, N}, x.options());
  auto q = at::empty({M, K}, x.options().dtype(at::kChar));
  std::vector<float> sx(M);
  quantize_tokens(x.data_ptr<float>(), M, K, K, q.data_ptr<int8_t>(), sx.data());
  at::Tensor sums;  // (M, N) int32, exact
  // u . w stays below 255 * 128 * K in int32 up to K = 65,793
  const bool avx512 = lowbit_kernels::use_avx512();
  if (M <= kMmGemvRows && K <= 65536 && (avx512 || lowbit_kernels::use_avxvnni())) {
    sums = at::empty({M, N}, x.options().dtype(at::kInt));
    uint8_t* u = reinterpret_cast<uint8_t*>(q.data_ptr<int8_t>());
    for (int64_t i = 0; i < M * K; ++i) u[i] ^= 0x80;  // q + 128 as unsigned bytes, in place
    gemv_rows(u, M, K, codes.data_ptr<int8_t>(), N, sums.data_ptr<int32_t>(), avx512);
  } else {
    sums = at::_int_mm(q, codes.t()).contiguous();
  }
  // the float outputs overwrite their own sums (one buffer: a second would be new pages to
  // fault in at every prompt-sized call)
  int32_t* acc = sums.data_ptr<int32_t>();
  const at::Tensor scales = w_scale.contiguous();
  const float* sw = scales.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / N), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      int32_t* row = acc + m * N;
      const __m256 s = _mm256_set1_ps(sx[m]);
      int64_t n = 0;
      for (; n + 8 <= N; n += 8) {  // the float's bits in place of its sum
        const __m256 v = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + n)));
        _mm256_storeu_ps(reinterpret_cast<float*>(row + n), _mm256_mul_ps(_mm256_mul_ps(v, s), _mm256_loadu_ps(sw + n)));
      }
      for (; n < N; ++n) {
        const float v = (static_cast<float>(row[n]) * sx[m]) * sw[n];
        std::memcpy(row + n, &v, sizeof v);
      }
    }
  });
  return sums.view(at::kFloat);
}

}  // namespace lowbit_kernels

TORCH_LIBRARY_FRAGMENT(lowbit_cpu, m) {
  m.def("int8_linear(Tensor x, Tensor panels, Tensor w_scale) -> Tensor");
  m.def("int8_linear_mm(Tensor x, Tensor codes, Tensor w_scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit_cpu, CPU, m) {
  m.impl("int8_linear", &lowbit_kernels::int8_linear);
  m.impl("int8_linear_mm", &lowbit_kernels::int8_linear_mm);
}
