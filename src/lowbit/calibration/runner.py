"""The sequential block runner: quantize a model one decoder block at a time.

Calibration windows go through the model once up to the first block. Then, for each block:
its float outputs on the current inputs are computed, a handler collects the statistics its
algorithm needs and quantizes the block's linears (setting each linear's weight to its
quantized value), the block's outputs are recomputed *with the quantized weights* and become the
next block's inputs. The relative output error ||Y_q − Y_fp||² / ||Y_fp||² of each block is
reported (and shown on the progress bar); it is measured on the first ``error_batches`` batches,
which spares a full float pass per block.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.calibration.canary import CanaryProbe
from lowbit.calibration.capture import (
    BlockCall,
    StopForward,
    block_output,
    iter_block_inputs,
    module_output,
)
from lowbit.calibration.group import Group, ordered_total
from lowbit.calibration.hidden import Calls, HiddenStates
from lowbit.calibration.stats import InputStats, collect_input_stats, reduce_stats
from lowbit.errors import LowbitError

log = logging.getLogger(__name__)


@dataclass
class BlockResult:
    index: int
    name: str
    output_error: float | None  # relative squared error of the block's outputs (None: no data)
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"block": self.name, "index": self.index, "output_rel_mse": self.output_error,
                "seconds": round(self.seconds, 3)}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BlockResult:
        return cls(data["index"], data["block"], data["output_rel_mse"], data["seconds"])


class BlockContext:
    """What a handler may do with the block being quantized. ``calls`` are this rank's
    calibration batches: ``indices`` says which of the job's ``sizes`` (windows per batch)
    they are; ``group`` reduces what the ranks collect and says who quantizes which linear
    (one process: all of them)."""

    def __init__(self, block: nn.Module, name: str, calls: Sequence[BlockCall],
                 group: Group | None = None, indices: Sequence[int] | None = None,
                 sizes: Sequence[int] | None = None) -> None:  # fmt: skip
        self.block, self.name, self.calls = block, name, calls
        self.group = group or Group()
        self.indices = list(range(len(calls)) if indices is None else indices)
        self.sizes = list([c.hidden.shape[0] for c in calls] if sizes is None else sizes)

    @property
    def calibrated(self) -> bool:
        """Whether the job has calibration data (a rank always holds some of it)."""
        return len(self.sizes) > 0

    def linear(self, name: str) -> nn.Linear:
        return self.block.get_submodule(name)

    def first(self, batches: int) -> int:
        """How many of this rank's calls are among the job's first ``batches`` batches."""
        return sum(1 for i in self.indices if i < batches)

    def batches_for(self, windows: int) -> int:
        """The number of leading batches that together hold at least ``windows`` windows."""
        seen = count = 0
        for size in self.sizes:
            if seen >= windows:
                break
            seen, count = seen + size, count + 1
        return count

    def total(self, values: Sequence[float], batches: int) -> float:
        """The sum over the job's first ``batches`` batches of per-batch ``values`` (one per
        local call among them), added in batch order on every rank."""
        mine = dict(zip(self.indices[: len(values)], values, strict=True))
        return ordered_total(self.group.ordered_sum(mine, batches))

    @torch.no_grad()
    def collect(
        self, names: list[str], hessian: bool = False, absmean: bool = False, absmax: bool = False,
        owners: dict[str, int] | None = None,
    ) -> dict[str, InputStats]:  # fmt: skip
        """Input statistics of the named linears over all calibration batches of every rank
        (each forward pass stops as soon as those linears have been reached; with a mixture's
        experts among them, which a pass may reach only some of, it runs to the block's end).
        With ``owners`` each Hessian is summed on its owner's rank only (others get none)."""
        modules = {n: self.linear(n) for n in names}
        routed = {n for n, m in modules.items() if getattr(m, "lowbit_routed", False)}
        with collect_input_stats(modules, hessian, absmean, not routed, absmax) as stats:
            for call in self.calls:
                with contextlib.suppress(StopForward):
                    block_output(self.block, call)
        for name in routed:  # every rank sums the same tensors (zeros where no token came)
            if stats[name].rows == 0:
                stats[name].empty(modules[name].in_features, hessian, absmean, absmax)
        reduce_stats(stats, self.group, owners)
        missing = [n for n, s in stats.items() if s.rows == 0 and n not in routed]
        unreached = [n for n in stats if n in routed and stats[n].rows == 0]
        if unreached:
            log.info("%s: %d linears of experts saw no calibration token (%s, ...): rounded "
                     "as if every input weighed the same", self.name, len(unreached),
                     unreached[0])  # fmt: skip
        if missing:
            raise LowbitError(f"{self.name}: layers {missing} saw no calibration data")
        return stats

    def module_inputs(self, module_name: str, max_calls: int) -> list[tuple[tuple, dict]]:
        """(args, kwargs) with which the block calls one of its submodules, for this rank's
        calls among the job's first ``max_calls`` batches."""
        return self.modules_inputs([module_name], max_calls)[module_name]

    @torch.no_grad()
    def modules_inputs(self, names: Sequence[str], max_calls: int) -> dict[str, list]:
        """:meth:`module_inputs` of several submodules in one pass per call (a mixture's
        experts): a call stops once it has reached them all, else runs to the block's end."""
        seen: dict[str, list[tuple[tuple, dict]]] = {n: [] for n in names}
        reached: set[str] = set()

        def hook(name: str):
            def record(mod: nn.Module, args: tuple, kwargs: dict) -> None:
                kept = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
                seen[name].append((kept, kwargs))
                reached.add(name)
                if len(reached) == len(seen):
                    raise StopForward

            return record

        handles = [self.block.get_submodule(n).register_forward_pre_hook(hook(n), with_kwargs=True)
                   for n in names]  # fmt: skip
        try:
            for call in self.calls[: self.first(max_calls)]:
                reached.clear()
                with contextlib.suppress(StopForward):
                    block_output(self.block, call)
        finally:
            for handle in handles:
                handle.remove()
        return seen

    @torch.no_grad()
    def outputs(self, limit: int | None = None) -> list[Tensor]:
        """The block's outputs on this rank's calls among the job's first ``limit`` batches."""
        count = None if limit is None else self.first(limit)
        return [block_output(self.block, call) for call in self.calls[:count]]


Handler = Callable[[BlockContext], None]
Finish = Callable[[BlockContext], dict[str, Any]]


class BlockStore:
    """Where blocks live. This base keeps them in memory (nothing to load, nothing to write);
    a streaming store reads each block's weights from disk before it is quantized, writes the
    finished block and frees it, and lets a killed run start at its first unfinished block."""

    def records(self) -> list[dict[str, Any]]:
        """The records of the blocks finished by an earlier, interrupted run, in order."""
        return []

    @contextlib.contextmanager
    def rest(self, model: nn.Module, layers: list[str]) -> Iterator[None]:
        """Materialise the named linears outside the blocks; persist the rest of the model after."""
        yield

    def first_block(self, dtype: torch.dtype) -> tuple[int, HiddenStates | None]:
        """Index of the first unfinished block and the hidden states entering it (None: the
        runner computes them from the start)."""
        return 0, None

    def hidden_states(self, after: int, dtype: torch.dtype) -> HiddenStates:
        """An empty holder for the hidden states leaving block ``after`` (-1: entering block
        0); this store keeps them in memory."""
        return HiddenStates(dtype)

    @contextlib.contextmanager
    def outside(self, model: nn.Module, head: bool = False) -> Iterator[None]:
        """Materialise what the model runs outside its blocks (embeddings; with ``head`` also
        the final norm and output layer), for a while."""
        yield

    def probe_state(self, index: int) -> dict[str, Tensor]:
        """The canary probe's state kept when block ``index`` finished (see :meth:`leave`)."""
        raise LowbitError("this store does not resume")

    def enter(self, name: str, block: nn.Module) -> None:
        """Materialise a block's weights."""

    def leave(self, index: int, name: str, block: nn.Module, record: dict[str, Any],
              hidden: HiddenStates | None,
              probe: dict[str, Tensor] | None = None) -> None:  # fmt: skip
        """The block is final: persist it (with ``record``, the next block's inputs and the
        canary ``probe``'s state)."""

    def status(self) -> dict[str, str]:
        """Figures for the progress bar."""
        return {}


@torch.no_grad()
def run_sequential(
    model: nn.Module,
    blocks: nn.ModuleList,
    prefix: str,
    windows: Tensor | None,
    handler: Handler,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "calibrate",
    error_batches: int = 4,
    finish: Finish | None = None,
    store: BlockStore | None = None,
    seed: int = 0,
    hidden_dtype: torch.dtype = torch.float32,
    group: Group | None = None,
    probe: CanaryProbe | None = None,
) -> list[BlockResult]:
    """Run ``handler`` on every block in order, feeding each the previous quantized outputs,
    then ``finish`` (whose record the store keeps with the block). Without ``windows`` no
    forward pass runs (data-free algorithms). Each block starts from its own seed, so a resumed
    run draws what an uninterrupted one did. ``hidden_dtype`` bfloat16 halves the memory of the
    hidden states carried between blocks (each block still computes in float32). Under a
    process ``group`` each rank takes every world-th batch and the handlers reduce over ranks.
    A canary ``probe`` is carried through every block, float before it is quantized and
    quantized after (and kept with each finished block, for a resumed run)."""
    store = store or BlockStore()
    group = group or Group()
    first, hidden = store.first_block(hidden_dtype)
    calls: Sequence[BlockCall] = []
    batches = list(windows.split(batch_size)) if windows is not None else []
    mine = group.mine(len(batches))
    if batches and len(batches) < group.world:  # every rank raises: none waits for the rest
        raise LowbitError(f"{len(batches)} calibration batches for {group.world} processes: "
                          f"use more windows or fewer processes")  # fmt: skip
    calibrate = bool(batches) and first < len(blocks)
    if calibrate and first and hidden is None:
        raise LowbitError(f"no saved inputs for block {first}; rerun with --restart")
    if calibrate or probe is not None:
        with store.outside(model):
            if probe is not None:
                probe.begin(model, blocks[0])
            if calibrate:
                saved = hidden if hidden is not None else store.hidden_states(-1, hidden_dtype)
                calls = _entering_calls(model, blocks[0], [batches[i] for i in mine], saved,
                                        record=hidden is None)  # fmt: skip
    if probe is not None and first:  # a resumed run: the windows after the finished blocks
        probe.restore(store.probe_state(first - 1))
    sizes = [len(b) for b in batches]
    results: list[BlockResult] = []
    bar = tqdm(range(first, len(blocks)), desc=desc, unit="block", disable=not progress,
               initial=first, total=len(blocks))  # fmt: skip
    for index in bar:
        start = time.perf_counter()
        torch.manual_seed(seed * 1_000_003 + index)
        block = blocks[index]
        store.enter(f"{prefix}.{index}", block)
        if probe is not None:
            probe.step(block, "float")
        ctx = BlockContext(block, f"{prefix}.{index}", calls, group, mine, sizes)
        reference = ctx.outputs(limit=error_batches)
        handler(ctx)
        last = index + 1 == len(blocks)
        leaving = store.hidden_states(index, hidden_dtype) if calls and not last else None
        error = _quantized_outputs(ctx, reference, leaving, error_batches) if calls else None
        record = finish(ctx) if finish is not None else {}
        if leaving is not None:
            calls = calls.with_states(leaving)
        result = BlockResult(index, ctx.name, error, time.perf_counter() - start)
        results.append(result)
        record["block"] = result.to_dict()
        if probe is not None:
            probe.step(block, "quantized")
        store.leave(index, ctx.name, block, record, leaving,
                    probe.state() if probe is not None else None)  # fmt: skip
        post = {"block_err": f"{error:.2e}"} if error is not None else {}
        bar.set_postfix({**post, **store.status()})
    return results


def _entering_calls(model: nn.Module, first: nn.Module, batches: list[Tensor],
                    states: HiddenStates, record: bool) -> Calls:  # fmt: skip
    """The first block's calls on this rank's batches; their hidden states are ``states`` (a
    resumed run's saved inputs) or, with ``record``, are appended to it now."""
    frames = []
    for call in iter_block_inputs(model, first, batches):
        frames.append(call.with_hidden(None))
        if record:
            states.append(call.hidden)
    return Calls(frames, states)


def _quantized_outputs(
    ctx: BlockContext, reference: list[Tensor], leaving: HiddenStates | None, measured: int
) -> float:
    """Run the quantized block on this rank's batches, keep its outputs in ``leaving`` (the
    next block's inputs) and return their relative squared error against ``reference`` (the
    float block's outputs on the job's first ``measured`` batches), summed over ranks."""
    num: list[float] = []
    den: list[float] = []
    calls = ctx.calls
    if leaving is None:  # the last block: only the measured batches are needed
        calls = calls[: len(reference)]
    for i, call in enumerate(calls):
        y = block_output(ctx.block, call)
        if i < len(reference):
            num.append(float((y.double() - reference[i].double()).pow(2).sum()))
            den.append(float(reference[i].double().pow(2).sum()))
        if leaving is not None:
            leaving.append(y)
        del y
    measured = min(measured, len(ctx.sizes))
    total, power = ctx.total(num, measured), ctx.total(den, measured)
    if not math.isfinite(total):
        raise LowbitError("non-finite block outputs after quantization")
    return total / max(power, 1e-30)


__all__ = ["BlockContext", "BlockResult", "BlockStore", "HiddenStates", "module_output",
           "run_sequential"]  # fmt: skip
