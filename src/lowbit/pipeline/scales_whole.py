"""Per-channel factors folded into a model quantized as one unit (image models): SmoothQuant
and AWQ, convolutions included.

The wiring is traced on the model itself (:func:`lowbit.models.wiring.derive_family` with the
whole model as the block): a convolution (or linear) whose output reaches the next ones only
through positively homogeneous activations (ReLU, LeakyReLU) can take per-channel factors, its
output channel j divided by s_j and their input channel j multiplied by it, which leaves the
float model's output unchanged; the trace keeps a pair only if folding random factors does.

For each such group, in the order the model runs them, candidate factors are tried and the
one kept is the one whose *model output* on the first calibration batch is closest (mean
squared error) to the float model's, with every planned layer's weights rounded to its format
(RTN) and, when the recipe rounds activations, its inputs rounded per tensor; the groups chosen
before stay folded and "no factors" is a candidate. The candidates:

- SmoothQuant (for rounded activations): ``s_j = max|X_j|^α / max|W_j|^(1-α)`` for each α of
  its grid, the maxima over every calibration input and over every kernel tap reading j.
- AWQ (for rounded weights): ``s_j = mean|X_j|^α`` (divided by the weights' mean relative
  magnitude^(1-α) with ``duo``) for α = 0, 1/grid, ...; the channels that carry large inputs get
  finer weight steps. AWQ's output-error clipping search of language-model blocks is not run
  here: a whole model's ranges are its weight observer's (``observer: mse`` clips them).

The model's output is the objective, not each group's own output error as for language-model
blocks: on waifu2x the groups' own errors chose SmoothQuant factors that raised PSNR but lowered
SSIM, while the output's error raised both (see the README). Each candidate costs one forward
pass of that batch. This runs before the weights are quantized (GPTQ then sees the scaled
layers) and before static ranges are calibrated.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.algorithms.awq import AWQOptions, choose_scales
from lowbit.algorithms.smoothquant import SmoothQuantOptions, search_alpha
from lowbit.calibration import CalibrationSet
from lowbit.formats.spec import ActivationSpec, WeightSpec
from lowbit.models.fold import can_fold, fold_scales, folded_tensors, input_columns
from lowbit.models.modules import forward_logits
from lowbit.models.wiring import derive_family
from lowbit.nn.quant_conv import ConvGeometry, is_conv
from lowbit.primitives import fake_quantize_weight
from lowbit.primitives.activations import fake_quantize_dynamic

log = logging.getLogger(__name__)

TRACE_INPUTS = 2  # calibration inputs the wiring is traced on

# (per-channel statistic of the readers' inputs, reading columns, error=error of candidate s)
# -> (s, α)
Chooser = Callable[[Tensor, list[Tensor], Callable[[Tensor | None], float]],
                   tuple[Tensor | None, float | None]]  # fmt: skip


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
    choose = partial(search_alpha, options=options)
    return _fold_search(model, plan, act, calibration, batch_size, "max", choose,
                        "smoothquant", progress)  # fmt: skip


def awq_whole(
    model: nn.Module,
    plan: dict[str, WeightSpec],
    act: ActivationSpec | None,
    options: AWQOptions,
    calibration: CalibrationSet,
    batch_size: int,
    progress: bool = False,
) -> dict[str, float | None]:
    """Choose and fold AWQ scales into ``model`` as :func:`smooth_whole` folds SmoothQuant's;
    returns α per feeder (None: no scaling won)."""
    if options.clip:
        log.info("awq: the clipping search runs on decoder blocks only; a model quantized whole "
                 "takes its weight observer's ranges (observer: mse clips them)")  # fmt: skip
    choose = partial(choose_scales, options=options)
    return _fold_search(model, plan, act, calibration, batch_size, "mean", choose, "awq",
                        progress)  # fmt: skip


@torch.no_grad()
def _fold_search(
    model: nn.Module,
    plan: dict[str, WeightSpec],
    act: ActivationSpec | None,
    calibration: CalibrationSet,
    batch_size: int,
    reduce: str,
    choose: Chooser,
    desc: str,
    progress: bool,
) -> dict[str, float | None]:
    """Trace the foldable groups, measure their inputs (``reduce``: per-channel ``max`` or
    ``mean`` of |x|), then for each group fold the factors ``choose`` picks by the model's
    rounded output error."""
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
    stats = _input_stats(model, readers, batches, reduce)
    objective = _OutputError(model, plan, act, batches[0])
    chosen = {}
    for group, layers, prev in tqdm(groups, desc=desc, unit="group", disable=not progress):
        changed = [n for n in (group.prev, *group.linears) if n in plan]

        def error(s: Tensor | None, prev=prev, layers=layers, kind=group.prev_kind,
                  changed=changed) -> float:  # fmt: skip
            if s is None:
                return objective()
            saved = [t.detach().clone() for t in folded_tensors(prev, layers)]
            try:
                fold_scales(prev, kind, layers, s)
                return objective(fresh=changed)
            finally:
                for t, old in zip(folded_tensors(prev, layers), saved, strict=True):
                    t.copy_(old)

        columns = [input_columns(layer) for layer in layers]
        s, alpha = choose(stats[group.linears[0]], columns, error=error)
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


def _input_stats(
    model: nn.Module, readers: dict[str, nn.Module], batches: tuple[Tensor, ...], reduce: str
) -> dict[str, Tensor]:
    """Per-channel max or mean of |input| of each reader over every batch (of the input itself:
    ``collect_input_stats`` reduces im2col columns, which for a 3x3 convolution builds patches
    9x the input's size)."""
    totals: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str, layer: nn.Module):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            dim = 1 if is_conv(layer) else x.dim() - 1
            rows = x.abs().transpose(0, dim).reshape(x.shape[dim], -1)
            if reduce == "max":
                m = rows.amax(1)
                totals[name] = m if name not in totals else torch.maximum(totals[name], m)
            else:
                totals[name] = totals.get(name, 0) + rows.double().sum(1)
                counts[name] = counts.get(name, 0) + rows.shape[1]

        return record

    handles = [layer.register_forward_pre_hook(hook(n, layer)) for n, layer in readers.items()]
    try:
        for batch in batches:
            forward_logits(model, batch)
    finally:
        for h in handles:
            h.remove()
    if reduce == "max":
        return totals
    return {n: (t / counts[n]).float() for n, t in totals.items()}


def _rounded(layer: nn.Module, w: Tensor, spec: WeightSpec) -> Tensor:
    if not is_conv(layer):
        return fake_quantize_weight(w, spec)
    geometry = ConvGeometry.of(layer)
    return geometry.weight(fake_quantize_weight(geometry.matrix(w), spec))


__all__ = ["awq_whole", "smooth_whole"]
