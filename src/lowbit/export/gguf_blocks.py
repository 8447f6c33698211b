"""GGUF block encodings of lowbit's packed layers (Q4_0, Q4_1, Q8_0), built from the stored codes.

The ``gguf`` package can quantize float arrays into these types, but that re-derives scales from
the values and would not reproduce codes chosen by GPTQ/AWQ/clipping. So the bytes are assembled
here from lowbit's own codes and fp16 scales (layouts per ggml's block definitions):
- Q8_0: fp16 d, 32 x int8 q;                  x = q * d
- Q4_0: fp16 d, 16 bytes (q[j] | q[j+16] << 4); x = (q - 8) * d
- Q4_1: fp16 d, fp16 m, 16 bytes as Q4_0;     x = q * d + m
Every one has blocks of 32 along the input dimension, fp16 parameters, and the same grid as a
lowbit spec, so the mapping is exact; ``gguf.quants.dequantize`` is the test oracle.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from lowbit.errors import LowbitError
from lowbit.nn import QuantLinear

EXACT = {
    (4, True): T.Q4_0,
    (4, False): T.Q4_1,
    (8, True): T.Q8_0,
}
FLOATS = {"fp16": T.F16, "bf16": T.BF16}  # 16-bit float layers (e.g. a float16 output head)
LOSSLESS_HINT = (
    "recipes that export losslessly: int4 symmetric group 32 (Q4_0), int4 asymmetric group 32 "
    "(Q4_1), int8 symmetric group 32 (Q8_0), all with float16 scales, and fp16 / bf16 layers; "
    "or pass --requantize"
)


def exact_type(mod: QuantLinear, layer: str) -> T:
    """The GGUF type that holds ``mod`` exactly, or a clear error."""
    spec = mod.spec
    reason = None
    if spec.qtype.name in FLOATS and not spec.lorc_rank:  # the stored values as they are
        return FLOATS[spec.qtype.name]
    if spec.lorc_rank:
        reason = "LoRC corrections"
    elif spec.qtype.kind != "int":
        reason = f"{spec.qtype.name} weights"
    elif spec.granularity != "group" or spec.group_size != 32:
        reason = f"{spec.granularity} blocks" + (
            f" of {spec.group_size}" if spec.granularity == "group" else ""
        )
    elif spec.scale_dtype != "float16" and not _fits_float16(mod):
        reason = f"{spec.scale_dtype} scales that float16 does not hold"
    elif not spec.symmetric and spec.zero_point != "float":
        reason = "integer zero points"
    elif (spec.qtype.bits, spec.symmetric) not in EXACT:
        reason = f"{spec.qtype.bits}-bit {'symmetric' if spec.symmetric else 'asymmetric'} codes"
    if reason is not None:
        raise LowbitError(f"{layer}: {reason} have no exact GGUF type; {LOSSLESS_HINT}")
    return EXACT[(spec.qtype.bits, spec.symmetric)]


def _fits_float16(mod: QuantLinear) -> bool:
    """Whether every scale (and float offset) is a float16 value: then GGUF's fp16 fields hold
    it exactly, whatever dtype lowbit stored it in (bfloat16 scales mostly are)."""
    held = [mod.scale] + ([mod.zero] if mod.spec.zero_point == "float" and mod.zero is not None
                          else [])  # fmt: skip
    return all(torch.equal(t.float().half().float(), t.float()) for t in held)


def encode(mod: QuantLinear, qtype: T) -> np.ndarray:
    """Raw GGUF bytes (out, in/32 * block_bytes) of a layer whose spec maps exactly to ``qtype``
    (a 16-bit float layer: its (out, in) float16 / bfloat16 values)."""
    if qtype == T.F16:  # exact: the layer holds these values
        return mod.dequantized_weight().to(torch.float16).numpy()
    if qtype == T.BF16:  # numpy has no bfloat16: its bits
        return mod.dequantized_weight().to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    out, k = mod.out_features, mod.in_features
    codes = mod.codes().numpy().reshape(out, k // 32, 32)  # (out, nb, 32) unsigned
    d = mod.scale.to(torch.float16).numpy().reshape(out, k // 32, 1).view(np.uint8)  # (.., 2)
    d = d.reshape(out, k // 32, 2)
    if qtype == T.Q8_0:
        q = (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
        blocks = np.concatenate([d, q], axis=-1)
    else:
        nib = (codes[..., :16] & 0xF) | (codes[..., 16:] << 4)  # (out, nb, 16)
        parts = [d]
        if qtype == T.Q4_1:
            m = mod.qparams().zero.to(torch.float16).numpy().reshape(out, k // 32, 1)
            parts.append(m.view(np.uint8).reshape(out, k // 32, 2))
        blocks = np.concatenate([*parts, nib.astype(np.uint8)], axis=-1)
    return np.ascontiguousarray(blocks.reshape(out, -1))


def requantize(weight: torch.Tensor, qtype: T) -> np.ndarray:
    """Raw bytes of a float (out, in) weight re-quantized by the gguf package (lossy)."""
    from gguf.quants import quantize

    if weight.shape[1] % 32:
        raise LowbitError(f"in_features {weight.shape[1]} is not a multiple of 32 for {qtype.name}")
    return quantize(weight.float().numpy(), qtype)
