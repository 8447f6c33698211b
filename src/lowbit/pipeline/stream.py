"""Streaming quantization: a model larger than RAM, one decoder block in memory at a time.

The model is a meta-device skeleton built from ``config.json``. The :class:`StreamStore` gives
the sequential runner each block's weights from the source's safetensors shards just before the
block is quantized, writes the finished block into the work folder and frees it. Embeddings are
read only while the calibration windows are embedded; tensors the recipe leaves alone outside
the blocks are copied byte for byte into the output without ever being loaded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.calibration import BlockStore, CalibrationSet, HiddenStates, SpilledStates, saved_states
from lowbit.calibration.canary import CanaryProbe
from lowbit.calibration.group import Group
from lowbit.errors import LowbitError
from lowbit.models.families import find_blocks
from lowbit.models.normalize import checkpoint_state
from lowbit.models.source import TensorSource, materialize, release, tied_names
from lowbit.models.workdir import WorkFolder
from lowbit.pipeline.report import QuantizeReport
from lowbit.pipeline.weights import quantize_weights
from lowbit.recipes import Recipe
from lowbit.sysinfo import current_rss_mb, release_freed_memory


class StreamStore(BlockStore):
    """Blocks read from ``source`` and written to ``work`` as they finish."""

    def __init__(
        self, model: nn.Module, source: TensorSource, work: WorkFolder, prefix: str, blocks: int,
        spill: bool = False, group: Group | None = None,
    ) -> None:  # fmt: skip
        self.model, self.source, self.work = model, source, work
        self.prefix, self.blocks, self.spill = prefix, blocks, spill
        self.group = group or Group()
        self.bytes_read = 0
        release_freed_memory()

    def records(self) -> list[dict[str, Any]]:
        return self.work.records()[: self.blocks]

    def first_block(self, dtype: torch.dtype) -> tuple[int, HiddenStates | None]:
        mine = len(self.records())
        done = self.group.min_int(mine)  # where every rank can start (they stop <= 1 apart)
        if self.group.max_int(mine) > done + 1:
            raise LowbitError("the ranks' work folders disagree by more than one block; rerun "
                              "with --restart")  # fmt: skip
        folder = self.work.hidden(done - 1) if 0 < done < self.blocks else None
        return done, saved_states(folder, self.spill, dtype) if folder is not None else None

    def hidden_states(self, after: int, dtype: torch.dtype) -> HiddenStates:
        """Spilled into the work folder, or in memory (and saved there as the block leaves)."""
        if self.spill:
            return SpilledStates(self.work.hidden_folder(after), dtype)
        return HiddenStates(dtype)

    @contextlib.contextmanager
    def outside(self, model: nn.Module, head: bool = False) -> Iterator[None]:
        names = self._outside_names(skip_output=not head)
        if head:  # the head's pass is given its input embeddings: leave that table on disk
            held = model.state_dict(keep_vars=True)  # and what is in memory (a quantized head)
            skip = self._input_names(model)
            names = [n for n in names if n not in skip and n in held and held[n].is_meta]
        self.bytes_read += materialize(model, names, self.source)
        try:
            yield
        finally:
            for name in names:
                module_name, _, attr = name.rpartition(".")
                _to_meta(model.get_submodule(module_name) if module_name else model, attr)
            if tied_names(model):
                model.get_output_embeddings().weight = model.get_input_embeddings().weight

    def enter(self, name: str, block: nn.Module) -> None:
        names = [f"{name}.{k}" for k in block.state_dict()]
        self.bytes_read += materialize(self.model, names, self.source)

    def leave(self, index: int, name: str, block: nn.Module, record: dict[str, Any],
              hidden: HiddenStates | None,
              probe: dict[str, Tensor] | None = None) -> None:  # fmt: skip
        self.work.started = True  # a block is done (see WorkFolder.discard_if_unused)
        state = checkpoint_state(block)  # (GPT-2's float Conv1D weights as (in, out))
        tensors = {f"{name}.{k}": v.detach().contiguous() for k, v in state.items()}
        spilled = isinstance(hidden, SpilledStates)
        folder = hidden.folder if spilled else None
        if hidden is not None and not spilled:
            folder = self.work.hidden_folder(index)
            hidden.save(folder)
        mine = tensors if self.group.main else None  # rank 0 writes the weights
        committed = self.work.write_unit(index, mine, record, folder, probe)
        if spilled:
            hidden.folder = committed  # the next block reads its inputs where they now lie
        release(block)
        del tensors
        release_freed_memory()

    @contextlib.contextmanager
    def rest(self, model: nn.Module, layers: list[str]) -> Iterator[None]:
        names = [f"{n}.{k}" for n in layers for k in ("weight", "bias")]
        tied = tied_names(model)
        if tied & set(names):  # a quantized output layer tied to the input embedding
            embed = [n for n, m in model.named_modules() if m is model.get_input_embeddings()]
            names.append(f"{embed[0]}.weight")
        self.bytes_read += materialize(model, names, self.source)
        yield
        tensors: dict[str, Any] = {}
        for layer in layers:
            for k, v in checkpoint_state(model.get_submodule(layer)).items():
                tensors[f"{layer}.{k}"] = v.detach().contiguous()
        owned = {f"{n}." for n in layers}
        for name in self._outside_names(skip_output=False):
            if not name.startswith(tuple(owned)) and name in self.source:
                tensors[name] = self.source.item(name)  # copied byte for byte (or rotated)
        if self.group.main:
            self.work.write_unit(self.blocks, tensors, {"rest": layers})

    def _outside_names(self, skip_output: bool) -> list[str]:
        """Names of the model's tensors outside the decoder blocks (the output embedding left
        out with ``skip_output``, unless it is tied to the input embedding)."""
        head = self.prefix + "."
        names = [n for n in self.model.state_dict() if not n.startswith(head)]
        out = self._output_prefix()
        if skip_output and out:
            tied = tied_names(self.model)
            names = [n for n in names if n in tied or not n.startswith(out)]
        return names

    def _input_names(self, model: nn.Module) -> set[str]:
        """The input embedding's weight name, unless it is also the (tied) output layer."""
        embed = model.get_input_embeddings()
        found = {f"{n}.weight" for n, m in model.named_modules() if m is embed}
        return set() if tied_names(model) else found

    def _output_prefix(self) -> str | None:
        out = getattr(self.model, "get_output_embeddings", lambda: None)()
        found = [n for n, m in self.model.named_modules() if out is not None and m is out]
        return f"{found[0]}." if found else None

    def probe_state(self, index: int) -> dict[str, Tensor]:
        state = self.work.side(index)
        if state is None:
            raise LowbitError(f"{self.work.path} keeps no canary state for block {index}; "
                              f"rerun with --restart")  # fmt: skip
        return state

    def status(self) -> dict[str, str]:
        return {
            "read": f"{self.bytes_read / 1e9:.1f}GB",
            "written": f"{self.work.bytes_written / 1e9:.2f}GB",
            "rss": f"{current_rss_mb():.0f}MB",
        }


