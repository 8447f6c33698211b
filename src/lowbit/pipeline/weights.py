"""Apply a recipe to a model: plan the layers, quantize block by block, swap in QuantLinear.

Every recipe goes through the sequential block runner, one decoder block at a time: data-free
algorithms (RTN, HQQ, K-means without data) quantize each planned linear of the block with no
forward pass; with calibration data the block's calibrated steps run (SmoothQuant, the weight
algorithm, LKD), then its static activation ranges and output-SQNR diagnostics. Where the blocks
live is the ``store``'s business: in memory (``lowbit.quantize`` on an ``nn.Module``) or read
from disk and written back block by block (the CLI's streaming runs), with one code path.
Linears outside the decoder blocks (an untied ``lm_head`` the recipe asks for) are quantized
last, with RTN. A model without repeated blocks is quantized as one unit: SmoothQuant or AWQ
factors folded first (:mod:`lowbit.pipeline.scales_whole`), then GPTQ
(:mod:`lowbit.pipeline.whole`) or data-free weights, then static ranges.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.calibration import BlockResult, BlockStore, CalibrationSet, run_sequential
from lowbit.calibration.canary import CanaryProbe
from lowbit.calibration.group import Group
from lowbit.errors import LowbitError
from lowbit.models.families import family_of, find_blocks
from lowbit.models.modules import get_module, untie_if_needed
from lowbit.models.normalize import conv1d_to_linear, fold_batchnorm
from lowbit.nn import QuantLinear
from lowbit.nn.attention import use_attention_function
from lowbit.nn.quant_conv import is_conv, weight_matrix
from lowbit.pipeline.act_ranges import calibrate_activations
from lowbit.pipeline.blocks import (
    DIAGNOSTIC_WINDOWS,
    BlockSteps,
    data_free,
    require_finite,
    restore,
    swap,
)
from lowbit.pipeline.diagnostics import output_sqnr
from lowbit.pipeline.plan import plan_model
from lowbit.pipeline.report import LayerReport, QuantizeReport
from lowbit.pipeline.scales_whole import awq_whole, smooth_whole
from lowbit.pipeline.whole import gptq_whole
from lowbit.recipes import Recipe
from lowbit.sysinfo import peak_rss_mb

log = logging.getLogger(__name__)

CALIBRATED = ("gptq", "awq", "awq+gptq", "autoround", "awq+autoround")

__all__ = ["CALIBRATED", "LayerReport", "QuantizeReport", "quantize_weights"]


@torch.no_grad()
def quantize_weights(
    model: nn.Module,
    recipe: Recipe,
    calibration: CalibrationSet | None = None,
    progress: bool = True,
    batch_size: int = 8,
    store: BlockStore | None = None,
    seed: int = 0,
    hidden_dtype: torch.dtype = torch.float32,
    group: Group | None = None,
    probe: CanaryProbe | None = None,
) -> QuantizeReport:
    """Quantize ``model`` in place according to ``recipe``; returns the report. ``store``
    (default: in memory) says where the blocks' weights come from and go to; ``hidden_dtype``
    is the dtype calibration hidden states are kept in between blocks. Under a process
    ``group`` (default: the initialised torch.distributed group, if any) the ranks share the
    calibration batches and the linears; every rank ends with the whole quantized model. A
    canary ``probe`` (models with decoder blocks) ends with the float and the quantized
    model's logits on its windows (``float_logits``, ``quantized_logits``)."""
    start = time.perf_counter()
    conv1d_to_linear(model)
    blocks = _blocks(model, recipe, calibration)
    if blocks is None:  # a model quantized whole (image models): convolutions too
        fold_batchnorm(model)  # a BatchNorm's scale is quantized with its convolution
    plan = plan_model(recipe, model, convs=blocks is None)[1]
    report = QuantizeReport(recipe, calibration=calibration)
    check_calibration_given(recipe, calibration)
    _check_step_ranges(model, recipe, calibration)
    _check_before_work(model, recipe, plan, blocks, calibration)
    store = store or BlockStore()
    if blocks is not None and recipe.lkd is not None:  # one calibration call per LKD step
        batch_size = recipe.lkd.batch_size
    if blocks is not None and recipe.algorithm.endswith("autoround"):  # ...per AutoRound step
        batch_size = recipe.autoround.batch_size
    steps = BlockSteps(model, recipe, plan, family_of(model), report, calibration, batch_size,
                       progress)  # fmt: skip
    if recipe.attention is not None:  # each block's cache is rounded once it is quantized
        if blocks is None:
            raise LowbitError("attention: (a quantized key/value cache) is for language models; "
                              "this model is quantized as one unit")  # fmt: skip
        use_attention_function(model)
    if blocks is None and recipe.tune is not None:
        raise LowbitError("tune: (end-to-end tuning towards the float model's next-token "
                          "distribution) is for language models; this model is quantized as "
                          "one unit: drop tune")  # fmt: skip
    if blocks is None:
        probe = None  # the canary rides along with the blocks
        if recipe.smoothquant is not None:  # before any layer is quantized
            alphas = smooth_whole(model, plan, recipe.activations, recipe.smoothquant,
                                  calibration, batch_size, progress)  # fmt: skip
            report.smooth_alpha.update(alphas)
        if recipe.algorithm.startswith("awq"):
            alphas = awq_whole(model, plan, recipe.activations, recipe.awq, calibration,
                               batch_size, progress)  # fmt: skip
            report.awq_alpha.update(alphas)
    else:
        prefix, modules = blocks
        resumed = store.records()
        for record in resumed:
            restore(report, record)
        windows = calibration.windows if calibration is not None else None
        results = run_sequential(
            model, modules, prefix, windows, steps.handler, batch_size, progress,
            desc=f"quantize ({_description(recipe)})", finish=steps.finish, store=store, seed=seed,
            hidden_dtype=hidden_dtype, group=group or Group.current(), probe=probe,
        )  # fmt: skip
        if probe is not None:  # the float head, before it may be quantized below
            with store.outside(model, head=True):
                probe.float_logits = probe.logits(model, prefix, "float")
        if windows is not None:
            report.blocks = [*(BlockResult.from_dict(r["block"]) for r in resumed), *results]
    rest = {n: s for n, s in plan.items() if blocks is None or not n.startswith(blocks[0] + ".")}
    with store.rest(model, list(rest)):
        _quantize_rest(model, recipe, rest, report, calibration, batch_size, blocks is None,
                       progress)  # fmt: skip
        untie_if_needed(model, set(plan))
    if probe is not None:  # the head as the folder holds it
        with store.outside(model, head=True):
            probe.quantized_logits = probe.logits(model, blocks[0], "quantized")
    report.seconds = time.perf_counter() - start
    report.peak_rss_mb = peak_rss_mb()
    log.info("quantized %d layers in %.1f s", len(plan), report.seconds)
    return report


