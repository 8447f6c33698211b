"""Static activation ranges: calibrate one (scale, zero) per quantized layer from sampled inputs.

The quantized model (or, in the block runner, one block at a time) runs on the calibration
windows with every static layer observing
(inputs pass through unrounded, so each layer sees what its predecessors compute with their
quantized weights). Each layer keeps a uniform random sample of its input values plus their
exact minimum and maximum (sampling bounds the memory: one layer's full inputs over 128 windows
of 512 tokens would take hundreds of MB); the recipe's observer then picks the range from it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.models.modules import forward_logits
from lowbit.nn import QuantLinear
from lowbit.primitives.activations import static_qparams


def static_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, QuantLinear) and m.act is not None and m.act.static}  # fmt: skip


@torch.no_grad()
def calibrate_activations(
    model: nn.Module,
    windows: Tensor,
    batch_size: int = 8,
    samples_per_batch: int = 65536,
    seed: int = 0,
    progress: bool = True,
) -> int:
    """Set every static layer's range from ``windows``; returns the number of layers set."""

    def run() -> None:
        starts = range(0, len(windows), batch_size)
        for start in tqdm(starts, desc="activation ranges", unit="batch", disable=not progress):
            forward_logits(model, windows[start : start + batch_size])

    return observe_ranges(static_layers(model), run, samples_per_batch, seed)


@torch.no_grad()
def observe_ranges(
    layers: dict[str, QuantLinear],
    run: Callable[[], None],
    samples_per_batch: int = 65536,
    seed: int = 0,
) -> int:
    """Set the static range of each of ``layers`` from the inputs they see while ``run()``
    drives forward passes (the whole model, or one block on its recorded inputs)."""
    if not layers:
        return 0
    gen = torch.Generator().manual_seed(seed)
    seen: dict[str, list[Tensor]] = {n: [] for n in layers}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float().reshape(-1)
            if not torch.isfinite(x).all():
                raise LowbitError(f"non-finite calibration activations entering {name}")
            idx = torch.randint(0, x.numel(), (min(samples_per_batch, x.numel()),), generator=gen)
            seen[name].append(torch.cat([x[idx], x.amin().reshape(1), x.amax().reshape(1)]))

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in layers.items()]
    for m in layers.values():
        m.observing = True
    try:
        run()
    finally:
        for h in handles:
            h.remove()
        for m in layers.values():
            m.observing = False
    for name, module in layers.items():
        if not seen[name]:
            raise LowbitError(f"{name} saw no calibration data; its static range is unset")
        module.set_static_range(static_qparams(torch.cat(seen[name]), module.act))
    return len(layers)
