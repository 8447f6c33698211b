"""The float and the quantized model's logits on a few fixed windows, from the sequential walk.

A streamed model is never whole in memory, so neither its float nor its quantized logits can
be taken by one forward pass. The probe rides along with the runner instead: the windows are
embedded with the calibration windows; each block maps the float path before it is quantized
and the quantized path once it is final; at the end the model's own head runs on each path's
last hidden states, with the blocks replaced for that pass by :class:`Replay` modules that
return them (what the head sees is exactly what the blocks produced). The quantized path runs
the layers' plain-PyTorch reference, as ``lowbit monitor --reference`` does. Both paths' hidden
states are tiny (windows x tokens x hidden) and are kept with each finished block, so a resumed
run carries on from them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.calibration.capture import BlockCall, iter_block_inputs


class Replay(nn.Module):
    """Stands in for a decoder block: returns ``output`` whatever it is given. Attributes the
    model reads from its blocks (e.g. ``attention_type``) come from the ``block`` it replaces."""

    def __init__(self, block: nn.Module, output: Any) -> None:
        super().__init__()
        self.output = output
        object.__setattr__(self, "_replaced", block)  # not a submodule: no weights of its own

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_replaced"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output


class CanaryProbe:
    """Carries ``tokens`` (N, T) through the blocks on a float and a quantized path;
    :meth:`logits` then gives either path's (N, T, V) logits."""

    def __init__(self, tokens: Tensor) -> None:
        self.tokens = tokens
        self.call: BlockCall | None = None  # the first block's call (its other arguments)
        self.hidden: dict[str, Tensor] = {}  # "float" / "quantized": (N, T, H) after the last
        self.tuple_len = 0  # the blocks return a tuple of this length (0: a tensor)
        self.float_logits: Tensor | None = None  # (N, T, V), set by the pipeline at the end
        self.quantized_logits: Tensor | None = None

    @torch.no_grad()
    def begin(self, model: nn.Module, first: nn.Module) -> None:
        """Record the first block's call on the windows (inside the store's ``outside``)."""
        (self.call,) = list(iter_block_inputs(model, first, [self.tokens]))
        self.hidden = {"float": self.call.hidden, "quantized": self.call.hidden}

    def state(self) -> dict[str, Tensor]:
        """What a resumed run needs after the block just finished."""
        return {**self.hidden, "tuple_len": torch.tensor(self.tuple_len)}

    def restore(self, state: dict[str, Tensor]) -> None:
        self.hidden = {k: state[k] for k in ("float", "quantized")}
        self.tuple_len = int(state["tuple_len"])

    @torch.no_grad()
    def step(self, block: nn.Module, path: str) -> None:
        """Map one path through ``block``: "float" before it is quantized, "quantized" after."""
        assert self.call is not None, "begin() first"
        out = block(self.hidden[path], *self.call.args, **self.call.kwargs)
        self.tuple_len = len(out) if isinstance(out, (tuple, list)) else 0
        self.hidden[path] = out[0] if self.tuple_len else out

    @torch.no_grad()
    def logits(self, model: nn.Module, blocks: str, path: str) -> Tensor:
        """The model's (N, T, V) logits on ``path``, its blocks (the module list named
        ``blocks``) replayed. The head must be materialised; the input embedding need not be
        (what it would give is replaced anyway)."""
        hidden = self.hidden[path]
        output = (hidden, *[None] * (self.tuple_len - 1)) if self.tuple_len else hidden
        width = model.get_input_embeddings().weight.shape[1]
        ignored = torch.zeros(*self.tokens.shape, width)  # (N, T, E)
        with _replayed(model, blocks, output):
            out = model(inputs_embeds=ignored, use_cache=False)
        return (out.logits if hasattr(out, "logits") else out).float()


@contextlib.contextmanager
def _replayed(model: nn.Module, blocks: str, output: Any) -> Iterator[None]:
    parent_name, _, attr = blocks.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    original = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList(Replay(b, output) for b in original))
    try:
        yield
    finally:
        setattr(parent, attr, original)
