// Prefill of 4- and 8-bit layers on int8 inputs (act8): an integer GEMM, AVX-512 VNNI, AVX-VNNI
// and AVX2.
//
// Why hand-written: dequantizing the codes into torch's float GEMM (tiled_gemm) was slower than
// float32 itself (the GEMM does the same work plus the dequantization); multiplying the codes
// by int8 inputs in integer multiply-adds does 4x the work per instruction. Nothing shipped with
// torch does it for grouped 4-bit codes (its int4 CPU kernel wants bf16 inputs; oneDNN and
// fbgemm take int8 weights per channel, not codes with a scale and offset per group).
//
// The arithmetic is the decode path's (gemv_q8, affine_q8.cpp): x quantized per block of 32
// inputs (q, s_x per block), y = sum_g s_g sum_{b in g} s_x,b ((u - mid) . q_b) + (o_g + mid s_g) X_g
// with mid = 8 (4-bit codes) or 128 (8-bit codes).
// Two changes of form make it a GEMM that keeps 16 (AVX-512) or 8 (AVX2) outputs per register:
//   - the weights are unpacked, per block of NB output columns, into a panel of centred codes
//     c = u - mid (signed bytes), four consecutive k of each column in one 32-bit lane, so that
//     one vpdpbusd (or vpmaddubsw) multiplies 4 inputs of one row of x by 16 (8) columns
//     (AVX-VNNI, the 256-bit vpdpbusd of CPUs without AVX-512: 8 columns, the AVX2 tile's shape);
//   - the inputs are made unsigned, q + 128, as the u8 operand; the extra 128 . sum(c_b) per
//     block and column is subtracted by starting each block's integer sum at -128 sum(c_b).
// No sum can saturate: vpdpbusd sums in int32; on AVX2 a vpmaddubsw pair of 4-bit codes is at
// most 2 * 255 * 8 and eight of them (one block) 32640 < 2^15, so a block is summed in int16
// first. 8-bit codes on AVX2 would saturate that pair (2 * 255 * 128), so there the signed
// inputs meet the codes as in int8_gemm.cpp: |c| (u8, at most 128) times q ^ neg(c) (neg(c) =
// 0xFF where c < 0: q where c >= 0, -q - 1 where c < 0; |q| <= 127), each product in
// [-16384, 16129] and a pair within int16, widened to int32 at every step; each block's sum is
// short by its negative codes' |c| summed, which the panel holds (Panel::neg) and adds back.
// The panel is rebuilt at every call (N * K bytes, against M * N * K multiply-adds).
#include "affine_blocks.h"
#include "common.h"

#include <algorithm>

namespace lowbit_kernels {
namespace {

// One block of NB output columns: codes, block starts and scales, laid out per block of 32 k.
struct Panel {
  std::vector<int32_t> codes;  // (K/4, NB) words: 4 centred codes of column j at k..k+3
  std::vector<int32_t> start;  // (R, NB): -128 * sum of the column's centred codes in block b
  std::vector<float> scale;    // (R, NB): the column's weight scale for block b's group
  std::vector<int32_t> neg;    // (R, NB), 8-bit codes: the sum of |c| over block b's c < 0
};

// The code that stands for 0 once centred: 8 for 4-bit codes, 128 for 8-bit ones.
template <int Bits>
constexpr int kMid = 1 << (Bits - 1);

// Panel columns c0..c0+16 from a whole block of 16 interleaved rows of 4-bit codes (wb, its
// params sb; affine_blocks.h): a run's part j holds, per row, the 4 codes of the panel's word
// 8r + 2j in its low nibbles and of word 8r + 2j + 1 in its high ones, so each part gives two
// words of 16 columns at once, centred by a byte subtraction, with no transposing.
template <typename P>
void fill_block(const uint8_t* wb, const P* sb, int64_t K, int64_t per, int64_t NB, int64_t c0,
                Panel& p) {
  const int64_t R = K / 32;
  const __m256i nib = _mm256_set1_epi8(0x0F), mid = _mm256_set1_epi8(8);
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  for (int64_t r = 0; r < R; ++r) {
    for (int h = 0; h < 2; ++h) {  // rows 8h..8h+7 of the block
      __m256i sum = _mm256_setzero_si256();  // per row, int16 pairs of the run's codes
      for (int j = 0; j < 4; ++j) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 256 * r + 64 * j + 32 * h));
        const __m256i lo = _mm256_and_si256(v, nib);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
        int32_t* dst = p.codes.data() + (8 * r + 2 * j) * NB + c0 + 8 * h;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_sub_epi8(lo, mid));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + NB), _mm256_sub_epi8(hi, mid));
        sum = _mm256_add_epi16(sum, _mm256_maddubs_epi16(_mm256_add_epi8(lo, hi), ones8));
      }
      const __m256i u = _mm256_madd_epi16(sum, ones16);  // per row, the sum of its 32 codes
      const __m256i start = _mm256_mullo_epi32(_mm256_set1_epi32(-128),
                                               _mm256_sub_epi32(u, _mm256_set1_epi32(8 * 32)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p.start.data() + r * NB + c0 + 8 * h), start);
      _mm256_storeu_ps(p.scale.data() + r * NB + c0 + 8 * h, load8(sb + (r / per) * kBlockRows + 8 * h));
    }
  }
}

