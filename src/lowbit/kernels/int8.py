"""W8A8: int8 per-channel weights × int8 per-token dynamic activations, int32 accumulation.

Two arithmetics, one per kind of CPU, each with its plain-PyTorch reference:

- ``token`` (every CPU without AVX-512 VNNI): symmetric 8-bit codes per token,
  ``q = round(x · 127/absmax)``, multiplied by the int8 weights exactly in int32 by lowbit's own
  kernel (``csrc/int8_gemm.cpp``). fbgemm, torch's int8 GEMM, multiplies uint8 activations with
  ``vpmaddubsw`` on these CPUs, whose int16 pair sums saturate on full-range codes, so there it
  needed 7-bit activations (a held-out model lost ×1.085 of float perplexity to them against
  ×0.997 for its W8 weight-only model); the kernel uses llama.cpp's sign trick instead and
  cannot saturate. :func:`int8_linear_reference` computes the same codes and sums.
- ``fbgemm`` (CPUs with AVX-512 VNNI and fbgemm): fbgemm's dynamic-quantized linear, which
  accumulates in int32 there (``vpdpbusd``) and matched the exact arithmetic to 4e-7 with full
  8-bit codes. fbgemm quantizes the whole input with one range; dividing each row by its
  absolute maximum first makes every row span [-1, 1], so the one range (255 steps) fits every
  token equally; the output rows are multiplied back.

Both are 8-bit per-token grids (steps of 1/127 and 2/255 of the row's absolute maximum), so a
model scores the same on either kind of CPU; :func:`act_grid` picks one per machine
(``LOWBIT_KERNEL_ISA=avx2`` forces ``token``).
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit.formats.spec import ActivationSpec, WeightSpec
from lowbit.kernels.affine import quantize_rows_act8
from lowbit.kernels.build import native_ops

PANEL, STEP = 8, 4  # the kernel's panels: 8 weight rows, inputs in steps of 4 (int8_gemm.cpp)
# Inputs per exact float32 partial sum in the reference: 1024 · 127 · 128 < 2^24.
EXACT_CHUNK = 1024


@dataclass
class Int8Weight:
    """Signed int8 codes (N, K) and fp32 per-row scales (N,); the fast path keeps only its own
    copy: ``panels`` (lowbit's kernel layout) or ``packed`` (fbgemm's object)."""

    codes: Tensor | None
    scale: Tensor
    packed: Any = None
    in_features: int = 0
    panels: Tensor | None = None


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
def act_grid() -> str:
    """``fbgemm`` where fbgemm runs on AVX-512 VNNI, else ``token`` (see the module doc)."""
    return "fbgemm" if fbgemm_available() and has_avx512_vnni() else "token"


def has_avx512_vnni() -> bool:
    if os.environ.get("LOWBIT_KERNEL_ISA", "").lower() == "avx2":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512_vnni" in line for line in f)
    except OSError:
        return False  # unknown CPU: the token grid runs everywhere


@functools.cache
def fbgemm_available() -> bool:
    engines = torch.backends.quantized.supported_engines
    return any(e in engines for e in ("x86", "fbgemm"))


def pack_panels(codes: Tensor) -> Tensor:
    """(N, K) int8 codes -> the kernel's (N/8, Kp/4, 32) panels: rows padded to a multiple of 8,
    inputs to a multiple of 4 (zero codes add nothing); within a panel, step s holds inputs
    4s..4s+3 of each of its 8 rows."""
    n, k = codes.shape
    n_pad, k_pad = -(-n // PANEL) * PANEL, -(-k // STEP) * STEP
    padded = F.pad(codes, (0, k_pad - k, 0, n_pad - n))
    panels = padded.reshape(n_pad // PANEL, PANEL, k_pad // STEP, STEP).permute(0, 2, 1, 3)
    return panels.reshape(n_pad // PANEL, k_pad // STEP, PANEL * STEP).contiguous()


def unpack_panels(panels: Tensor, n: int, k: int) -> Tensor:
    """Inverse of :func:`pack_panels`."""
    groups, steps, _ = panels.shape
    codes = panels.reshape(groups, steps, PANEL, STEP).permute(0, 2, 1, 3)
    return codes.reshape(groups * PANEL, steps * STEP)[:n, :k].contiguous()


def prepare_int8(codes: Tensor, scale: Tensor) -> Int8Weight:
    """Pack int8 (N, K) codes with per-row scales for this machine's fast path (keeping only its
    copy), or keep the codes for the reference where there is none."""
    codes = codes.to(torch.int8).contiguous()
    scale = scale.float().reshape(-1).contiguous()
    n, k = codes.shape
    if act_grid() == "token":
        if not native_ops():
            return Int8Weight(codes, scale, None, k)
        return Int8Weight(None, scale, None, k, pack_panels(codes))
    engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"
    torch.backends.quantized.engine = engine
    with warnings.catch_warnings():  # quantized tensors are deprecated; the kernel is not gone
        warnings.simplefilter("ignore", UserWarning)
        zeros = torch.zeros(n, dtype=torch.long)
        qw = torch._make_per_channel_quantized_tensor(codes, scale.double(), zeros, 0)
        packed = torch.ops.quantized.linear_prepack(qw, None)
    return Int8Weight(None, scale, packed, k)


def int8_linear(x: Tensor, weight: Int8Weight) -> Tensor:
    """y = Q_token(x) · Wᵀ (no bias) for float32 x (..., K)."""
    on_cpu = x.device.type == "cpu"
    lead = x.shape[:-1]
    n = weight.scale.numel()
    if weight.panels is not None and on_cpu:
        x2 = x.reshape(-1, x.shape[-1]).float()
        y = torch.ops.lowbit_cpu.int8_linear(x2, weight.panels, weight.scale)
        return y.reshape(*lead, n).to(x.dtype)
    if weight.packed is None or not on_cpu:
        return int8_linear_reference(x, weight)
    xn, amax = _row_normalise(x.float())
    y = torch.ops.quantized.linear_dynamic(xn.reshape(-1, xn.shape[-1]), weight.packed, False)
    return (y.reshape(*lead, n) * amax).to(x.dtype)


def int8_weight_codes(weight: Int8Weight) -> Tensor:
    """The int8 (N, K) codes, from the fast path's copy when ours was dropped."""
    if weight.codes is not None:
        return weight.codes
    if weight.panels is not None:
        return unpack_panels(weight.panels, weight.scale.numel(), weight.in_features)
    qw, _ = torch.ops.quantized.linear_unpack(weight.packed)
    return qw.int_repr()


