"""Static activation ranges: calibrate one (scale, zero) per quantized layer from sampled inputs.

The quantized model (or, in the block runner, one block at a time) runs on the calibration
windows with every static layer observing
(inputs pass through unrounded, so each layer sees what its predecessors compute with their
quantized weights). Each layer keeps a uniform random sample of its input values plus their
exact minimum and maximum (sampling bounds the memory: one layer's full inputs over 128 windows
of 512 tokens would take hundreds of MB); the recipe's observer then picks the range from it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.calibration.group import Group
from lowbit.errors import LowbitError
from lowbit.models.modules import forward_logits
from lowbit.nn import QuantLinear
from lowbit.nn.steps import step_group
from lowbit.primitives.activations import static_qparams

Step = tuple[int, Callable[[], None]]  # (calibration batch index, run the forward pass on it)


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
    steps = [(i, functools.partial(forward_logits, model, b))
             for i, b in enumerate(windows.split(batch_size))]  # fmt: skip
    bar = tqdm(steps, desc="activation ranges", unit="batch", disable=not progress)
    return observe_ranges(static_layers(model), bar, samples_per_batch, seed)


@torch.no_grad()
def observe_ranges(
    layers: dict[str, QuantLinear],
    steps: Iterable[Step],
    samples_per_batch: int = 65536,
    seed: int = 0,
    group: Group | None = None,
) -> int:
    """Set the static range of each of ``layers`` from the inputs they see while the ``steps``
    drive forward passes (the whole model, or one block on its recorded inputs). Each batch
    draws its sample from its own seed and, under a process ``group``, the samples of every
    rank's batches are pooled in batch order: the ranges do not depend on the number of ranks.
    """
    if not layers:
        return 0
    group = group or Group()
    seen: dict[str, dict[tuple[int, int], list[Tensor]]] = {n: {} for n in layers}
    current = [0, torch.Generator()]

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float().reshape(-1)
            if not torch.isfinite(x).all():
                raise LowbitError(f"non-finite calibration activations entering {name}")
            n = min(samples_per_batch, x.numel())
            idx = torch.randint(0, x.numel(), (n,), generator=current[1])
            sample = torch.cat([x[idx], x.amin().reshape(1), x.amax().reshape(1)])
            step = step_group(getattr(module, "step_position", None),
                              module.act_scale.numel(), name)  # fmt: skip
            seen[name].setdefault((current[0], step), []).append(sample)

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in layers.items()]
    for m in layers.values():
        m.observing = True
    try:
        for index, run in steps:
            current[:] = [index, torch.Generator().manual_seed(seed * 1_000_003 + index)]
            run()
    finally:
        for h in handles:
            h.remove()
        for m in layers.values():
            m.observing = False
    pooled = _pooled(seen, group)
    for name, module in layers.items():
        for step in range(module.act_scale.numel()):
            parts = [s for (_, g), s in pooled[name] if g == step]
            if not parts:
                what = f"step group {step} of {name}" if step or module.act_scale.numel() > 1 \
                    else name  # fmt: skip
                hint = ""
                if ".experts." in name:  # lowbit.models.experts: a mixture's expert
                    hint = (" (an expert that the router sent no calibration token: calibrate "
                            "on more windows)")  # fmt: skip
                raise LowbitError(f"{what} saw no calibration data{hint}; its static range is "
                                  f"unset")  # fmt: skip
            module.set_static_range(static_qparams(torch.cat(parts), module.act), step)
    return len(layers)


def _pooled(seen: dict[str, dict[tuple[int, int], list[Tensor]]],
            group: Group) -> dict[str, list[tuple[tuple[int, int], Tensor]]]:  # fmt: skip
    """Each layer's samples from every rank, ((batch index, step group), sample) in batch
    order."""
    mine = {f"{index}/{step}/{name}": torch.cat(parts) for name, by in seen.items()
            for (index, step), parts in by.items()}  # fmt: skip
    every: dict[str, dict[tuple[int, int], Tensor]] = {n: {} for n in seen}
    for found in group.gather(mine):
        for key, sample in found.items():
            index, step, name = key.split("/", 2)
            every[name][int(index), int(step)] = sample
    return {n: sorted(by.items(), key=lambda kv: kv[0]) for n, by in every.items()}
