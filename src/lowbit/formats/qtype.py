"""What a number is: the value sets a weight or an activation can be stored in.

A :class:`QType` names a value set; quantized *codes* are always stored as unsigned integers
``u`` in ``[0, 2**bits)`` (or, for fp8, as torch's float8 dtypes), and the meaning of a code is
fixed by the kind:

- ``int``: an integer grid; symmetric grids read ``(u - 2**(bits-1)) * scale``, asymmetric ones
  ``(u - zero) * scale`` (integer zero point) or ``u * scale + zero`` (float offset, the GGUF
  Q4_1 / tinygemm form);
- ``nf``: a 16-entry NormalFloat codebook scaled by the block's absmax (QLoRA's nf4);
- ``codebook``: ``book[code]`` with a learned table of ``2**bits`` fp16 values per block
  (K-means weights, :mod:`lowbit.algorithms.kmeans`; the table is held where a scale would be);
- ``fp8``: ``float(code) * scale`` with the code held as float8 e4m3 or e5m2;
- ``float``: a plain cast to fp16 or bf16, no scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from lowbit.errors import LowbitError

KINDS = ("int", "nf", "codebook", "fp8", "float")


@dataclass(frozen=True)
class QType:
    """A storage value set: ``kind`` in KINDS and its width in bits."""

    name: str
    kind: str
    bits: int

    @property
    def levels(self) -> int:
        """Number of distinct codes (for integer-coded kinds)."""
        return 1 << self.bits

    @property
    def code_max(self) -> int:
        """Largest unsigned code, ``2**bits - 1``."""
        return self.levels - 1

    @property
    def mid(self) -> int:
        """The code that means zero on a symmetric integer grid, ``2**(bits-1)``."""
        return 1 << (self.bits - 1)

    @property
    def sym_max(self) -> int:
        """Largest positive signed value of a symmetric integer grid, ``2**(bits-1) - 1``."""
        return self.mid - 1

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype codes are held in before packing."""
        return _TORCH_DTYPES.get(self.name, torch.uint8)

    @property
    def float_max(self) -> float:
        """Largest finite magnitude of an fp8 or nf type (1.0 for nf4's normalised codebook)."""
        if self.kind == "fp8":
            return float(torch.finfo(self.torch_dtype).max)
        if self.kind == "nf":
            return 1.0
        raise LowbitError(f"{self.name} has no float range")


_TORCH_DTYPES = {
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


def int_type(bits: int) -> QType:
    """The integer value set of ``bits`` bits (1..8)."""
    if not 1 <= bits <= 8:
        raise LowbitError(f"integer formats have 1 to 8 bits, got {bits}")
    return QType(f"int{bits}", "int", bits)


# the formats of one width: name -> (kind, bits)
FIXED_FORMATS = {"nf4": ("nf", 4), "fp8_e4m3": ("fp8", 8), "fp8_e5m2": ("fp8", 8),
                 "fp16": ("float", 16), "bf16": ("float", 16)}  # fmt: skip


def qtype_for(fmt: str, bits: int) -> QType:
    """The QType for a recipe's ``format`` and ``bits`` (validated)."""
    if fmt == "int":
        return int_type(bits)
    if fmt == "kmeans":
        if not 1 <= bits <= 8:
            raise LowbitError(f"kmeans codebooks have 1 to 8 bits, got {bits}")
        return QType(f"kmeans{bits}", "codebook", bits)
    if fmt not in FIXED_FORMATS:
        raise LowbitError(f"unknown format {fmt!r}; expected int, kmeans, "
                          f"{', '.join(FIXED_FORMATS)}")  # fmt: skip
    kind, width = FIXED_FORMATS[fmt]
    if bits != width:
        raise LowbitError(f"format {fmt} has {width} bits, but bits: {bits} was given")
    return QType(fmt, kind, width)


@cache
def nf4_codebook() -> tuple[float, ...]:
    """The 16 NormalFloat-4 values (QLoRA, Dettmers et al. 2023), ascending, in [-1, 1].

    Built as in the paper: 8 positive and 7 negative quantiles of N(0, 1) taken at evenly spaced
    probabilities between ``offset`` and 1/2, plus an exact zero, normalised by the largest.
    """
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    offset = 0.5 * (1 / 32 + 1 / 30)  # the paper's choice: mean of the 1-1/(2*15), 1-1/(2*16) tails
    pos = normal.icdf(torch.linspace(1 - offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -normal.icdf(torch.linspace(1 - offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return tuple((values / values.abs().max()).tolist())