def _row_normalise(x: Tensor) -> tuple[Tensor, Tensor]:
    amax = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)
    return x / amax, amax


def quantize_tokens(x: Tensor) -> tuple[Tensor, Tensor]:
    """(..., K) float32 -> integer-valued codes and per-token scales (..., 1) of the ``token``
    grid: the act8 quantizer with one block per row (a NaN or infinite input makes its row's
    outputs NaN: the kernel gives such a row scale NaN)."""
    k = x.shape[-1]
    q, s = quantize_rows_act8(x.reshape(-1, k), k)
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], 1)


def int8_linear_reference(x: Tensor, weight: Int8Weight, grid: str | None = None) -> Tensor:
    """The arithmetic of this machine's fast path (``grid``, default :func:`act_grid`) in plain
    PyTorch, equal to it bit for bit on the ``token`` grid."""
    codes = int8_weight_codes(weight).to(x.device)
    if (grid or act_grid()) == "token":
        q, sx = quantize_tokens(x.float())
        acc = torch.zeros(*q.shape[:-1], codes.shape[0], dtype=torch.float64, device=x.device)
        for k0 in range(0, q.shape[-1], EXACT_CHUNK):  # exact int32 sums, in float arithmetic
            k1 = k0 + EXACT_CHUNK
            acc += F.linear(q[..., k0:k1], codes[:, k0:k1].float()).double()
        return (acc.float() * sx * weight.scale.to(x.device)).to(x.dtype)
    # fbgemm's: rows scaled to [-1, 1], one asymmetric range of 255 steps over the batch (it
    # always contains 0); fbgemm multiplies by 1/step
    xn, amax = _row_normalise(x.float())
    lo, hi = xn.min().clamp(max=0.0), xn.max().clamp(min=0.0)
    step = ((hi - lo) / 255).clamp_min(1e-12)
    zero = torch.round(-lo / step).clamp(0, 255)
    xq = (torch.round(xn * (1.0 / step)) + zero).clamp(0, 255)
    w = codes.float() * weight.scale.to(x.device).unsqueeze(1)
    return (F.linear((xq - zero) * step, w) * amax).to(x.dtype)
