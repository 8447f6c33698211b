"""Argument types and start-up checks shared by the commands: bad sizes are refused by the
parser, before any model is loaded."""

from __future__ import annotations

import argparse
from typing import Any

from lowbit.errors import LowbitError
from lowbit.formats.spec import AttentionSpec


def _integer(value: str, low: int, high: int | None, what: str, expected: str) -> int:
    """``value`` as an integer in [low, high] (high None: no bound), else argparse's error."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}") from None
    if n < low or (high is not None and n > high):
        raise argparse.ArgumentTypeError(f"{what}, got {n}")
    return n


def positive(value: str) -> int:
    return _integer(value, 1, None, "expected a positive integer", "a positive integer")


def threads(value: str) -> int:
    """A thread count (torch crashes or overflows far past any machine's cores)."""
    return _integer(value, 1, 1024, "threads are in [1, 1024]", "a number of threads")


def positive_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}") from None
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return x


def seed(value: str) -> int:
    """A seed torch's generators take: 0 <= seed < 2**63."""
    return _integer(value, 0, 2**63 - 1, "a seed is in [0, 2**63)", "an integer seed")


def port(value: str) -> int:
    return _integer(value, 0, 65535, "a port is in [0, 65535]", "a port number")


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


def add_attention_options(p: argparse.ArgumentParser) -> None:
    """--kv-bits and friends: round the key/value cache (and queries) of any text model."""
    g = p.add_argument_group(
        "key/value cache", "round attention's inputs at run time (quantize saves this with the "
        "model; at eval / generate it overrides a folder's own), e.g. --kv-bits 4 --kv-hadamard",
    )  # fmt: skip
    g.add_argument("--kv-bits", type=_kv_bits, metavar="N",
                   help="keys and values on an N-bit asymmetric grid (2-8), one range per "
                   "token and head (or per --kv-group channels); a stored code takes 4 bits "
                   "(N <= 4) or 8 (N > 4); 16: stored as float16 (llama.cpp's default cache: "
                   "half the bytes of float32)")  # fmt: skip
    g.add_argument(
        "--kv-group",
        type=positive,
        metavar="N",
        help="channels per range along the head dimension (default: the whole head)",
    )
    g.add_argument("--query-bits", type=_bits, metavar="N",
                   help="also round the queries to N bits (4-bit attention: --kv-bits 4 "
                   "--query-bits 4)")  # fmt: skip
    g.add_argument("--kv-hadamard", action="store_true",
                   help="rotate every head by a Hadamard matrix before rounding (exact in "
                   "float; spreads outlier channels, as QuaRot does)")  # fmt: skip
    g.add_argument("--kv-center", action="store_true",
                   help="store the keys minus each layer's mean key, measured on the "
                   "calibration text when quantizing (exact in float; narrows the keys' "
                   "ranges: quantize only)")  # fmt: skip


def _bits(value: str) -> int:
    n = positive(value)
    if not 2 <= n <= 8:
        raise argparse.ArgumentTypeError(f"expected 2 to 8 bits, got {n}")
    return n


def _kv_bits(value: str) -> int:
    n = positive(value)
    if n != 16 and not 2 <= n <= 8:
        raise argparse.ArgumentTypeError(f"expected 2 to 8 bits, or 16 (float16), got {n}")
    return n


def attention_override(args: argparse.Namespace) -> AttentionSpec | None:
    """The AttentionSpec the flags ask for (None: none given)."""
    kv, q = getattr(args, "kv_bits", None), getattr(args, "query_bits", None)
    if kv is None and q is None:
        extras = ("kv_group", "kv_hadamard", "kv_center")
        if any(getattr(args, key, None) for key in extras):
            raise LowbitError("--kv-group, --kv-hadamard and --kv-center need --kv-bits or "
                              "--query-bits")  # fmt: skip
        return None
    return AttentionSpec(kv, args.kv_group or -1, q, args.kv_hadamard,
                         getattr(args, "kv_center", False))  # fmt: skip


def refuse_attention(args: argparse.Namespace, model: str) -> None:
    """The cache flags on an image model are an error, not silently ignored."""
    if attention_override(args) is not None:
        raise LowbitError(f"--kv-bits / --query-bits round a language model's attention; "
                          f"{model} is an image model")  # fmt: skip


def apply_attention(model: Any, args: argparse.Namespace) -> None:
    """Install the flags' AttentionSpec on ``model`` (a transformers model), if any."""
    spec = attention_override(args)
    if spec is not None:
        from lowbit.models.litert import LiteRTModel
        from lowbit.nn.attention import has_key_centers, install_attention

        if isinstance(model, LiteRTModel):
            raise LowbitError("a .tflite runs the float KV cache its export wrote: the attention "
                              "flags (--kv-bits, ...) apply to lowbit folders and hub models; "
                              "drop them")  # fmt: skip

        if spec.center_keys and not has_key_centers(model):
            raise LowbitError("--kv-center needs key centres measured on calibration text: "
                              "quantize with --kv-bits N --kv-center, then use the "
                              "folder")  # fmt: skip
        install_attention(model, spec)


def given(args: argparse.Namespace, *dests: str) -> list[str]:
    """Those of the options ``dests`` this command line set to other than their default, spelt
    as flags (``calib_samples`` -> ``--calib-samples``): how a command refuses options that
    would do nothing for the model it was given. The command's parser is ``args.parser``."""
    parser = args.parser
    return [f"--{d.replace('_', '-')}" for d in dests if getattr(args, d) != parser.get_default(d)]


def check_context(seqlen: int, config: Any, flag: str) -> None:
    """Refuse windows longer than the model's context (``config``: its config object or
    config.json as a mapping): positions past it were never trained, and such a run is slow."""
    from lowbit.models.modules import context_limit

    limit = context_limit(config)
    if limit is not None and seqlen > limit:
        raise LowbitError(f"{flag} {seqlen} exceeds the model's context of {limit} positions; "
                          f"lower {flag}")  # fmt: skip