def _to_meta(module: nn.Module, attr: str) -> None:
    if attr in module._parameters and module._parameters[attr] is not None:
        p = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(torch.empty_like(p, device="meta"),
                                                requires_grad=False)  # fmt: skip
    elif attr in module._buffers and module._buffers[attr] is not None:
        module._buffers[attr] = torch.empty_like(module._buffers[attr], device="meta")


def stream_quantize(
    model: nn.Module,
    source: TensorSource,
    recipe: Recipe,
    calibration: CalibrationSet | None,
    work: WorkFolder,
    progress: bool = True,
    seed: int = 0,
    hidden_dtype: torch.dtype = torch.float32,
    spill: bool = False,
    group: Group | None = None,
    probe: CanaryProbe | None = None,
) -> tuple[QuantizeReport, int]:
    """Quantize the meta skeleton ``model`` block by block from ``source`` into ``work``;
    returns the report and the number of units written (blocks, then the rest). ``spill``
    keeps the calibration hidden states in the work folder, one batch in memory at a time.
    The caller has checked ``source`` against the skeleton (:meth:`TensorSource.check`)."""
    try:
        prefix, blocks = find_blocks(model)
    except LowbitError as exc:
        raise LowbitError(f"streaming quantization goes block by block: {exc}") from None
    store = StreamStore(model, source, work, prefix, len(blocks), spill, group)
    report = quantize_weights(model, recipe, calibration, progress, store=store, seed=seed,
                              hidden_dtype=hidden_dtype, group=group, probe=probe)  # fmt: skip
    return report, len(blocks) + 1
