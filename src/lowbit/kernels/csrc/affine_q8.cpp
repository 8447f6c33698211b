// 4- or 8-bit codes x int8 inputs: the decode path of 4- and 8-bit layers ("act8"; see the
// header comment of affine_gemv.cpp), an AVX2 kernel and an AVX-512 VNNI one.
#include "affine_blocks.h"
#include "common.h"

#include <cctype>
#include <cmath>

namespace lowbit_kernels {
namespace {

// x (M, K) -> int8 codes (M, K) and one scale per 32 inputs (M, K/32):
// q = round(x * 127/absmax), half to even; scale = absmax / 127.
// Also the block sums of x (xsum) and of q (qsum), for the offset correction of gemv_q8.
// shifted: each code stored as q + 128 (q xor 0x80), the unsigned operand of gemm_q8.
// A block holding a NaN or an infinity gets scale NaN, so every output of its row is NaN as
// the reference's are (max_ps drops a NaN operand, and a symmetric grid's kernels never read
// xsum, where it would have stayed).
void quantize_rows_q8(const float* x, int64_t M, int64_t K, int8_t* q, float* qs, float* xsum,
                      float* qsum, bool shifted) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i flip = _mm256_set1_epi8(shifted ? static_cast<char>(0x80) : 0);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256 inf = _mm256_set1_ps(INFINITY);
  for (int64_t i = 0; i < M * K / 32; ++i) {
    const float* src = x + 32 * i;
    __m256 amax = _mm256_setzero_ps(), fs = _mm256_setzero_ps(), qsv = _mm256_setzero_ps();
    __m256 bad = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      const __m256 v = _mm256_loadu_ps(src + 8 * j), m = _mm256_andnot_ps(sign, v);
      amax = _mm256_max_ps(amax, m);
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(m, inf, _CMP_NLT_UQ));  // NaN or infinite
      fs = _mm256_add_ps(fs, v);
    }
    xsum[i] = hsum(fs);
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float a = _mm_cvtss_f32(m4);
    qs[i] = _mm256_movemask_ps(bad) == 0 ? a / 127.f : NAN;
    const float r = a > 0.f ? 127.f / a : 0.f;  // a block too small for 127/a: codes 0
    const __m256 inv = _mm256_set1_ps(std::isfinite(r) ? r : 0.f);
    __m256i n[4];
    for (int j = 0; j < 4; ++j) {
      n[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(src + 8 * j), inv));  // to even
      qsv = _mm256_add_ps(qsv, _mm256_cvtepi32_ps(n[j]));
    }
    const __m256i b =
        _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]), _mm256_packs_epi32(n[2], n[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 32 * i),
                        _mm256_xor_si256(_mm256_permutevar8x32_epi32(b, order), flip));
    qsum[i] = hsum(qsv);
  }
}

// How a kernel finds the weight scales of chunk c (64 codes, runs 2c and 2c + 1) without
// branches where it can, by ps = group_shift(group, K):
//   Uniform: groups are a power of two of whole chunks, or one group spans the row (per-channel
//            grids: w8-rtn's; they took the Walk's branches before, 3072x576 8-bit on one
//            thread 63.8 us against 55.7 at groups of 64), one scale per chunk (c >> (ps - 1));
//   Pair:    groups of 32 (GGUF Q4_0/Q4_1's, ps = 0), the chunk's two scales are consecutive;
//   Walk:    any other multiple of 32 (ps < 0; four branches per chunk).
enum class Groups { Uniform, Pair, Walk };

template <typename P>
inline __m128 load2(const P* p) {  // two consecutive params -> lanes 0, 1
  if constexpr (sizeof(P) == 4) {
    return _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(p)));
  } else {
    int32_t bits;
    std::memcpy(&bits, p, 4);
    return _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
  }
}

// Sum over groups of (o_g + mid s_g) X_g (mid = 2^(Bits - 1)): what the centred dots leave
// out of an asymmetric grid.
template <int Bits, typename P>
inline float offset_sum(const P* of, const P* sc, const float* xg, int64_t G) {
  constexpr float kMid = 1 << (Bits - 1);
  __m256 t = _mm256_setzero_ps();
  const __m256 mid = _mm256_set1_ps(kMid);
  int64_t g = 0;
  for (; g + 8 <= G; g += 8)
    t = _mm256_fmadd_ps(_mm256_fmadd_ps(mid, load8(sc + g), load8(of + g)),
                        _mm256_loadu_ps(xg + g), t);
  float tail = 0.f;
  for (; g < G; ++g) tail += (load1(of + g) + kMid * load1(sc + g)) * xg[g];
  return hsum(t) + tail;
}

// The integer dot of a row's last run, a half chunk (K not a multiple of 64), with x: of the
// codes 0..15 as they are for 4-bit codes (the caller centres), of u - 128 for 8-bit ones.
template <int Bits>
inline float run_dot(const uint8_t* wb, int64_t C, const int8_t* x) {
  if constexpr (Bits == 4)
    return half_chunk_dot(codes_u4(wb + 32 * C), x);
  else
    return half_chunk_dot8(wb + 64 * C, x);
}

// run_dot of the centred codes (qsum: the sum of the run's int8 input codes q).
template <int Bits>
inline float run_dot_centred(const uint8_t* wb, int64_t C, const int8_t* x, float qsum) {
  return Bits == 4 ? run_dot<4>(wb, C, x) - 8.f * qsum : run_dot<8>(wb, C, x);
}

