// W8A8 convolutions (and linears) with per-tensor activation codes on AVX2, exact: the uint8
// codes u of a static (or per-call) range, zero point z, against int8 per-output-channel
// weights, y = float(sum (u - z) * w) * s_x * s_w + bias. lowbit/kernels/int8_conv_avx2.py
// calls it; the convolution's geometry is torch's (stride, padding, dilation, groups).
//
// Why hand-written: oneDNN's and fbgemm's integer convolutions multiply uint8 by int8 with
// vpmaddubsw on CPUs without VNNI, whose int16 pair sums saturate on full 8-bit codes (up to 4%
// relative error on waifu2x's layers, measured); torch has no other integer convolution. This
// one runs the panels' product of int8_gemm.cpp (int8_panels.h), which cannot saturate, on the
// signed codes a = u - 128 (u ^ 0x80): sum (u - z) w = sum a w + (128 - z) sum w, the last term
// one integer per output channel.
//
// The im2col rows are written a block at a time (kCodesBlock bytes: they stay in L2 while the
// panels pass), never as a whole matrix: row m = output pixel (n, oy, ox), its inputs ordered
// (ky, kx, c) from the channels-last codes; taps outside the input read the zero point (the
// float 0 of a zero-padded convolution), so the padding costs nothing more. A grouped
// convolution is one such product per group: its channels' rows against its panels, into its
// columns of the output.
#include <torch/library.h>

#include "common.h"
#include "int8_panels.h"

namespace {

using namespace lowbit_kernels::panels;

struct Geometry {
  int64_t C, H, W, KH, KW, sy, sx, py, px, dy, dx, OH, OW;
  int64_t Cg;  // channels per group (C with one group)
};

// dst[0..n) = src ^ 0x80 (the signed codes); runs of a few channels (an RGB input's 3, a
// grouped layer's 8 or 16) in 8- and 16-byte pieces rather than byte by byte.
inline void signed_copy(int8_t* dst, const uint8_t* src, int64_t n) {
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm256_xor_si256(v, flip));
  }
  if (i + 16 <= n) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm_xor_si128(v, _mm256_castsi256_si128(flip)));
    i += 16;
  }
  for (; i + 8 <= n; i += 8) {
    uint64_t v;
    std::memcpy(&v, src + i, 8);
    v ^= 0x8080808080808080ULL;
    std::memcpy(dst + i, &v, 8);
  }
  for (; i < n; ++i) dst[i] = static_cast<int8_t>(src[i] ^ 0x80);
}

// The im2col rows m0..m1 of the channels-last codes u, channels c0..c0 + Cg, into q (stride
// Kp); pad: z ^ 0x80.
void im2col_rows(const uint8_t* u, const Geometry& g, int64_t c0, int64_t m0, int64_t m1,
                 int64_t Kp, int8_t pad, int8_t* q) {
  const int64_t C = g.Cg, K = g.KH * g.KW * C;
  for (int64_t m = m0; m < m1; ++m) {
    int8_t* row = q + (m - m0) * Kp;
    const int64_t n = m / (g.OH * g.OW), oy = (m / g.OW) % g.OH, ox = m % g.OW;
    const int64_t ix0 = ox * g.sx - g.px;
    for (int64_t ky = 0; ky < g.KH; ++ky) {
      int8_t* dst = row + ky * g.KW * C;
      const int64_t iy = oy * g.sy - g.py + ky * g.dy;
      if (iy < 0 || iy >= g.H) {
        std::memset(dst, pad, g.KW * C);
        continue;
      }
      const uint8_t* line = u + (n * g.H + iy) * g.W * g.C + c0;
      if (C == g.C && g.dx == 1 && ix0 >= 0 && ix0 + g.KW <= g.W) {  // one run of bytes
        signed_copy(dst, line + ix0 * C, g.KW * C);
        continue;
      }
      for (int64_t kx = 0; kx < g.KW; ++kx) {
        const int64_t ix = ix0 + kx * g.dx;
        if (ix < 0 || ix >= g.W)
          std::memset(dst + kx * C, pad, C);
        else
          signed_copy(dst + kx * C, line + ix * g.C, C);
      }
    }
    std::memset(row + K, 0, Kp - K);  // the panels' padded inputs are zero codes
  }
}

}  // namespace

