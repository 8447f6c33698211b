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
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.calibration.capture import (
    BlockCall,
    StopForward,
    block_output,
    capture_block_inputs,
    module_output,
)
from lowbit.calibration.stats import InputStats, collect_input_stats
from lowbit.errors import LowbitError


@dataclass
class BlockResult:
    index: int
    name: str
    output_error: float  # relative squared error of the block's outputs
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"block": self.name, "output_rel_mse": self.output_error,
                "seconds": round(self.seconds, 3)}  # fmt: skip


class BlockContext:
    """What a handler may do with the block being quantized."""

    def __init__(self, block: nn.Module, name: str, calls: list[BlockCall]) -> None:
        self.block, self.name, self.calls = block, name, calls

    def linear(self, name: str) -> nn.Linear:
        return self.block.get_submodule(name)

    @torch.no_grad()
    def collect(
        self, names: list[str], hessian: bool = False, absmean: bool = False, absmax: bool = False
    ) -> dict[str, InputStats]:
        """Input statistics of the named linears over all calibration batches (each forward
        pass stops as soon as those linears have been reached)."""
        modules = {n: self.linear(n) for n in names}
        with collect_input_stats(modules, hessian, absmean, True, absmax) as stats:
            for call in self.calls:
                with contextlib.suppress(StopForward):
                    block_output(self.block, call)
        missing = [n for n, s in stats.items() if s.rows == 0]
        if missing:
            raise LowbitError(f"{self.name}: layers {missing} saw no calibration data")
        return stats

    @torch.no_grad()
    def module_inputs(self, module_name: str, max_calls: int) -> list[tuple[tuple, dict]]:
        """(args, kwargs) with which the block calls one of its submodules, for the first
        ``max_calls`` batches."""
        module = self.block.get_submodule(module_name)
        seen: list[tuple[tuple, dict]] = []

        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            seen.append((tuple(a.detach() if isinstance(a, Tensor) else a for a in args), kwargs))
            raise StopForward

        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for call in self.calls[:max_calls]:
                with contextlib.suppress(StopForward):
                    block_output(self.block, call)
        finally:
            handle.remove()
        return seen

    @torch.no_grad()
    def outputs(self, limit: int | None = None) -> list[Tensor]:
        return [block_output(self.block, call) for call in self.calls[:limit]]


Handler = Callable[[BlockContext], None]


@torch.no_grad()
def run_sequential(
    model: nn.Module,
    blocks: nn.ModuleList,
    prefix: str,
    windows: Tensor,
    handler: Handler,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "calibrate",
    error_batches: int = 4,
) -> list[BlockResult]:
    """Run ``handler`` on every block in order, feeding each the previous quantized outputs."""
    calls = capture_block_inputs(model, blocks[0], windows, batch_size)
    results: list[BlockResult] = []
    bar = tqdm(list(enumerate(blocks)), desc=desc, unit="block", disable=not progress)
    for index, block in bar:
        start = time.perf_counter()
        ctx = BlockContext(block, f"{prefix}.{index}", calls)
        reference = ctx.outputs(limit=error_batches)
        handler(ctx)
        quantized = ctx.outputs()
        error = _relative_error(quantized[: len(reference)], reference)
        calls = [c.with_hidden(y) for c, y in zip(calls, quantized, strict=True)]
        results.append(BlockResult(index, ctx.name, error, time.perf_counter() - start))
        bar.set_postfix(block_err=f"{error:.2e}")
    return results


def _relative_error(new: list[Tensor], ref: list[Tensor]) -> float:
    num = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(new, ref, strict=True))
    den = sum(float(b.double().pow(2).sum()) for b in ref)
    if not torch.isfinite(torch.tensor(num)):
        raise LowbitError("non-finite block outputs after quantization")
    return num / max(den, 1e-30)


__all__ = ["BlockContext", "BlockResult", "module_output", "run_sequential"]