// Fill the panel for columns n0..n0+NB (columns beyond N: code mid, scale 0, so they add 0).
template <int Bits, typename P>
void fill_panel(const uint8_t* w, const P* scale, int64_t K, int64_t group, int64_t N, int64_t n0,
                int64_t NB, Panel& p, std::vector<uint8_t>& rows) {
  const int64_t R = K / 32, G = K / group, per = group / 32;
  p.codes.resize(K / 4 * NB);
  p.start.resize(R * NB);
  p.scale.resize(R * NB);
  if (Bits == 8) p.neg.resize(R * NB);
  rows.resize(NB * K);
  const __m256i mid = _mm256_set1_epi8(static_cast<char>(kMid<Bits>));
  // column j from `row` (row-by-row codes, its params at s; null: past N)
  auto fill = [&](int64_t j, const uint8_t* row, const P* s) {
    uint8_t* dst = rows.data() + j * K;
    for (int64_t b = 0; b < R; ++b) {
      __m256i u = mid;
      if (row && Bits == 4) u = run_codes(row, 32 * b, K);
      if (row && Bits == 8) u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32 * b));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 32 * b), _mm256_sub_epi8(u, mid));
      const __m256i sad = _mm256_sad_epu8(u, _mm256_setzero_si256());  // 4 partial sums of u
      const int64_t sum = _mm256_extract_epi64(sad, 0) + _mm256_extract_epi64(sad, 1) +
                          _mm256_extract_epi64(sad, 2) + _mm256_extract_epi64(sad, 3);
      p.start[b * NB + j] = static_cast<int32_t>(-128 * (sum - kMid<Bits> * 32));
      if constexpr (Bits == 8) {  // sum over u < 128 of 128 - u = 32 * 128 - sum min(u, 128)
        const __m256i low = _mm256_sad_epu8(_mm256_min_epu8(u, mid), _mm256_setzero_si256());
        p.neg[b * NB + j] = static_cast<int32_t>(
            32 * 128 - (_mm256_extract_epi64(low, 0) + _mm256_extract_epi64(low, 1) +
                        _mm256_extract_epi64(low, 2) + _mm256_extract_epi64(low, 3)));
      }
      p.scale[b * NB + j] = row ? load1(s + b / per) : 0.f;
    }
  };
  const int64_t n1 = std::min(N, n0 + NB), rb = K * Bits / 8;
  int64_t direct = 0;  // columns 0..direct filled straight from whole blocks of 16 rows
  if constexpr (Bits == 4) {
    const int64_t whole = N / kBlockRows * kBlockRows;
    for (; n0 + direct + kBlockRows <= std::min(n1, whole) && (n0 + direct) % kBlockRows == 0;
         direct += kBlockRows)
      fill_block(w + (n0 + direct) * rb, scale + (n0 + direct) * G, K, per, NB, direct, p);
  }
  if (n0 + direct < n1)  // the rest as rows (a block cut by N's panels taken back to rows)
    for_rows<Bits, P>(w, scale, static_cast<const P*>(nullptr), N, K, G, n0 + direct, n1,
                      [&](const uint8_t* w2, const P* s2, const P*, int64_t first, int64_t lo,
                          int64_t hi) {
                        for (int64_t r = lo; r < hi; ++r)
                          fill(first + r - n0, w2 + r * rb, s2 + r * G);
                      });
  for (int64_t j = n1 - n0; j < NB; ++j) fill(j, nullptr, nullptr);
  for (int64_t j = direct; j < NB; ++j) {  // transpose the 32-bit words into the panel
    const int32_t* src = reinterpret_cast<const int32_t*>(rows.data() + j * K);
    for (int64_t kq = 0; kq < K / 4; ++kq) p.codes[kq * NB + j] = src[kq];
  }
}

