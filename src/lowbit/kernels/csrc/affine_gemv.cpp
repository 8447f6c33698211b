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
//   bits 4: per row, chunks of 64 codes in 32 bytes: byte j of a chunk holds code 64c + j in its
//           low nibble and code 64c + 32 + j in its high nibble. When K is not a multiple of 64
//           the row ends with one chunk of 32 codes in 16 bytes (byte j: codes j and 16 + j).
//           One 32-byte load thus holds two whole runs of 32 in k order, one per nibble, which
//           the AVX-512 kernel multiplies without shuffling (see gemv_rows_q8_512).
//   bits 8: per row, K bytes, one code each.
//
// Small batches (decode) run fused kernels, up to 8 rows of x per pass over the weights:
//   - 4-bit with act8 (the default): each row of x is first quantized to int8 per block of 32
//     inputs (scale = absmax / 127, as llama.cpp quantizes activations), and the 4-bit codes meet
//     the int8 inputs in integer multiply-adds (vpmaddubsw: u4 x s8 pairs cannot saturate);
//     the result is corrected to that of the centred codes u - 8 (see gemv_q8).
//     Converting every code to float is what bounds the float kernel; this path avoids it. The
//     offset term uses the exact float block sums of x.
//   - otherwise (8-bit codes, or act8 off) codes are converted to float and FMA'd with x.
// Larger batches (prefill) dequantize the weight tile by tile into a small per-thread float
// buffer that stays in cache and call torch's GEMM on each tile, which is compute-bound there
// and beats anything written here.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

constexpr int64_t kMaxM = 8;      // rows of x handled per weight pass
// The act8 path has one activation scale per run of 32 inputs: blocks of 64 were no faster
// from DRAM and doubled the error.
constexpr int64_t kPrefetch = 8192;  // bytes ahead in the weight stream (one core alone does not
                                     // keep enough DRAM reads in flight without it)
constexpr int64_t kGemvMaxM = 32;  // above this, dequantize + GEMM (GEMV_MAX_ROWS in affine.py)

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  const __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 shuf = _mm_movehdup_ps(lo);
  __m128 sums = _mm_add_ps(lo, shuf);
  shuf = _mm_movehl_ps(shuf, sums);
  sums = _mm_add_ss(sums, shuf);
  return _mm_cvtss_f32(sums);
}

inline __m256 u8x8_to_ps(__m128i bytes) {  // low 8 bytes -> 8 floats
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
}

// Per-group scales and offsets are float32, or float16 where that holds them exactly (lowbit's
// saved grids usually are float16): 2 bytes instead of 4 per parameter is a ninth less to read
// per weight of a 4-bit layer with groups of 64. P is float or uint16_t (float16 bits).
inline float load1(const float* p) { return *p; }
inline float load1(const uint16_t* p) { return _cvtsh_ss(*p); }
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Symmetric grids store no offsets (offset = -mid * scale, mid = 2^(bits-1)): a null offset
// pointer says so, and saves another 2 bytes per group to read.
template <typename P>
inline float offset_at(const P* offset, const P* scale, int64_t i, float mid) {
  return offset ? load1(offset + i) : -mid * load1(scale + i);
}

// 16 bytes -> the 32 codes of a half chunk (low nibbles, then high nibbles): a row's last
// chunk of 32 codes when K is not a multiple of 64.
inline __m256i codes_u4(const uint8_t* wb) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wb));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), _mm256_set1_epi8(0x0F));
}

// The 32 4-bit codes of the run starting at k0 (a multiple of 32) of a row of K, as 32 bytes
// 0..15 in k order.
inline __m256i run_codes(const uint8_t* row, int64_t k0, int64_t K) {
  if ((K & 63) && k0 + 32 == K) return codes_u4(row + k0 / 2);
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + (k0 >> 6) * 32));
  const __m256i nib = _mm256_set1_epi8(0x0F);
  return (k0 & 32) ? _mm256_and_si256(_mm256_srli_epi16(b, 4), nib) : _mm256_and_si256(b, nib);
}

