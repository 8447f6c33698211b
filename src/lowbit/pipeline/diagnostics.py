"""Diagnostics after quantization: each layer's output SQNR on calibration data.

One pass of the quantized model over a few calibration windows, hooking every quantized layer:
its output is compared with what the float weight would have given on the *same* input (the
input the quantized model actually feeds it), 10·log10(||Y||² / ||Y − Ŷ||²) in dB. A layer with
few dB is one whose quantization destroyed its output.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.calibration.group import Group
from lowbit.models.modules import forward_logits
from lowbit.nn import QuantLinear


@torch.no_grad()
def output_sqnr(
    model: nn.Module, originals: dict[str, Tensor], windows: Tensor, batch_size: int = 4
) -> dict[str, float]:
    """layer -> output SQNR in dB over ``windows`` (inf for an exact layer)."""
    layers = {n: m for n, m in model.named_modules()
              if isinstance(m, QuantLinear) and n in originals}  # fmt: skip

    steps = [(i, functools.partial(forward_logits, model, b))
             for i, b in enumerate(windows.split(batch_size))]  # fmt: skip
    return output_sqnr_during(layers, originals, steps)


@torch.no_grad()
def output_sqnr_during(
    layers: dict[str, nn.Module],
    originals: dict[str, Tensor],
    steps: Iterable[tuple[int, Callable[[], None]]],
    group: Group | None = None,
) -> dict[str, float]:
    """Output SQNR of each of ``layers`` against its float weight in ``originals`` while the
    (batch, step) ``steps`` drive forward passes (the whole model, or one block on its recorded
    inputs); under a process ``group`` summed over ranks."""
    sums: dict[str, list[float]] = {}

    def make_hook(name: str, weight: Tensor):
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            x, bias = args[0].float(), module.bias
            geometry = getattr(module, "geometry", None)  # a QuantConv: its matrix as a conv
            if geometry is None:
                ref = F.linear(x, weight.float(), None)
            else:
                ref = geometry.apply(x, geometry.weight(weight.float()), None)
                bias = None if bias is None else bias.view(-1, 1, 1)  # per channel
            got = out.float() if bias is None else out.float() - bias.float()
            s = sums.setdefault(name, [0.0, 0.0])
            s[0] += float(ref.double().pow(2).sum())
            s[1] += float((got - ref).double().pow(2).sum())

        return hook

    handles = [m.register_forward_hook(make_hook(n, originals[n])) for n, m in layers.items()]
    try:
        for _, step in steps:
            step()
    finally:
        for h in handles:
            h.remove()
    if group is not None and group.distributed:
        # power, error, and whether the layer ran at all, over every rank
        table = torch.tensor([[*sums.get(n, [0.0, 0.0]), float(n in sums)] for n in layers],
                             dtype=torch.float64)  # fmt: skip
        group.sum(table)
        sums = {n: row[:2] for n, row in zip(layers, table.tolist(), strict=True) if row[2] > 0}
    return {n: _db(power, err) for n, (power, err) in sums.items()}


def _db(power: float, err: float) -> float:
    if not math.isfinite(err):
        return float("-inf")
    if err == 0.0:
        return float("inf")
    return 10.0 * math.log10(max(power, 1e-30) / err)
