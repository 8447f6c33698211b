// Helpers shared by lowbit's CPU kernels: affine_gemv.cpp (the affine op, float inputs,
// dequantize, prefill), affine_q8.cpp (4-bit codes x int8 inputs, the decode path),
// affine_q8_gemm.cpp (the same for prompts) and float_gemv.cpp (float weights). The affine
// weight layout is described at the top of affine_gemv.cpp.
#pragma once

#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "pool.h"

namespace lowbit_kernels {

constexpr int64_t kMaxM = 8;      // rows of x handled per weight pass
// The act8 path has one activation scale per run of 32 inputs: blocks of 64 were no faster
// from DRAM and doubled the error.
constexpr int64_t kPrefetch = 8192;  // bytes ahead in the weight stream (one core alone does not
                                     // keep enough DRAM reads in flight without it)
constexpr int64_t kGemvMaxM = 32;  // above this, a GEMM (GEMV_MAX_ROWS in affine.py)

// Functions that use AVX-512 VNNI in a library built for AVX2 (called only where use_avx512()).
#define LOWBIT_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
// ...and AVX-VNNI, the 256-bit vpdpbusd of CPUs without AVX-512 (called only where the CPU has
// it). Compilers before GCC 11 / Clang 12 do not know it: the library is then built without
// those kernels (use_avxvnni() is false) and such CPUs run the AVX2 ones.
#ifndef LOWBIT_HAS_AVXVNNI  // -DLOWBIT_HAS_AVXVNNI=0 builds without them on any compiler
#if defined(__has_include)
#if __has_include(<avxvnniintrin.h>)
#define LOWBIT_HAS_AVXVNNI 1
#endif
#endif
#endif
#ifndef LOWBIT_HAS_AVXVNNI
#define LOWBIT_HAS_AVXVNNI 0
#endif
#if LOWBIT_HAS_AVXVNNI
#define LOWBIT_AVXVNNI __attribute__((target("avxvnni,avx2,fma,f16c")))
#endif

// Arithmetic that must round as torch's elementwise reference does: each product rounded on its
// own, no fused multiply-add (GCC contracts a*b + c*d across a statement at -O3 -mfma).
#if defined(__GNUC__) && !defined(__clang__)
#define LOWBIT_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else  // (clang contracts within one expression only: the product is a statement of its own)
#define LOWBIT_NO_CONTRACT
#endif

// The prefetch helpers are always inlined: a function whose only work is prefetches has no
// side effects in GCC's eyes, and GCC 12 at -O3 found prefetch_rest "const" and deleted every
// call to it before inlining (no prefetch of a row's last bytes in any kernel: a 4-bit
// 960x576 GEMV read 9.1 GB/s from memory on one Zen 4 core, 13-15 with them).
#define LOWBIT_PREFETCH __attribute__((always_inline)) inline

// Prefetches every cache line of the `bytes` at p. Rows of 4-bit codes are rarely a whole
// number of lines (K = 576: 288 bytes), so one prefetch per 64 bytes read would leave about one
// line in nine to a demand miss: a row's last bytes take this, its whole lines prefetch_lines.
LOWBIT_PREFETCH void prefetch_row(const uint8_t* p, int64_t bytes) {
  for (int64_t l = 0; l < bytes; l += 64) _mm_prefetch(reinterpret_cast<const char*>(p + l), _MM_HINT_T1);
  _mm_prefetch(reinterpret_cast<const char*>(p + bytes - 1), _MM_HINT_T1);
}

// The 4-bit GEMVs prefetch kPrefetch ahead of what they read, Lines lines (64 bytes each) at a
// time, spread through the row as the other kernels here do. A whole row at the row's start
// (16 prefetches at once for K = 2048) kept fewer reads in flight: a 5632x2048 GEMV on 2 Xeon
// cores read 18.3-19.5 GB/s so and 21.6-21.9 spread, where torch's float32 sum read 23-24.
template <int Lines>
LOWBIT_PREFETCH void prefetch_lines(const uint8_t* p) {
  for (int l = 0; l < Lines; ++l)
    _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetch + 64 * l), _MM_HINT_T1);
}

// The first kPrefetch bytes (at most `bytes`) of a stream at p, which the kernels' prefetches
// kPrefetch ahead never ask for: the start of each thread's share of a decode call.
LOWBIT_PREFETCH void prefetch_start(const uint8_t* p, int64_t bytes) {
  const int64_t n = bytes < kPrefetch ? bytes : kPrefetch;
  for (int64_t l = 0; l < n; l += 64) _mm_prefetch(reinterpret_cast<const char*>(p + l), _MM_HINT_T1);
}

// The rest of a row from p on (bytes < a loop step, may be 0), kPrefetch ahead.
LOWBIT_PREFETCH void prefetch_rest(const uint8_t* p, int64_t bytes) {
  if (bytes > 0) prefetch_row(p + kPrefetch, bytes);
}

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

// The integer dot of 32 codes 0..15 (codes_u4) with 32 int8 inputs: the act8 kernels' last
// run of a row when K is not a multiple of 64.
inline float half_chunk_dot(__m256i codes, const int8_t* x) {
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(codes, xv), _mm256_set1_epi16(1));
  return hsum(_mm256_cvtepi32_ps(dot));
}