// The 32 codes of one run as four vectors of 8 floats, in k order.
template <int64_t Bits>
inline void load_run(const uint8_t* row, int64_t k0, int64_t K, __m256 w[4]) {
  if constexpr (Bits == 4) {
    const __m256i c = run_codes(row, k0, K);
    const __m128i lo = _mm256_castsi256_si128(c), hi = _mm256_extracti128_si256(c, 1);
    w[0] = u8x8_to_ps(lo);
    w[1] = u8x8_to_ps(_mm_srli_si128(lo, 8));
    w[2] = u8x8_to_ps(hi);
    w[3] = u8x8_to_ps(_mm_srli_si128(hi, 8));
  } else {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k0));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k0 + 16));
    w[0] = u8x8_to_ps(a);
    w[1] = u8x8_to_ps(_mm_srli_si128(a, 8));
    w[2] = u8x8_to_ps(b);
    w[3] = u8x8_to_ps(_mm_srli_si128(b, 8));
  }
}

// y[m, n0:n1] for M (compile-time, <= kMaxM) rows of x (row stride K, output stride N). With
// few rows, each row keeps A independent accumulators so the FMA latency chain does not bind.
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

template <int64_t Bits, typename P>
void gemv_any(const float* x, int64_t M, int64_t K, const uint8_t* w, const P* scale,
              const P* offset, int64_t group, const float* xsum, float* y, int64_t N,
              int64_t n0, int64_t n1) {
  switch (M) {
#define LOWBIT_CASE(R) \
  case R:              \
    return gemv_rows<Bits, R, P>(x, K, w, scale, offset, group, xsum, y, N, n0, n1);
    LOWBIT_CASE(1) LOWBIT_CASE(2) LOWBIT_CASE(3) LOWBIT_CASE(4)
    LOWBIT_CASE(5) LOWBIT_CASE(6) LOWBIT_CASE(7) LOWBIT_CASE(8)
#undef LOWBIT_CASE
    default:
      TORCH_CHECK(false, "gemv_any: M out of range");
  }
}

// x (M, K) -> int8 codes (M, K) and one scale per 32 inputs (M, K/32):
// q = round(x * 127/absmax), half to even; scale = absmax / 127.
// Also the block sums of x (xsum) and of q (qsum), for the offset correction of gemv_q8.
void quantize_rows_q8(const float* x, int64_t M, int64_t K, int8_t* q, float* qs, float* xsum,
                      float* qsum) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t i = 0; i < M * K / 32; ++i) {
    const float* src = x + 32 * i;
    __m256 amax = _mm256_setzero_ps(), fs = _mm256_setzero_ps(), qsv = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      const __m256 v = _mm256_loadu_ps(src + 8 * j);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v));
      fs = _mm256_add_ps(fs, v);
    }
    xsum[i] = hsum(fs);
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float a = _mm_cvtss_f32(m4);
    qs[i] = a / 127.f;
    const __m256 inv = _mm256_set1_ps(a > 0.f ? 127.f / a : 0.f);
    __m256i n[4];
    for (int j = 0; j < 4; ++j) {
      n[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(src + 8 * j), inv));  // to even
      qsv = _mm256_add_ps(qsv, _mm256_cvtepi32_ps(n[j]));
    }
    const __m256i b =
        _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]), _mm256_packs_epi32(n[2], n[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 32 * i),
                        _mm256_permutevar8x32_epi32(b, order));
    qsum[i] = hsum(qsv);
  }
}

// sum_g o_g X_g + s_g XC_g over a row's G groups (see gemv_q8), 8 groups at a time; with no
// stored offsets (symmetric, o_g = -8 s_g) that is sum_g s_g (XC_g - 8 X_g).
template <typename P>
inline float offset_term(const P* of, const P* sc, const float* xg, const float* xc, int64_t G) {
  __m256 t = _mm256_setzero_ps();
  const __m256 mid = _mm256_set1_ps(8.f);
  int64_t g = 0;
  for (; g + 8 <= G; g += 8) {
    const __m256 x = _mm256_loadu_ps(xg + g), c = _mm256_loadu_ps(xc + g);
    if (of) {
      t = _mm256_fmadd_ps(load8(of + g), x, t);
      t = _mm256_fmadd_ps(load8(sc + g), c, t);
    } else {
      t = _mm256_fmadd_ps(load8(sc + g), _mm256_fnmadd_ps(mid, x, c), t);
    }
  }
  float tail = 0.f;
  for (; g < G; ++g) tail += offset_at(of, sc, g, 8.f) * xg[g] + load1(sc + g) * xc[g];
  return hsum(t) + tail;
}

