// Attention of one new token per row over a key/value cache of codes (lowbit's QuantKVCache:
// per token, head and group of channels an unsigned code with a float16 scale and minimum,
// value = code * scale + minimum; codes of up to 4 bits two per byte, low nibble first), in
// one call per layer as decode_ops.cpp's decode_attention does for a float cache: the heads
// prepared as lowbit's attention function prepares them (norms, RoPE, key centres, the
// Hadamard turn of every head, rounded queries), the new key and value rounded into their slot,
// softmax(q·Kᵀ)·V over the stored codes, the output turned back.
//
// The rounding is lowbit.primitives.kv.quantize_heads' arithmetic step by step (float32
// range, scale = (max - min) / code_max stored as float16, code = round-half-even((x - min) /
// scale)). Each slot's key and value is dequantized once as it streams by and used by every
// query head of its KV head, so the cache is read as codes (at 4 bits about a quarter of a
// float16 cache's bytes) and no float copy of the context is made per step, which is what the
// reference (dequantize the filled slots, then SDPA) does. Why hand-written: no library op
// attends over grouped low-bit codes on a CPU. decode_attention_codes_reference in
// lowbit/kernels/kv_attention.py defines the result.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common.h"
#include "decode_api.h"
#include "decode_part.h"

namespace {

using lowbit_kernels::Part;

// One side (keys or values) of one (row, KV head): per slot row_bytes of codes, and `groups`
// float16 scales and minimums.
struct Side {
  const uint8_t* codes;
  const uint16_t* scale;
  const uint16_t* minimum;
  int64_t row_bytes, groups;
};

// The 8 codes starting at channel d (a multiple of 8) of a slot's row, as floats.
inline __m256 codes8(const uint8_t* row, int64_t d, bool packed) {
  if (!packed) return lowbit_kernels::u8x8_to_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + d)));
  int32_t four;
  std::memcpy(&four, row + d / 2, 4);  // 4 bytes: codes d..d+7, low nibble first
  const __m128i b = _mm_cvtsi32_si128(four), nib = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(b, nib), hi = _mm_and_si128(_mm_srli_epi16(b, 4), nib);
  return lowbit_kernels::u8x8_to_ps(_mm_unpacklo_epi8(lo, hi));
}

// Slot s of one side as D floats.
void dequantize_slot(const Side& side, int64_t s, int64_t D, bool packed, float* out) {
  const uint8_t* row = side.codes + s * side.row_bytes;
  const uint16_t* sc = side.scale + s * side.groups;
  const uint16_t* mn = side.minimum + s * side.groups;
  const int64_t g = D / side.groups;
  for (int64_t gi = 0; gi < side.groups; ++gi) {
    const float scale = _cvtsh_ss(sc[gi]), minimum = _cvtsh_ss(mn[gi]);
    int64_t d = gi * g;
    const int64_t end = d + g;
    if (g % 8 == 0) {
      const __m256 vs = _mm256_set1_ps(scale), vm = _mm256_set1_ps(minimum);
      for (; d < end; d += 8)
        _mm256_storeu_ps(out + d, _mm256_fmadd_ps(codes8(row, d, packed), vs, vm));
    }
    for (; d < end; ++d) {  // groups that are not a multiple of 8 channels
      const int code = packed ? (row[d / 2] >> (4 * (d & 1))) & 0x0F : row[d];
      out[d] = static_cast<float>(code) * scale + minimum;
    }
  }
}

// A slot's float16 scales and minimums as floats (G <= 64: D <= 512 in groups of >= 8).
struct SlotParams {
  float scale[64], minimum[64];
  void load(const Side& side, int64_t s) {
    for (int64_t gi = 0; gi < side.groups; ++gi) {
      scale[gi] = _cvtsh_ss(side.scale[s * side.groups + gi]);
      minimum[gi] = _cvtsh_ss(side.minimum[s * side.groups + gi]);
    }
  }
  // Channels d..d+7 of the slot's row (d a multiple of 8, in group gi) as floats.
  template <bool Packed>
  __m256 values8(const uint8_t* row, int64_t d, int64_t gi) const {
    return _mm256_fmadd_ps(codes8(row, d, Packed), _mm256_set1_ps(scale[gi]),
                           _mm256_set1_ps(minimum[gi]));
  }
};