def _blocks(
    model: nn.Module, recipe: Recipe, calibration: CalibrationSet | None
) -> tuple[str, nn.ModuleList] | None:
    """The decoder blocks, or None for a model quantized as one unit: one without them, one
    marked ``quantized_whole`` (image models: their repeated blocks take no token ids) or one
    of no known language family holding 2-D convolutions (a diffusers UNet or VAE, a CNN)."""
    try:
        if quantized_whole(model):
            raise LowbitError("it is an image model, quantized as one unit")
        prefix, blocks = find_blocks(model)
    except LowbitError as exc:
        if calibration is not None and not _whole_supported(recipe):
            raise LowbitError(f"AutoRound and LKD run block by block, but {exc}; a model "
                              f"without decoder blocks takes GPTQ, AWQ (awq, awq+gptq) or "
                              f"data-free weights (rtn, hqq, kmeans), SmoothQuant and static "
                              f"activation ranges") from None  # fmt: skip
        return None
    return prefix, blocks


def quantized_whole(model: nn.Module) -> bool:
    """Whether ``model`` is quantized as one unit (convolutions included), not block by block:
    marked so (``model.quantized_whole = True``), or holding 2-D convolutions without being of a
    known language-model family."""
    if getattr(model, "quantized_whole", False):
        return True
    return family_of(model) is None and any(is_conv(m) for m in model.modules())


def _quantize_rest(model, recipe, rest, report, calibration, batch_size, whole, progress) -> None:
    """RTN for the planned linears outside the blocks; for a model without blocks (``whole``),
    its layers (GPTQ with calibration data, else data-free), static ranges and diagnostics over
    the whole model, as one unit."""
    if whole and calibration is not None and recipe.algorithm in ("gptq", "awq+gptq"):
        originals = gptq_whole(model, recipe, rest, calibration, batch_size, report, progress)
    else:
        originals = _data_free_rest(model, recipe, rest, report, progress)
    static = [n for n in rest if _static(get_module(model, n))]
    if calibration is None or not rest:
        return
    if static:  # (outside the blocks only for a model quantized whole: checked before any work)
        calibrate_activations(model, calibration.windows, batch_size, progress=progress)
    sample = calibration.windows[:DIAGNOSTIC_WINDOWS]
    if whole:
        for name, db in output_sqnr(model, originals, sample, batch_size).items():
            report.layers[name].output_sqnr_db = db


