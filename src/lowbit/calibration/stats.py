"""Statistics of the inputs of linear layers (and of convolutions, as the im2col rows their
weight matrix multiplies), collected with forward pre-hooks.

- ``hessian``: H = 2·XᵀX / n over all input rows (GPTQ's Hessian of ||WX − ŴX||²);
- ``absmean``: mean |x| per input channel (AWQ's activation magnitude);
- ``absmax``: max |x| per input channel (SmoothQuant's outlier measure);
Inputs shared by several linears (q, k and v read the same tensor) are reduced once. A
non-finite input stops calibration with an error naming the layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lowbit.calibration.capture import StopForward
from lowbit.calibration.group import Group
from lowbit.errors import LowbitError
from lowbit.nn.quant_conv import input_gram, input_rows, is_conv


@dataclass
class InputStats:
    """Running sums for one linear layer's inputs."""

    xtx: Tensor | None = None  # (in, in) sum of x xᵀ, float64
    abs_sum: Tensor | None = None  # (in,) sum of |x|
    abs_max: Tensor | None = None  # (in,) max of |x|
    rows: int = 0

    def hessian(self) -> Tensor:
        """2·XᵀX / n in float32 (zero rows: the identity, no input weighing more than another:
        GPTQ then rounds to nearest)."""
        if self.rows == 0:
            return torch.eye(self.xtx.shape[0])
        return (2.0 * self.xtx / self.rows).float()

    def empty(self, width: int, hessian: bool, absmean: bool, absmax: bool) -> None:
        """Zero sums for a layer that saw no rows (an expert no token was routed to)."""
        if hessian:
            self.xtx = torch.zeros(width, width, dtype=torch.float64)
        if absmean:
            self.abs_sum = torch.zeros(width, dtype=torch.float64)
        if absmax:
            self.abs_max = torch.zeros(width)

    def absmean(self) -> Tensor:
        return (self.abs_sum / max(self.rows, 1)).float()

    def absmax(self) -> Tensor:
        return self.abs_max.float()


@contextmanager
def collect_input_stats(
    modules: dict[str, nn.Linear],
    hessian: bool = False,
    absmean: bool = False,
    stop_when_done: bool = False,
    absmax: bool = False,
) -> Iterator[dict[str, InputStats]]:
    """Hook ``modules`` (name -> linear) while the block runs; yields name -> InputStats.

    With ``stop_when_done`` the forward pass is aborted (``StopForward``) as soon as every hooked
    layer has seen its input, so collecting a block's first linears costs a fraction of a pass.
    """
    stats = {name: InputStats() for name in modules}
    seen: set[str] = set()
    last: list = [None, None, None]  # [input tensor, its reductions, conv]: keeps it alive

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            conv = module if is_conv(module) else None  # its own patches, even of a shared input
            if last[0] is not x or conv is not last[2]:  # a new input (not the one q/k/v share)
                xd = x.detach()
                if not torch.isfinite(xd).all():
                    raise LowbitError(f"non-finite calibration activations entering {name}")
                xtx = abs_sum = amax = None
                if hessian:  # per-batch products in fp32 (fast), summed over batches in fp64
                    xtx, rows = input_gram(module, xd)
                    xtx = xtx.double()
                if absmean or absmax or not hessian:
                    xf = input_rows(module, xd).float()  # (rows, in)
                    abs_sum = xf.abs().sum(0).double() if absmean else None
                    amax = xf.abs().amax(0) if absmax else None
                    rows = xf.shape[0]
                last[:] = [x, (xtx, abs_sum, amax, rows), conv]
            xtx, abs_sum, amax, rows = last[1]
            s = stats[name]
            if hessian:
                if s.xtx is None:
                    s.xtx = xtx.clone()
                else:
                    s.xtx += xtx  # in place: one (in, in) float64 less at the peak
            if absmean:
                s.abs_sum = abs_sum.clone() if s.abs_sum is None else s.abs_sum + abs_sum
            if absmax:
                s.abs_max = amax.clone() if s.abs_max is None else torch.maximum(s.abs_max, amax)
            s.rows += rows
            seen.add(name)
            if stop_when_done and len(seen) == len(modules):
                seen.clear()
                raise StopForward

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in modules.items()]
    try:
        yield stats
    finally:
        last[:] = [None, None, None]
        for h in handles:
            h.remove()


def reduce_stats(
    stats: dict[str, InputStats], group: Group, owners: dict[str, int] | None = None
) -> None:
    """Sum (max for ``abs_max``) each layer's statistics over the ranks of ``group``, in place.
    With ``owners``, a Hessian sum goes to its owner's rank only; the others drop theirs."""
    if not group.distributed:
        return
    for name, s in stats.items():
        s.rows = int(group.sum(torch.tensor([s.rows], dtype=torch.int64)))
        if s.abs_sum is not None:
            group.sum(s.abs_sum)
        if s.abs_max is not None:
            group.max(s.abs_max)
        if s.xtx is not None:
            s.xtx = group.sum(s.xtx) if owners is None else group.reduce_to(s.xtx, owners[name])