// The group of each run of 32 codes, in order along a row, without a division per run.
struct GroupWalk {
  explicit GroupWalk(int64_t runs_per_group) : runs(runs_per_group), left(runs_per_group) {}
  int64_t next() {
    const int64_t current = g;
    if (--left == 0) left = runs, ++g;
    return current;
  }
  const int64_t runs;
  int64_t left, g = 0;
};

// The 4-bit kernel on int8 inputs: y[m, n0:n1] for M (<= kMaxM) rows. Per run of 32: the
// integer dot u . q (vpmaddubsw pairs cannot saturate: 2 * 15 * 127 < 2^15) is converted once
// and accumulated with weight (scale_g * s_x). The codes stay unsigned (0..15); the row's
// epilogue makes the result that of the centred codes u - 8 (see gemv_q8). One accumulator
// per row: out-of-order execution overlaps consecutive rows.
template <int M, typename P>
void gemv_rows_q8(const int8_t* xq, const float* xqs, int64_t K, const uint8_t* w,
                  const P* scale, const P* offset, int64_t group, const float* xg,
                  const float* xc, float* y, int64_t N, int64_t n0, int64_t n1) {
  const int64_t G = K / group, R = K / 32;
  const __m256i ones = _mm256_set1_epi16(1), nib = _mm256_set1_epi8(0x0F);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wb = w + n * (K / 2);
    const P* sc = scale + n * G;
    __m256 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    GroupWalk walk(group / 32);
    const auto run = [&](__m256i codes, int64_t r) {
      const float s = load1(sc + walk.next());
      for (int m = 0; m < M; ++m) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + 32 * r));
        const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(codes, xv), ones));
        acc[m] = _mm256_fmadd_ps(dot, _mm256_set1_ps(s * xqs[m * R + r]), acc[m]);
      }
    };
    int64_t r = 0;
    for (; r + 2 <= R; r += 2, wb += 32) {  // one chunk: runs r (low nibbles) and r + 1 (high)
      _mm_prefetch(reinterpret_cast<const char*>(wb + kPrefetch), _MM_HINT_T1);
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb));
      run(_mm256_and_si256(b, nib), r);
      run(_mm256_and_si256(_mm256_srli_epi16(b, 4), nib), r + 1);
    }
    if (r < R) run(codes_u4(wb), r);
    for (int m = 0; m < M; ++m)
      y[m * N + n] = hsum(acc[m]) + offset_term(offset ? offset + n * G : nullptr, sc, xg + m * G, xc + m * G, G);
  }
}

// The same 4-bit x int8 kernel with AVX-512 VNNI, where the CPU has it: a whole chunk (64
// codes, two runs) per vpdpbusd. The chunk's 32 bytes are broadcast to both halves of a
// register and masked with 0x0F (low half: run 2c) and 0xF0 (high half: run 2c + 1, as 16 times
// its codes; 4 * 240 * 127 fits int32 easily), so no shuffle is needed; the 1/16 is folded into
// the input scales, which gemv_q8 lays out per chunk as [s_2c x8 | s_2c+1 / 16 x8] (xs2). Per
// chunk and row of x that is and, vpdpbusd, convert, multiply, FMA: the AVX2 kernel issues about
// twice as many instructions, and on this work two cores are bound by instructions, not memory.
// Uniform: groups are a power of two of whole chunks, so one scale serves the chunk and its
// group is c >> shift (the general walk costs four branches per chunk).
#define LOWBIT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma,f16c")))

