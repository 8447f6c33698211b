"""Calibration (or training) text and evaluation text must not overlap: the checks.

Comparing whole texts by hash finds only an identical copy. A file that holds the calibration
text plus one more document, half of it, or the same words spaced differently would be scored
on the very tokens the model was fitted to. Texts are therefore compared by their spans: with
whitespace collapsed, every ``SPAN``-byte window of the evaluation text is looked up among the
training text's windows that start at multiples of ``STRIDE``, so any common passage of
``SPAN + STRIDE - 1`` bytes or more is found, wherever either text cuts it. Two different texts
can share a sentence or two (a quotation, a licence line); a share of the evaluation text at or
above ``MAX_SHARED`` is refused, anything smaller is logged. (Rolling hashes in numpy: no
well-kept library offers a span-overlap test between two texts.)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from lowbit.data.corpora import HUB_CORPORA, Corpus, corpus_sources, load_corpus
from lowbit.errors import LowbitError

log = logging.getLogger(__name__)
SPAN = 64  # bytes of whitespace-collapsed UTF-8 text per compared window (a power of 2)
STRIDE = 32  # the training text's windows start every STRIDE bytes
MAX_SHARED = 0.01  # of the evaluation text
_BASE = 0x100000001B3  # odd: the polynomial hash's base (mod 2**64)
_BLOCK = 1 << 23  # bytes hashed at once: bounded temporaries for large texts


def _bytes(corpus: Corpus) -> np.ndarray:
    return np.frombuffer(" ".join(corpus.text.split()).encode("utf-8"), dtype=np.uint8)


def _hashes(data: np.ndarray, stride: int) -> np.ndarray:
    """The hash of every ``SPAN``-byte window of ``data`` starting at a multiple of ``stride``."""
    out = []
    for start in range(0, max(len(data) - SPAN + 1, 0), _BLOCK):
        h = data[start : start + _BLOCK + SPAN - 1].astype(np.uint64)
        width = 1  # h[p]: the hash of the ``width`` bytes from p; doubled until SPAN
        with np.errstate(over="ignore"):  # arithmetic mod 2**64 is the hash
            while width < SPAN:
                h = h[:-width] * np.uint64(pow(_BASE, width, 1 << 64)) + h[width:]
                width *= 2
        out.append(h[(-start) % stride :: stride])
    return np.concatenate(out) if out else np.zeros(0, np.uint64)


def shared_fraction(train: Corpus, evaluation: Corpus) -> float:
    """The fraction of ``evaluation``'s bytes (whitespace collapsed) inside spans that
    ``train`` also holds."""
    ours = _bytes(evaluation)
    if len(ours) < SPAN:
        return 0.0
    found = np.flatnonzero(np.isin(_hashes(ours, 1), np.unique(_hashes(_bytes(train), STRIDE))))
    covered = np.zeros(len(ours) + 1, np.int64)  # each found window covers SPAN bytes
    covered[found] += 1  # (found holds each position once)
    covered[found + SPAN] -= 1
    return float((np.cumsum(covered[:-1]) > 0).mean())


def check_disjoint(train: Corpus, evaluation: Corpus, what: str) -> None:
    """A one-line error when ``evaluation`` repeats ``train`` (``what``: how the error names
    the pair, e.g. the two options)."""
    if train.sha256 == evaluation.sha256:
        raise LowbitError(f"{what}: the same text; calibration (or training) and evaluation "
                          f"text must differ")  # fmt: skip
    share = shared_fraction(train, evaluation)
    if share >= MAX_SHARED:
        raise LowbitError(f"{what}: {share:.1%} of the evaluation text ({evaluation.name}) is "
                          f"also in {train.name}; calibration (or training) and evaluation text "
                          f"must not overlap")  # fmt: skip
    if share > 0:
        log.warning("%s: %.2f%% of the evaluation text is also in %s (below the "
                    "%.0f%% that is refused)", what, 100 * share, train.name,
                    100 * MAX_SHARED)  # fmt: skip


def disjoint_texts(first: str, second: str, flags: str) -> None:
    """:func:`check_disjoint` of two corpus names or files (``flags`` names the options)."""
    if first == second:
        raise LowbitError(f"{flags}: the same text; calibration (or training) and evaluation "
                          f"text must differ")  # fmt: skip
    check_disjoint(load_corpus(first), load_corpus(second), flags)


def calibration_text(calibration: dict[str, Any]) -> Corpus | None:
    """The text a folder was calibrated on, from its manifest's ``calibration`` record, when it
    can be read again here without a network: a bundled corpus, or the file still holding the
    recorded text. None otherwise (a hub corpus, a file since moved or changed)."""
    name = calibration.get("corpus")
    if not isinstance(name, str) or name in HUB_CORPORA:
        return None
    if name not in corpus_sources() and not Path(name).expanduser().is_file():
        return None
    try:
        corpus = load_corpus(name)
    except LowbitError:
        return None
    want = calibration.get("text_sha256")
    return corpus if want is None or want == corpus.sha256 else None