// The 4-bit kernel on int8 inputs (AVX2): y[m, n0:n1] for M (<= kMaxM) rows. One chunk's 32
// bytes hold two runs of 32 codes (low and high nibbles). Per run the integer products u . q
// in pairs (vpmaddubsw: 2 * 15 * 127 < 2^15, no saturation); the two runs' pairs are added
// pairwise across both (vphaddw, sums of four products, still < 2^15) and summed in int32
// (vpmaddwd), which leaves lanes [2c, 2c, 2c+1, 2c+1 | the same], each lane of one run. So one
// convert, one multiply by the input scales (xs4, laid out per chunk in that lane order by
// gemv_q8) and one FMA with the weight scales serve two runs. Two FMA chains per row of x (one
// above 4 rows, where registers run out). The codes stay unsigned (0..15); the row's
// epilogue makes the result that of the centred codes u - 8 (offset_term, with xc from
// quantize_act8). 8-bit codes (Bits = 8, a chunk's 64 bytes) are centred in the products
// instead (centred_u8_products: vpmaddubsw's pairs would saturate on codes up to 255), each
// run summed in int32 before the runs' lanes are paired (vphaddd), so only an asymmetric
// grid's term sum_g (o_g + 128 s_g) X_g is left to the epilogue.
template <int M, Groups Mode, typename P, int Bits>
void gemv_rows_q8(const int8_t* xq, const float* xqs, const float* xs4, int64_t K,
                  const uint8_t* w, const P* scale, const P* offset, int64_t group, int ps,
                  const float* xg, const float* xc, float* y, int64_t N, int64_t n0, int64_t n1) {
  constexpr int A = M <= 4 ? 2 : 1;
  const int64_t G = K / group, R = K / 32, C = K / 64;
  const int shift = Mode == Groups::Uniform ? ps - 1 : 0;
  const __m256i ones = _mm256_set1_epi16(1), nib = _mm256_set1_epi8(0x0F);
  const __m256i pairs = _mm256_setr_epi32(0, 0, 1, 1, 0, 0, 1, 1);
  constexpr int64_t chunk_bytes = 8 * Bits;
  const int64_t row_bytes = K * Bits / 8;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wb = w + n * row_bytes;
    const P* sc = scale + n * G;
    __m256 acc[A][M];
    for (int m = 0; m < M; ++m) acc[0][m] = acc[A - 1][m] = _mm256_setzero_ps();
    GroupWalk walk(group / 32);
    const auto chunk = [&](int64_t c, __m256* a) {
      __m256 s;  // the weight scales in the lane order above
      if constexpr (Mode == Groups::Uniform) {
        s = _mm256_set1_ps(load1(sc + (c >> shift)));
      } else if constexpr (Mode == Groups::Pair) {
        s = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(load2(sc + 2 * c)), pairs);
      } else {
        const __m128 s0 = _mm_set_ss(load1(sc + walk.next()));
        const __m128 s01 = _mm_unpacklo_ps(s0, _mm_set_ss(load1(sc + walk.next())));
        s = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(s01), pairs);
      }
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + chunk_bytes * c));
      __m256i lo = b, hi = b;
      if constexpr (Bits == 4) {
        lo = _mm256_and_si256(b, nib), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), nib);
      } else {
        hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + chunk_bytes * c + 32));
      }
      for (int m = 0; m < M; ++m) {
        const int8_t* xr = xq + m * K + 64 * c;
        const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr));
        const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 32));
        __m256i sums;
        if constexpr (Bits == 4) {
          sums = _mm256_madd_epi16(
              _mm256_hadd_epi16(_mm256_maddubs_epi16(lo, x0), _mm256_maddubs_epi16(hi, x1)), ones);
        } else {
          sums = _mm256_hadd_epi32(centred_u8_products(lo, x0), centred_u8_products(hi, x1));
        }
        const __m256 dot = _mm256_cvtepi32_ps(sums);
        a[m] = _mm256_fmadd_ps(_mm256_mul_ps(dot, _mm256_load_ps(xs4 + (m * C + c) * 8)), s, a[m]);
      }
    };
    int64_t c = 0;
    for (; c + 2 <= C; c += 2) {
      prefetch_lines<Bits / 4>(wb + chunk_bytes * c);
      chunk(c, acc[0]);
      chunk(c + 1, acc[A - 1]);
    }
    prefetch_rest(wb + chunk_bytes * c, row_bytes - chunk_bytes * c);
    if (c < C) chunk(c, acc[0]);
    float tail[M];
    for (int m = 0; m < M; ++m) tail[m] = 0.f;
    if (R & 1) {  // the row's last run, a half chunk
      const int64_t r = R - 1;
      const float s = load1(sc + r * 32 / group);
      for (int m = 0; m < M; ++m)
        tail[m] = s * xqs[m * R + r] * run_dot<Bits>(wb, C, xq + m * K + 32 * r);
    }
    for (int m = 0; m < M; ++m) {
      float end;  // what the integer dots leave out (see above)
      if constexpr (Bits == 4)
        end = offset_term(offset ? offset + n * G : nullptr, sc, xg + m * G, xc + m * G, G);
      else
        end = offset ? offset_sum<Bits>(offset + n * G, sc, xg + m * G, G) : 0.f;
      const __m256 sum = A == 2 ? _mm256_add_ps(acc[0][m], acc[A - 1][m]) : acc[0][m];
      y[m * N + n] = hsum(sum) + tail[m] + end;
    }
  }
}

// The first 2 * chunks (< 8) params at p, then zeros (masked loads: a copy through the stack
// stalled on store forwarding).
template <typename P>
inline __m256 load8_part(const P* p, int64_t chunks) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  if constexpr (sizeof(P) == 4) {
    return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(2 * chunks), lane));
  } else {  // two float16 params per 32-bit lane
    const __m128i k = _mm_cmpgt_epi32(_mm_set1_epi32(chunks), _mm256_castsi256_si128(lane));
    return _mm256_cvtph_ps(_mm_maskload_epi32(reinterpret_cast<const int*>(p), k));
  }
}