// One chunk c of a weight row against M rows of x, into the accumulators a.
template <int M, bool Uniform, typename P>
LOWBIT_AVX512 inline void chunk_512(const uint8_t* wb, const P* sc, int64_t g0, int64_t g1,
                                    const __m512i mask, const int8_t* xq, const float* xs2,
                                    int64_t K, int64_t C, int64_t c, __m512* a) {
  const __m512 s = Uniform ? _mm512_set1_ps(load1(sc + g0))
                           : _mm512_mask_broadcastss_ps(_mm512_set1_ps(load1(sc + g0)), 0xFF00,
                                                        _mm_set_ss(load1(sc + g1)));
  const __m512i codes = _mm512_and_si512(
      _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 32 * c))),
      mask);
  for (int m = 0; m < M; ++m) {
    const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes,
                                            _mm512_loadu_si512(xq + m * K + 64 * c));
    const __m512 xs = _mm512_load_ps(xs2 + (m * C + c) * 16);
    a[m] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), xs), s, a[m]);
  }
}

template <int M, bool Uniform, typename P>
LOWBIT_AVX512 void gemv_rows_q8_512(const int8_t* xq, const float* xqs, const float* xs2,
                                    int64_t K, const uint8_t* w, const P* scale, const P* offset, int64_t group, const float* xg,
                                    const float* xc, float* y, int64_t N, int64_t n0, int64_t n1) {
  const int64_t G = K / group, R = K / 32, C = K / 64;
  const int shift = Uniform ? __builtin_ctzll(group / 64) : 0;
  const __m512i mask =
      _mm512_inserti64x4(_mm512_set1_epi8(0x0F), _mm256_set1_epi8(static_cast<char>(0xF0)), 1);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wb = w + n * (K / 2);
    const P* sc = scale + n * G;
    __m512 acc[2][M];  // two chains per row of x, so FMA latency does not bind
    for (int m = 0; m < M; ++m) acc[0][m] = acc[1][m] = _mm512_setzero_ps();
    GroupWalk walk(group / 32);
    const auto groups = [&](int64_t c, int64_t& g0, int64_t& g1) {
      if constexpr (Uniform) {
        g0 = g1 = c >> shift;
      } else {
        g0 = walk.next(), g1 = walk.next();
      }
    };
    int64_t c = 0, g0, g1;
    for (; c + 2 <= C; c += 2) {
      _mm_prefetch(reinterpret_cast<const char*>(wb + 32 * c + kPrefetch), _MM_HINT_T1);
      groups(c, g0, g1);
      chunk_512<M, Uniform, P>(wb, sc, g0, g1, mask, xq, xs2, K, C, c, acc[0]);
      groups(c + 1, g0, g1);
      chunk_512<M, Uniform, P>(wb, sc, g0, g1, mask, xq, xs2, K, C, c + 1, acc[1]);
    }
    if (c < C) {
      groups(c, g0, g1);
      chunk_512<M, Uniform, P>(wb, sc, g0, g1, mask, xq, xs2, K, C, c, acc[0]);
    }
    float tail[M];
    for (int m = 0; m < M; ++m) tail[m] = 0.f;
    if (R & 1) {  // the row's last run, a half chunk: one 256-bit step
      const int64_t r = R - 1;
      const float s = load1(sc + r * 32 / group);
      const __m256i codes = codes_u4(wb + 32 * C);
      for (int m = 0; m < M; ++m) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + 32 * r));
        const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(codes, xv), _mm256_set1_epi16(1));
        tail[m] = s * xqs[m * R + r] * hsum(_mm256_cvtepi32_ps(dot));
      }
    }
    for (int m = 0; m < M; ++m)
      y[m * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][m], acc[1][m])) + tail[m] +
                     offset_term(offset ? offset + n * G : nullptr, sc, xg + m * G, xc + m * G, G);
  }
}

// Whether to use the AVX-512 VNNI kernel: the CPU has it and LOWBIT_KERNEL_ISA is not "avx2".
bool use_avx512() {
  static const bool cpu = __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vnni");
  const char* isa = std::getenv("LOWBIT_KERNEL_ISA");
  return cpu && !(isa && std::string(isa) == "avx2");
}

