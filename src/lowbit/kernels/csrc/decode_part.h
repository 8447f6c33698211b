// What the two decode attention ops share (decode_ops.cpp on a float cache, decode_codes.cpp on
// a cache of codes): RMSNorm and RoPE of a head, the exponential, and flash-decoding's split of one head's slots into
// ranges that threads attend to separately and that are then combined by their maxima.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common.h"

namespace lowbit_kernels {

inline void rms_row(const float* x, const float* w, float eps, int64_t C, float* y) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t c = 0; c < C; ++c) ss += x[c] * x[c];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(C) + eps);
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) y[c] = w[c] * (x[c] * r);
}

// Optional per-head RMSNorm (Qwen3's q_norm / k_norm), then RoPE in the rotate-half layout,
// rounded as the reference's x·cos + rotate_half(x)·sin is (no fused multiply-add: a key one
// ulp apart can round to another cache code).
LOWBIT_NO_CONTRACT inline void norm_rope(const float* src, const float* norm, float eps, const float* cos, const float* sin,
               int64_t D, float* dst) {
  float tmp[512];
  const float* x = src;
  if (norm != nullptr) {
    rms_row(src, norm, eps, D, tmp);
    x = tmp;
  }
  const int64_t h = D / 2;
  for (int64_t i = 0; i < h; ++i) {
    dst[i] = x[i] * cos[i] - x[i + h] * sin[i];
    dst[i + h] = x[i + h] * cos[i + h] + x[i] * sin[i + h];
  }
}

// exp of 8 floats: 2^n · e^r with |r| <= ln2/2 and Cephes' degree-6 polynomial for e^r
// (relative error ~1e-7); inputs below -87 (scores far under the maximum) give ~0.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504089f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                       _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// a . b over D floats; b float32 or float16 bits (load8 / load1, common.h).
template <typename T>
inline float dot(const float* a, const T* b, int64_t D) {
  __m256 acc = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), load8(b + d), acc);
  float tail = 0.f;
  for (; d < D; ++d) tail += a[d] * load1(b + d);
  return hsum(acc) + tail;
}

// score[0..n) <- exp(score - top) in place; returns their sum.
inline float exp_sum(float* score, int64_t n, float top) {
  const __m256 vtop = _mm256_set1_ps(top);
  __m256 vsum = _mm256_setzero_ps();
  int64_t s = 0;
  for (; s + 8 <= n; s += 8) {
    const __m256 w = exp8(_mm256_sub_ps(_mm256_loadu_ps(score + s), vtop));
    _mm256_storeu_ps(score + s, w);
    vsum = _mm256_add_ps(vsum, w);
  }
  float total = hsum(vsum);
  for (; s < n; ++s) total += (score[s] = std::exp(score[s] - top));
  return total;
}

// One query against a range of one head's slots: the unnormalized
// out = sum_s exp(score_s - top) v_s with top = max_s score_s and total = sum_s exp(score_s - top),
// score_s = scale · q·k_s. An empty range is {-inf, 0} with out = 0.
struct Part {
  float top, total;
};

// How many ranges a context of slots 0..pos is split into: one for short contexts, else as
// many as threads (each at least 64 slots), so two threads share three KV heads evenly and
// every key and value is read once, by the item whose query heads all use it.
inline int64_t ranges_for(int64_t pos, int64_t threads) {
  return pos >= 256 ? std::max<int64_t>(1, std::min<int64_t>(threads, pos / 64)) : 1;
}

// Range c of S of the slots first..last: [lo, hi] (hi < lo when empty).
inline void range_of(int64_t first, int64_t last, int64_t c, int64_t S, int64_t* lo,
                     int64_t* hi) {
  const int64_t n = last - first + 1;
  *lo = first + n * c / S;
  *hi = first + n * (c + 1) / S - 1;
}

// Softmax over each head's S ranges by their tops: parts (heads, S), part_out (heads, S, D)
// -> out (heads, D).
inline void combine_parts(const Part* parts, const float* part_out, int64_t heads, int64_t S,
                          int64_t D, float* out) {
  for (int64_t bh = 0; bh < heads; ++bh) {
    float top = -INFINITY;
    for (int64_t c = 0; c < S; ++c) top = std::max(top, parts[bh * S + c].top);
    float total = 0.f;
    float* o = out + bh * D;
    std::fill_n(o, D, 0.f);
    for (int64_t c = 0; c < S; ++c) {
      const Part& pt = parts[bh * S + c];
      if (pt.total == 0.f) continue;
      const float w = std::exp(pt.top - top);
      total += w * pt.total;
      const float* src = part_out + (bh * S + c) * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] += w * src[d];
    }
    const float inv = 1.f / total;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) o[d] *= inv;
  }
}

}  // namespace lowbit_kernels