// One row of x on groups of 32 (8-bit codes at decode; 4-bit codes only in the rows past a
// weight's last whole block of 16, the rest taking gemv_blocks_256), AVX2: as gemv_rows_q8, with
// the scale products found 8 runs at a time. Per 4 chunks one convert of the row's 8 weight
// scales and one multiply by the 8 input scales give S; each chunk then takes its lanes of S
// ([2c, 2c, 2c+1, 2c+1] twice) with one permute and needs one FMA. The per-group epilogue
// (offset_term) is folded in the same way: sum_r s_r U_r + o_r V_r, one or two FMAs per 8 runs,
// with U, V per run (see gemv_q8). The last chunks short of 4 read their parameters by a
// masked load; a half chunk takes the general kernel's step. (Pairing two chunks' sums once
// more, so that one convert and FMA serve four runs, measured no faster.) 8-bit codes: each
// chunk's runs as in gemv_rows_q8.
template <typename P, int Bits>
void gemv_row1_pair(const int8_t* xq, const float* xqs, const float* U, const float* V,
                    int64_t K, const uint8_t* w, const P* scale, const P* offset, float* y,
                    int64_t n0, int64_t n1) {
  const int64_t R = K / 32, C = K / 64, B = C / 4, left = C - 4 * B;
  constexpr int64_t chunk_bytes = 8 * Bits;
  const int64_t row_bytes = K * Bits / 8;
  const __m256i ones = _mm256_set1_epi16(1), nib = _mm256_set1_epi8(0x0F);
  const __m256i base = _mm256_setr_epi32(0, 0, 1, 1, 0, 0, 1, 1);
  __m256i idx[4];
  for (int j = 0; j < 4; ++j) idx[j] = _mm256_add_epi32(base, _mm256_set1_epi32(2 * j));
  const auto chunk = [&](const uint8_t* wb, int64_t c, __m256i ix, __m256 S, __m256& a) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + chunk_bytes * c));
    const int8_t* xr = xq + 64 * c;
    const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr));
    const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 32));
    __m256i sums;
    if constexpr (Bits == 4) {
      const __m256i lo = _mm256_and_si256(b, nib);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), nib);
      sums = _mm256_madd_epi16(
          _mm256_hadd_epi16(_mm256_maddubs_epi16(lo, x0), _mm256_maddubs_epi16(hi, x1)), ones);
    } else {
      const uint8_t* high = wb + chunk_bytes * c + 32;
      const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(high));
      sums = _mm256_hadd_epi32(centred_u8_products(b, x0), centred_u8_products(hi, x1));
    }
    a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_permutevar8x32_ps(S, ix), a);
  };
  // S for the 8 runs from r0 (weight scales sw, offsets ov), and the epilogue's share into z
  const auto block = [&](int64_t r0, __m256 sw, __m256 ov, __m256& z) {
    z = _mm256_fmadd_ps(sw, _mm256_loadu_ps(U + r0), z);
    if (offset) z = _mm256_fmadd_ps(ov, _mm256_loadu_ps(V + r0), z);
    return _mm256_mul_ps(sw, _mm256_loadu_ps(xqs + r0));
  };
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wb = w + n * row_bytes;
    const P* sc = scale + n * R;
    const P* of = offset ? offset + n * R : nullptr;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), z = _mm256_setzero_ps();
    for (int64_t b = 0; b < B; ++b) {
      prefetch_lines<Bits / 2>(wb + 4 * chunk_bytes * b);
      const __m256 S = block(8 * b, load8(sc + 8 * b), of ? load8(of + 8 * b) : __m256{}, z);
      chunk(wb, 4 * b, idx[0], S, a0);
      chunk(wb, 4 * b + 1, idx[1], S, a1);
      chunk(wb, 4 * b + 2, idx[2], S, a0);
      chunk(wb, 4 * b + 3, idx[3], S, a1);
    }
    prefetch_rest(wb + 4 * chunk_bytes * B, row_bytes - 4 * chunk_bytes * B);
    if (left) {
      const __m256 S = block(8 * B, load8_part(sc + 8 * B, left),
                             of ? load8_part(of + 8 * B, left) : __m256{}, z);
      for (int64_t j = 0; j < left; ++j)
        chunk(wb, 4 * B + j, _mm256_add_epi32(base, _mm256_set1_epi32(2 * j)), S, a0);
    }
    float tail = 0.f;
    if (R & 1) {  // the row's last run, a half chunk
      const int64_t r = R - 1;
      const float s = load1(sc + r);
      tail = s * xqs[r] * run_dot<Bits>(wb, C, xq + 32 * r) + s * U[r] +
             (of ? load1(of + r) * V[r] : 0.f);
    }
    y[n] = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), z)) + tail;
  }
}

// The same 4-bit x int8 kernel with AVX-512 VNNI, where the CPU has it: a whole chunk (64
// codes, two runs) per vpdpbusd. The chunk's 32 bytes are broadcast to both halves of a
// register and masked with 0x0F (low half: run 2c) and 0xF0 (high half: run 2c + 1, as 16 times
// its codes; 4 * 240 * 127 fits int32 easily), so no shuffle is needed; the 1/16 is folded into
// the input scales, which gemv_q8 lays out per chunk as [s_2c x8 | s_2c+1 / 16 x8] (xs2).
// The centring (codes u - 8, see gemv_q8) is folded into the integer dot too: vpdpbusd starts
// from [-8 sum(q_2c), 0 x7 | -128 sum(q_2c+1), 0 x7] (corr, laid out beside xs2), so a symmetric
// grid needs no per-group epilogue and an asymmetric one only sum_g (o_g + 8 s_g) X_g. Two cores
// are bound by instructions here, not memory: per chunk and row of x this is and, vpdpbusd,
// convert, multiply, FMA, and the chunk's weight scales are found as the Groups mode says.
// 8-bit codes (Bits = 8): the chunk's 64 bytes as they are (no mask, no 1/16), centred on 128
// by corr = [-128 sum(q_2c), 0 x7 | -128 sum(q_2c+1), 0 x7] (4 * 255 * 127 per lane fits too).

// A chunk's codes as vpdpbusd's unsigned operand (see above).
template <int Bits>
LOWBIT_AVX512 inline __m512i chunk_codes_512(const uint8_t* wb, int64_t c, const __m512i mask) {
  if constexpr (Bits == 4)
    return _mm512_and_si512(
        _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 32 * c))),
        mask);
  else
    return _mm512_loadu_si512(wb + 64 * c);
}

// One chunk c of a weight row (scales s) against M rows of x, into the accumulators a.
template <int M, int Bits>
LOWBIT_AVX512 inline void chunk_512(const uint8_t* wb, const __m512 s, const __m512i mask,
                                    const int8_t* xq, const float* xs2, const int32_t* corr,
                                    int64_t K, int64_t C, int64_t c, __m512* a) {
  const __m512i codes = chunk_codes_512<Bits>(wb, c, mask);
  for (int m = 0; m < M; ++m) {
    const int64_t at = (m * C + c) * 16;
    const __m512i dot = _mm512_dpbusd_epi32(_mm512_load_si512(corr + at), codes,
                                            _mm512_loadu_si512(xq + m * K + 64 * c));
    a[m] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_load_ps(xs2 + at)), s,
                           a[m]);
  }
}

// The weight scales of chunk c: [group of run 2c x8 | group of run 2c + 1 x8].
template <Groups Mode, typename P>
LOWBIT_AVX512 inline __m512 chunk_scales(const P* sc, int64_t c, int shift, GroupWalk& walk,
                                         const __m512i halves) {
  if constexpr (Mode == Groups::Uniform) {
    return _mm512_set1_ps(load1(sc + (c >> shift)));
  } else if constexpr (Mode == Groups::Pair) {
    return _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(load2(sc + 2 * c)));
  } else {
    const float s0 = load1(sc + walk.next()), s1 = load1(sc + walk.next());
    return _mm512_mask_broadcastss_ps(_mm512_set1_ps(s0), 0xFF00, _mm_set_ss(s1));
  }
}

