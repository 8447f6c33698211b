"""Argument types and start-up checks shared by the commands: bad sizes are refused by the
parser, before any model is loaded."""

from __future__ import annotations

import argparse

from lowbit.errors import LowbitError


def positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def positive_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}") from None
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return x


def tokens(value: str) -> int | None:
    if value == "all":
        return None
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of tokens or 'all', got {value!r}"
        ) from None
    if n < 2:
        raise argparse.ArgumentTypeError("need at least 2 tokens")
    return n


def check_window(count: int | None, seqlen: int, prefix: str = "") -> None:
    """An evaluation of ``count`` tokens (None: all) must hold one window of ``seqlen``."""
    if count is not None and count < seqlen:
        raise LowbitError(f"--{prefix}tokens {count} is shorter than one window of "
                          f"--{prefix}seqlen {seqlen}; ask for at least {seqlen}")  # fmt: skip