// xs2: the AVX-512 kernel's per-chunk input scales (see gemv_rows_q8_512); null for AVX2.
template <typename P>
void gemv_any_q8(const int8_t* xq, const float* xqs, const float* xs2, int64_t M, int64_t K,
                 const uint8_t* w, const P* scale, const P* offset, int64_t group,
                 const float* xg, const float* xc, float* y, int64_t N, int64_t n0, int64_t n1) {
  const bool uniform = group % 64 == 0 && ((group / 64) & (group / 64 - 1)) == 0;
  switch (M) {
#define LOWBIT_CASE(R)                                                                          \
  case R:                                                                                       \
    if (!xs2)                                                                                   \
      return gemv_rows_q8<R, P>(xq, xqs, K, w, scale, offset, group, xg, xc, y, N, n0, n1);        \
    if (uniform)                                                                                \
      return gemv_rows_q8_512<R, true, P>(xq, xqs, xs2, K, w, scale, offset, group, xg, xc, y, N,  \
                                       n0, n1);                                                 \
    return gemv_rows_q8_512<R, false, P>(xq, xqs, xs2, K, w, scale, offset, group, xg, xc, y, N,   \
                                      n0, n1);
    LOWBIT_CASE(1) LOWBIT_CASE(2) LOWBIT_CASE(3) LOWBIT_CASE(4)
    LOWBIT_CASE(5) LOWBIT_CASE(6) LOWBIT_CASE(7) LOWBIT_CASE(8)
#undef LOWBIT_CASE
    default:
      TORCH_CHECK(false, "gemv_any_q8: M out of range");
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

// The parameters of a kernel-layout weight as P (float, or uint16_t for float16).
template <typename P>
const P* params(const at::Tensor& t) {
  return t.numel() ? reinterpret_cast<const P*>(t.data_ptr()) : nullptr;
}

template <typename P>
at::Tensor gemv_q8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                   const at::Tensor& offset, int64_t group) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), G = K / group;
  const int64_t RB = K / 32;  // activation blocks
  auto y = at::empty({M, N}, x.options());
  std::vector<int8_t> xq(M * K);
  std::vector<float> xqs(M * RB), bx(M * RB), bq(M * RB);
  quantize_rows_q8(x.data_ptr<float>(), M, K, xq.data(), xqs.data(), bx.data(), bq.data());
  // The integer loop computes sum_g s_g sum_b s_x,b (u . q_b). Written with centred codes,
  //   y = sum_g s_g sum_b s_x,b ((u - 8) . q_b) + (o_g + 8 s_g) X_g      (X_g: float sum of x)
  //     = integer part + sum_g o_g X_g + s_g * 8 (X_g - C_g),  C_g = sum_{b in g} s_x,b sum(q_b).
  // Centring matters: with codes 0..15 the rounding error of x is multiplied by codes averaging
  // 7.5 instead of about 3, which made the act8 error ~2.5x larger.
  std::vector<float> xg(M * G, 0.f), xc(M * G, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < RB; ++b) {
      const int64_t i = m * RB + b, g = m * G + (32 * b) / group;
      xg[g] += bx[i];
      xc[g] += 8.f * (bx[i] - xqs[i] * bq[i]);
    }
  // The AVX-512 kernel's input scales per chunk of 64: [s_2c x8 | s_2c+1 / 16 x8] (a power of
  // two, so exact). 64-byte aligned: one aligned load per chunk.
  const int64_t C = K / 64;
  const bool wide = use_avx512() && C > 0;
  std::vector<float> xs2_store;
  float* xs2 = nullptr;
  if (wide) {
    xs2_store.resize(M * C * 16 + 16);
    xs2 = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(xs2_store.data()) + 63) & ~uintptr_t{63});
    for (int64_t m = 0; m < M; ++m)
      for (int64_t c = 0; c < C; ++c) {
        float* v = xs2 + (m * C + c) * 16;
        for (int j = 0; j < 8; ++j) v[j] = xqs[m * RB + 2 * c], v[8 + j] = xqs[m * RB + 2 * c + 1] / 16.f;
      }
  }
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const P* sp = params<P>(scale);
  const P* op = params<P>(offset);
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += kMaxM) {
      const int64_t mm = std::min(kMaxM, M - m0);
      gemv_any_q8(xq.data() + m0 * K, xqs.data() + m0 * RB, wide ? xs2 + m0 * C * 16 : nullptr,
                  mm, K, wp, sp, op, group, xg.data() + m0 * G, xc.data() + m0 * G, yp + m0 * N,
                  N, n0, n1);
    }
  });
  return y;
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
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += kMaxM) {
      const int64_t mm = std::min(kMaxM, M - m0);
      gemv_any<Bits, P>(xp + m0 * K, mm, K, wp, sp, op, group, xs + m0 * G, yp + m0 * N, N, n0, n1);
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
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    if (bits == 4)
      dequantize_rows<4, P>(wp, sp, op, K, group, dst, 0, n0, n1);
    else
      dequantize_rows<8, P>(wp, sp, op, K, group, dst, 0, n0, n1);
  });
}