template <int M, Groups Mode, typename P, int Bits>
LOWBIT_AVX512 void gemv_rows_q8_512(const int8_t* xq, const float* xqs, const float* xs2,
                                    const int32_t* corr, const float* qsum, int64_t K,
                                    const uint8_t* w, const P* scale, const P* offset,
                                    int64_t group, int ps, const float* xg, float* y, int64_t N,
                                    int64_t n0, int64_t n1) {
  const int64_t G = K / group, R = K / 32, C = K / 64;
  const int shift = Mode == Groups::Uniform ? ps - 1 : 0;
  const __m512i mask =
      _mm512_inserti64x4(_mm512_set1_epi8(0x0F), _mm256_set1_epi8(static_cast<char>(0xF0)), 1);
  const __m512i halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  constexpr int64_t chunk_bytes = 8 * Bits;
  const int64_t row_bytes = K * Bits / 8;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wb = w + n * row_bytes;
    const P* sc = scale + n * G;
    __m512 acc[2][M];  // two chains per row of x, so FMA latency does not bind
    for (int m = 0; m < M; ++m) acc[0][m] = acc[1][m] = _mm512_setzero_ps();
    GroupWalk walk(group / 32);
    const auto chunk = [&](int64_t c, __m512* a) LOWBIT_AVX512 {
      chunk_512<M, Bits>(wb, chunk_scales<Mode>(sc, c, shift, walk, halves), mask, xq, xs2,
                         corr, K, C, c, a);
    };
    int64_t c = 0;
    for (; c + 2 <= C; c += 2) {
      prefetch_lines<Bits / 4>(wb + chunk_bytes * c);
      chunk(c, acc[0]);
      chunk(c + 1, acc[1]);
    }
    prefetch_rest(wb + chunk_bytes * c, row_bytes - chunk_bytes * c);
    if (c < C) chunk(c, acc[0]);
    float tail[M];
    for (int m = 0; m < M; ++m) tail[m] = 0.f;
    if (R & 1) {  // the row's last run, a half chunk: one 256-bit step
      const int64_t r = R - 1;
      const float s = load1(sc + r * 32 / group);
      for (int m = 0; m < M; ++m)
        tail[m] = s * xqs[m * R + r] *
                  run_dot_centred<Bits>(wb, C, xq + m * K + 32 * r, qsum[m * R + r]);
    }
    for (int m = 0; m < M; ++m)
      y[m * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][m], acc[1][m])) + tail[m] +
                     (offset ? offset_sum<Bits>(offset + n * G, sc, xg + m * G, G) : 0.f);
  }
}

// One row of x (8-bit codes at decode; 4-bit codes only in the rows past a weight's last whole
// block of 16, the rest taking gemv_blocks_512; written for Q4_0's groups of 32), AVX-512: as
// gemv_rows_q8_512, with the scale products found 16 runs at a time. Per 8 chunks one convert of
// the row's 16 weight scales and one multiply by the 16 input scales (xs16: s_r, odd runs / 16, as
// in xs2) give S; each chunk then takes its two runs' lanes of S with one permute (per-chunk index
// vectors held in registers) and needs one FMA, where the general kernel multiplies and FMAs per
// chunk. An asymmetric grid's epilogue is folded in as in gemv_row1_pair. The last chunks short of
// 8 read their parameters by a masked load; a half chunk takes the general kernel's step. On a
// 2-core EPYC this took a smollm2-135m W4 decode step from 5.5 to 4.6 ms. Groups of 2^ps runs (64,
// 128, ... codes), or one per row, take it too: a block's parameters are then (up to) 16 >> ps
// group values spread over its runs by one permute.
template <typename P>
LOWBIT_AVX512 inline __m512 load16_masked(const P* p, __mmask16 k) {  // lanes beyond k: 0
  if constexpr (sizeof(P) == 4) {
    return _mm512_maskz_loadu_ps(k, p);
  } else {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
  }
}

template <typename P, int Bits>
LOWBIT_AVX512 void gemv_row1_pair_512(const int8_t* xq, const float* xqs, const float* xs16,
                                      const float* U, const float* V, const int32_t* corr,
                                      const float* qsum, int64_t K, int ps, const uint8_t* w,
                                      const P* scale, const P* offset, float* y, int64_t n0,
                                      int64_t n1) {
  const int64_t R = K / 32, C = K / 64, B = C / 8, left = C - 8 * B;
  const int64_t G = ps >= 40 ? 1 : R >> ps;  // groups per row (2^ps runs each, or the row)
  // A block's 16 runs take their groups' parameters, (up to) 16 >> ps of them from group
  // r0 >> ps, spread by one permute (ps = 0, groups of 32: one load as they are).
  const __m512i spread = _mm512_srli_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), std::min(ps, 4));
  const __m512i mask =
      _mm512_inserti64x4(_mm512_set1_epi8(0x0F), _mm256_set1_epi8(static_cast<char>(0xF0)), 1);
  const __m512i halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __mmask16 all = 0xFFFF, rest = static_cast<__mmask16>((1u << (2 * left)) - 1);
  __m512i idx[8];
  for (int j = 0; j < 8; ++j) idx[j] = _mm512_add_epi32(halves, _mm512_set1_epi32(2 * j));
  // chunk c's dot times its lanes of S, into a
  const auto chunk = [&](const uint8_t* wb, int64_t c, __m512i ix, __m512 S, __m512& a)
                         LOWBIT_AVX512 {
    const __m512i codes = chunk_codes_512<Bits>(wb, c, mask);
    const __m512i dot = _mm512_dpbusd_epi32(_mm512_load_si512(corr + 16 * c), codes,
                                            _mm512_loadu_si512(xq + 64 * c));
    a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(ix, S), a);
  };
  // the groups a block reads: a whole block's, the last short one's (the same for every row)
  const auto group_mask = [&](int64_t runs) {
    return static_cast<__mmask16>((1u << (((runs - 1) >> std::min(ps, 4)) + 1)) - 1);
  };
  const __mmask16 whole = group_mask(16), last = group_mask(std::max<int64_t>(1, 2 * left));
  // the parameters of the 16 runs from r0 (runs in k; their groups' from p)
  const auto params16 = [&](const P* p, int64_t r0, __mmask16 k) LOWBIT_AVX512 {
    if (ps == 0) return load16_masked(p + r0, k);
    const __m512 g = load16_masked(p + (r0 >> ps), k == all ? whole : last);
    return _mm512_maskz_permutexvar_ps(k, spread, g);  // (runs past k: 0, as ps = 0's load)
  };
  // S for the 16 runs from r0 (parameters of the lanes in k), and the epilogue's share into z
  const auto block = [&](const P* sc, const P* of, int64_t r0, __mmask16 k, __m512& z)
                         LOWBIT_AVX512 {
    const __m512 sw = params16(sc, r0, k);
    if (U) z = _mm512_fmadd_ps(sw, _mm512_loadu_ps(U + r0), z);
    if (of) z = _mm512_fmadd_ps(params16(of, r0, k), _mm512_loadu_ps(V + r0), z);
    return _mm512_mul_ps(sw, _mm512_loadu_ps(xs16 + r0));
  };
  constexpr int64_t chunk_bytes = 8 * Bits;
  const int64_t row_bytes = K * Bits / 8;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wb = w + n * row_bytes;
    const P* sc = scale + n * G;
    const P* of = offset ? offset + n * G : nullptr;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), z = _mm512_setzero_ps();
    for (int64_t b = 0; b < B; ++b) {
      prefetch_lines<Bits>(wb + 8 * chunk_bytes * b);
      const __m512 S = block(sc, of, 16 * b, all, z);
      for (int j = 0; j < 8; j += 2) {
        chunk(wb, 8 * b + j, idx[j], S, a0);
        chunk(wb, 8 * b + j + 1, idx[j + 1], S, a1);
      }
    }
    prefetch_rest(wb + 8 * chunk_bytes * B, row_bytes - 8 * chunk_bytes * B);
    if (left) {  // fewer than 8 chunks: their parameters by a masked load
      const __m512 S = block(sc, of, 16 * B, rest, z);
      for (int64_t j = 0; j < left; ++j)
        chunk(wb, 8 * B + j, _mm512_add_epi32(halves, _mm512_set1_epi32(2 * j)), S, a0);
    }
    float tail = 0.f;
    if (R & 1) {  // the row's last run, a half chunk: one 256-bit step
      const int64_t r = R - 1;
      const float s = load1(sc + (r >> ps));
      tail = s * xqs[r] * run_dot_centred<Bits>(wb, C, xq + 32 * r, qsum[r]) +
             (U ? s * U[r] : 0.f) + (of ? load1(of + (r >> ps)) * V[r] : 0.f);
    }
    y[n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), z)) + tail;
  }
}