// Signed bytes c times int8 inputs q (|q| <= 127), 4 products summed per int32 lane, as
// llama.cpp's q8_0 dot on AVX2: |c| (as u8, 128 included) times q with the sign of c, so each
// vpmaddubsw pair is at most 2 * 128 * 127 < 2^15 whatever c is.
inline __m256i signed_products(__m256i c, __m256i q) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(c), _mm256_sign_epi8(q, c)),
                           _mm256_set1_epi16(1));
}
// The same for 8-bit codes u (0..255, centred on 128): sum (u - 128) q per lane.
inline __m256i centred_u8_products(__m256i codes, __m256i x) {
  return signed_products(_mm256_xor_si256(codes, _mm256_set1_epi8(static_cast<char>(0x80))), x);
}
inline float half_chunk_dot8(const uint8_t* codes, const int8_t* x) {
  const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes));
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return hsum(_mm256_cvtepi32_ps(centred_u8_products(c, xv)));
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

// The parameters of a kernel-layout weight as P (float, or uint16_t for float16).
template <typename P>
const P* params(const at::Tensor& t) {
  return t.numel() ? reinterpret_cast<const P*>(t.data_ptr()) : nullptr;
}

// Prefill: y = x · Wᵀ tile by tile. fill(out, row0, n0, n1) writes the float rows n0..n1 of
// the weight to out + (n - row0) * K; each tile of rows (about 8 MB of floats, so it stays in
// cache) is filled in parallel into the calling thread's buffer and multiplied by torch's GEMM.
// Filling the whole weight first wrote and re-read it through DRAM and made prefill slower
// than float32.
template <typename Fill>
at::Tensor tiled_gemm(const at::Tensor& x, int64_t N, Fill fill) {
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t T = std::min(N, std::max<int64_t>(16, ((int64_t{1} << 21) / K) / 16 * 16));
  thread_local std::vector<float> buffer;  // grown to the largest tile seen, then reused
  if (static_cast<int64_t>(buffer.size()) < T * K) buffer.resize(T * K);
  float* dst = buffer.data();
  const at::Tensor tile = at::from_blob(dst, {T, K}, at::TensorOptions().dtype(at::kFloat));
  auto yt = at::empty({N, M}, x.options());
  const at::Tensor xt = x.t();
  for (int64_t t0 = 0; t0 < N; t0 += T) {
    const int64_t rows = std::min(T, N - t0);
    // in pieces of whole 16-row blocks (4-bit codes are stored so: affine_blocks.h)
    at::parallel_for(0, (rows + 15) / 16, 1, [&](int64_t a, int64_t b) {
      fill(dst, t0, t0 + 16 * a, t0 + std::min(rows, 16 * b));
    });
    at::Tensor out = yt.narrow(0, t0, rows);
    at::mm_out(out, tile.narrow(0, 0, rows), xt);
  }
  return yt.t().contiguous();
}

// Whether lowbit's AVX-512 VNNI kernels run, and (where they do not) its AVX-VNNI ones: the CPU
// has them and LOWBIT_KERNEL_ISA allows them (affine_q8.cpp).
bool use_avx512();
bool use_avxvnni();

// x (M, K) quantized per block of 32 inputs (the act8 path, affine_q8.cpp): int8 codes q (M, K),
// scales s (M, K/32), and per group of the weight the float sums of x (xg) and, with centring,
// the centring term xc (M, K/group each; see gemv_q8; only the AVX2 GEMV reads it), and per
// block the sum of its codes (qsum, M x K/32: the AVX-512 GEMV folds the centring into its
// integer dots). shifted: the codes stored as q + 128 (as unsigned bytes), the operand the
// integer GEMM wants. Parallel over rows.
struct Act8 {
  std::vector<int8_t> q;
  std::vector<float> s, xg, xc, qsum, xr;  // xr: per block, the float sum of x
};
Act8 quantize_act8(const at::Tensor& x, int64_t group, bool shifted, bool centring);

// The 4- or 8-bit x int8-input prefill path (affine_q8_gemm.cpp): the same arithmetic as
// gemv_q8 (4-bit), with codes centred on 128 for 8-bit ones.
template <typename P>
at::Tensor gemm_q8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                   const at::Tensor& offset, int64_t group, int64_t bits);

// The 4- or 8-bit x int8-input decode path (affine_q8.cpp), for P = float and uint16_t
// (float16).
template <typename P>
at::Tensor gemv_q8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                   const at::Tensor& offset, int64_t group, int64_t bits);

// gemv_q8 in two halves: x (M <= kGemvMaxM, K) quantized and laid out once for the kernel
// that runs on `bits`-bit codes (offsets: whether the weights it meets store offsets), then
// rows(...) computes
// y[m * N + n] for the weight rows n0..n1 (any thread, any split: every output element is
// computed within one call, so the result does not depend on the split). affine_experts
// prepares one input for many weights this way.
struct Q8Inputs {
  Q8Inputs(const at::Tensor& x, int64_t group, int64_t bits, bool offsets);
  Q8Inputs(const Q8Inputs&) = delete;
  Q8Inputs& operator=(const Q8Inputs&) = delete;
  template <typename P>
  void rows(const uint8_t* w, const P* scale, const P* offset, float* y, int64_t N, int64_t n0,
            int64_t n1) const;

  const int64_t M, K, group, bits, C;
  const bool offsets, wide;  // weights with offsets; AVX-512 kernels
  const int ps;  // log2 of the runs per group (40: one group per row; -1: neither)
  const bool row1;  // one row on groups of 32 (AVX-512: of any power of two of runs, or rows)
  const Act8 a;
  std::vector<float> xs_store, xsr, U, V;
  std::vector<int32_t> corr_store;
  float* xs = nullptr;       // per-chunk input scales (64-byte aligned, in xs_store)
  int32_t* corr = nullptr;  // AVX-512: per-chunk centring (in corr_store)
};

// Checks the affine op's arguments (affine_gemv.cpp).
void check_affine(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                  const at::Tensor& offset, int64_t group, int64_t bits);

}  // namespace lowbit_kernels
