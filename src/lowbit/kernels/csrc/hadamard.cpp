// The online Hadamard transform: each row x (n = p·2^k floats) times kron(A, S)/√(2^k), with S
// Sylvester's ±1 matrix of order 2^k (applied by the butterflies of the fast Walsh–Hadamard
// transform) and A a small orthonormal block (p × p, p = 1 for powers of two). Used before
// down_proj when a recipe rotates its input online (lowbit/nn/online.py).
//
// Why hand-written: the plain-PyTorch butterflies cost ~15 aten ops per call, more than the
// layer's own matmul at decode (measured: 370 µs against 115 µs for the 576 x 1536 down_proj
// of the default model at one row); no maintained CPU library ships this transform (the
// fast-hadamard-transform package is CUDA only). The reference is
// lowbit.primitives.hadamard.online_hadamard.
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "common.h"

namespace {

// In place: one row of m = 2^k floats times S (unnormalised).
void fwht(float* x, int64_t m) {
  for (int64_t h = 1; h < m; h *= 2) {
    for (int64_t i = 0; i < m; i += 2 * h) {
      float* a = x + i;
      float* b = x + i + h;
#pragma omp simd
      for (int64_t j = 0; j < h; ++j) {
        const float u = a[j], v = b[j];
        a[j] = u + v;
        b[j] = u - v;
      }
    }
  }
}

at::Tensor hadamard_transform(const at::Tensor& x, const at::Tensor& block) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && block.scalar_type() == at::kFloat,
              "lowbit::hadamard_transform: float32 tensors only");
  TORCH_CHECK(x.is_contiguous() && block.is_contiguous() && block.dim() == 2 &&
                  block.size(0) == block.size(1),
              "lowbit::hadamard_transform: contiguous (..., n) input and a square block");
  const int64_t n = x.size(-1), p = block.size(0);
  TORCH_CHECK(p >= 1 && n % p == 0, "lowbit::hadamard_transform: block does not divide n");
  const int64_t m = n / p;
  TORCH_CHECK((m & (m - 1)) == 0, "lowbit::hadamard_transform: n / p must be a power of two");
  auto y = at::empty_like(x);
  const int64_t rows = n == 0 ? 0 : x.numel() / n;
  const float* xp = x.data_ptr<float>();
  const float* ap = block.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float norm = 1.f / std::sqrt(static_cast<float>(m));
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(p == 1 ? 0 : n);
    for (int64_t r = begin; r < end; ++r) {
      float* out = yp + r * n;
      float* work = p == 1 ? out : buf.data();
      std::copy(xp + r * n, xp + (r + 1) * n, work);
      for (int64_t i = 0; i < p; ++i) fwht(work + i * m, m);
      if (p == 1) {
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) out[j] *= norm;
        continue;
      }
      for (int64_t a = 0; a < p; ++a) {  // out[a, :] = Σ_i A[i, a] · work[i, :] / √m
        float* o = out + a * m;
        std::fill(o, o + m, 0.f);
        for (int64_t i = 0; i < p; ++i) {
          const float c = ap[i * p + a] * norm;
          const float* w = work + i * m;
#pragma omp simd
          for (int64_t j = 0; j < m; ++j) o[j] += c * w[j];
        }
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowbit_cpu, m) {
  m.def("hadamard_transform(Tensor x, Tensor block) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit_cpu, CPU, m) { m.impl("hadamard_transform", &hadamard_transform); }