// The fast path (D a multiple of 32, groups of a multiple of 8 channels), QC query heads at a
// time: scores of four slots at once (each slot's key dequantized in registers once for the
// QC heads, the four dot products summed together), then the values 32 channels at a time
// with the QC heads' accumulators in registers. gidx[v]: the group of channels 8v..8v+7.
template <bool Packed, int QC>
void scores_fast(const float* q, const Side& keys, int64_t lo, int64_t hi, int64_t D,
                 const int64_t* gidx, float scale, float* score, int64_t n) {
  SlotParams p[4];
  int64_t s = lo;
  for (; s + 4 <= hi + 1; s += 4) {
    __m256 acc[QC][4];
    for (int j = 0; j < QC; ++j)
      for (int i = 0; i < 4; ++i) acc[j][i] = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) p[i].load(keys, s + i);
    for (int64_t d = 0; d < D; d += 8) {
      for (int i = 0; i < 4; ++i) {
        const __m256 k = p[i].values8<Packed>(keys.codes + (s + i) * keys.row_bytes, d, gidx[d / 8]);
        for (int j = 0; j < QC; ++j) acc[j][i] = _mm256_fmadd_ps(_mm256_loadu_ps(q + j * D + d), k, acc[j][i]);
      }
    }
    for (int j = 0; j < QC; ++j) {  // pairwise adds leave the four sums in the two halves
      const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[j][0], acc[j][1]),
                                      _mm256_hadd_ps(acc[j][2], acc[j][3]));
      const __m128 four = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
      _mm_storeu_ps(score + j * n + s - lo, _mm_mul_ps(four, _mm_set1_ps(scale)));
    }
  }
  for (; s <= hi; ++s) {  // the last slots one at a time
    __m256 acc[QC];
    for (int j = 0; j < QC; ++j) acc[j] = _mm256_setzero_ps();
    p[0].load(keys, s);
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 k = p[0].values8<Packed>(keys.codes + s * keys.row_bytes, d, gidx[d / 8]);
      for (int j = 0; j < QC; ++j) acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(q + j * D + d), k, acc[j]);
    }
    for (int j = 0; j < QC; ++j) score[j * n + s - lo] = lowbit_kernels::hsum(acc[j]) * scale;
  }
}

template <bool Packed, int QC>
void values_fast(const float* w, const Side& vals, int64_t lo, int64_t hi, int64_t D,
                 const int64_t* gidx, int64_t n, float* out) {
  SlotParams p;
  for (int64_t d0 = 0; d0 < D; d0 += 32) {
    __m256 acc[QC][4];
    for (int j = 0; j < QC; ++j)
      for (int i = 0; i < 4; ++i) acc[j][i] = _mm256_setzero_ps();
    for (int64_t s = lo; s <= hi; ++s) {
      p.load(vals, s);
      const uint8_t* row = vals.codes + s * vals.row_bytes;
      __m256 ws[QC];
      for (int j = 0; j < QC; ++j) ws[j] = _mm256_set1_ps(w[j * n + s - lo]);
      for (int i = 0; i < 4; ++i) {
        const int64_t d = d0 + 8 * i;
        const __m256 v = p.values8<Packed>(row, d, gidx[d / 8]);
        for (int j = 0; j < QC; ++j) acc[j][i] = _mm256_fmadd_ps(ws[j], v, acc[j][i]);
      }
    }
    for (int j = 0; j < QC; ++j)
      for (int i = 0; i < 4; ++i) _mm256_storeu_ps(out + j * D + d0 + 8 * i, acc[j][i]);
  }
}

