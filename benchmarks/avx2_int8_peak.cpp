// One core's peak multiply-accumulates per second with AVX2 alone: float32 FMA against exact
// int8 products (vpmaddubsw: uint8 x int8 -> int16 pairs, vpmaddwd by ones -> int32, vpaddd:
// 32 products), and the same with the one more instruction per 32 products that keeps full
// 8-bit codes from saturating (llama.cpp's vpsignb, lowbit's vpxor), on independent chains in
// registers, no memory. Why: it bounds what a W8A8 GEMM without any VNNI can gain over a
// float32 GEMM (issue "W8A8 prefill >= 2x float32" on the AVX2 path). The loops
// are written in assembly because compilers kept the accumulators of the intrinsic form in
// memory (store-forwarding chains, a third of the real pace). Build and run (one line out):
//
//     g++ -O2 -o /tmp/avx2_int8_peak benchmarks/avx2_int8_peak.cpp && /tmp/avx2_int8_peak
#include <chrono>
#include <cstdio>

namespace {

// ymm0-5: accumulators, ymm6-11: temporaries, ymm12: inputs, ymm13: int16 ones, ymm14/15: weights
#define LOWBIT_I8(A, T, W)                                                                         \
  "vpmaddubsw %%ymm12, %%ymm" #W ", %%ymm" #T "\n vpmaddwd %%ymm13, %%ymm" #T ", %%ymm" #T "\n " \
  "vpaddd %%ymm" #T ", %%ymm" #A ", %%ymm" #A "\n"
// the same with llama.cpp's sign trick: the signed operand sign(w) * a (vpsignb, one more
// instruction per 32 products), the unsigned one |w|
#define LOWBIT_I8S(A, T, W)                                                                  \
  "vpsignb %%ymm" #W ", %%ymm12, %%ymm" #T "\n vpmaddubsw %%ymm" #T ", %%ymm" #W ", %%ymm" #T \
  "\n vpmaddwd %%ymm13, %%ymm" #T ", %%ymm" #T "\n vpaddd %%ymm" #T ", %%ymm" #A ", %%ymm" #A "\n"
// and as lowbit's AVX2 GEMM does it (csrc/int8_gemm.cpp): the signed operand a ^ neg(w)
// (vpxor with the weights' sign mask, here ymm14/15 stand for it), |w| the unsigned one
#define LOWBIT_I8X(A, T, W)                                                                  \
  "vpxor %%ymm" #W ", %%ymm12, %%ymm" #T "\n vpmaddubsw %%ymm" #T ", %%ymm" #W ", %%ymm" #T \
  "\n vpmaddwd %%ymm13, %%ymm" #T ", %%ymm" #T "\n vpaddd %%ymm" #T ", %%ymm" #A ", %%ymm" #A "\n"
// 6 steps of 32 products per loop, each step one of the forms above
#define LOWBIT_I8_LOOP(STEP)                                                                 \
  "vpxor %%ymm12, %%ymm12, %%ymm12\n vpxor %%ymm13, %%ymm13, %%ymm13\n"                     \
  "vpxor %%ymm14, %%ymm14, %%ymm14\n vpxor %%ymm15, %%ymm15, %%ymm15\n"                     \
  "1:\n" STEP(0, 6, 14) STEP(1, 7, 15) STEP(2, 8, 14) STEP(3, 9, 15) STEP(4, 10, 14)        \
      STEP(5, 11, 15) "dec %0\n jnz 1b\n vzeroupper\n"
// 12 FMA chains: latency 4 on two pipes needs 8 in flight
#define LOWBIT_FMA(A, B) \
  "vfmadd231ps %%ymm12, %%ymm14, %%ymm" #A "\n vfmadd231ps %%ymm12, %%ymm15, %%ymm" #B "\n"
#define LOWBIT_CLOBBER                                                                           \
  "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", \
      "xmm11", "xmm12", "xmm13", "xmm14", "xmm15"

enum class Kind { fma, int8, int8_sign, int8_xor };

double seconds(Kind kind, long steps) {
  const auto t0 = std::chrono::steady_clock::now();
  if (kind == Kind::int8_sign) {
    asm volatile(LOWBIT_I8_LOOP(LOWBIT_I8S) : "+r"(steps)::LOWBIT_CLOBBER);
  } else if (kind == Kind::int8_xor) {
    asm volatile(LOWBIT_I8_LOOP(LOWBIT_I8X) : "+r"(steps)::LOWBIT_CLOBBER);
  } else if (kind == Kind::int8) {
    asm volatile(LOWBIT_I8_LOOP(LOWBIT_I8) : "+r"(steps)::LOWBIT_CLOBBER);
  } else {  // 12 FMAs of 8 products per loop
    asm volatile(
        "vxorps %%ymm12, %%ymm12, %%ymm12\n vxorps %%ymm14, %%ymm14, %%ymm14\n"
        "vxorps %%ymm15, %%ymm15, %%ymm15\n"
        "1:\n" LOWBIT_FMA(0, 1) LOWBIT_FMA(2, 3) LOWBIT_FMA(4, 5) LOWBIT_FMA(6, 7)
            LOWBIT_FMA(8, 9) LOWBIT_FMA(10, 11) "dec %0\n jnz 1b\n vzeroupper\n"
        : "+r"(steps)::LOWBIT_CLOBBER);
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main() {
  const long loops = 100000000;
  const double q = 6.0 * 32 * loops / seconds(Kind::int8, loops);
  const double s = 6.0 * 32 * loops / seconds(Kind::int8_sign, loops);
  const double x = 6.0 * 32 * loops / seconds(Kind::int8_xor, loops);
  const double f = 12.0 * 8 * loops / seconds(Kind::fma, loops);
  std::printf("one core, AVX2, GMAC/s: float32 FMA %.1f; exact int8 %.1f (x%.2f), with "
              "vpsignb %.1f (x%.2f), with vpxor %.1f (x%.2f)\n",
              f / 1e9, q / 1e9, q / f, s / 1e9, s / f, x / 1e9, x / f);
  return 0;
}
