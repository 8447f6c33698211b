// Low-bit weight x fp32 activation linear layers for CPUs with AVX2 + FMA.
//
// Why hand-written: on AVX2 CPUs without VNNI/AMX, nothing shipped with torch multiplies
// 4-bit weights with fp32 activations fast (torch's int4 CPU kernel wants bf16 activations and
// its fp32 path is slower than dense fp32), and at batch 1 the work is bound by reading the
// weights, so reading 0.5 byte per weight instead of 4 is the whole gain.
//
// Every weight row is affine per group: w[n, k] = scale[n, g] * u[n, k] + offset[n, g], with
// unsigned codes u and g = k / group. So
//   y[m, n] = sum_g scale[n, g] * dot(u[n, g, :], x[m, g, :]) + offset[n, g] * sum(x[m, g, :]),
// which covers symmetric grids (offset = -mid * scale), integer zero points
// (offset = -zero * scale) and float offsets (GGUF Q4_1 style) alike.
//
// Layouts (built once from lowbit's plain packing when a model is loaded; K a multiple of 32):
//   bits 4: each whole block of 16 rows interleaved, its params group-major (affine_blocks.h:
//           the decode kernels take rows as vector lanes); the rows past the last whole block
//           (and every block once a reader has taken it back to rows, rows_of_block) row by
//           row: chunks of 64 codes in 32 bytes, byte j of a chunk holding code 64c + j in its
//           low nibble and code 64c + 32 + j in its high nibble. When K is not a multiple of 64
//           the row ends with one chunk of 32 codes in 16 bytes (byte j: codes j and 16 + j).
//           One 32-byte load thus holds two whole runs of 32 in k order, one per nibble, which
//           the AVX-512 kernel multiplies without shuffling (gemv_rows_q8_512, affine_q8.cpp).
//   bits 8: per row, K bytes, one code each.
//
// Small batches (decode) run fused kernels, up to 8 rows of x per pass over the weights (4-bit
// codes: up to 4 per pass over a block of 16 rows):
//   - with act8 (the default): each row of x is first quantized to int8 per block of 32
//     inputs (scale = absmax / 127, as llama.cpp quantizes activations), and the codes meet
//     the int8 inputs in integer multiply-adds (4-bit: vpmaddubsw, u4 x s8 pairs cannot
//     saturate, the result corrected to that of the centred codes u - 8; 8-bit: the centred
//     codes u - 128 in llama.cpp's signed products; AVX-512 VNNI: vpdpbusd for both; gemv_q8,
//     affine_q8.cpp). Converting every code to float is what bounds the float kernel; this
//     path avoids it. The offset term uses the exact float block sums of x.
//   - with act8 off, codes are converted to float and FMA'd with x (8-bit codes 16 at a time
//     with AVX-512 where the CPU has it: gemv_rows8_512; 4-bit blocks: gemv_blocks_f32).
// Larger batches: 4- and 8-bit layers with act8 (the decode loop's prompts) run an integer GEMM
// on int8 inputs (gemm_q8, affine_q8_gemm.cpp); otherwise (evaluation windows) the
// weight is dequantized tile by tile into a small per-thread float buffer that stays in cache
// and torch's GEMM runs on each tile.
#include <torch/library.h>

#include "affine_blocks.h"
#include "common.h"
#include "decode_api.h"

using namespace lowbit_kernels;

