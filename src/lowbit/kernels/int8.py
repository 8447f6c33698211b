"""W8A8: int8 per-channel weights × int8 per-token dynamic activations, int32 accumulation.

The fast path is fbgemm's dynamic-quantized linear (``torch.ops.quantized.linear_dynamic``), the
only int8 GEMM in torch that is fast on AVX2 CPUs without VNNI (``torch._int_mm`` is a slow
reference there). It lives in torch's older quantization namespace, so it is isolated here.

On AVX2 (no VNNI) fbgemm multiplies uint8 activations by int8 weights with ``vpmaddubsw``, whose
int16 pair sums saturate when full-range codes meet (measured: up to 47% output error on inputs
with outlier channels). There activations get 7-bit codes (fbgemm's ``reduce_range``), which
cannot saturate. CPUs with AVX-512 VNNI accumulate in int32 (``vpdpbusd``): there fbgemm with
full 8-bit codes matched the exact arithmetic to 4e-7 and halved the error against float
activations, so 8-bit codes are used. :func:`act_levels` makes that choice once per machine
(``LOWBIT_KERNEL_ISA=avx2`` forces the 7-bit grid), and the reference below uses the same grid,
so the packed model and its reference agree on every machine.

fbgemm quantizes the whole input with one range; lowbit wants one range per token. Dividing each
row by its absolute maximum first makes every row span [-1, 1], so the one range fits every token
equally (per-token resolution); the output rows are multiplied back. The reference
:func:`int8_linear_reference` spells out exactly that arithmetic in plain PyTorch.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit.formats.spec import ActivationSpec, WeightSpec

ACT_LEVELS_7BIT, ACT_LEVELS_8BIT = 127, 255  # activation code steps: see the module docstring


@dataclass
class Int8Weight:
    """Signed int8 codes (N, K), fp32 per-row scales (N,), and fbgemm's packed copy (or None)."""

    codes: Tensor | None
    scale: Tensor
    packed: Any = None
    in_features: int = 0


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
def act_levels() -> int:
    """Activation code steps on this machine: 255 (8-bit) unless fbgemm would saturate."""
    if not fbgemm_available() or _has_avx512_vnni():
        return ACT_LEVELS_8BIT
    return ACT_LEVELS_7BIT


def _has_avx512_vnni() -> bool:
    import os

    if os.environ.get("LOWBIT_KERNEL_ISA", "").lower() == "avx2":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512_vnni" in line for line in f)
    except OSError:
        return False  # unknown CPU: the 7-bit grid is safe everywhere


@functools.cache
def fbgemm_available() -> bool:
    engines = torch.backends.quantized.supported_engines
    return any(e in engines for e in ("x86", "fbgemm"))


def prepare_int8(codes: Tensor, scale: Tensor) -> Int8Weight:
    """Pack int8 (N, K) codes with per-row scales; keeps only fbgemm's copy when it exists."""
    codes = codes.to(torch.int8).contiguous()
    scale = scale.float().reshape(-1).contiguous()
    n, k = codes.shape
    if not fbgemm_available():
        return Int8Weight(codes, scale, None, k)
    engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"
    torch.backends.quantized.engine = engine
    with warnings.catch_warnings():  # quantized tensors are deprecated; the kernel is not gone
        warnings.simplefilter("ignore", UserWarning)
        zeros = torch.zeros(n, dtype=torch.long)
        qw = torch._make_per_channel_quantized_tensor(codes, scale.double(), zeros, 0)
        packed = torch.ops.quantized.linear_prepack(qw, None)
    return Int8Weight(None, scale, packed, k)


def _row_normalise(x: Tensor) -> tuple[Tensor, Tensor]:
    amax = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)
    return x / amax, amax


def int8_linear(x: Tensor, weight: Int8Weight) -> Tensor:
    """y = Q_token(x) · Wᵀ (no bias) for float32 x (..., K)."""
    if weight.packed is None or x.device.type != "cpu":
        return int8_linear_reference(x, weight)
    xn, amax = _row_normalise(x.float())
    lead = xn.shape[:-1]
    reduce_range = act_levels() == ACT_LEVELS_7BIT
    y = torch.ops.quantized.linear_dynamic(
        xn.reshape(-1, xn.shape[-1]), weight.packed, reduce_range
    )
    return (y.reshape(*lead, -1) * amax).to(x.dtype)


def int8_weight_codes(weight: Int8Weight) -> Tensor:
    """The int8 (N, K) codes, from fbgemm's packed copy when ours was dropped."""
    if weight.codes is not None:
        return weight.codes
    qw, _ = torch.ops.quantized.linear_unpack(weight.packed)
    return qw.int_repr()


def int8_linear_reference(x: Tensor, weight: Int8Weight, levels: int | None = None) -> Tensor:
    """The same arithmetic in plain PyTorch: rows scaled to [-1, 1], one asymmetric range of
    ``levels`` steps (default :func:`act_levels`) over the batch (as fbgemm chooses it: it always
    contains 0), int8 weights, float rescale. Codes are clamped to uint8's range as fbgemm does:
    on the 7-bit grid the rounding of the top of the range may give code 128 (still safe from
    ``vpmaddubsw`` saturation)."""
    levels = levels or act_levels()
    xn, amax = _row_normalise(x.float())
    lo, hi = xn.min().clamp(max=0.0), xn.max().clamp(min=0.0)
    step = ((hi - lo) / levels).clamp_min(1e-12)
    zero = torch.round(-lo / step).clamp(0, levels)
    xq = (torch.round(xn * (1.0 / step)) + zero).clamp(0, 255)  # fbgemm multiplies by 1/step
    w = int8_weight_codes(weight).float() * weight.scale.unsqueeze(1)
    return (F.linear((xq - zero) * step, w) * amax).to(x.dtype)
