"""SmoothQuant for a model quantized as one unit (image models): convolutions included.

The wiring is traced on the model itself (:func:`lowbit.models.wiring.derive_family` with the
whole model as the block): a convolution (or linear) whose output reaches the next ones only
through positively homogeneous activations (ReLU, LeakyReLU) can take per-channel factors, its
output channel j divided by s_j and their input channel j multiplied by it, which leaves the
float model's output unchanged; the trace keeps a pair only if folding random factors does.

For each such group, in the order the model runs them, SmoothQuant's factors
``s_j = max|X_j|^α / max|W_j|^(1-α)`` (the maxima over every calibration input and over every
kernel tap reading channel j) are tried for each α of the grid, and the one kept is the one
whose *model output* on the first calibration batch is closest (mean squared error) to the
float model's, with every planned layer's weights rounded to its format (RTN) and its inputs
rounded per tensor, the groups chosen before kept folded; "no smoothing" is a candidate. The
model's output is the objective, not each group's own output error as for language-model
blocks: on waifu2x the groups' own errors chose factors that raised PSNR but lowered SSIM,
while the output's error raised both (see the README). Each candidate costs one forward pass
of that batch. It runs before the weights are quantized (GPTQ then sees the smoothed layers)
and before static ranges are calibrated.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.algorithms.smoothquant import SmoothQuantOptions, search_alpha
from lowbit.calibration import CalibrationSet
from lowbit.formats.spec import ActivationSpec, WeightSpec
from lowbit.models.fold import can_fold, fold_scales, folded_tensors, input_columns
from lowbit.models.modules import forward_logits
from lowbit.models.wiring import derive_family
from lowbit.nn.quant_conv import ConvGeometry, is_conv
from lowbit.primitives import fake_quantize_weight
from lowbit.primitives.activations import fake_quantize_dynamic

TRACE_INPUTS = 2  # calibration inputs the wiring is traced on


@torch.no_grad()
def smooth_whole(
    model: nn.Module,
    plan: dict[str, WeightSpec],
    act: ActivationSpec | None,
    options: SmoothQuantOptions,
    calibration: CalibrationSet,
    batch_size: int,
    progress: bool = False,
) -> dict[str, float | None]:
    """Choose and fold SmoothQuant factors into ``model`` for every group of planned layers
    whose feeder can absorb them; returns α per feeder (None: no smoothing won)."""
    batches = calibration.windows.split(batch_size)
    wiring = derive_family(model, lambda: forward_logits(model, batches[0][:TRACE_INPUTS]))
    groups = []
    for group in wiring.scale_groups:
        layers = [model.get_submodule(n) for n in group.linears]
        prev = model.get_submodule(group.prev)
        if all(n in plan for n in group.linears) and can_fold(prev, group.prev_kind, layers):
            groups.append((group, layers, prev))
    if not groups:
        return {}
    # folding leaves the float model unchanged, so one pass measures every group's inputs
    readers = {group.linears[0]: layers[0] for group, layers, _ in groups}
    absmax = _input_absmax(model, readers, batches)
    objective = _OutputError(model, plan, act, batches[0])
    chosen = {}
    for group, layers, prev in tqdm(groups, desc="smoothquant", unit="group", disable=not progress):
        changed = [n for n in (group.prev, *group.linears) if n in plan]

        def error(s: Tensor | None, prev=prev, layers=layers, kind=group.prev_kind,
                  changed=changed) -> float:  # fmt: skip
            if s is None:
                return objective()
            saved = [t.detach().clone() for t in folded_tensors(prev, layers)]
            fold_scales(prev, kind, layers, s)
            try:
                return objective(fresh=changed)
            finally:
                for t, old in zip(folded_tensors(prev, layers), saved, strict=True):
                    t.copy_(old)

        columns = [input_columns(layer) for layer in layers]
        s, alpha = search_alpha(absmax[group.linears[0]], columns, options, error)
        if s is not None:
            fold_scales(prev, group.prev_kind, layers, s)
            objective.forget(changed)
        chosen[group.prev] = alpha
    return chosen


class _OutputError:
    """Mean squared error of the model's output on ``batch`` against the float model's, with
    every planned layer's weight rounded to its format (RTN) and its input rounded per tensor
    (dynamic ranges standing in for the static ones calibrated later)."""

    def __init__(self, model: nn.Module, plan: dict[str, WeightSpec], act: ActivationSpec | None,
                 batch: Tensor) -> None:  # fmt: skip
        self.model, self.plan, self.act, self.batch = model, plan, act, batch
        self.layers = {n: model.get_submodule(n) for n in plan}
        with torch.no_grad():
            self.target = forward_logits(model, batch).float()
        self.rounded: dict[str, Tensor] = {}  # weights of layers whose float weight is settled

    def forget(self, names: list[str]) -> None:
        for name in names:
            self.rounded.pop(name, None)

    @torch.no_grad()
    def __call__(self, fresh: list[str] = ()) -> float:
        """The error now; ``fresh`` layers' weights are rounded anew and not kept."""
        weights = {}
        for name, layer in self.layers.items():
            if name in fresh or name not in self.rounded:
                w = _rounded(layer, layer.weight.detach().float(), self.plan[name])
                weights[name] = w.to(layer.weight.dtype)
                if name not in fresh:
                    self.rounded[name] = weights[name]
            else:
                weights[name] = self.rounded[name]
        handles = []
        if self.act is not None:
            spec = self.act.as_dynamic()
            handles = [layer.register_forward_pre_hook(partial(_round_input, spec))
                       for layer in self.layers.values()]  # fmt: skip
        try:
            with _weights_as(self.layers, weights):
                out = forward_logits(self.model, self.batch).float()
        finally:
            for h in handles:
                h.remove()
        return float((out - self.target).double().pow(2).mean())


def _round_input(spec: ActivationSpec, module: nn.Module, args: tuple) -> tuple:
    return (fake_quantize_dynamic(args[0], spec), *args[1:])


@contextlib.contextmanager
def _weights_as(layers: dict[str, nn.Module], weights: dict[str, Tensor]):
    """The layers compute with ``weights`` (their own tensors put back after)."""
    saved = {n: layers[n].weight.data for n in weights}
    try:
        for name, w in weights.items():
            layers[name].weight.data = w
        yield
    finally:
        for name, w in saved.items():
            layers[name].weight.data = w


def _input_absmax(
    model: nn.Module, readers: dict[str, nn.Module], batches: tuple[Tensor, ...]
) -> dict[str, Tensor]:
    """Per-channel max |input| of each reader over every batch (the input itself, reduced:
    ``collect_input_stats``' absmax is per im2col column, which for a 3x3 convolution builds
    patches 9x the input's size)."""
    absmax: dict[str, Tensor] = {}

    def hook(name: str, layer: nn.Module):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            dim = 1 if is_conv(layer) else x.dim() - 1
            m = x.abs().transpose(0, dim).reshape(x.shape[dim], -1).amax(1)
            absmax[name] = m if name not in absmax else torch.maximum(absmax[name], m)

        return record

    handles = [layer.register_forward_pre_hook(hook(n, layer)) for n, layer in readers.items()]
    try:
        for batch in batches:
            forward_logits(model, batch)
    finally:
        for h in handles:
            h.remove()
    return absmax


def _rounded(layer: nn.Module, w: Tensor, spec: WeightSpec) -> Tensor:
    if not is_conv(layer):
        return fake_quantize_weight(w, spec)
    geometry = ConvGeometry.of(layer)
    return geometry.weight(fake_quantize_weight(geometry.matrix(w), spec))


__all__ = ["smooth_whole"]