namespace {

// y[m, n0:n1] for M (compile-time, <= kMaxM) rows of x (row stride K, output stride N), 4-bit
// codes on float inputs (act8 off; 8-bit codes: gemv_rows8 below). With few rows, each row
// keeps A independent accumulators so the FMA latency chain does not bind.
template <int64_t Bits, int M, typename P>
void gemv_rows(const float* x, int64_t K, const uint8_t* w, const P* scale, const P* offset, int64_t group, const float* xsum, float* y, int64_t N,
               int64_t n0, int64_t n1) {
  constexpr int A = M == 1 ? 4 : (M == 2 ? 2 : 1);
  const int64_t G = K / group, row_bytes = K * Bits / 8;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    __m256 acc[M];
    float acc_off[M];
    for (int m = 0; m < M; ++m) {
      acc[m] = _mm256_setzero_ps();
      acc_off[m] = 0.f;
    }
    for (int64_t g = 0; g < G; ++g) {
      __m256 gacc[M][A];
      for (int m = 0; m < M; ++m)
        for (int a = 0; a < A; ++a) gacc[m][a] = _mm256_setzero_ps();
      for (int64_t k0 = g * group; k0 < (g + 1) * group; k0 += 32) {
        _mm_prefetch(reinterpret_cast<const char*>(row + k0 * Bits / 8 + kPrefetch), _MM_HINT_T1);
        __m256 wv[4];
        load_run<Bits>(row, k0, K, wv);
        for (int m = 0; m < M; ++m) {
          const float* xr = x + m * K + k0;
          for (int i = 0; i < 4; ++i)
            gacc[m][i % A] = _mm256_fmadd_ps(wv[i], _mm256_loadu_ps(xr + 8 * i), gacc[m][i % A]);
        }
      }
      const __m256 s = _mm256_set1_ps(load1(scale + n * G + g));
      const float o = offset_at(offset, scale, n * G + g, 1 << (Bits - 1));
      for (int m = 0; m < M; ++m) {
        __m256 sum = gacc[m][0];
        for (int a = 1; a < A; ++a) sum = _mm256_add_ps(sum, gacc[m][a]);
        acc[m] = _mm256_fmadd_ps(sum, s, acc[m]);
        acc_off[m] += o * xsum[m * G + g];
      }
    }
    for (int m = 0; m < M; ++m) y[m * N + n] = hsum(acc[m]) + acc_off[m];
  }
}

// sum_g o_g X_g over a row's G groups, vectorized, for 8-bit codes (o_g = -128 s_g where no
// offsets are stored): the 8-bit kernels add it once per row rather than a scalar step per group.
template <typename P>
inline float offsets8(const P* of, const P* sc, const float* xs, int64_t G) {
  __m256 t = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= G; g += 8) {
    const __m256 o = of ? load8(of + g) : _mm256_mul_ps(_mm256_set1_ps(-128.f), load8(sc + g));
    t = _mm256_fmadd_ps(o, _mm256_loadu_ps(xs + g), t);
  }
  float tail = 0.f;
  for (; g < G; ++g) tail += offset_at(of, sc, g, 128.f) * xs[g];
  return hsum(t) + tail;
}

template <typename P>
inline __m256 broadcast8(const P* p) {
  if constexpr (sizeof(P) == 4) {
    return _mm256_broadcast_ss(p);
  } else {
    return _mm256_cvtph_ps(_mm_set1_epi16(static_cast<short>(*p)));
  }
}

// The 8-bit kernels on float inputs (act8 off). Per run of 32 codes: widening loads and converts,
// one FMA per 8 (AVX2) or 16 (AVX-512) codes into the group's sums, split over two chains so their
// latency does not bind at groups of 32; per group one scale FMA; the offsets once per row. Bound
// by instructions, not memory, on two cores: with the general kernel's per-group scalar steps
// (gemv_rows) a 32000x2048 int8 head took 6.9 ms on one thread, with this one 5.1.
template <int M, typename P>
void gemv_rows8(const float* x, int64_t K, const uint8_t* w, const P* scale, const P* offset,
                int64_t group, const float* xsum, float* y, int64_t N, int64_t n0, int64_t n1) {
  const int64_t G = K / group;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * K;
    const P* sc = scale + n * G;
    __m256 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      __m256 gacc[M][2];
      for (int m = 0; m < M; ++m) gacc[m][0] = gacc[m][1] = _mm256_setzero_ps();
      for (int64_t k0 = g * group; k0 < (g + 1) * group; k0 += 32) {
        _mm_prefetch(reinterpret_cast<const char*>(row + k0 + kPrefetch), _MM_HINT_T1);
        __m256 wv[4];
        for (int i = 0; i < 4; ++i)
          wv[i] = u8x8_to_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k0 + 8 * i)));
        for (int m = 0; m < M; ++m) {
          const float* xr = x + m * K + k0;
          for (int i = 0; i < 4; ++i)
            gacc[m][i & 1] = _mm256_fmadd_ps(wv[i], _mm256_loadu_ps(xr + 8 * i), gacc[m][i & 1]);
        }
      }
      const __m256 s = broadcast8(sc + g);
      for (int m = 0; m < M; ++m)
        acc[m] = _mm256_fmadd_ps(_mm256_add_ps(gacc[m][0], gacc[m][1]), s, acc[m]);
    }
    const P* of = offset ? offset + n * G : nullptr;
    for (int m = 0; m < M; ++m) y[m * N + n] = hsum(acc[m]) + offsets8(of, sc, xsum + m * G, G);
  }
}

