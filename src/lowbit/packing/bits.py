"""Exact bit packing of unsigned codes of 1..8 bits along the last dimension.

Codes are packed in runs: the shortest run of codes that fills whole bytes (2 codes -> 1 byte at
4 bits, 4 -> 1 at 2 bits, 8 -> 3 at 3 bits, 4 -> 3 at 6 bits). Inside a run the order is
little-endian in bits: code i lands at bit ``bits*i`` of a word whose bytes are written low to
high, so 4 bits is the usual nibble layout (byte = c0 | c1 << 4) and 2 bits is
(c0 | c1 << 2 | c2 << 4 | c3 << 6). A row whose length is not a multiple of the run is padded
with zero codes (at most a few bytes per row).

Hand-written: torch has no general sub-byte packing op, and kernel-specific layouts (issue of the
kernels) are converted from this plain one when a model is loaded.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit.errors import LowbitError


def _run(bits: int) -> tuple[int, int]:
    """(codes, bytes) of the shortest run of ``bits``-bit codes that fills whole bytes."""
    total = math.lcm(bits, 8)
    return total // bits, total // 8


def packed_length(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take in one packed row."""
    _check_bits(bits)
    codes, nbytes = _run(bits)
    return -(-n // codes) * nbytes


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack uint8 codes (..., n), each < 2**bits, into uint8 (..., packed_length(n, bits))."""
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise LowbitError(f"pack expects uint8 codes, got {codes.dtype}")
    if bits == 8:
        return codes.clone()
    if codes.numel() and int(codes.max()) >= (1 << bits):
        raise LowbitError(f"a code does not fit in {bits} bits")
    lead, n = codes.shape[:-1], codes.shape[-1]
    run, nbytes = _run(bits)
    if nbytes == 1:  # 1, 2, 4 bits: a run is one byte; stay in uint8 (int64 costs 8x the memory)
        v = F.pad(codes, (0, (-n) % run)).reshape(*lead, -1, run)  # (..., bytes, run)
        out = v[..., 0].clone()
        for i in range(1, run):
            out |= v[..., i] << (bits * i)
        return out
    v = F.pad(codes.to(torch.int64), (0, (-n) % run)).reshape(*lead, -1, run)  # (..., runs, run)
    shifts = torch.arange(run, device=codes.device, dtype=torch.int64) * bits
    word = (v << shifts).sum(-1)  # (..., runs): disjoint bit fields, so sum == or
    out = [(word >> (8 * j)) & 0xFF for j in range(nbytes)]
    return torch.stack(out, -1).to(torch.uint8).reshape(*lead, -1)


def unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack`: uint8 (..., packed_length(n, bits)) -> uint8 codes (..., n)."""
    _check_bits(bits)
    if packed.shape[-1] != packed_length(n, bits):
        raise LowbitError(
            f"packed row has {packed.shape[-1]} bytes, expected {packed_length(n, bits)} "
            f"for {n} codes of {bits} bits"
        )
    lead = packed.shape[:-1]
    run, nbytes = _run(bits)
    if bits == 8:
        return packed.clone()
    if nbytes == 1:  # 1, 2, 4 bits: uint8 shifts, no int64 temporaries
        fields = torch.arange(run, device=packed.device, dtype=torch.uint8) * bits
        codes = (packed.unsqueeze(-1) >> fields) & ((1 << bits) - 1)  # (..., bytes, run)
        return codes.reshape(*lead, -1)[..., :n].contiguous()
    b = packed.to(torch.int64).reshape(*lead, -1, nbytes)  # (..., runs, nbytes)
    shifts = torch.arange(nbytes, device=packed.device, dtype=torch.int64) * 8
    word = (b << shifts).sum(-1)  # (..., runs)
    fields = torch.arange(run, device=packed.device, dtype=torch.int64) * bits
    codes = (word.unsqueeze(-1) >> fields) & ((1 << bits) - 1)  # (..., runs, run)
    return codes.reshape(*lead, -1)[..., :n].to(torch.uint8)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise LowbitError(f"packing supports 1 to 8 bits, got {bits}")
