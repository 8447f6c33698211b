"""Capturing what a decoder block receives, and replaying blocks on captured inputs.

The model runs once per batch of calibration windows until its first block is called; a forward
pre-hook records that call (hidden states, extra positional args, keyword args such as rotary
position embeddings and masks) and stops the forward pass. Every later block is then driven
directly with those recorded arguments and the previous block's outputs, which is what bounds
memory to one block plus the cached activations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


class StopForward(Exception):
    """Raised from a hook to end a forward pass once what was needed has been recorded."""


@dataclass
class BlockCall:
    """One batch's call of a block: ``hidden`` (B, T, H) plus the other arguments."""

    hidden: Tensor | None
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def with_hidden(self, hidden: Tensor | None) -> BlockCall:
        return BlockCall(hidden, self.args, self.kwargs)


def capture_block_inputs(
    model: nn.Module, block: nn.Module, windows: Tensor, batch_size: int
) -> list[BlockCall]:
    """The calls ``block`` receives when ``model`` reads ``windows`` (N, T) in batches."""
    return list(iter_block_inputs(model, block, windows.split(batch_size)))


@torch.no_grad()
def iter_block_inputs(
    model: nn.Module, block: nn.Module, batches: Iterable[Tensor]
) -> Iterator[BlockCall]:
    """The calls of ``block`` for each batch of windows (B, T), one batch at a time. Keyword
    tensors equal to the previous batch's (the rotary position embeddings of equally long
    batches) are shared, not held once per batch."""
    calls: list[BlockCall] = []
    previous: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs["hidden_states"], ()
        extra = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        calls.append(BlockCall(hidden.detach(), rest, extra))
        raise StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            with contextlib.suppress(StopForward):
                model(input_ids=batch, use_cache=False)
            for call in calls:
                call.kwargs = {k: _shared(v, previous.get(k)) for k, v in call.kwargs.items()}
                previous = call.kwargs
                yield call
            calls.clear()
    finally:
        handle.remove()


def _shared(value: Any, before: Any) -> Any:
    """``before`` if it holds the same tensors as ``value`` (else ``value``)."""
    if isinstance(value, Tensor) and isinstance(before, Tensor):
        same = value.shape == before.shape and value.dtype == before.dtype
        return before if same and torch.equal(value, before) else value
    if isinstance(value, tuple) and isinstance(before, tuple) and len(value) == len(before):
        parts = tuple(_shared(v, b) for v, b in zip(value, before, strict=True))
        return before if all(p is b for p, b in zip(parts, before, strict=True)) else value
    return value


def block_output(block: nn.Module, call: BlockCall) -> Tensor:
    """The hidden states a block returns for one recorded call (hidden states kept in a
    narrower dtype between blocks are computed with in float32)."""
    hidden = call.hidden.float() if call.hidden.dtype == torch.bfloat16 else call.hidden
    out = block(hidden, *call.args, **call.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def module_output(module: nn.Module, args: tuple, kwargs: dict) -> Tensor:
    out = module(*args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out