// Q query heads (q: Q x D) of one KV head against its slots lo..hi: each head's Part and
// unnormalized output (out: Q x D). score: Q x (hi - lo + 1) floats; buf: D floats.
void attend_range(const float* q, int64_t Q, const Side& keys, const Side& vals, int64_t lo,
                  int64_t hi, int64_t D, bool packed, float scale, float* score, float* buf,
                  float* out, Part* parts) {
  const int64_t n = hi - lo + 1, g = D / keys.groups;
  const bool fast = D % 32 == 0 && g % 8 == 0;
  int64_t gidx[64];
  for (int64_t v = 0; v < D / 8; ++v) gidx[v] = v * 8 / g;
  // Scores: score[j * n + s - lo] = scale * q_j . k_s.
  for (int64_t j0 = 0; fast && j0 < Q; j0 += 3) {
    const int qc = static_cast<int>(std::min<int64_t>(3, Q - j0));
    const float* qj = q + j0 * D;
    float* sj = score + j0 * n;
    if (packed) {
      if (qc == 3) scores_fast<true, 3>(qj, keys, lo, hi, D, gidx, scale, sj, n);
      else if (qc == 2) scores_fast<true, 2>(qj, keys, lo, hi, D, gidx, scale, sj, n);
      else scores_fast<true, 1>(qj, keys, lo, hi, D, gidx, scale, sj, n);
    } else {
      if (qc == 3) scores_fast<false, 3>(qj, keys, lo, hi, D, gidx, scale, sj, n);
      else if (qc == 2) scores_fast<false, 2>(qj, keys, lo, hi, D, gidx, scale, sj, n);
      else scores_fast<false, 1>(qj, keys, lo, hi, D, gidx, scale, sj, n);
    }
  }
  for (int64_t s = lo; !fast && s <= hi; ++s) {
    dequantize_slot(keys, s, D, packed, buf);
    for (int64_t j = 0; j < Q; ++j) score[j * n + s - lo] = lowbit_kernels::dot(q + j * D, buf, D) * scale;
  }
  for (int64_t j = 0; j < Q; ++j) {
    float* sj = score + j * n;
    const float top = *std::max_element(sj, sj + n);
    parts[j] = {top, lowbit_kernels::exp_sum(sj, n, top)};
  }
  // Values: out_j = sum_s score[j * n + s - lo] v_s.
  for (int64_t j0 = 0; fast && j0 < Q; j0 += 3) {
    const int qc = static_cast<int>(std::min<int64_t>(3, Q - j0));
    const float* wj = score + j0 * n;
    float* oj = out + j0 * D;
    if (packed) {
      if (qc == 3) values_fast<true, 3>(wj, vals, lo, hi, D, gidx, n, oj);
      else if (qc == 2) values_fast<true, 2>(wj, vals, lo, hi, D, gidx, n, oj);
      else values_fast<true, 1>(wj, vals, lo, hi, D, gidx, n, oj);
    } else {
      if (qc == 3) values_fast<false, 3>(wj, vals, lo, hi, D, gidx, n, oj);
      else if (qc == 2) values_fast<false, 2>(wj, vals, lo, hi, D, gidx, n, oj);
      else values_fast<false, 1>(wj, vals, lo, hi, D, gidx, n, oj);
    }
  }
  if (fast) return;
  std::fill_n(out, Q * D, 0.f);
  for (int64_t s = lo; s <= hi; ++s) {  // other shapes: each slot dequantized into buf
    dequantize_slot(vals, s, D, packed, buf);
    for (int64_t j = 0; j < Q; ++j) {
      const float w = score[j * n + s - lo];
      float* o = out + j * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] += w * buf[d];
    }
  }
}

// One group of g values rounded as lowbit.primitives.kv.quantize_heads does: float16 scale and
// minimum into *sh, *mh, codes into u.
void quantize_group(const float* x, int64_t g, int code_max, uint16_t* sh, uint16_t* mh,
                    uint8_t* u) {
  float lo = x[0], hi = x[0];
  for (int64_t i = 1; i < g; ++i) lo = std::min(lo, x[i]), hi = std::max(hi, x[i]);
  float s = (hi - lo) / static_cast<float>(code_max);
  TORCH_CHECK(std::isfinite(s), "lowbit::decode_attention_codes: a key, value or query is not finite");
  if (!(s > 0.f)) s = 1.f;  // a zero-width group: any scale is exact
  *sh = _cvtss_sh(s, 0), *mh = _cvtss_sh(lo, 0);  // round to nearest even
  if (_cvtsh_ss(*sh) == 0.f) *sh = 0x0400;  // underflow: float16's smallest normal
  TORCH_CHECK(std::isfinite(_cvtsh_ss(*sh)) && std::isfinite(_cvtsh_ss(*mh)),
              "lowbit::decode_attention_codes: a key, value or query overflows float16");
  const float sf = _cvtsh_ss(*sh), mf = _cvtsh_ss(*mh);
  for (int64_t i = 0; i < g; ++i) {
    const float c = std::nearbyint((x[i] - mf) / sf);
    u[i] = static_cast<uint8_t>(std::min<float>(std::max(c, 0.f), code_max));
  }
}