def _data_free_rest(model, recipe, rest, report, progress) -> dict:
    originals = {}
    bar = tqdm(rest.items(), desc=f"quantize ({_rtn_name(recipe)})", unit="layer",
               disable=not progress or not rest)  # fmt: skip
    for name, spec in bar:
        module = get_module(model, name)
        weight = weight_matrix(module)  # a convolution's as the matrix it is quantized as
        swap(model, name, module, data_free(recipe, weight, spec, name), weight, report)
        originals[name] = weight
    return originals


def _whole_supported(recipe: Recipe) -> bool:
    """Whether a model quantized whole can run the recipe's calibrated steps: GPTQ, AWQ
    (scales, then RTN or GPTQ) or data-free weights, SmoothQuant, static ranges (not AutoRound
    or LKD)."""
    return recipe.lkd is None and "autoround" not in recipe.algorithm


def _check_before_work(model: nn.Module, recipe: Recipe, plan: dict, blocks: tuple | None,
                       calibration: CalibrationSet | None) -> None:  # fmt: skip
    """What would otherwise fail after some layers were already replaced, leaving the caller's
    model half quantized: checked before the first one is. (A streamed run's weights are read
    block by block, so there only the recipe is checked here; its work folder resumes.)"""
    outside = [n for n in plan if blocks is not None and not n.startswith(blocks[0] + ".")]
    static = recipe.activations is not None and recipe.activations.static
    if calibration is not None and static and outside:
        raise LowbitError(f"static activation ranges for layers outside the decoder blocks "
                          f"({outside[0]}) are not supported; add them to ignore")  # fmt: skip
    weights = {n: get_module(model, n).weight for n in plan}
    real = {n: w for n, w in weights.items() if not w.is_meta}
    for name, weight in real.items():
        require_finite(weight, name)
    half = {w.dtype for w in real.values()} & {torch.float16, torch.bfloat16}
    if half and calibration is not None and blocks is not None:
        raise LowbitError(f"calibration runs the model in float32, and it is in "
                          f"{str(half.pop()).removeprefix('torch.')}: convert it first "
                          f"(model.float()), or load it with lowbit.load_model")  # fmt: skip


def _check_step_ranges(model: nn.Module, recipe: Recipe,
                       calibration: CalibrationSet | None) -> None:  # fmt: skip
    """Per-step ranges (``activations.step_groups``) need a sampler (a model that runs its
    layers once per step, ``repeats_layers``, telling them the step) or calibration inputs that
    say where on the timestep axis each one is; refused before any work otherwise."""
    act = recipe.activations
    if act is None or not act.static or act.step_groups == 1 or calibration is None:
        return
    sampler = getattr(model, "repeats_layers", False)
    if not sampler and getattr(calibration.windows, "positions", None) is None:
        raise LowbitError(f"activations.step_groups: {act.step_groups} keeps one range per slice "
                          f"of a diffusion sampler's timesteps, and this model's calibration "
                          f"inputs have none (it runs once per input): use step_groups: 1 "
                          f"(e.g. conv-w8a8-static)")  # fmt: skip


def _static(module: nn.Module) -> bool:
    return isinstance(module, QuantLinear) and module.act is not None and module.act.static


def _description(recipe: Recipe) -> str:
    steps = "+".join(k for k in ("smoothquant", "lkd") if getattr(recipe, k) is not None)
    return f"{recipe.algorithm}{'+' + steps if steps else ''}"


def check_calibration_given(recipe: Recipe, calibration: CalibrationSet | None) -> None:
    """A recipe that calibrates has calibration windows (checked before any work)."""
    if recipe.needs_calibration and calibration is None:
        raise LowbitError(f"this recipe needs calibration data (--calib): "
                          f"{_calibration_reason(recipe)}")  # fmt: skip


def _calibration_reason(recipe: Recipe) -> str:
    if recipe.algorithm in CALIBRATED:
        return f"algorithm {recipe.algorithm}"
    steps = [k for k in ("smoothquant", "lkd", "tune") if getattr(recipe, k) is not None]
    if recipe.attention is not None and recipe.attention.center_keys:
        steps.append("attention.center_keys (the keys' centres are measured on it)")
    if recipe.rotate is not None and recipe.rotate.kind == "learned":
        steps.append("rotate: kind learned (trained on calibration text)")
    static = recipe.activations is not None and recipe.activations.static
    return ", ".join(steps + (["static activation ranges"] if static else []))


def _rtn_name(recipe: Recipe) -> str:
    return recipe.algorithm if recipe.algorithm in ("hqq", "kmeans") else "rtn"
