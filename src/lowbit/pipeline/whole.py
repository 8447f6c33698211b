"""GPTQ for a model quantized as one unit (image models, anything without decoder blocks).

The whole model is GPTQ's one block: layer after layer, in the plan's order, each layer's input
Hessian is measured on the calibration inputs with every layer before it already quantized (the
sequential order; their inputs pass unrounded, static ranges come after), then GPTQ fits it and
it is packed at once (a sampler that runs each layer once per step, ``repeats_layers``,
runs whole: the Hessian covers every step). A convolution's Hessian is over the im2col rows
its weight matrix multiplies (``ConvGeometry.gram``). The forward pass stops as soon as the
layer has seen its input, so early layers cost a fraction of a pass.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.algorithms.gptq import gptq
from lowbit.calibration import CalibrationSet
from lowbit.calibration.capture import StopForward
from lowbit.calibration.stats import collect_input_stats
from lowbit.errors import LowbitError
from lowbit.formats.spec import WeightSpec
from lowbit.models.modules import forward_logits, get_module
from lowbit.nn.quant_conv import is_conv, weight_matrix
from lowbit.pipeline.blocks import data_free, swap
from lowbit.pipeline.report import QuantizeReport
from lowbit.recipes import Recipe

log = logging.getLogger(__name__)


@torch.no_grad()
def gptq_whole(
    model: nn.Module,
    recipe: Recipe,
    plan: dict[str, WeightSpec],
    calibration: CalibrationSet,
    batch_size: int,
    report: QuantizeReport,
    progress: bool,
) -> dict[str, Tensor]:
    """Quantize the ``plan``'s layers of ``model`` in place with GPTQ; returns each layer's float
    weight matrix (for the diagnostics)."""
    originals: dict[str, Tensor] = {}
    bar = tqdm(plan.items(), desc="quantize (gptq)", unit="layer", disable=not progress)
    for name, spec in bar:
        module = get_module(model, name)
        weight = weight_matrix(module)
        if is_conv(module) and module.groups != 1:  # one Hessian per group: not built
            log.info("%s: grouped convolution, round-to-nearest weights", name)
            qw = data_free(recipe, weight, spec, name)
        else:
            hessian = _hessian(model, name, module, weight.shape[1], calibration, batch_size)
            qw = gptq(weight, hessian, spec, recipe.gptq, name)
        new = swap(model, name, module, qw, weight, report)
        new.observing = True  # static input ranges are calibrated once every layer is packed
        originals[name] = weight
    for name in originals:
        get_module(model, name).observing = False
    return originals


def _hessian(model: nn.Module, name: str, module: nn.Module, columns: int,
             calibration: CalibrationSet, batch_size: int) -> Tensor:  # fmt: skip
    # a sampler runs each layer once per step, and inputs with timestep positions once per
    # position of a batch: the Hessian sums the inputs of every call
    windows = calibration.windows
    positions = getattr(windows, "positions", None) is not None
    repeats = getattr(model, "repeats_layers", False) or positions
    with collect_input_stats({name: module}, hessian=True, stop_when_done=not repeats) as stats:
        for batch in windows.split(batch_size):
            with contextlib.suppress(StopForward):
                forward_logits(model, batch)
    rows = stats[name].rows
    if rows == 0:
        raise LowbitError(f"{name}: the layer never ran on the calibration inputs; add it to "
                          f"ignore or give inputs that reach it")  # fmt: skip
    if rows < 4 * columns:  # a Hessian of fewer rows than inputs is singular: GPTQ overfits
        log.warning("%s: %d calibration rows for %d inputs; GPTQ needs several rows per input "
                    "(give more calibration inputs)", name, rows, columns)  # fmt: skip
    return stats[name].hessian()


__all__ = ["gptq_whole"]