inline int32_t word(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// AVX-512: MR rows of x against 32 columns (two registers of 16), a whole row of K.
constexpr int64_t kNB512 = 32;
template <int MR>
LOWBIT_AVX512 void tile_512(const uint8_t* xu, const float* xs, int64_t K, const Panel& p,
                            float* y, int64_t N, int64_t n0, int64_t cols) {
  const int64_t R = K / 32;
  __m512 f[MR][2];
  for (int m = 0; m < MR; ++m) f[m][0] = f[m][1] = _mm512_setzero_ps();
  const int32_t* pc = p.codes.data();
  for (int64_t b = 0; b < R; ++b) {
    const __m512i s0 = _mm512_loadu_si512(p.start.data() + b * kNB512);
    const __m512i s1 = _mm512_loadu_si512(p.start.data() + b * kNB512 + 16);
    __m512i a[MR][2];
    for (int m = 0; m < MR; ++m) a[m][0] = s0, a[m][1] = s1;
    for (int s = 0; s < 8; ++s) {
      const int32_t* wq = pc + (b * 8 + s) * kNB512;
      const __m512i w0 = _mm512_loadu_si512(wq), w1 = _mm512_loadu_si512(wq + 16);
      for (int m = 0; m < MR; ++m) {
        const __m512i xb = _mm512_set1_epi32(word(xu + m * K + 32 * b + 4 * s));
        a[m][0] = _mm512_dpbusd_epi32(a[m][0], xb, w0);
        a[m][1] = _mm512_dpbusd_epi32(a[m][1], xb, w1);
      }
    }
    const __m512 c0 = _mm512_loadu_ps(p.scale.data() + b * kNB512);
    const __m512 c1 = _mm512_loadu_ps(p.scale.data() + b * kNB512 + 16);
    for (int m = 0; m < MR; ++m) {
      const __m512 sx = _mm512_set1_ps(xs[m * R + b]);
      f[m][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[m][0]), _mm512_mul_ps(c0, sx), f[m][0]);
      f[m][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[m][1]), _mm512_mul_ps(c1, sx), f[m][1]);
    }
  }
  const __mmask16 k0 = cols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << cols) - 1);
  const __mmask16 k1 = cols >= 32 ? 0xFFFF : cols <= 16 ? 0 : static_cast<__mmask16>((1u << (cols - 16)) - 1);
  for (int m = 0; m < MR; ++m) {
    _mm512_mask_storeu_ps(y + m * N + n0, k0, f[m][0]);
    _mm512_mask_storeu_ps(y + m * N + n0 + 16, k1, f[m][1]);
  }
}

// The AVX2 and AVX-VNNI tiles' float sums to y (columns beyond `cols`: not written).
template <int MR, int NV>
inline void store_256(const __m256 (&f)[MR][NV], float* y, int64_t N, int64_t n0, int64_t cols,
                      int v0) {
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) {
      const int64_t c0 = 8 * (v0 + v), n = std::min<int64_t>(8, cols - c0);
      if (n <= 0) continue;
      alignas(32) float out[8];
      _mm256_store_ps(out, f[m][v]);
      std::copy(out, out + n, y + m * N + n0 + c0);
    }
}

// How the AVX2 tile sums one block of 32 k of a row of x (stored as q + 128) against 8 columns
// of centred codes c (see the top); W is what a step keeps of a loaded weight register:
//   - SumU4, 4-bit codes: (q + 128) . c in int16 (it cannot saturate there), widened to int32
//     once per block, plus the block's start (-128 sum(c));
//   - SumS8, 8-bit codes: |c| (unsigned) times q ^ neg(c) (the input's stored q ^ 0x80 xored
//     with neg(c) ^ 0x80), widened at every step, plus the block's Panel::neg.
// SumU4's int16 sums use the saturating add although they cannot saturate: GCC reassociated
// plain integer adds into a tree and spilled every product. SumS8's int32 sums (no saturating
// form) pass through an empty asm statement instead, which GCC cannot reassociate across.
struct SumU4 {
  using W = __m256i;
  static W load(const int32_t* wq) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq)); }
  static __m256i step(__m256i h, __m256i xu, const W& c) {
    return _mm256_adds_epi16(h, _mm256_maddubs_epi16(xu, c));
  }
  static const int32_t* base(const Panel& p) { return p.start.data(); }
  static __m256i total(__m256i h, __m256i start) {
    return _mm256_add_epi32(_mm256_madd_epi16(h, _mm256_set1_epi16(1)), start);
  }
};
struct SumS8 {
  struct W {
    __m256i abs, flip;  // |c|; neg(c) ^ 0x80
  };
  static W load(const int32_t* wq) {
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq));
    const __m256i neg = _mm256_cmpgt_epi8(_mm256_setzero_si256(), c);
    return {_mm256_abs_epi8(c), _mm256_xor_si256(neg, _mm256_set1_epi8(static_cast<char>(0x80)))};
  }
  static __m256i step(__m256i a, __m256i xu, const W& w) {
    const __m256i p = _mm256_maddubs_epi16(w.abs, _mm256_xor_si256(xu, w.flip));
    __m256i sum = _mm256_add_epi32(a, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
    asm("" : "+x"(sum));  // opaque to GCC: no add tree over the unrolled steps (see above)
    return sum;
  }
  static const int32_t* base(const Panel& p) { return p.neg.data(); }
  static __m256i total(__m256i a, __m256i neg) { return _mm256_add_epi32(a, neg); }
};

