// 4-bit codes in blocks of 16 interleaved rows (lowbit.kernels.affine.pack_runs): each whole
// block of kBlockRows weight rows is stored run by run, 256 bytes per run of 32 codes, in four
// parts of 64 bytes; in part j, bytes 4i..4i+3 are row i's, byte t holding the run's code
// 8j + t (low nibble) and 8j + 4 + t (high nibble). Its params are stored group-major, (G, 16).
// Rows past the last whole block keep the row-by-row layout of affine_gemv.cpp's header.
//
// Why: a decode step's GEMV with one row per weight row was bound by instructions at rows of
// 576 codes (per 64 codes a broadcast, masks, vpdpbusd, a convert, a permute and an FMA, per row
// a horizontal sum), 36-58% of the plain read's bytes per second from memory. With rows as the
// vector lanes, one vpdpbusd multiplies 4 codes of each of 16 rows by 4 broadcast inputs, and
// per run one convert and one FMA serve 16 rows: no shuffles and no horizontal sums
// (gemv_blocks_512 / gemv_blocks_256 in affine_q8.cpp, 1-4 rows of x a pass; float inputs:
// gemv_blocks_f32 in affine_gemv.cpp). The prompt GEMM builds its panels straight from blocks
// (fill_block, affine_q8_gemm.cpp). The dequantizing readers (evaluation tiles,
// affine_dequantize, convolution columns) take a block back to rows in cache (rows_of_block)
// and run their row code on it: a pass over 16 rows' codes in L1 beside the GEMM it feeds.
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace lowbit_kernels {

constexpr int64_t kBlockRows = 16;

// Block codes wb (16 rows of K codes) and params sb, ob ((G, 16); ob may be null) -> rows in
// the row-by-row layout: wr (16, K/2) bytes, sr, orow (16, G).
template <typename P>
inline void rows_of_block(const uint8_t* wb, const P* sb, const P* ob, int64_t K, int64_t G,
                          uint8_t* wr, P* sr, P* orow) {
  const int64_t R = K / 32, rb = K / 2;
  const __m128i nib = _mm_set1_epi8(0x0F);
  for (int64_t i = 0; i < kBlockRows; ++i) {
    uint8_t* row = wr + i * rb;
    __m128i prev[2] = {_mm_setzero_si128(), _mm_setzero_si128()};  // run 2c's codes 0..15 and 16..31 until run 2c + 1 joins them
    for (int64_t r = 0; r < R; ++r) {
      int32_t d[4];
      for (int j = 0; j < 4; ++j) std::memcpy(d + j, wb + r * 256 + 64 * j + 4 * i, 4);
      const __m128i v = _mm_setr_epi32(d[0], d[1], d[2], d[3]);
      const __m128i lo = _mm_and_si128(v, nib), hi = _mm_and_si128(_mm_srli_epi16(v, 4), nib);
      const __m128i c0 = _mm_unpacklo_epi32(lo, hi), c1 = _mm_unpackhi_epi32(lo, hi);
      if (r % 2 == 0 && r + 1 == R) {  // a last half chunk: codes t and 16 + t
        _mm_storeu_si128(reinterpret_cast<__m128i*>(row + 16 * r),
                         _mm_or_si128(c0, _mm_slli_epi16(c1, 4)));
      } else if (r % 2 == 0) {
        prev[0] = c0, prev[1] = c1;
      } else {  // chunk (r - 1) / 2: codes t of run r - 1 and of run r in one byte
        uint8_t* dst = row + 16 * (r - 1);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm_or_si128(prev[0], _mm_slli_epi16(c0, 4)));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), _mm_or_si128(prev[1], _mm_slli_epi16(c1, 4)));
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      sr[i * G + g] = sb[g * kBlockRows + i];
      if (ob) orow[i * G + g] = ob[g * kBlockRows + i];
    }
  }
}

