// The AVX2 W8A8 product on weight panels, shared by int8_gemm.cpp (linears, per-token codes)
// and int8_conv.cpp (convolutions, per-tensor codes): the layout and the exact product are
// described at the top of int8_gemm.cpp.
#pragma once

#include "common.h"

namespace lowbit_kernels::panels {

constexpr int64_t kPanel = 8;     // weight rows per panel: one ymm of int32 sums
// Register tile: 3 activation rows x 2 panels = 6 int32 sums, 2 weights' absolute values and
// 2 sign masks, one broadcast, one signed copy, the ones and a zero: 14 of AVX2's 16 registers
// (4 x 2 spills sums to the stack, which ran slower; measured).
constexpr int64_t kRowsTile = 3;
constexpr int kPanels = 2;
// Activation codes per block of rows: about half of a 512 KB L2, so a block's codes stay there
// while every panel streams past them once.
constexpr int64_t kCodesBlock = 1 << 17;

// What the tile's int32 sums become: y[m, n] = float(sum + add[n]) * sx * sw[n] (+ bias[n]);
// sx per row (per-token codes) or one for all (per-tensor codes); add and bias may be null;
// ldy: y's row stride (N, or more where y is one group's columns of a wider output); with
// leaky, then y = max(y, slope * y) (a LeakyReLU or, slope 0, a ReLU after the layer, fused:
// 0 <= slope <= 1).
struct Epilogue {
  const float* sx;
  bool sx_per_row;
  const float* sw;
  const int32_t* add;
  const float* bias;
  int64_t ldy;
  bool leaky = false;
  float slope = 0.f;
};

// Sums of R activation rows (stride Kp) against P panels (P * 8 columns), over Kp / 4 steps,
// in out. Not inlined, and the sums local: inlined into its caller, g++ 12 kept one of the 6
// sums on the stack (a store-forwarding chain at every step: slower than the vpsignb form).
// Wide: the panels as widen() writes them, |w| and the sign mask of each step side by side
// (no vpabsb / vpcmpgtb per step), else as pack_panels stores them.
template <int R, int P, bool Wide>
__attribute__((noinline)) void tile(const int8_t* q, int64_t Kp, const int8_t* panel,
                                    int64_t panel_bytes, __m256i out[R][P]) {
  const __m256i ones = _mm256_set1_epi16(1), zero = _mm256_setzero_si256();
  __m256i acc[R][P];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) acc[r][p] = _mm256_setzero_si256();
  for (int64_t s = 0; s < Kp / 4; ++s) {
    __m256i aw[P], neg[P];
    for (int p = 0; p < P; ++p) {
      const __m256i* at = reinterpret_cast<const __m256i*>(panel + p * panel_bytes + (Wide ? 64 : 32) * s);
      if constexpr (Wide) {
        aw[p] = _mm256_loadu_si256(at);
        neg[p] = _mm256_loadu_si256(at + 1);
      } else {
        const __m256i w = _mm256_loadu_si256(at);
        aw[p] = _mm256_abs_epi8(w);
        neg[p] = _mm256_cmpgt_epi8(zero, w);
      }
    }
    for (int r = 0; r < R; ++r) {
      int32_t four;
      std::memcpy(&four, q + r * Kp + 4 * s, 4);
      const __m256i a = _mm256_set1_epi32(four);
      for (int p = 0; p < P; ++p) {
        const __m256i sa = _mm256_xor_si256(a, neg[p]);  // a where w >= 0, -a - 1 where w < 0
        acc[r][p] = _mm256_add_epi32(acc[r][p], _mm256_madd_epi16(_mm256_maddubs_epi16(aw[p], sa), ones));
      }
    }
  }
  for (int p = 0; p < P; ++p) {  // the corrections (the last 32 bytes of a panel): exact sums
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + (p + 1) * panel_bytes - 32));
    for (int r = 0; r < R; ++r) out[r][p] = _mm256_add_epi32(acc[r][p], c);
  }
}

// Rows enough to widen a group's panels first (each widened step then serves them all; a few
// decode rows read the panels once, as stored: widening would triple their memory traffic).
constexpr int64_t kWideRows = 24;

// Bytes of one panel, as stored and widened.
inline int64_t panel_size(int64_t Kp, bool wide) { return (wide ? 16 : 8) * Kp + 32; }

// P stored panels -> their widened form in dst: per step |w| then the sign mask (0xFF where
// w < 0), 64 bytes; the corrections copied. One pass, reused by every row of the block.
inline void widen(const int8_t* src, int64_t Kp, int P, int8_t* dst) {
  const __m256i zero = _mm256_setzero_si256();
  for (int p = 0; p < P; ++p) {
    const int8_t* from = src + p * panel_size(Kp, false);
    int8_t* to = dst + p * panel_size(Kp, true);
    for (int64_t s = 0; s < Kp / 4; ++s) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(from + 32 * s));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(to + 64 * s), _mm256_abs_epi8(w));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(to + 64 * s + 32), _mm256_cmpgt_epi8(zero, w));
    }
    std::memcpy(to + 16 * Kp, from + 8 * Kp, 32);
  }
}