namespace lowbit_kernels {

// u: uint8 (N, C, H, W) codes; panels: each group's pack_panels of its weight codes
// (out / groups, kh, kw, C / groups), concatenated; w_sum: int32 (out,) each output channel's
// sum of codes; bias: float32 (out,) or none; slope: a LeakyReLU's (0: a ReLU) applied to the
// outputs, or none. Returns float32 (N, out, OH, OW), channels-last.
at::Tensor int8_conv_panels(const at::Tensor& u_in, at::IntArrayRef kernel, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                            int64_t zero, double x_scale, const at::Tensor& panels,
                            const at::Tensor& w_scale, const at::Tensor& w_sum,
                            const std::optional<at::Tensor>& bias, std::optional<double> slope) {
  const char* op = "lowbit::int8_conv_panels";
  TORCH_CHECK(!slope.has_value() || (*slope >= 0.0 && *slope <= 1.0), op, ": slope outside 0..1");
  TORCH_CHECK(u_in.dim() == 4 && u_in.scalar_type() == at::kByte, op, ": codes must be uint8 (N, C, H, W)");
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              op, ": kernel, stride, padding and dilation take two values");
  TORCH_CHECK(zero >= 0 && zero <= 255, op, ": zero point outside 0..255");
  const at::Tensor u = u_in.contiguous(at::MemoryFormat::ChannelsLast);
  Geometry g{u.size(1), u.size(2), u.size(3), kernel[0], kernel[1], stride[0], stride[1],
             padding[0], padding[1], dilation[0], dilation[1], 0, 0, 0};
  TORCH_CHECK(groups > 0 && g.C % groups == 0 && w_scale.numel() % groups == 0, op,
              ": the channels and the outputs must divide into the groups");
  g.Cg = g.C / groups;
  TORCH_CHECK(g.KH > 0 && g.KW > 0 && g.sy > 0 && g.sx > 0 && g.dy > 0 && g.dx > 0 && g.py >= 0 && g.px >= 0,
              op, ": a bad geometry");
  g.OH = (g.H + 2 * g.py - g.dy * (g.KH - 1) - 1) / g.sy + 1;
  g.OW = (g.W + 2 * g.px - g.dx * (g.KW - 1) - 1) / g.sx + 1;
  TORCH_CHECK(g.OH > 0 && g.OW > 0, op, ": the input is smaller than the kernel");
  const int64_t K = g.KH * g.KW * g.Cg, N = w_scale.numel(), M = u.size(0) * g.OH * g.OW;
  const int64_t Ng = N / groups;  // outputs per group
  TORCH_CHECK(panels.dim() == 3 && panels.scalar_type() == at::kChar && panels.size(2) == kPanel * 4 &&
                  panels.is_contiguous(),
              op, ": panels must be int8 (N/8, Kp/4 + 1, 32) as pack_panels makes them");
  const int64_t Np = (Ng + kPanel - 1) / kPanel * kPanel, Kp = (panels.size(1) - 1) * 4;
  // |sum| <= 255 * 128 * K fits int32 up to K = 65,793
  TORCH_CHECK(K > 0 && K <= 65536 && Kp >= K && Kp < K + 4 && panels.size(0) == groups * Np / kPanel,
              op, ": the codes' channels, the kernel and the panels do not fit together");
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous() && w_sum.scalar_type() == at::kInt &&
                  w_sum.numel() == N && w_sum.is_contiguous(),
              op, ": w_scale float32 (out,) and w_sum int32 (out,)");
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == N && bias->is_contiguous(),
                op, ": bias float32 (out,)");
    bp = bias->data_ptr<float>();
  }
  auto y = at::empty({u.size(0), N, g.OH, g.OW}, u.options().dtype(at::kFloat),
                     at::MemoryFormat::ChannelsLast);
  if (M == 0) return y;
  std::vector<int32_t> add(N);
  const int32_t* ws = w_sum.data_ptr<int32_t>();
  for (int64_t n = 0; n < N; ++n) add[n] = static_cast<int32_t>(128 - zero) * ws[n];
  const float sx = static_cast<float>(x_scale);
  const float* sw = w_scale.data_ptr<float>();
  // Tasks: blocks of rows of one group, each across all its panels, or (few rows: a small
  // image, a linear's tokens) across a share of them, so that every thread has work.
  const int64_t block = std::max<int64_t>(8 * kRowsTile, (kCodesBlock / Kp) / kRowsTile * kRowsTile);
  const int64_t blocks = (M + block - 1) / block * groups, pairs = (Np / kPanel + kPanels - 1) / kPanels;
  const int64_t want = 2 * at::get_num_threads();
  const int64_t chunks = blocks >= want ? 1 : std::min(pairs, (want + blocks - 1) / blocks);
  const uint8_t* up = u.data_ptr<uint8_t>();
  const int8_t* wp = panels.data_ptr<int8_t>();
  float* yp = y.data_ptr<float>();
  const int8_t pad = static_cast<int8_t>(zero ^ 0x80);
  at::parallel_for(0, blocks * chunks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<int8_t> q(std::min(block, M) * Kp);
    int64_t have = -1;  // the (block, group) whose rows q holds
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bg = t / chunks, c = t % chunks, G = bg % groups;
      const int64_t m0 = bg / groups * block, m1 = std::min(M, m0 + block), n0 = G * Ng;
      if (bg != have) im2col_rows(up, g, G * g.Cg, m0, m1, Kp, pad, q.data());
      have = bg;
      const Epilogue e{&sx, false, sw + n0, add.data() + n0, bp ? bp + n0 : nullptr, N,
                       slope.has_value(), static_cast<float>(slope.value_or(0.0))};
      rows_against_all(q.data(), m1 - m0, Kp, wp + G * (Np / kPanel) * panel_size(Kp, false), Np, e,
                       m0, pairs * c / chunks, pairs * (c + 1) / chunks, Ng, yp + m0 * N + n0);
    }
  });
  return y;
}

}  // namespace lowbit_kernels

TORCH_LIBRARY_FRAGMENT(lowbit_cpu, m) {
  m.def("int8_conv_panels(Tensor u, int[] kernel, int[] stride, int[] padding, int[] dilation, "
        "int groups, int zero, float x_scale, Tensor panels, Tensor w_scale, Tensor w_sum, "
        "Tensor? bias, float? slope=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit_cpu, CPU, m) {
  m.impl("int8_conv_panels", &lowbit_kernels::int8_conv_panels);
}
