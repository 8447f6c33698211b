"""The calibration hidden states carried from one decoder block to the next.

Between two blocks the runner holds, for every calibration batch, the hidden states entering the
next block: (batch, tokens, hidden) values each, 4 bytes per value in float32 (2 in bfloat16).
For many long windows on a wide model that is more than RAM (512 windows of 2048 tokens of an
8B model: 17 GB in float32), so the states may live on disk instead: one safetensors file per
batch in a folder, read back one batch at a time whenever a block replays the batches, written
as the block's outputs are made. Spilling is exact (the values read back are those written); it
costs one write and a few reads per batch and block, which the page cache absorbs while the
states fit in it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from lowbit.calibration.capture import BlockCall
from lowbit.errors import LowbitError


class HiddenStates:
    """The hidden states of each calibration batch entering one block, in memory."""

    spilled = False

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype
        self._items: list[Tensor] = []

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> Tensor:
        return self._items[index]

    def __iter__(self) -> Iterator[Tensor]:
        return (self[i] for i in range(len(self)))

    def append(self, hidden: Tensor) -> None:
        self._items.append(hidden.detach().to(self.dtype))

    def save(self, folder: Path) -> None:
        """Write every batch into ``folder`` (the layout :class:`SpilledStates` reads)."""
        folder.mkdir(parents=True, exist_ok=True)
        for i, hidden in enumerate(self):
            save_file({"hidden": hidden.contiguous()}, str(batch_file(folder, i)))


class SpilledStates(HiddenStates):
    """The same, one safetensors file per batch in ``folder`` (``count`` already there)."""

    spilled = True

    def __init__(self, folder: Path, dtype: torch.dtype = torch.float32, count: int = 0) -> None:
        super().__init__(dtype)
        self.folder, self.count = Path(folder), count
        self.folder.mkdir(parents=True, exist_ok=True)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Tensor:
        if not 0 <= index < self.count:
            raise IndexError(index)
        return load_file(str(batch_file(self.folder, index)))["hidden"]

    def append(self, hidden: Tensor) -> None:
        path = batch_file(self.folder, self.count)
        try:
            save_file({"hidden": hidden.detach().to(self.dtype).contiguous()}, str(path))
        except OSError as exc:
            raise LowbitError(f"cannot spill hidden states to {path}: "
                              f"{exc.strerror or exc}") from None  # fmt: skip
        self.count += 1

    def save(self, folder: Path) -> None:
        if Path(folder) != self.folder:
            super().save(folder)


def batch_file(folder: Path, index: int) -> Path:
    return Path(folder) / f"{index:05d}.safetensors"


def saved_states(folder: Path, spill: bool, dtype: torch.dtype) -> HiddenStates:
    """The states a finished run left in ``folder``: read in place (``spill``) or into memory."""
    count = len(list(Path(folder).glob("*.safetensors")))
    on_disk = SpilledStates(folder, dtype, count)
    if spill:
        return on_disk
    states = HiddenStates(dtype)
    for hidden in on_disk:
        states.append(hidden)
    return states


class Calls(Sequence[BlockCall]):
    """Each calibration batch's recorded call of a block (positional and keyword arguments,
    held in memory) with its hidden states taken from ``states`` when the call is read; a
    slice is a view, so a pass over spilled states holds one batch at a time."""

    def __init__(self, frames: list[BlockCall], states: HiddenStates,
                 index: range | None = None) -> None:  # fmt: skip
        self.frames, self.states = frames, states
        self.index = range(len(frames)) if index is None else index
        if len(states) != len(frames):
            raise LowbitError(f"{len(states)} saved hidden states for {len(frames)} calibration "
                              f"batches; rerun with --restart")  # fmt: skip

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, slice):
            return Calls(self.frames, self.states, self.index[key])
        i = self.index[key]
        return self.frames[i].with_hidden(self.states[i])

    def with_states(self, states: HiddenStates) -> Calls:
        return Calls(self.frames, states)
