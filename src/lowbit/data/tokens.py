"""Token ids of a corpus, evaluation windows, and the seeded calibration sampler."""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import torch
from torch import Tensor

from lowbit.assets import cache_dir
from lowbit.assets.atomic import atomic_file
from lowbit.data.corpora import Corpus
from lowbit.errors import LowbitError

log = logging.getLogger(__name__)

CACHED_TOKENS = 65_536  # shorter texts tokenize in well under a second: not worth a cache file


def tokenizer_fingerprint(tokenizer: object) -> str | None:
    """A hash of a fast tokenizer's full definition, or None if it has none."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()


def corpus_ids(corpus: Corpus, tokenizer: object) -> Tensor:
    """All token ids of ``corpus.text`` (1-D int64), tokenized once and cached per tokenizer."""
    fp = tokenizer_fingerprint(tokenizer)
    path = cache_dir() / "tokens" / f"{corpus.sha256[:20]}-{(fp or 'none')[:20]}.npy"
    if fp is not None and path.is_file():
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False).astype(np.int64))
        except (OSError, ValueError):
            log.warning("cached token file %s is unreadable; tokenizing again", path.name)
    ids = tokenizer(corpus.text, return_attention_mask=False, verbose=False)["input_ids"]
    arr = np.asarray(ids, dtype=np.int64)
    if fp is not None and len(arr) >= CACHED_TOKENS:
        with atomic_file(path) as tmp, open(tmp, "wb") as f:
            np.save(f, arr.astype(np.uint32), allow_pickle=False)
    return torch.from_numpy(arr)


def eval_windows(ids: Tensor, seqlen: int, max_tokens: int | None = None) -> Tensor:
    """Non-overlapping windows (n, seqlen) from the start of ``ids`` (at most ``max_tokens``)."""
    if seqlen < 2:
        raise LowbitError(f"seqlen must be at least 2, got {seqlen}")
    usable = len(ids) if max_tokens is None else min(len(ids), max_tokens)
    n = usable // seqlen
    if n == 0:
        raise LowbitError(
            f"need at least {seqlen} tokens for one window, have {usable}; lower --seqlen"
        )
    return ids[: n * seqlen].reshape(n, seqlen)


def calibration_windows(ids: Tensor, n: int, seqlen: int, seed: int,
                        options: str = "--calib-samples or --calib-seqlen") -> Tensor:  # fmt: skip
    """``n`` windows of ``seqlen`` tokens at seeded random offsets (GPTQ-style sampling);
    ``options``: what the caller lowers to ask for fewer tokens (named in the error)."""
    if n < 1 or seqlen < 2:
        raise LowbitError(f"calibration needs samples >= 1 and seqlen >= 2, got {n} x {seqlen}")
    if len(ids) < n * seqlen:
        raise LowbitError(
            f"the corpus has {len(ids)} tokens, fewer than the {n} x {seqlen} = "
            f"{n * seqlen} requested; lower {options}, "
            "or use a larger corpus"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seqlen + 1, (n,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def ids_sha256(ids: Tensor) -> str:
    """sha256 of token ids as little-endian int64 (recorded in manifests)."""
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