#define LOWBIT_AVX512F __attribute__((target("avx512f,avx512bw,avx2,fma,f16c")))

template <typename P>
LOWBIT_AVX512F inline __m512 broadcast1(const P* p) {
  if constexpr (sizeof(P) == 4) {
    return _mm512_set1_ps(*p);
  } else {
    return _mm512_cvtph_ps(_mm256_set1_epi16(static_cast<short>(*p)));
  }
}

template <int M, typename P>
LOWBIT_AVX512F void gemv_rows8_512(const float* x, int64_t K, const uint8_t* w, const P* scale,
                                   const P* offset, int64_t group, const float* xsum, float* y,
                                   int64_t N, int64_t n0, int64_t n1) {
  const int64_t G = K / group;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * K;
    const P* sc = scale + n * G;
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      __m512 gacc[M];
      for (int m = 0; m < M; ++m) gacc[m] = _mm512_setzero_ps();
      for (int64_t k0 = g * group; k0 < (g + 1) * group; k0 += 32) {
        _mm_prefetch(reinterpret_cast<const char*>(row + k0 + kPrefetch), _MM_HINT_T1);
        const __m512 w0 = _mm512_cvtepi32_ps(
            _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k0))));
        const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k0 + 16))));
        for (int m = 0; m < M; ++m) {
          const float* xr = x + m * K + k0;
          gacc[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), gacc[m]);
          gacc[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), gacc[m]);
        }
      }
      const __m512 s = broadcast1(sc + g);
      for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(gacc[m], s, acc[m]);
    }
    const P* of = offset ? offset + n * G : nullptr;
    for (int m = 0; m < M; ++m)
      y[m * N + n] = _mm512_reduce_add_ps(acc[m]) + offsets8(of, sc, xsum + m * G, G);
  }
}

template <int64_t Bits, typename P>
void gemv_any(const float* x, int64_t M, int64_t K, const uint8_t* w, const P* scale,
              const P* offset, int64_t group, const float* xsum, float* y, int64_t N,
              int64_t n0, int64_t n1) {
  const bool wide = Bits == 8 && use_avx512();
  switch (M) {
#define LOWBIT_CASE(R)                                                                       \
  case R:                                                                                    \
    if (wide) return gemv_rows8_512<R, P>(x, K, w, scale, offset, group, xsum, y, N, n0, n1); \
    if constexpr (Bits == 8)                                                                 \
      return gemv_rows8<R, P>(x, K, w, scale, offset, group, xsum, y, N, n0, n1);             \
    else                                                                                     \
      return gemv_rows<Bits, R, P>(x, K, w, scale, offset, group, xsum, y, N, n0, n1);
    LOWBIT_CASE(1) LOWBIT_CASE(2) LOWBIT_CASE(3) LOWBIT_CASE(4)
    LOWBIT_CASE(5) LOWBIT_CASE(6) LOWBIT_CASE(7) LOWBIT_CASE(8)
#undef LOWBIT_CASE
    default:
      TORCH_CHECK(false, "gemv_any: M out of range");
  }
}