// M (<= 4) rows of x against whole blocks b0..b1 of 16 interleaved rows of 4-bit codes
// (affine_blocks.h), any group of whole runs, AVX-512 VNNI. Lanes are weight rows: per run,
// each of its 4 parts of 64 bytes is split into nibbles once and meets every row of x's
// broadcast inputs 8j..8j+3 (low nibbles) and 8j+4..8j+7 (high) in one vpdpbusd each, from the
// centring -8 sum(q) of the run; per run and row of x one convert and one FMA by the run's
// input scale, then per group one FMA by the 16 weight rows' scales (and with offsets one more
// for (o + 8 s) X_g). Inputs of row m: xq + m K, xs and qsum + m K/32, xg + m G; its
// outputs y + m N.
LOWBIT_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
LOWBIT_AVX512 inline __m512 load16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

template <int M, typename P>
LOWBIT_AVX512 void gemv_blocks_512(const int8_t* xq, const float* xs, const float* qsum,
                                   const float* xg, int64_t K, int64_t group, const uint8_t* w,
                                   const P* scale, const P* offset, float* y, int64_t N,
                                   int64_t b0, int64_t b1) {
  const int64_t G = K / group, R = K / 32, per = group / 32, slab = kBlockRows * K / 2;
  const __m512i nib = _mm512_set1_epi8(0x0F);
  const int32_t* x4 = reinterpret_cast<const int32_t*>(xq);
  prefetch_start(w + b0 * slab, (b1 - b0) * slab);
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* wb = w + b * slab;
    const P* sb = scale + b * kBlockRows * G;
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      __m512 ga[M];
      for (int m = 0; m < M; ++m) ga[m] = _mm512_setzero_ps();
      for (int64_t r = g * per; r < (g + 1) * per; ++r) {
        const uint8_t* p = wb + 256 * r;
        prefetch_lines<4>(p);
        __m512i da[M], db[M];
        for (int m = 0; m < M; ++m) {
          da[m] = _mm512_set1_epi32(-8 * static_cast<int32_t>(qsum[m * R + r]));
          db[m] = _mm512_setzero_si512();
        }
        for (int j = 0; j < 4; ++j) {
          const __m512i v = _mm512_loadu_si512(p + 64 * j);
          const __m512i lo = _mm512_and_si512(v, nib);
          const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
          for (int m = 0; m < M; ++m) {
            const int32_t* xm = x4 + m * K / 4 + 8 * r + 2 * j;
            da[m] = _mm512_dpbusd_epi32(da[m], lo, _mm512_set1_epi32(xm[0]));
            db[m] = _mm512_dpbusd_epi32(db[m], hi, _mm512_set1_epi32(xm[1]));
          }
        }
        for (int m = 0; m < M; ++m)
          ga[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(da[m], db[m])),
                                  _mm512_set1_ps(xs[m * R + r]), ga[m]);
      }
      const __m512 s = load16(sb + kBlockRows * g);
      const __m512 c = offset ? _mm512_fmadd_ps(_mm512_set1_ps(8.f), s,
                                                load16(offset + b * kBlockRows * G + kBlockRows * g))
                              : _mm512_setzero_ps();
      for (int m = 0; m < M; ++m) {
        acc[m] = _mm512_fmadd_ps(ga[m], s, acc[m]);
        if (offset) acc[m] = _mm512_fmadd_ps(c, _mm512_set1_ps(xg[m * G + g]), acc[m]);
      }
    }
    for (int m = 0; m < M; ++m) _mm512_storeu_ps(y + m * N + kBlockRows * b, acc[m]);
  }
}