// Round one head's D values (groups of g channels) into its slot: codes, scale and minimum.
void store_slot(const float* x, int64_t D, int64_t g, int64_t bits, uint8_t* codes,
                uint16_t* scale, uint16_t* minimum) {
  uint8_t u[512];
  for (int64_t gi = 0; gi < D / g; ++gi)
    quantize_group(x + gi * g, g, (1 << bits) - 1, scale + gi, minimum + gi, u + gi * g);
  if (bits > 4) {
    std::copy_n(u, D, codes);
    return;
  }
  for (int64_t i = 0; i < D / 2; ++i) codes[i] = u[2 * i] | (u[2 * i + 1] << 4);
}

// A query rounded in place to bits-bit codes per group and back (fake_quantize_heads).
void round_query(float* x, int64_t D, int64_t g, int64_t bits) {
  uint8_t u[512];
  for (int64_t gi = 0; gi < D / g; ++gi) {
    uint16_t sh, mh;
    quantize_group(x + gi * g, g, (1 << bits) - 1, &sh, &mh, u);
    const float sf = _cvtsh_ss(sh), mf = _cvtsh_ss(mh);
    for (int64_t i = 0; i < g; ++i) x[gi * g + i] = static_cast<float>(u[i]) * sf + mf;
  }
}

// x (D) times the orthonormal h (D x D, row-major): out = x h; with `back`, out = x hᵀ.
void turn(const float* x, const float* h, int64_t D, bool back, float* out) {
  if (back) {
    for (int64_t i = 0; i < D; ++i) out[i] = lowbit_kernels::dot(x, h + i * D, D);
    return;
  }
  std::fill_n(out, D, 0.f);
  for (int64_t i = 0; i < D; ++i) {
    const float xi = x[i];
    const float* hi = h + i * D;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) out[j] += xi * hi[j];
  }
}

void check_side(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& minimum,
                const at::Tensor& like, int64_t row_bytes) {
  TORCH_CHECK(codes.scalar_type() == at::kByte && scale.scalar_type() == at::kHalf &&
                  minimum.scalar_type() == at::kHalf,
              "lowbit::decode_attention_codes: uint8 codes, float16 scales and minimums");
  TORCH_CHECK(codes.is_contiguous() && scale.is_contiguous() && minimum.is_contiguous(),
              "lowbit::decode_attention_codes: contiguous caches only");
  TORCH_CHECK(codes.dim() == 4 && codes.sizes().slice(0, 3) == like.sizes().slice(0, 3) &&
                  codes.size(3) == row_bytes && scale.sizes() == minimum.sizes() &&
                  scale.sizes().slice(0, 3) == like.sizes().slice(0, 3),
              "lowbit::decode_attention_codes: cache shapes do not match");
}

}  // namespace