// Rows n0..n1 of the weight as floats; row n goes to out + (n - row0) * K.
template <int64_t Bits, typename P>
void dequantize_rows(const uint8_t* w, const P* scale, const P* offset, int64_t K,
                     int64_t group, float* out, int64_t row0, int64_t n0, int64_t n1) {
  const int64_t G = K / group, row_bytes = K * Bits / 8;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    float* dst = out + (n - row0) * K;
    for (int64_t g = 0; g < G; ++g) {
      const __m256 s = _mm256_set1_ps(load1(scale + n * G + g));
      const __m256 o = _mm256_set1_ps(offset_at(offset, scale, n * G + g, 1 << (Bits - 1)));
      for (int64_t k0 = g * group; k0 < (g + 1) * group; k0 += 32) {
        __m256 wv[4];
        load_run<Bits>(row, k0, K, wv);
        for (int i = 0; i < 4; ++i) _mm256_storeu_ps(dst + k0 + 8 * i, _mm256_fmadd_ps(wv[i], s, o));
      }
    }
  }
}

// dequantize_rows of a weight as stored (4-bit: blocks of interleaved rows, affine_blocks.h).
template <typename P>
void dequantize_stored(const uint8_t* w, const P* scale, const P* offset, int64_t N, int64_t K,
                       int64_t group, int64_t bits, float* out, int64_t row0, int64_t n0,
                       int64_t n1) {
  if (bits == 8) return dequantize_rows<8, P>(w, scale, offset, K, group, out, row0, n0, n1);
  over_rows(w, scale, offset, N, K, K / group, n0, n1,
            [&](const uint8_t* w2, const P* s2, const P* o2, int64_t first, int64_t lo,
                int64_t hi) {
              dequantize_rows<4, P>(w2, s2, o2, K, group, out, row0 - first, lo, hi);
            });
}

void check(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
           const at::Tensor& offset, int64_t group, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "lowbit::affine_linear: bits must be 4 or 8");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be a float32 matrix");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous(),
              "w must be a contiguous uint8 matrix");
  TORCH_CHECK((scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kHalf) &&
                  offset.scalar_type() == scale.scalar_type() && scale.is_contiguous() &&
                  offset.is_contiguous(),
              "scale and offset must be contiguous, both float32 or both float16");
  const int64_t K = x.size(1);
  TORCH_CHECK(w.size(1) * 8 == K * bits, "weight width does not match x");
  TORCH_CHECK(group > 0 && K % group == 0 && group % 32 == 0,
              "group must divide K and be a multiple of 32");
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == w.size(0) && scale.size(1) == K / group,
              "bad scale shape");
  TORCH_CHECK(offset.numel() == 0 || offset.sizes() == scale.sizes(),
              "bad offset shape (empty for a symmetric grid, else that of scale)");
}