// gemv_blocks_512 on AVX2 alone: each block's 64-byte parts as two halves of 8 weight rows
// (lanes), both halves in the same pass, so the weights are read once, in order, meeting the
// inputs in vpmaddubsw (codes 0..15 times int8: pairs of at most 2 * 15 * 127; a run's 8 pairs,
// 16 products, summed in int16 stay below 2^15 even for an input code of -128), one vpmaddwd per
// run and half to int32, then as gemv_blocks_512 (the same float steps: the same bits). (The
// halves one after the other, as before, read each line twice, the second time from cache, and
// left the memory idle meanwhile: a 4-bit 11264x2048 GEMV of one row on two Zen 4 cores read 33
// GB/s so and 45 in one pass, where the cores' plain read gave ~46.)
template <int M, typename P>
void gemv_blocks_256(const int8_t* xq, const float* xs, const float* qsum, const float* xg,
                     int64_t K, int64_t group, const uint8_t* w, const P* scale, const P* offset,
                     float* y, int64_t N, int64_t b0, int64_t b1) {
  const int64_t G = K / group, R = K / 32, per = group / 32, slab = kBlockRows * K / 2;
  const __m256i nib = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const int32_t* x4 = reinterpret_cast<const int32_t*>(xq);
  prefetch_start(w + b0 * slab, (b1 - b0) * slab);
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* wb = w + b * slab;
    const P* sb = scale + b * kBlockRows * G;
    __m256 acc[2][M];  // [half][row of x]
    for (int m = 0; m < M; ++m) acc[0][m] = acc[1][m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      __m256 ga[2][M];
      for (int m = 0; m < M; ++m) ga[0][m] = ga[1][m] = _mm256_setzero_ps();
      for (int64_t r = g * per; r < (g + 1) * per; ++r) {
        const uint8_t* p = wb + 256 * r;
        prefetch_lines<4>(p);
        __m256i sum[2][M];
        for (int m = 0; m < M; ++m) sum[0][m] = sum[1][m] = _mm256_setzero_si256();
        for (int j = 0; j < 4; ++j) {
          for (int h = 0; h < 2; ++h) {
            const __m256i v =
                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * j + 32 * h));
            const __m256i lo = _mm256_and_si256(v, nib);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
            for (int m = 0; m < M; ++m) {
              const int32_t* xm = x4 + m * K / 4 + 8 * r + 2 * j;
              __m256i& s = sum[h][m];
              s = _mm256_add_epi16(s, _mm256_maddubs_epi16(lo, _mm256_set1_epi32(xm[0])));
              s = _mm256_add_epi16(s, _mm256_maddubs_epi16(hi, _mm256_set1_epi32(xm[1])));
            }
          }
        }
        for (int m = 0; m < M; ++m) {
          const __m256i c = _mm256_set1_epi32(-8 * static_cast<int32_t>(qsum[m * R + r]));
          const __m256 x = _mm256_set1_ps(xs[m * R + r]);
          for (int h = 0; h < 2; ++h) {
            const __m256i d = _mm256_add_epi32(_mm256_madd_epi16(sum[h][m], ones), c);
            ga[h][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), x, ga[h][m]);
          }
        }
      }
      for (int h = 0; h < 2; ++h) {  // weight rows 8h..8h+7
        const __m256 s = load8(sb + kBlockRows * g + 8 * h);
        const __m256 c =
            offset ? _mm256_fmadd_ps(_mm256_set1_ps(8.f), s,
                                     load8(offset + b * kBlockRows * G + kBlockRows * g + 8 * h))
                   : _mm256_setzero_ps();
        for (int m = 0; m < M; ++m) {
          acc[h][m] = _mm256_fmadd_ps(ga[h][m], s, acc[h][m]);
          if (offset) acc[h][m] = _mm256_fmadd_ps(c, _mm256_set1_ps(xg[m * G + g]), acc[h][m]);
        }
      }
    }
    for (int h = 0; h < 2; ++h)
      for (int m = 0; m < M; ++m) _mm256_storeu_ps(y + m * N + kBlockRows * b + 8 * h, acc[h][m]);
  }
}

// The block kernel of the ISA that runs for M (1..4) rows of x.
template <typename P>
void gemv_blocks(bool wide, int64_t M, const int8_t* xq, const float* xs, const float* qsum,
                 const float* xg, int64_t K, int64_t group, const uint8_t* w, const P* scale,
                 const P* offset, float* y, int64_t N, int64_t b0, int64_t b1) {
  switch (M) {
#define LOWBIT_CASE(R)                                                                           \
  case R:                                                                                        \
    if (wide)                                                                                    \
      return gemv_blocks_512<R, P>(xq, xs, qsum, xg, K, group, w, scale, offset, y, N, b0, b1); \
    return gemv_blocks_256<R, P>(xq, xs, qsum, xg, K, group, w, scale, offset, y, N, b0, b1);
    LOWBIT_CASE(1) LOWBIT_CASE(2) LOWBIT_CASE(3) LOWBIT_CASE(4)
#undef LOWBIT_CASE
    default:
      TORCH_CHECK(false, "gemv_blocks: M out of range");
  }
}

// xs2 / corr: the AVX-512 kernel's per-chunk input scales and centring (see
// gemv_rows_q8_512), null for AVX2; xs4: the AVX2 kernel's per-chunk input scales.
template <typename P, int Bits>
void gemv_any_q8(const int8_t* xq, const float* xqs, const float* xs2, const int32_t* corr,
                 const float* xs4,
                 const float* qsum, int64_t M, int64_t K, const uint8_t* w, const P* scale,
                 const P* offset, int64_t group, int ps, const float* xg, const float* xc,
                 float* y, int64_t N, int64_t n0, int64_t n1) {
  const bool uniform = ps >= 1;
  switch (M) {
#define LOWBIT_WIDE(R, MODE)                                                               \
  gemv_rows_q8_512<R, Groups::MODE, P, Bits>(xq, xqs, xs2, corr, qsum, K, w, scale, offset, \
                                             group, ps, xg, y, N, n0, n1)
#define LOWBIT_NARROW(R, MODE)                                                                  \
  gemv_rows_q8<R, Groups::MODE, P, Bits>(xq, xqs, xs4, K, w, scale, offset, group, ps, xg, xc, y, \
                                         N, n0, n1)
#define LOWBIT_CASE(R)                                                                          \
  case R:                                                                                       \
    if (!xs2) {                                                                                 \
      if (uniform) return LOWBIT_NARROW(R, Uniform);                                            \
      if (group == 32) return LOWBIT_NARROW(R, Pair);                                           \
      return LOWBIT_NARROW(R, Walk);                                                            \
    }                                                                                           \
    if (uniform) return LOWBIT_WIDE(R, Uniform);                                                \
    if (group == 32) return LOWBIT_WIDE(R, Pair);                                               \
    return LOWBIT_WIDE(R, Walk);
    LOWBIT_CASE(1) LOWBIT_CASE(2) LOWBIT_CASE(3) LOWBIT_CASE(4)
    LOWBIT_CASE(5) LOWBIT_CASE(6) LOWBIT_CASE(7) LOWBIT_CASE(8)
#undef LOWBIT_CASE
#undef LOWBIT_NARROW
#undef LOWBIT_WIDE
    default:
      TORCH_CHECK(false, "gemv_any_q8: M out of range");
  }
}

}  // namespace