// The epilogue for the tile's rows (the first at row m0 of the call) and columns; a last panel
// of fewer than 8 real columns (N not a multiple of 8) reads and writes through small buffers
// (a variable-length memcpy is a library call: measured 3x slower on a 27-input layer when
// every panel took it).
template <typename T>
inline __m256i column_bits(const T* v, int64_t cols) {
  if (cols == kPanel) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v));
  T buf[kPanel] = {0};
  std::memcpy(buf, v, cols * sizeof(T));
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(buf));
}

template <int R, int P>
inline void store(const __m256i acc[R][P], const Epilogue& e, int64_t m0, int64_t n0, int64_t N,
                  float* y) {
  for (int p = 0; p < P; ++p) {
    const int64_t n = n0 + p * kPanel, cols = std::min<int64_t>(kPanel, N - n);
    const __m256 ws = _mm256_castsi256_ps(column_bits(e.sw + n, cols));
    const __m256i add = e.add ? column_bits(e.add + n, cols) : _mm256_setzero_si256();
    const __m256 bias = e.bias ? _mm256_castsi256_ps(column_bits(e.bias + n, cols)) : _mm256_setzero_ps();
    for (int r = 0; r < R; ++r) {
      const __m256 sx = _mm256_set1_ps(e.sx[e.sx_per_row ? m0 + r : 0]);
      const __m256i sum = e.add ? _mm256_add_epi32(acc[r][p], add) : acc[r][p];
      __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(sum), sx), ws);
      if (e.bias) v = _mm256_add_ps(v, bias);
      if (e.leaky) v = _mm256_max_ps(v, _mm256_mul_ps(v, _mm256_set1_ps(e.slope)));
      if (cols == kPanel) {
        _mm256_storeu_ps(y + r * e.ldy + n, v);
      } else {
        float out[kPanel];
        _mm256_storeu_ps(out, v);
        std::memcpy(y + r * e.ldy + n, out, cols * sizeof(float));
      }
    }
  }
}

// Rows m0.. m0 + M of the codes q (M rows at stride Kp, row m0 first) against P panels from
// column n0 (stored, or widened), into y (row m0 first, N columns at stride e.ldy).
template <int P, bool Wide>
void rows_against_panels(const int8_t* q, int64_t M, int64_t Kp, const int8_t* panel,
                         const Epilogue& e, int64_t m0, int64_t n0, int64_t N, float* y) {
  const int64_t panel_bytes = panel_size(Kp, Wide);
  int64_t m = 0;
  for (; m + kRowsTile <= M; m += kRowsTile) {
    __m256i acc[kRowsTile][P];
    tile<kRowsTile, P, Wide>(q + m * Kp, Kp, panel, panel_bytes, acc);
    store<kRowsTile, P>(acc, e, m0 + m, n0, N, y + m * e.ldy);
  }
  if (M - m == 2) {  // the last rows: one pass over the panels for both
    __m256i acc[2][P];
    tile<2, P, Wide>(q + m * Kp, Kp, panel, panel_bytes, acc);
    store<2, P>(acc, e, m0 + m, n0, N, y + m * e.ldy);
  } else if (M - m == 1) {
    __m256i acc[1][P];
    tile<1, P, Wide>(q + m * Kp, Kp, panel, panel_bytes, acc);
    store<1, P>(acc, e, m0 + m, n0, N, y + m * e.ldy);
  }
}

// Rows of q (M at stride Kp) against the groups g0..g1 of kPanels panels (Np / 8 panels in all,
// Np >= N), into y (M rows of N columns at stride e.ldy); with kWideRows rows or more, each
// group widened first.
inline void rows_against_all(const int8_t* q, int64_t M, int64_t Kp, const int8_t* panels,
                             int64_t Np, const Epilogue& e, int64_t m0, int64_t g0, int64_t g1,
                             int64_t N, float* y) {
  // one buffer per thread, kept between calls (no allocation or zeroing on this path)
  thread_local std::vector<int8_t> wide;
  const bool widen_first = M >= kWideRows;
  if (widen_first && wide.size() < static_cast<size_t>(kPanels * panel_size(Kp, true)))
    wide.resize(kPanels * panel_size(Kp, true));
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t n0 = kPanels * g * kPanel;
    const int8_t* panel = panels + (n0 / kPanel) * panel_size(Kp, false);
    const int count = (Np - n0) / kPanel >= kPanels ? kPanels : 1;
    if (!widen_first) {
      if (count == kPanels)
        rows_against_panels<kPanels, false>(q, M, Kp, panel, e, m0, n0, N, y);
      else
        rows_against_panels<1, false>(q, M, Kp, panel, e, m0, n0, N, y);
      continue;
    }
    widen(panel, Kp, count, wide.data());
    if (count == kPanels)
      rows_against_panels<kPanels, true>(q, M, Kp, wide.data(), e, m0, n0, N, y);
    else
      rows_against_panels<1, true>(q, M, Kp, wide.data(), e, m0, n0, N, y);
  }
}

}  // namespace lowbit_kernels::panels
