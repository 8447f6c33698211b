"""Capturing what a decoder block receives, and replaying blocks on captured inputs.

The model runs once per batch of calibration windows until its first block is called; a forward
pre-hook records that call (hidden states, extra positional args, keyword args such as rotary
position embeddings and masks) and stops the forward pass. Every later block is then driven
directly with those recorded arguments and the previous block's outputs, which is what bounds
memory to one block plus the cached activations.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


class StopForward(Exception):
    """Raised from a hook to end a forward pass once what was needed has been recorded."""


@dataclass
class BlockCall:
    """One batch's call of a block: ``hidden`` (B, T, H) plus the other arguments."""

    hidden: Tensor
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def with_hidden(self, hidden: Tensor) -> BlockCall:
        return BlockCall(hidden, self.args, self.kwargs)


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, block: nn.Module, windows: Tensor, batch_size: int
) -> list[BlockCall]:
    """The calls ``block`` receives when ``model`` reads ``windows`` (N, T) in batches."""
    calls: list[BlockCall] = []

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
        for batch in windows.split(batch_size):
            with contextlib.suppress(StopForward):
                model(input_ids=batch, use_cache=False)
    finally:
        handle.remove()
    return calls


def block_output(block: nn.Module, call: BlockCall) -> Tensor:
    """The hidden states a block returns for one recorded call (hidden states kept in a
    narrower dtype between blocks are computed with in float32)."""
    hidden = call.hidden.float() if call.hidden.dtype == torch.bfloat16 else call.hidden
    out = block(hidden, *call.args, **call.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def module_output(module: nn.Module, args: tuple, kwargs: dict) -> Tensor:
    out = module(*args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out
