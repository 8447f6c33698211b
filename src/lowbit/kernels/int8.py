"""W8A8: int8 per-channel weights × int8 per-token dynamic activations, int32 accumulation.

One arithmetic on every CPU: symmetric 8-bit codes per token, ``q = round(x · 127/absmax)``,
multiplied by the int8 weights exactly in int32, then ``(sum · s_x) · s_w`` in float32, so a
model scores the same wherever it runs. Two kernels compute it, equal bit for bit, each
holding the weight codes in its own layout (one copy):

- ``mm`` (CPUs whose oneDNN multiplies int8 by int8 exactly: VNNI's ``vpdpbusd``, AVX-512's or
  the 256-bit AVX-VNNI of CPUs without AVX-512, AMX's tile products; checked once by
  :func:`onednn_int8_exact`): the codes row-major (N, K), the activations quantized by lowbit's
  op and multiplied by ``torch._int_mm`` (oneDNN), the fastest GEMM there for prompt-sized
  inputs (several times float32's), or for up to 4 rows by lowbit's VNNI GEMV.
- ``panels`` (every other CPU): lowbit's own kernel (``csrc/int8_gemm.cpp``). oneDNN and fbgemm
  multiply uint8 by int8 there with ``vpmaddubsw``, whose int16 pair sums saturate on
  full-range codes (fbgemm needed 7-bit activations: a held-out model lost ×1.085 of float
  perplexity to them against ×0.997 for its W8 weight-only model); the kernel's product cannot
  saturate (a cheaper form of llama.cpp's sign trick, with a per-column correction).

:func:`int8_linear_reference` computes the same codes and sums in plain PyTorch.
``LOWBIT_KERNEL_ISA=avx2`` forces the panels (no VNNI of any kind); ``LOWBIT_KERNEL_ISA=avxvnni``
keeps lowbit's kernels to AVX2 and AVX-VNNI, as on Intel's client CPUs (add
``ONEDNN_MAX_CPU_ISA=AVX2_VNNI`` to hold oneDNN there too).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit.formats.spec import ActivationSpec, WeightSpec
from lowbit.kernels.affine import quantize_rows_act8
from lowbit.kernels.build import kernel_isa_env, native_ops

PANEL, STEP = 8, 4  # the kernel's panels: 8 weight rows, inputs in steps of 4 (int8_gemm.cpp)
# The widest input the kernels' int32 sums hold exactly (|code · code| <= 128 · 127); wider
# layers (none in today's models) keep the reference's chunked sums rather than wrap around.
INT32_EXACT_K = (2**31 - 1) // (128 * 127)
# Inputs per exact float32 partial sum in the reference: 1024 · 127 · 128 < 2^24.
EXACT_CHUNK = 1024


@dataclass
class Int8Weight:
    """Signed int8 codes (N, K) and fp32 per-row scales (N,); a kernel keeps only its own copy:
    ``codes`` with ``mm`` (oneDNN's matmul; without it, the reference's), or ``panels``."""

    codes: Tensor | None
    scale: Tensor
    in_features: int = 0
    panels: Tensor | None = None
    mm: bool = False


def int8_eligible(spec: WeightSpec, act: ActivationSpec | None) -> bool:
    """Whether a layer is this module's W8A8 format: int8 symmetric per-channel weights (no
    LoRC) with 8-bit symmetric per-token dynamic activations."""
    if act is None or not (act.bits == 8 and act.symmetric and act.dynamic):
        return False
    if act.granularity != "token":
        return False
    return (spec.format == "int" and spec.bits == 8 and bool(spec.symmetric)
            and spec.granularity == "channel" and not spec.lorc_rank)  # fmt: skip


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo, read once (empty where it cannot be)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()  # unknown CPU: the token grid runs everywhere


def has_avx512_vnni() -> bool:
    return kernel_isa_env() not in ("avx2", "avxvnni") and "avx512_vnni" in cpu_flags()


def has_vnni() -> bool:
    """AVX-512 VNNI or AVX-VNNI (VNNI's 256-bit form on CPUs without AVX-512: Intel's client
    CPUs from Alder Lake, AMD's from Zen 5), as ``LOWBIT_KERNEL_ISA`` allows."""
    if kernel_isa_env() == "avx2":
        return False
    return has_avx512_vnni() or "avx_vnni" in cpu_flags()


@functools.cache
def onednn_int8_exact() -> bool:
    """Whether ``torch._int_mm`` (oneDNN) multiplies full-range int8 codes exactly on this CPU:
    it needs VNNI or AMX (``vpmaddubsw``'s int16 pair sums saturate without them), so the CPU
    must have VNNI (:func:`has_vnni`) and a probe of the worst case (codes ±127 against -128,
    whose pair sums overflow int16) must match int64 arithmetic, at a decode size and at a
    prompt size (oneDNN may pick another kernel for each; lowbit sends it 5 rows or more)."""
    if not has_vnni():
        return False
    for m, k in ((2, 64), (130, 544)):
        q = torch.full((m, k), 127, dtype=torch.int8)
        q[1::2, ::2] = -127
        w = torch.full((48, k), -128, dtype=torch.int8)
        w[24:] = 127
        try:
            sums = torch._int_mm(q, w.t())
        except RuntimeError:
            return False
        if not torch.equal(sums.long(), q.long() @ w.long().T):
            return False
    return True


def pack_panels(codes: Tensor) -> Tensor:
    """(N, K) int8 codes -> the kernel's (N/8, Kp/4 + 1, 32) panels: rows padded to a multiple
    of 8, inputs to a multiple of 4 (zero codes add nothing); within a panel, step s holds inputs
    4s..4s+3 of each of its 8 rows, and the last step the 8 rows' int32 corrections, the sum of
    |w| over their negative codes (the kernel's product leaves each sum short by it)."""
    n, k = codes.shape
    n_pad, k_pad = -(-n // PANEL) * PANEL, -(-k // STEP) * STEP
    padded = F.pad(codes, (0, k_pad - k, 0, n_pad - n))
    panels = padded.reshape(n_pad // PANEL, PANEL, k_pad // STEP, STEP).permute(0, 2, 1, 3)
    panels = panels.reshape(n_pad // PANEL, k_pad // STEP, PANEL * STEP)
    correction = padded.int().clamp(max=0).sum(1).neg().to(torch.int32)  # (N_pad,)
    last = correction.reshape(n_pad // PANEL, 1, PANEL).view(torch.int8)  # little-endian bytes
    return torch.cat([panels, last], dim=1).contiguous()


def unpack_panels(panels: Tensor, n: int, k: int) -> Tensor:
    """Inverse of :func:`pack_panels`."""
    groups, steps, _ = panels.shape
    codes = panels[:, : steps - 1].reshape(groups, steps - 1, PANEL, STEP).permute(0, 2, 1, 3)
    return codes.reshape(groups * PANEL, (steps - 1) * STEP)[:n, :k].contiguous()


def prepare_int8(codes: Tensor, scale: Tensor) -> Int8Weight:
    """Keep int8 (N, K) codes with per-row scales in this machine's kernel layout (see the
    module doc), or as they are for the reference where no kernel is built."""
    codes = codes.to(torch.int8).contiguous()
    scale = scale.float().reshape(-1).contiguous()
    k = codes.shape[1]
    if not native_ops() or k > INT32_EXACT_K:
        return Int8Weight(codes, scale, k)
    # oneDNN's int8 matmul misreads a weight of one input (its transpose then looks contiguous:
    # results change from call to call, torch 2.13); layers that narrow take the panels
    if onednn_int8_exact() and k >= PANEL:
        return Int8Weight(codes, scale, k, mm=True)
    return Int8Weight(None, scale, k, pack_panels(codes))


def int8_linear(x: Tensor, weight: Int8Weight) -> Tensor:
    """y = Q_token(x) · Wᵀ (no bias) for float32 x (..., K)."""
    lead, n = x.shape[:-1], weight.scale.numel()
    if x.device.type == "cpu" and (weight.panels is not None or weight.mm):
        x2 = x.reshape(-1, x.shape[-1]).float()
        if weight.panels is not None:
            y = torch.ops.lowbit_cpu.int8_linear(x2, weight.panels, weight.scale)
        else:
            y = torch.ops.lowbit_cpu.int8_linear_mm(x2, weight.codes, weight.scale)
        return y.reshape(*lead, n).to(x.dtype)
    return int8_linear_reference(x, weight)


def int8_weight_codes(weight: Int8Weight) -> Tensor:
    """The int8 (N, K) codes, from the panels when they are the only copy."""
    if weight.codes is not None:
        return weight.codes
    return unpack_panels(weight.panels, weight.scale.numel(), weight.in_features)


def quantize_tokens(x: Tensor) -> tuple[Tensor, Tensor]:
    """(..., K) float32 -> integer-valued codes and per-token scales (..., 1) of the ``token``
    grid: the act8 quantizer with one block per row (a NaN or infinite input makes its row's
    outputs NaN: the kernel gives such a row scale NaN)."""
    k = x.shape[-1]
    q, s = quantize_rows_act8(x.reshape(-1, k), k)
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], 1)


def int8_linear_reference(x: Tensor, weight: Int8Weight) -> Tensor:
    """The kernels' arithmetic in plain PyTorch, equal to them bit for bit."""
    codes = int8_weight_codes(weight).to(x.device)
    q, sx = quantize_tokens(x.float())
    acc = torch.zeros(*q.shape[:-1], codes.shape[0], dtype=torch.float64, device=x.device)
    for k0 in range(0, q.shape[-1], EXACT_CHUNK):  # exact int32 sums, in float arithmetic
        k1 = k0 + EXACT_CHUNK
        acc += F.linear(q[..., k0:k1], codes[:, k0:k1].float()).double()
    return (acc.float() * sx * weight.scale.to(x.device)).to(x.dtype)