// M (<= 4) rows of x on float inputs against whole blocks b0..b1 of 16 interleaved rows of
// 4-bit codes (affine_blocks.h), 8 rows a pass: per 32 bytes (4 codes of a run's part for each
// of 8 rows), each code shifted out of its lane and converted once, then FMA'd with every row
// of x's broadcast input; A accumulators per row of x so that the FMA latency does not bind.
// y[m * ys + 16 b + i]; the offsets' term uses the float group sums of x (xsum, M x G).
template <int M, typename P>
void gemv_blocks_f32(const float* x, int64_t K, const uint8_t* w, const P* scale,
                     const P* offset, int64_t group, const float* xsum, float* y, int64_t ys,
                     int64_t b0, int64_t b1) {
  constexpr int A = M == 1 ? 4 : (M == 2 ? 2 : 1);
  const int64_t G = K / group, per = group / 32, slab = kBlockRows * K / 2;
  const __m256i nib = _mm256_set1_epi32(0x0F);
  prefetch_start(w + b0 * slab, (b1 - b0) * slab);
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* wb = w + b * slab;
    const P* sb = scale + b * kBlockRows * G;
    const P* ob = offset ? offset + b * kBlockRows * G : nullptr;
    for (int h = 0; h < 2; ++h) {  // weight rows 8h..8h+7
      __m256 acc[M];
      for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
      for (int64_t g = 0; g < G; ++g) {
        __m256 ga[M][A];
        for (int m = 0; m < M; ++m)
          for (int a = 0; a < A; ++a) ga[m][a] = _mm256_setzero_ps();
        for (int64_t r = g * per; r < (g + 1) * per; ++r) {
          const uint8_t* p = wb + 256 * r + 32 * h;
          if (h == 0) prefetch_lines<4>(p);
          for (int j = 0; j < 4; ++j) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * j));
            for (int t = 0; t < 4; ++t) {
              const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 8 * t), nib));
              const __m256 hi = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 8 * t + 4), nib));
              for (int m = 0; m < M; ++m) {
                const float* xm = x + m * K + 32 * r + 8 * j;
                __m256& a = ga[m][t % A];
                a = _mm256_fmadd_ps(lo, _mm256_broadcast_ss(xm + t), a);
                a = _mm256_fmadd_ps(hi, _mm256_broadcast_ss(xm + 4 + t), a);
              }
            }
          }
        }
        const __m256 s = load8(sb + kBlockRows * g + 8 * h);
        const __m256 o = ob ? load8(ob + kBlockRows * g + 8 * h)
                            : _mm256_mul_ps(_mm256_set1_ps(-8.f), s);
        for (int m = 0; m < M; ++m) {
          __m256 sum = ga[m][0];
          for (int a = 1; a < A; ++a) sum = _mm256_add_ps(sum, ga[m][a]);
          acc[m] = _mm256_fmadd_ps(sum, s, acc[m]);
          acc[m] = _mm256_fmadd_ps(o, _mm256_set1_ps(xsum[m * G + g]), acc[m]);
        }
      }
      for (int m = 0; m < M; ++m) _mm256_storeu_ps(y + m * ys + kBlockRows * b + 8 * h, acc[m]);
    }
  }
}

template <typename P>
void gemv_blocks_f32_any(int64_t M, const float* x, int64_t K, const uint8_t* w, const P* scale,
                         const P* offset, int64_t group, const float* xsum, float* y, int64_t ys,
                         int64_t b0, int64_t b1) {
  switch (M) {
#define LOWBIT_CASE(R) \
  case R:              \
    return gemv_blocks_f32<R, P>(x, K, w, scale, offset, group, xsum, y, ys, b0, b1);
    LOWBIT_CASE(1) LOWBIT_CASE(2) LOWBIT_CASE(3) LOWBIT_CASE(4)
#undef LOWBIT_CASE
    default:
      TORCH_CHECK(false, "gemv_blocks_f32: M out of range");
  }
}

template <int64_t Bits, typename P>
at::Tensor gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                const at::Tensor& offset, int64_t group) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), G = K / group;
  auto y = at::empty({M, N}, x.options());
  const at::Tensor xsum = x.view({M, G, group}).sum(-1).contiguous();
  const float* xp = x.data_ptr<float>();
  const float* xs = xsum.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const P* sp = params<P>(scale);
  const P* op = params<P>(offset);
  float* yp = y.data_ptr<float>();
  if constexpr (Bits == 8) {
    lowbit_kernels::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t m0 = 0; m0 < M; m0 += kMaxM)
        gemv_any<8, P>(xp + m0 * K, std::min(kMaxM, M - m0), K, wp, sp, op, group, xs + m0 * G,
                       yp + m0 * N, N, n0, n1);
    });
    return y;
  }
  // 4-bit: split at whole blocks of 16 rows; 4 rows of x a pass over them
  lowbit_kernels::parallel_for(0, (N + kBlockRows - 1) / kBlockRows, 1, [&](int64_t b0, int64_t b1) {
    const int64_t n0 = b0 * kBlockRows, n1 = std::min(N, b1 * kBlockRows);
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int64_t mm = std::min<int64_t>(4, M - m0);
      const float* xm = xp + m0 * K;
      const float* xsm = xs + m0 * G;
      over_blocks(
          wp, sp, op, yp + m0 * N, mm, N, K, G, n0, n1,
          [&](const uint8_t* w2, const P* s2, const P* o2, float* y2, int64_t ys, int64_t c0,
              int64_t c1) { gemv_blocks_f32_any<P>(mm, xm, K, w2, s2, o2, group, xsm, y2, ys, c0, c1); },
          [&](const uint8_t* w2, const P* s2, const P* o2, float* y2, int64_t lo, int64_t hi) {
            gemv_any<4, P>(xm, mm, K, w2, s2, o2, group, xsm, y2, N, lo, hi);
          });
    }
  });
  return y;
}

}  // namespace