namespace lowbit_kernels {

// One new token per row: qkv (B, (H + 2·Hkv)·D) as the projections give it; one layer's cache of
// codes (B, Hkv, T, D/2 up to 4 bits, else D) uint8 and scales/minimums (B, Hkv, T, D/group)
// float16, keys then values; cos/sin (T, D) by position (slot minus the row's left padding).
// The queries and keys get the optional per-head norms and RoPE, the keys minus `center`
// (Hkv, D) when given, all three turned by `rotation` (D, D) when given, the queries rounded to
// `query_bits` (0: not); the key and value are rounded into slot `pos`, slots pad[b]..pos of row
// b attended to, and the output turned back. Returns (B, H·D).
at::Tensor decode_attention_codes(
    const at::Tensor& qkv, at::Tensor& k_codes, at::Tensor& k_scale, at::Tensor& k_min,
    at::Tensor& v_codes, at::Tensor& v_scale, at::Tensor& v_min, const at::Tensor& cos,
    const at::Tensor& sin, const at::Tensor& pad, int64_t pos, int64_t H, int64_t Hkv,
    double scale, const at::Tensor& q_norm, const at::Tensor& k_norm, double eps,
    const at::Tensor& center, const at::Tensor& rotation, int64_t bits, int64_t query_bits) {
  const char* op = "lowbit::decode_attention_codes";
  const int64_t B = qkv.size(0), D = cos.size(-1), length = pos + 1;
  const int64_t T = k_codes.size(2), G = k_scale.size(3);
  const bool packed = bits <= 4;
  for (const at::Tensor* t : {&qkv, &cos, &sin, &q_norm, &k_norm, &center, &rotation})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), op,
                ": contiguous float32 projections, tables, norms, centres and rotation");
  TORCH_CHECK(qkv.dim() == 2 && Hkv > 0 && H % Hkv == 0 && qkv.size(1) == (H + 2 * Hkv) * D &&
                  D % 2 == 0 && D <= 512 && cos.sizes() == sin.sizes() && cos.size(0) >= T,
              op, ": shapes do not match");
  TORCH_CHECK(bits >= 2 && bits <= 8 && (query_bits == 0 || (query_bits >= 2 && query_bits <= 8)),
              op, ": codes of 2 to 8 bits");
  check_side(k_codes, k_scale, k_min, k_codes, packed ? D / 2 : D);
  check_side(v_codes, v_scale, v_min, k_codes, packed ? D / 2 : D);
  TORCH_CHECK(k_codes.size(0) == B && k_codes.size(1) == Hkv && G > 0 && D % G == 0, op,
              ": the cache does not match the projections");
  TORCH_CHECK((q_norm.numel() == 0 || q_norm.numel() == D) && k_norm.numel() == q_norm.numel() &&
                  (center.numel() == 0 || center.numel() == Hkv * D) &&
                  (rotation.numel() == 0 || rotation.numel() == D * D),
              op, ": norms (D), centres (Hkv, D) and rotation (D, D), or empty");
  TORCH_CHECK(pad.scalar_type() == at::kLong && pad.is_contiguous() && pad.numel() == B, op,
              ": int64 (B) padding");
  TORCH_CHECK(pos >= 0 && pos < T, op, ": slot ", pos, " outside a cache of ", T);
  const int64_t* pd = pad.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(pd[b] >= 0 && pd[b] < length, op, ": row ", b, " has no slot to attend to");
  const float* in = qkv.data_ptr<float>();
  const float *cs = cos.data_ptr<float>(), *sn = sin.data_ptr<float>();
  const float* qn = q_norm.numel() ? q_norm.data_ptr<float>() : nullptr;
  const float* kn = k_norm.numel() ? k_norm.data_ptr<float>() : nullptr;
  const float* ctr = center.numel() ? center.data_ptr<float>() : nullptr;
  const float* rot = rotation.numel() ? rotation.data_ptr<float>() : nullptr;
  const int64_t row = (H + 2 * Hkv) * D, row_bytes = k_codes.size(3);
  const float e = static_cast<float>(eps);
  float tmp[512];
  // Each head as attention reads it: x -> (normed, RoPE'd) -> (centred) -> (turned) -> dst.
  auto prepare = [&](const float* x, bool rope, const float* norm, int64_t p, const float* c,
                     float* dst) {
    if (rope) lowbit_kernels::norm_rope(x, norm, e, cs + p * D, sn + p * D, D, tmp);
    else std::copy_n(x, D, tmp);
    if (c != nullptr)
      for (int64_t d = 0; d < D; ++d) tmp[d] -= c[d];
    if (rot != nullptr) turn(tmp, rot, D, false, dst);
    else std::copy_n(tmp, D, dst);
  };
  std::vector<float> qs(B * H * D), kv(2 * D);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t p = std::max<int64_t>(pos - pd[b], 0);
    for (int64_t h = 0; h < H; ++h) {
      float* q = qs.data() + (b * H + h) * D;
      prepare(in + b * row + h * D, true, qn, p, nullptr, q);
      if (query_bits) round_query(q, D, D / G, query_bits);
    }
    for (int64_t g = 0; g < Hkv; ++g) {  // the new token's key and value into slot pos
      prepare(in + b * row + (H + g) * D, true, kn, p, ctr ? ctr + g * D : nullptr, kv.data());
      prepare(in + b * row + (H + Hkv + g) * D, false, nullptr, p, nullptr, kv.data() + D);
      const int64_t slot = (b * Hkv + g) * T + pos;
      store_slot(kv.data(), D, D / G, bits, k_codes.data_ptr<uint8_t>() + slot * row_bytes,
                 reinterpret_cast<uint16_t*>(k_scale.data_ptr<at::Half>()) + slot * G,
                 reinterpret_cast<uint16_t*>(k_min.data_ptr<at::Half>()) + slot * G);
      store_slot(kv.data() + D, D, D / G, bits, v_codes.data_ptr<uint8_t>() + slot * row_bytes,
                 reinterpret_cast<uint16_t*>(v_scale.data_ptr<at::Half>()) + slot * G,
                 reinterpret_cast<uint16_t*>(v_min.data_ptr<at::Half>()) + slot * G);
    }
  }
  const int64_t Q = H / Hkv, S = lowbit_kernels::ranges_for(length - 1, lowbit_kernels::pool_threads());
  auto side = [&](const at::Tensor& c, const at::Tensor& s, const at::Tensor& m, int64_t bg) {
    return Side{c.data_ptr<uint8_t>() + bg * T * row_bytes,
                reinterpret_cast<const uint16_t*>(s.data_ptr<at::Half>()) + bg * T * G,
                reinterpret_cast<const uint16_t*>(m.data_ptr<at::Half>()) + bg * T * G,
                row_bytes, G};
  };
  std::vector<float> part_out(B * H * S * D);
  std::vector<Part> parts(B * H * S);
  lowbit_kernels::parallel_for(0, B * Hkv * S, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> score(Q * (length + 8)), buf(D), out(Q * D);
    std::vector<Part> local(Q);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (Hkv * S), g = item / S % Hkv, c = item % S, bg = b * Hkv + g;
      int64_t lo, hi;
      lowbit_kernels::range_of(pd[b], length - 1, c, S, &lo, &hi);
      if (hi < lo) {  // an empty range (more ranges than slots): adds nothing
        std::fill(local.begin(), local.end(), Part{-INFINITY, 0.f});
        std::fill(out.begin(), out.end(), 0.f);
      } else {
        attend_range(qs.data() + (b * H + g * Q) * D, Q, side(k_codes, k_scale, k_min, bg),
                     side(v_codes, v_scale, v_min, bg), lo, hi, D, packed,
                     static_cast<float>(scale), score.data(), buf.data(), out.data(),
                     local.data());
      }
      for (int64_t j = 0; j < Q; ++j) {
        const int64_t bh = b * H + g * Q + j;
        parts[bh * S + c] = local[j];
        std::copy_n(out.data() + j * D, D, part_out.data() + (bh * S + c) * D);
      }
    }
  });
  auto result = at::empty({B, H * D}, qkv.options());
  float* res = result.data_ptr<float>();
  if (rot == nullptr) {
    lowbit_kernels::combine_parts(parts.data(), part_out.data(), B * H, S, D, res);
    return result;
  }
  std::vector<float> turned(B * H * D);
  lowbit_kernels::combine_parts(parts.data(), part_out.data(), B * H, S, D, turned.data());
  for (int64_t bh = 0; bh < B * H; ++bh) turn(turned.data() + bh * D, rot, D, true, res + bh * D);
  return result;
}

}  // namespace lowbit_kernels

TORCH_LIBRARY_FRAGMENT(lowbit_cpu, m) {
  m.def(
      "decode_attention_codes(Tensor qkv, Tensor(a!) k_codes, Tensor(b!) k_scale, "
      "Tensor(c!) k_min, Tensor(d!) v_codes, Tensor(e!) v_scale, Tensor(f!) v_min, Tensor cos, "
      "Tensor sin, Tensor pad, int pos, int heads, int kv_heads, float scale, Tensor q_norm, "
      "Tensor k_norm, float eps, Tensor center, Tensor rotation, int bits, int query_bits) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit_cpu, CPU, m) {
  m.impl("decode_attention_codes", &lowbit_kernels::decode_attention_codes);
}