// LOWBIT_KERNEL_ISA holds lowbit's kernels below the CPU's best (read at every call, so tests
// can switch it): "avxvnni" = AVX2 with AVX-VNNI (as Intel's client CPUs), "avx2" = AVX2 alone.
static std::string kernel_isa_env() {  // lower case, as lowbit.kernels.int8 reads it
  const char* isa = std::getenv("LOWBIT_KERNEL_ISA");
  std::string value = isa ? std::string(isa) : std::string();
  for (char& c : value) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return value;
}

// Whether to use the AVX-512 VNNI kernels: the CPU has them and LOWBIT_KERNEL_ISA allows them.
bool use_avx512() {
  static const bool cpu = __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512vnni");
  if (!cpu) return false;
  const std::string isa = kernel_isa_env();
  return isa != "avx2" && isa != "avxvnni";
}

// Whether inputs of two rows or more run the AVX-512 kernels on 8-bit codes too: not where
// LOWBIT_KERNEL_ROWS is "avx2" (set by lowbit.kernels.rows_kernel from a measurement once per
// machine: on a CPU that splits 512-bit instructions in two, AMD's Zen 4, the AVX2 form of the
// row-by-row kernels ran 8-32 rows ~1.6x faster; on Intel's the AVX-512 one is faster). 4-bit
// codes take the AVX-512 block kernel for any rows (2.2x its AVX2 form on Zen 4).
static bool wide_rows() {
  const char* rows = std::getenv("LOWBIT_KERNEL_ROWS");
  return !(rows && std::string(rows) == "avx2");
}

// Whether to use the AVX-VNNI kernels (where AVX-512 is not used): the CPU has AVX-VNNI and
// LOWBIT_KERNEL_ISA is not "avx2".
bool use_avxvnni() {
#if LOWBIT_HAS_AVXVNNI
  static const bool cpu = __builtin_cpu_supports("avxvnni");
  return cpu && kernel_isa_env() != "avx2";
#else
  return false;
#endif
}

Act8 quantize_act8(const at::Tensor& x, int64_t group, bool shifted, bool centring) {
  const int64_t M = x.size(0), K = x.size(1), G = K / group, RB = K / 32, per = group / 32;
  Act8 a;
  a.q.resize(M * K);
  a.s.resize(M * RB);
  a.xg.assign(M * G, 0.f);
  if (centring) a.xc.assign(M * G, 0.f);
  a.qsum.resize(M * RB);
  a.xr.resize(M * RB);
  const float* xp = x.data_ptr<float>();
  // The integer loop computes sum_g s_g sum_b s_x,b (u . q_b). Written with centred codes,
  //   y = sum_g s_g sum_b s_x,b ((u - 8) . q_b) + (o_g + 8 s_g) X_g      (X_g: float sum of x)
  //     = integer part + sum_g o_g X_g + s_g * 8 (X_g - C_g),  C_g = sum_{b in g} s_x,b sum(q_b).
  // Centring matters: with codes 0..15 the rounding error of x is multiplied by codes averaging
  // 7.5 instead of about 3, which made the act8 error ~2.5x larger.
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    const int64_t rows = m1 - m0;
    float* bx = a.xr.data() + m0 * RB;
    float* bq = a.qsum.data() + m0 * RB;
    quantize_rows_q8(xp + m0 * K, rows, K, a.q.data() + m0 * K, a.s.data() + m0 * RB, bx, bq,
                     shifted);
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t g = 0, b = 0; g < G; ++g)
        for (int64_t e = 0; e < per; ++e, ++b) {
          const int64_t i = (m - m0) * RB + b;
          a.xg[m * G + g] += bx[i];
          if (centring) a.xc[m * G + g] += 8.f * (bx[i] - a.s[m * RB + b] * bq[i]);
        }
  });
  return a;
}

// log2 of the runs of 32 per group where that is a power of two, 40 where one group spans the
// row (shifts of a run or chunk index by it give 0), else -1.
static int group_shift(int64_t group, int64_t K) {
  if (group == K) return 40;
  return ((group / 32) & (group / 32 - 1)) == 0 ? __builtin_ctzll(group / 32) : -1;
}

Q8Inputs::Q8Inputs(const at::Tensor& x, int64_t group, int64_t bits, bool offsets)
    : M(x.size(0)), K(x.size(1)), group(group), bits(bits), C(K / 64), offsets(offsets),
      wide(use_avx512() && C > 0 && (M == 1 || bits == 4 || wide_rows())),
      ps(group_shift(group, K)),
      row1(M == 1 && C > 0 && (group == 32 || (wide && ps >= 0))),
      a(quantize_act8(x, group, false, bits == 4 && !wide)) {
  TORCH_CHECK(bits == 4 || bits == 8, "lowbit: int8-input GEMV of ", bits, "-bit codes");
  const int64_t RB = K / 32;  // activation blocks
  const std::vector<float>& xqs = a.s;
  // Per chunk of 64 inputs, laid out for the kernel that runs, 64-byte aligned (one aligned
  // load per chunk):
  //   AVX-512: input scales [s_2c x8 | s_2c+1 / 16 x8] (a power of two, so exact), and corr,
  //            the centring -8 sum(q) of the two runs (the high one times 16) as vpdpbusd's
  //            starting value (8-bit codes: [s_2c x8 | s_2c+1 x8] and -128 sum(q) for both);
  //   AVX2:    input scales [s_2c, s_2c, s_2c+1, s_2c+1] twice (see gemv_rows_q8).
  const bool four = bits == 4;
  const float high = four ? 16.f : 1.f;  // the high run's codes as stored: times 16 or as they are
  const int64_t lanes = wide ? 16 : 8;
  xs_store.resize(row1 ? 0 : M * C * lanes + 16);
  xs = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(xs_store.data()) + 63) & ~uintptr_t{63});
  if (wide) {
    corr_store.assign(M * C * 16 + 16, 0);
    corr = reinterpret_cast<int32_t*>((reinterpret_cast<uintptr_t>(corr_store.data()) + 63) & ~uintptr_t{63});
  }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < C; ++c) {
      const float s0 = xqs[m * RB + 2 * c], s1 = xqs[m * RB + 2 * c + 1];
      if (wide) {
        int32_t* k = corr + (m * C + c) * 16;
        k[0] = (four ? -8 : -128) * static_cast<int32_t>(a.qsum[m * RB + 2 * c]);
        k[8] = -128 * static_cast<int32_t>(a.qsum[m * RB + 2 * c + 1]);
      }
      if (row1) continue;  // (the one-row kernels read per-run scales, laid out below)
      float* v = xs + (m * C + c) * lanes;
      if (wide)
        for (int j = 0; j < 8; ++j) v[j] = s0, v[8 + j] = s1 / high;
      else
        _mm256_store_ps(v, _mm256_setr_ps(s0, s0, s1, s1, s0, s0, s1, s1));
    }
  if (!row1) return;
  // A decode step on Q4_0's grid (AVX-512: any power of two of runs per group, or one group per
  // row). Per run r (lanes past the row's runs 0): the input scales (odd runs / 16 for
  // AVX-512, as in xs2) and the epilogue's U, V (sum_r s_g(r) U_r + o_g(r) V_r, X_r the run's
  // float sum): AVX2 folds its centring there (U = 8 (X_r - s_x,r sum(q_r)) - 8 X_r, or without
  // the - 8 X_r and V = X with offsets), AVX-512 only the offsets' term (o + 8 s) X_r (U = 8 X,
  // V = X). 8-bit codes, centred in the integer dots on both ISAs: only the offsets' term
  // (U = 128 X, V = X; U = 0 without offsets).
  const int64_t pad = (C + 7) / 8 * 16 + 1;
  xsr.assign(pad, 0.f);
  U.assign(pad, 0.f);
  V.assign(pad, 0.f);
  for (int64_t r = 0; r < RB; ++r) {
    const float X = a.xr[r];
    xsr[r] = wide && (r & 1) ? xqs[r] / high : xqs[r];
    V[r] = X;
    if (!four) {
      U[r] = offsets ? 128.f * X : 0.f;
    } else if (wide) {
      U[r] = 8.f * X;
    } else {
      const float xc = 8.f * (X - xqs[r] * a.qsum[r]);
      U[r] = offsets ? xc : xc - 8.f * X;
    }
  }
}