// AVX2: MR rows of x against NV registers of 8 columns (from column 8 * v0 of the panel's 16),
// each block summed as Sum says.
constexpr int64_t kNB256 = 16;
template <class Sum, int MR, int NV>
void tile_256(const uint8_t* xu, const float* xs, int64_t K, const Panel& p, float* y, int64_t N,
              int64_t n0, int64_t cols, int v0) {
  const int64_t R = K / 32;
  __m256 f[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) f[m][v] = _mm256_setzero_ps();
  const int32_t* pc = p.codes.data() + 8 * v0;
  for (int64_t b = 0; b < R; ++b) {
    __m256i h[MR][NV];
    for (int m = 0; m < MR; ++m)
      for (int v = 0; v < NV; ++v) h[m][v] = _mm256_setzero_si256();
    for (int s = 0; s < 8; ++s) {
      const int32_t* wq = pc + (b * 8 + s) * kNB256;
      typename Sum::W wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = Sum::load(wq + 8 * v);
      for (int m = 0; m < MR; ++m) {
        const __m256i xb = _mm256_set1_epi32(word(xu + m * K + 32 * b + 4 * s));
        for (int v = 0; v < NV; ++v) h[m][v] = Sum::step(h[m][v], xb, wv[v]);
      }
    }
    for (int v = 0; v < NV; ++v) {
      const int64_t o = b * kNB256 + 8 * (v0 + v);
      const __m256i st = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(Sum::base(p) + o));
      const __m256 c = _mm256_loadu_ps(p.scale.data() + o);
      for (int m = 0; m < MR; ++m) {
        const __m256i i = Sum::total(h[m][v], st);
        f[m][v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_mul_ps(c, _mm256_set1_ps(xs[m * R + b])), f[m][v]);
      }
    }
  }
  store_256<MR, NV>(f, y, N, n0, cols, v0);
}

#if LOWBIT_HAS_AVXVNNI
// AVX-VNNI: the AVX2 tile with vpdpbusd summing each block in int32 from its start (as the
// AVX-512 tile), one instruction where AVX2 takes vpmaddubsw + an int16 add, and no vpmaddwd.
// A function of its own: the AVX2 tile must be compiled without the AVX-VNNI target, which
// would let the compiler use AVX-VNNI instructions anywhere in it.
template <int MR, int NV>
LOWBIT_AVXVNNI void tile_256_vnni(const uint8_t* xu, const float* xs, int64_t K, const Panel& p,
                                  float* y, int64_t N, int64_t n0, int64_t cols, int v0) {
  const int64_t R = K / 32;
  __m256 f[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) f[m][v] = _mm256_setzero_ps();
  const int32_t* pc = p.codes.data() + 8 * v0;
  for (int64_t b = 0; b < R; ++b) {
    __m256i a[MR][NV];
    for (int v = 0; v < NV; ++v) {
      const __m256i st = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.start.data() + b * kNB256 + 8 * (v0 + v)));
      for (int m = 0; m < MR; ++m) a[m][v] = st;
    }
    for (int s = 0; s < 8; ++s) {
      const int32_t* wq = pc + (b * 8 + s) * kNB256;
      __m256i wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + 8 * v));
      for (int m = 0; m < MR; ++m) {
        const __m256i xb = _mm256_set1_epi32(word(xu + m * K + 32 * b + 4 * s));
        for (int v = 0; v < NV; ++v) a[m][v] = _mm256_dpbusd_avx_epi32(a[m][v], xb, wv[v]);
      }
    }
    for (int v = 0; v < NV; ++v) {
      const __m256 c = _mm256_loadu_ps(p.scale.data() + b * kNB256 + 8 * (v0 + v));
      for (int m = 0; m < MR; ++m)
        f[m][v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[m][v]), _mm256_mul_ps(c, _mm256_set1_ps(xs[m * R + b])), f[m][v]);
    }
  }
  store_256<MR, NV>(f, y, N, n0, cols, v0);
}
#endif