namespace {

template <typename P>
void dequantize_into(const at::Tensor& w, const at::Tensor& scale, const at::Tensor& offset,
                     int64_t group, int64_t bits, at::Tensor& out) {
  const int64_t N = w.size(0), K = w.size(1) * 8 / bits;
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const P* sp = params<P>(scale);
  const P* op = params<P>(offset);
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, (N + kBlockRows - 1) / kBlockRows, 1, [&](int64_t b0, int64_t b1) {
    dequantize_stored<P>(wp, sp, op, N, K, group, bits, dst, 0, b0 * kBlockRows,
                         std::min(N, b1 * kBlockRows));
  });
}

// Prefill: the weight dequantized tile by tile into torch's GEMM (tiled_gemm, common.h).
template <typename P>
at::Tensor gemm_tiled(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                      const at::Tensor& offset, int64_t group, int64_t bits) {
  const int64_t K = x.size(1);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const P* sp = params<P>(scale);
  const P* op = params<P>(offset);
  const int64_t N = w.size(0);
  return tiled_gemm(x, N, [&](float* out, int64_t row0, int64_t n0, int64_t n1) {
    dequantize_stored<P>(wp, sp, op, N, K, group, bits, out, row0, n0, n1);
  });
}

}  // namespace

void lowbit_kernels::check_affine(const at::Tensor& x, const at::Tensor& w,
                                  const at::Tensor& scale, const at::Tensor& offset,
                                  int64_t group, int64_t bits) {
  check(x, w, scale, offset, group, bits);
}

template <typename P>
at::Tensor affine_linear_as(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                            const at::Tensor& offset, int64_t group, int64_t bits, bool act8) {
  const bool big = x.size(0) > kGemvMaxM;
  if (act8) return big ? gemm_q8<P>(x, w, scale, offset, group, bits)
                      : gemv_q8<P>(x, w, scale, offset, group, bits);
  if (big) return gemm_tiled<P>(x, w, scale, offset, group, bits);
  return bits == 4 ? gemv<4, P>(x, w, scale, offset, group) : gemv<8, P>(x, w, scale, offset, group);
}

at::Tensor affine_dequantize(const at::Tensor& w, const at::Tensor& scale, const at::Tensor& offset,
                             int64_t group, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "lowbit::affine_dequantize: bits must be 4 or 8");
  const int64_t N = w.size(0), K = w.size(1) * 8 / bits;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  check(at::empty({1, K}, f32), w, scale, offset, group, bits);
  auto out = at::empty({N, K}, f32);
  if (scale.scalar_type() == at::kHalf)
    dequantize_into<uint16_t>(w, scale, offset, group, bits, out);
  else
    dequantize_into<float>(w, scale, offset, group, bits, out);
  return out;
}

// A transposed convolution's column matrix (lowbit.nn.kernel_conv) back in its layer's
// weight layout, (in, out, kh, kw) contiguous: code rows b * taps + t hold tap t of output
// channel b, so out[k, b * taps + t] = W[b * taps + t, k] for k < in_features (the run padding
// dropped), the codes' matrix transposed. Each block of taps rows is dequantized into a
// per-thread buffer (taps x K floats, in cache) and written out transposed: one pass over the
// codes and the output, where dequantizing and then transposing in torch wrote and read the
// float weight twice. (An (out, in, kh, kw) tensor viewed as (in, out, kh, kw) made torch's
// transposed convolution take 11.0 ms instead of 6.4 on a 512->256 layer at 4x4, batch 16.)
template <typename P>
void columns_into(const at::Tensor& w, const at::Tensor& scale, const at::Tensor& offset,
                  int64_t group, int64_t bits, int64_t taps, at::Tensor& out) {
  const int64_t N = w.size(0), K = w.size(1) * 8 / bits, in_features = out.size(0);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const P* sp = params<P>(scale);
  const P* op = params<P>(offset);
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, N / taps, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(taps * K);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * taps;
      dequantize_stored<P>(wp, sp, op, N, K, group, bits, buf.data(), r0, r0, r0 + taps);
      for (int64_t k = 0; k < in_features; ++k)  // input k's row: this block's taps rows
        for (int64_t t = 0; t < taps; ++t) dst[k * N + r0 + t] = buf[t * K + k];
    }
  });
}

