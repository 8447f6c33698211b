"""Bit packing of quantized codes (exact round trip)."""

from lowbit.packing.bits import pack, packed_length, unpack

__all__ = ["pack", "packed_length", "unpack"]