// A float buffer per calling thread, grown to the largest tile seen and then reused.
at::Tensor scratch(int64_t N, int64_t K) {
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < N * K) buffer.resize(N * K);
  return at::from_blob(buffer.data(), {N, K}, at::TensorOptions().dtype(at::kFloat));
}

// Prefill: y^T tile by tile. Each tile of weight rows (about 8 MB of floats, so it stays in
// cache) is dequantized and multiplied by torch's GEMM; dequantizing the whole weight first
// wrote and re-read it through DRAM and made prefill slower than float32.
template <typename P>
at::Tensor gemm_tiled(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                      const at::Tensor& offset, int64_t group, int64_t bits) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const int64_t T = std::max<int64_t>(16, ((int64_t{1} << 21) / K) / 16 * 16);
  auto yt = at::empty({N, M}, x.options());
  const at::Tensor xt = x.t();
  at::Tensor tile = scratch(std::min(T, N), K);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const P* sp = params<P>(scale);
  const P* op = params<P>(offset);
  float* dst = tile.data_ptr<float>();
  for (int64_t t0 = 0; t0 < N; t0 += T) {
    const int64_t rows = std::min(T, N - t0);
    at::parallel_for(0, rows, 8, [&](int64_t a, int64_t b) {
      if (bits == 4)
        dequantize_rows<4, P>(wp, sp, op, K, group, dst, t0, t0 + a, t0 + b);
      else
        dequantize_rows<8, P>(wp, sp, op, K, group, dst, t0, t0 + a, t0 + b);
    });
    at::Tensor out = yt.narrow(0, t0, rows);
    at::mm_out(out, tile.narrow(0, 0, rows), xt);
  }
  return yt.t().contiguous();
}

}  // namespace

template <typename P>
at::Tensor affine_linear_as(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                            const at::Tensor& offset, int64_t group, int64_t bits, bool act8) {
  if (x.size(0) > kGemvMaxM) return gemm_tiled<P>(x, w, scale, offset, group, bits);
  if (bits == 4)
    return act8 ? gemv_q8<P>(x, w, scale, offset, group) : gemv<4, P>(x, w, scale, offset, group);
  return gemv<8, P>(x, w, scale, offset, group);
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

at::Tensor affine_linear(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& scale,
                         const at::Tensor& offset, int64_t group, int64_t bits, bool act8) {
  const at::Tensor x = x_in.contiguous();
  check(x, w, scale, offset, group, bits);
  return scale.scalar_type() == at::kHalf
             ? affine_linear_as<uint16_t>(x, w, scale, offset, group, bits, act8)
             : affine_linear_as<float>(x, w, scale, offset, group, bits, act8);
}

std::string kernel_isa() { return use_avx512() ? "avx512-vnni" : "avx2"; }

TORCH_LIBRARY(lowbit_cpu, m) {
  m.def("kernel_isa() -> str", &kernel_isa);
  m.def(
      "affine_linear(Tensor x, Tensor w, Tensor scale, Tensor offset, int group, int bits, "
      "bool act8) -> Tensor");
  m.def("affine_dequantize(Tensor w, Tensor scale, Tensor offset, int group, int bits) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit_cpu, CPU, m) {
  m.impl("affine_linear", &affine_linear);
  m.impl("affine_dequantize", &affine_dequantize);
}