// Runs f(wp, sp, op, first, lo, hi) over the rows n0..n1 of a 4-bit weight (N rows of K codes,
// G groups) in pieces, where wp, sp, op hold rows in the row-by-row layout, their row 0 being
// weight row `first`, and the piece is their rows lo..hi: a whole block's rows back in a buffer
// of this call, rows past the last whole block as stored.
template <typename P, typename F>
void over_rows(const uint8_t* w, const P* scale, const P* offset, int64_t N, int64_t K,
               int64_t G, int64_t n0, int64_t n1, F&& f) {
  const int64_t whole = N / kBlockRows * kBlockRows, rb = K / 2;
  std::vector<uint8_t> wr;
  std::vector<P> sr, orow;
  int64_t n = n0;
  while (n < std::min(n1, whole)) {
    const int64_t first = n / kBlockRows * kBlockRows, hi = std::min(n1, first + kBlockRows);
    if (wr.empty()) {
      wr.resize(kBlockRows * rb);
      sr.resize(kBlockRows * G);
      if (offset) orow.resize(kBlockRows * G);
    }
    rows_of_block(w + first * rb, scale + first * G, offset ? offset + first * G : nullptr, K, G,
                  wr.data(), sr.data(), offset ? orow.data() : nullptr);
    f(wr.data(), sr.data(), offset ? orow.data() : nullptr, first, n - first, hi - first);
    n = hi;
  }
  if (n < n1)
    f(w + whole * rb, scale + whole * G, offset ? offset + whole * G : nullptr, whole, n - whole,
      n1 - whole);
}

// Rows n0..n1 of a 4-bit weight for M rows of x into y (M, N): whole blocks by
// blocks(w, s, o, y, y_stride, b0, b1), which writes y[m * y_stride + 16 b + i] for its blocks
// b0..b1 of the weight (w, s, o); a block cut by the range is computed whole into a buffer
// (M, 16); rows past the last whole block by tail(w, s, o, y, lo, hi) on the row-by-row part,
// its row 0 being weight row N / 16 * 16 (y likewise offset).
template <typename P, typename B, typename T>
void over_blocks(const uint8_t* w, const P* scale, const P* offset, float* y, int64_t M,
                 int64_t N, int64_t K, int64_t G, int64_t n0, int64_t n1, B&& blocks, T&& tail) {
  const int64_t whole = N / kBlockRows * kBlockRows, rb = K / 2;
  int64_t n = n0;
  while (n < std::min(n1, whole)) {
    const int64_t first = n / kBlockRows * kBlockRows;
    if (n == first && first + kBlockRows <= n1) {  // whole blocks
      const int64_t b1 = std::min(n1, whole) / kBlockRows;
      blocks(w, scale, offset, y, N, first / kBlockRows, b1);
      n = b1 * kBlockRows;
      continue;
    }
    std::vector<float> part(M * kBlockRows);
    blocks(w + first * rb, scale + first * G, offset ? offset + first * G : nullptr, part.data(),
           kBlockRows, int64_t{0}, int64_t{1});
    const int64_t hi = std::min(n1, first + kBlockRows);
    for (int64_t m = 0; m < M; ++m)
      std::copy(part.begin() + m * kBlockRows + (n - first),
                part.begin() + m * kBlockRows + (hi - first), y + m * N + n);
    n = hi;
  }
  if (n < n1)
    tail(w + whole * rb, scale + whole * G, offset ? offset + whole * G : nullptr, y + whole,
         n - whole, n1 - whole);
}

// over_rows for Bits-bit codes: 8-bit weights are stored row by row, one piece.
template <int64_t Bits, typename P, typename F>
void for_rows(const uint8_t* w, const P* scale, const P* offset, int64_t N, int64_t K, int64_t G,
              int64_t n0, int64_t n1, F&& f) {
  if constexpr (Bits == 8)
    f(w, scale, offset, int64_t{0}, n0, n1);
  else
    over_rows(w, scale, offset, N, K, G, n0, n1, f);
}

// The (N, G) params of a 4-bit weight (a tensor in the layout above) one row per weight row.
inline at::Tensor row_params(const at::Tensor& p) {
  const int64_t N = p.size(0), G = p.size(1), whole = N / kBlockRows * kBlockRows;
  if (whole == 0) return p;
  const at::Tensor head = p.narrow(0, 0, whole).view({-1, G, kBlockRows}).transpose(1, 2).reshape({whole, G});
  return at::cat({head, p.narrow(0, whole, N - whole)});
}

}  // namespace lowbit_kernels