namespace {

template <typename P, int Bits>
void rows_of(const Q8Inputs& in, const uint8_t* wp, const P* sp, const P* op, float* yp,
             int64_t N, int64_t n0, int64_t n1) {
  const int64_t M = in.M, K = in.K, C = in.C, group = in.group;
  const bool wide = in.wide;
  const int8_t* xq = in.a.q.data();
  const float* xqs = in.a.s.data();
  if (in.row1) {
    if (wide)
      gemv_row1_pair_512<P, Bits>(xq, xqs, in.xsr.data(), in.offsets ? in.U.data() : nullptr,
                                  in.V.data(), in.corr, in.a.qsum.data(), K, in.ps, wp, sp, op,
                                  yp, n0, n1);
    else
      gemv_row1_pair<P, Bits>(xq, in.xsr.data(), in.U.data(), in.V.data(), K, wp, sp, op, yp, n0,
                              n1);
    return;
  }
  const int64_t RB = K / 32, G = K / group, lanes = wide ? 16 : 8;
  const bool centring = !in.a.xc.empty();  // (4-bit codes on AVX2 only)
  for (int64_t m0 = 0; m0 < M; m0 += kMaxM) {
    const int64_t mm = std::min(kMaxM, M - m0);
    const float* xs_m = in.xs + m0 * C * lanes;
    gemv_any_q8<P, Bits>(xq + m0 * K, xqs + m0 * RB, wide ? xs_m : nullptr,
                         wide ? in.corr + m0 * C * 16 : nullptr, wide ? nullptr : xs_m,
                         in.a.qsum.data() + m0 * RB, mm, K, wp, sp, op, group, in.ps,
                         in.a.xg.data() + m0 * G, centring ? in.a.xc.data() + m0 * G : nullptr,
                         yp + m0 * N, N, n0, n1);
  }
}

}  // namespace

// x on 4-bit codes (affine_blocks.h): the whole blocks of rows n0..n1 by the block kernels, 4
// rows of x at a time (a block cut by the split computed whole into a buffer), rows past the
// last whole block by rows_of.
template <typename P>
void blocks_of(const Q8Inputs& in, const uint8_t* wp, const P* sp, const P* op, float* yp,
               int64_t N, int64_t n0, int64_t n1) {
  const int64_t M = in.M, K = in.K, G = K / in.group, R = K / 32;
  over_blocks(
      wp, sp, op, yp, M, N, K, G, n0, n1,
      [&](const uint8_t* w, const P* s, const P* o, float* y, int64_t ys, int64_t b0,
          int64_t b1) {
        for (int64_t m0 = 0; m0 < M; m0 += 4)
          gemv_blocks<P>(in.wide, std::min<int64_t>(4, M - m0), in.a.q.data() + m0 * K,
                         in.a.s.data() + m0 * R, in.a.qsum.data() + m0 * R,
                         in.a.xg.data() + m0 * G, K, in.group, w, s, o, y + m0 * ys, ys, b0, b1);
      },
      [&](const uint8_t* w, const P* s, const P* o, float* y, int64_t lo, int64_t hi) {
        rows_of<P, 4>(in, w, s, o, y, N, lo, hi);
      });
}

template <typename P>
void Q8Inputs::rows(const uint8_t* wp, const P* sp, const P* op, float* yp, int64_t N,
                    int64_t n0, int64_t n1) const {
  TORCH_CHECK(offsets == (op != nullptr), "lowbit: inputs prepared for another offset layout");
  if (bits == 8) return rows_of<P, 8>(*this, wp, sp, op, yp, N, n0, n1);
  blocks_of<P>(*this, wp, sp, op, yp, N, n0, n1);
}

template void Q8Inputs::rows<float>(const uint8_t*, const float*, const float*, float*, int64_t,
                                    int64_t, int64_t) const;
template void Q8Inputs::rows<uint16_t>(const uint8_t*, const uint16_t*, const uint16_t*, float*,
                                       int64_t, int64_t, int64_t) const;

template <typename P>
at::Tensor gemv_q8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                   const at::Tensor& offset, int64_t group, int64_t bits) {
  const int64_t N = w.size(0);
  auto y = at::empty({x.size(0), N}, x.options());
  const Q8Inputs in(x, group, bits, offset.numel() > 0);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const P* sp = params<P>(scale);
  const P* op = params<P>(offset);
  float* yp = y.data_ptr<float>();
  // split at whole blocks of 16 rows (4-bit codes are stored so, affine_blocks.h)
  lowbit_kernels::parallel_for(0, (N + kBlockRows - 1) / kBlockRows, 1, [&](int64_t b0, int64_t b1) {
    in.rows(wp, sp, op, yp, N, b0 * kBlockRows, std::min(N, b1 * kBlockRows));
  });
  return y;
}

template at::Tensor gemv_q8<float>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, int64_t, int64_t);
template at::Tensor gemv_q8<uint16_t>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const at::Tensor&, int64_t, int64_t);

}  // namespace lowbit_kernels