// All M rows against one panel, MR rows at a time (the last few rows one by one).
template <int MR>
void rows_512(const uint8_t* xu, const float* xs, int64_t M, int64_t K, const Panel& p, float* y,
              int64_t N, int64_t n0, int64_t cols) {
  const int64_t R = K / 32;
  int64_t m = 0;
  for (; m + MR <= M; m += MR) tile_512<MR>(xu + m * K, xs + m * R, K, p, y + m * N, N, n0, cols);
  for (; m < M; ++m) tile_512<1>(xu + m * K, xs + m * R, K, p, y + m * N, N, n0, cols);
}

template <class Sum, int MR, int NV>
void rows_256(const uint8_t* xu, const float* xs, int64_t M, int64_t K, const Panel& p, float* y,
              int64_t N, int64_t n0, int64_t cols, bool vnni) {
  const int64_t R = K / 32;
  for (int v0 = 0; v0 < 2; v0 += NV) {
    int64_t m = 0;
#if LOWBIT_HAS_AVXVNNI
    if (vnni) {
      for (; m + MR <= M; m += MR)
        tile_256_vnni<MR, NV>(xu + m * K, xs + m * R, K, p, y + m * N, N, n0, cols, v0);
      for (; m < M; ++m)
        tile_256_vnni<1, NV>(xu + m * K, xs + m * R, K, p, y + m * N, N, n0, cols, v0);
      continue;
    }
#endif
    for (; m + MR <= M; m += MR)
      tile_256<Sum, MR, NV>(xu + m * K, xs + m * R, K, p, y + m * N, N, n0, cols, v0);
    for (; m < M; ++m) tile_256<Sum, 1, NV>(xu + m * K, xs + m * R, K, p, y + m * N, N, n0, cols, v0);
  }
}

}  // namespace

template <typename P>
at::Tensor gemm_q8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                   const at::Tensor& offset, int64_t group, int64_t bits) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), G = K / group;
  const Act8 a = quantize_act8(x, group, true, false);
  const uint8_t* xp = reinterpret_cast<const uint8_t*>(a.q.data());  // q + 128
  auto y = at::empty({M, N}, x.options());
  const bool wide = use_avx512(), vnni = !wide && use_avxvnni();
  const int64_t NB = wide ? kNB512 : kNB256;
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const P* sp = params<P>(scale);
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, (N + NB - 1) / NB, 1, [&](int64_t b0, int64_t b1) {
    Panel p;
    std::vector<uint8_t> rows;
    for (int64_t nb = b0; nb < b1; ++nb) {
      const int64_t n0 = nb * NB, cols = std::min(NB, N - n0);
      if (bits == 8)
        fill_panel<8, P>(wp, sp, K, group, N, n0, NB, p, rows);
      else
        fill_panel<4, P>(wp, sp, K, group, N, n0, NB, p, rows);
      const float* xs = a.s.data();
      // Rows per tile chosen by measurement (Xeon with AVX-512 VNNI, 2 threads): 6 rows x 32
      // columns for AVX-512 (12 int32 and 12 float accumulators), 3 rows x 16 columns for
      // AVX2 (16 registers: 6 int16 sums, 2 weight registers, one input); 4, 5, 8 and 2x2,
      // 4x1, 6x1 were slower. 8-bit codes on AVX2: 4 rows x 8 columns (its sums are int32 and
      // each weight register has its absolute value beside it; 3 x 16 ran alike, 0.92-0.98x
      // float32 against 0.93-0.99x on the small model's shapes).
      if (wide)
        rows_512<6>(xp, xs, M, K, p, yp, N, n0, cols);
      else if (bits == 8 && !vnni)
        rows_256<SumS8, 4, 1>(xp, xs, M, K, p, yp, N, n0, cols, false);
      else
        rows_256<SumU4, 3, 2>(xp, xs, M, K, p, yp, N, n0, cols, vnni);
    }
  });
  if (offset.numel()) {  // (o_g + mid s_g) X_g: a float GEMM of the group sums, (M, G) x (G, N)
    at::Tensor c = offset.to(at::kFloat) + (bits == 8 ? 128 : 8) * scale.to(at::kFloat);
    if (bits == 4) c = row_params(c);  // (4-bit params are stored in blocks of rows)
    y.addmm_(at::from_blob(const_cast<float*>(a.xg.data()), {M, G}, x.options()), c.t());
  }
  return y;
}

template at::Tensor gemm_q8<float>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, int64_t, int64_t);
template at::Tensor gemm_q8<uint16_t>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const at::Tensor&, int64_t, int64_t);

}  // namespace lowbit_kernels