at::Tensor affine_dequantize_columns(const at::Tensor& w, const at::Tensor& scale,
                                     const at::Tensor& offset, int64_t group, int64_t bits,
                                     int64_t taps, int64_t in_features) {
  TORCH_CHECK(bits == 4 || bits == 8, "lowbit::affine_dequantize_columns: bits must be 4 or 8");
  const int64_t N = w.size(0), K = w.size(1) * 8 / bits;
  TORCH_CHECK(taps >= 1 && N % taps == 0 && in_features >= 1 && in_features <= K,
              "lowbit::affine_dequantize_columns: taps must divide the rows and in_features "
              "be at most the row's codes");
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  check(at::empty({1, K}, f32), w, scale, offset, group, bits);
  auto out = at::empty({in_features, N}, f32);
  if (scale.scalar_type() == at::kHalf)
    columns_into<uint16_t>(w, scale, offset, group, bits, taps, out);
  else
    columns_into<float>(w, scale, offset, group, bits, taps, out);
  return out;
}

at::Tensor lowbit_kernels::affine_linear(const at::Tensor& x_in, const at::Tensor& w,
                                         const at::Tensor& scale, const at::Tensor& offset,
                                         int64_t group, int64_t bits, bool act8) {
  const at::Tensor x = x_in.contiguous();
  check(x, w, scale, offset, group, bits);
  return scale.scalar_type() == at::kHalf
             ? affine_linear_as<uint16_t>(x, w, scale, offset, group, bits, act8)
             : affine_linear_as<float>(x, w, scale, offset, group, bits, act8);
}

std::string kernel_isa() {
  return use_avx512() ? "avx512-vnni" : use_avxvnni() ? "avx2+avx-vnni" : "avx2";
}

// Who runs the decode-sized kernels' threads: lowbit's spinning pool, or OpenMP where its own
// threads never sleep (pool.h, openmp_spins).
std::string decode_threads() { return lowbit_kernels::openmp_spins() ? "openmp" : "spin pool"; }

// Sets the pool's thread count for this thread's calls apart from torch's (0: follow torch's);
// returns the previous.
int64_t set_kernel_threads(int64_t threads) {
  TORCH_CHECK(threads >= 0, "lowbit::set_kernel_threads: a count of at least 0");
  int& held = lowbit_kernels::kernel_threads();  // (this thread's)
  const int64_t before = held;
  held = static_cast<int>(threads);
  return before;
}

TORCH_LIBRARY(lowbit_cpu, m) {
  m.def("kernel_isa() -> str", &kernel_isa);
  m.def("decode_threads() -> str", &decode_threads);
  m.def("set_kernel_threads(int threads) -> int", &set_kernel_threads);
  m.def(
      "affine_linear(Tensor x, Tensor w, Tensor scale, Tensor offset, int group, int bits, "
      "bool act8) -> Tensor");
  m.def("affine_dequantize(Tensor w, Tensor scale, Tensor offset, int group, int bits) -> Tensor");
  m.def(
      "affine_dequantize_columns(Tensor w, Tensor scale, Tensor offset, int group, int bits, "
      "int taps, int in_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit_cpu, CPU, m) {
  m.impl("affine_linear", &lowbit_kernels::affine_linear);
  m.impl("affine_dequantize", &affine_dequantize);
  m.impl("affine_dequantize_columns", &affine_dequantize_columns);
}
