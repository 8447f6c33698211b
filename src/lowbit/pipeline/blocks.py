"""What the sequential runner does to one decoder block: the recipe's steps, then packing.

``handler`` runs the weight algorithm on the block's planned linears: with calibration data the
calibrated steps (SmoothQuant, AWQ, GPTQ / K-means / clipped RTN, LKD) as before, each linear
left holding its quantized value so the next block calibrates on quantized outputs; without
data, RTN / HQQ / K-means layer by layer. ``finish`` swaps in the packed :class:`QuantLinear`
modules, calibrates static activation ranges and measures each layer's output SQNR on the
block's recorded inputs, and returns the block's record (what the manifest says of it), which a
streaming store keeps with the finished block so that a resumed run can rebuild its report.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.algorithms import rtn, with_lorc
from lowbit.algorithms.kmeans import kmeans
from lowbit.calibration import BlockContext, CalibrationSet, block_output
from lowbit.errors import LowbitError
from lowbit.formats.spec import WeightSpec
from lowbit.models.families import Family, sequential_groups
from lowbit.models.modules import set_module
from lowbit.models.wiring import derive_family
from lowbit.nn import QuantConv, QuantLinear
from lowbit.nn.attention import attention_modules, calibrate_key_centers, set_attention
from lowbit.nn.quant_conv import is_conv
from lowbit.pipeline.act_ranges import Step, observe_ranges
from lowbit.pipeline.autoround import autoround_block
from lowbit.pipeline.calibrated import (
    awq_scale_block,
    clipped_rtn_block,
    fitted,
    gptq_fit,
    hessian_block,
    kmeans_fit,
    owned,
    smooth_block,
)
from lowbit.pipeline.diagnostics import output_sqnr_during
from lowbit.pipeline.lkd import lkd_block
from lowbit.pipeline.report import LayerReport, QuantizeReport
from lowbit.primitives import QuantizedWeight, sqnr_db
from lowbit.primitives.metrics import all_finite
from lowbit.recipes import Recipe

log = logging.getLogger(__name__)

DIAGNOSTIC_WINDOWS = 4  # calibration windows the per-layer output SQNR is measured on


def layer_spec(recipe: Recipe, spec: WeightSpec) -> WeightSpec:
    """HQQ is round-to-nearest with the HQQ range optimiser as the observer; K-means stores a
    codebook of the spec's width and blocks instead of a uniform grid."""
    if recipe.algorithm == "hqq":
        return spec.replace(observer=dataclasses.replace(spec.observer, name="hqq"))
    if recipe.algorithm == "kmeans" and spec.format != "kmeans":
        if spec.format != "int":
            raise LowbitError(f"algorithm kmeans fits integer-width codebooks, not {spec.format}")
        return spec.replace(format="kmeans", symmetric=True, zero_point="float")
    return spec


def require_finite(weight: Tensor, name: str) -> None:
    """A weight with NaN or inf values is refused, naming the layer to fix or exclude."""
    if not all_finite(weight):
        raise LowbitError(f"{name}: the weight holds NaN or inf values; fix or exclude the "
                          f"layer (ignore: [{name}]) before quantizing")  # fmt: skip


def data_free(recipe: Recipe, weight: Tensor, spec: WeightSpec, name: str,
              lorc: bool = True) -> QuantizedWeight:  # fmt: skip
    """One layer by RTN / HQQ / K-means (uniform weights), LoRC fitted when asked (and
    ``lorc``)."""
    require_finite(weight, name)
    spec = layer_spec(recipe, spec)
    if recipe.algorithm == "kmeans":
        qw = kmeans(weight, spec, None, name)
    else:
        qw = rtn(weight, spec, name)
    return with_lorc(qw, weight) if lorc else qw


def swap(model: nn.Module, name: str, module: nn.Linear, qw: QuantizedWeight, original: Tensor,
         report: QuantizeReport) -> QuantLinear:  # fmt: skip
    """Replace ``module`` by its packed QuantLinear and record the layer in ``report``."""
    act = report.recipe.activations
    params = [t for t in (qw.qparams.scale, qw.qparams.zero) if t is not None]
    if not all(torch.isfinite(t.float()).all() for t in params):
        raise LowbitError(f"{name}: quantization produced NaN or inf scales or zeros")
    if is_conv(module):
        new = QuantConv.from_conv(module, qw, name, act)
    else:
        new = QuantLinear.from_quantized(qw, module.bias, name, act)
    report.layers[name] = LayerReport(
        qw.spec, new.in_features, new.out_features, module.bias is not None,
        new.bits_per_weight(), sqnr_db(original, qw.dequantize()), act,
        conv=new.geometry.to_dict() if isinstance(new, QuantConv) else None,
    )  # fmt: skip
    new = new.to(original.device)
    set_module(model, name, new)
    return new


@dataclasses.dataclass
class BlockSteps:
    """The runner's ``handler`` and ``finish`` for one quantization run."""

    model: nn.Module
    recipe: Recipe
    plan: dict[str, WeightSpec]
    family: Family | None
    report: QuantizeReport
    calibration: CalibrationSet | None
    batch_size: int
    progress: bool
    results: dict[str, QuantizedWeight] = dataclasses.field(default_factory=dict)
    originals: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    traced: dict[tuple, Family] = dataclasses.field(default_factory=dict)

    def local(self, ctx: BlockContext) -> dict[str, WeightSpec]:
        head = ctx.name + "."
        return {n[len(head) :]: s for n, s in self.plan.items() if n.startswith(head)}

    def handler(self, ctx: BlockContext) -> None:
        local = self.local(ctx)
        if not local:
            return
        if not ctx.calibrated:  # data-free: layer by layer, each packed (its float freed) at once

            def one(n: str) -> QuantizedWeight:
                return data_free(self.recipe, ctx.linear(n).weight, local[n], f"{ctx.name}.{n}")

            for n, qw in fitted(ctx, list(local), one):
                linear = ctx.linear(n)
                swap(self.model, f"{ctx.name}.{n}", linear, qw, linear.weight, self.report)
                del linear, qw
            return
        self._calibrated(ctx, {n: layer_spec(self.recipe, s) for n, s in local.items()})

    def _calibrated(self, ctx: BlockContext, local: dict[str, WeightSpec]) -> None:
        recipe, report = self.recipe, self.report
        for n in local:
            self._check_finite(ctx, n)
        family = self.wiring(ctx)
        groups = sequential_groups(ctx.block, family, recipe.gptq.true_sequential)
        learned = recipe.algorithm.endswith("autoround")
        # the float block's outputs, what LKD and AutoRound train towards
        targets = ctx.outputs() if recipe.lkd is not None or learned else None
        if recipe.smoothquant is not None:
            report.smooth_alpha.update(
                smooth_block(ctx, local, family, recipe.activations, recipe.smoothquant)
            )
        if recipe.algorithm.startswith("awq"):
            report.awq_alpha.update(
                awq_scale_block(ctx, local, family, recipe.awq, self.batch_size)
            )
        for n in local:  # the float weight each quantized one stands for (after scaling)
            self.originals[f"{ctx.name}.{n}"] = ctx.linear(n).weight.detach().clone()
        if recipe.algorithm == "kmeans":
            hessian_block(ctx, local, groups, kmeans_fit, self.results)
        elif recipe.algorithm in ("gptq", "awq+gptq"):
            hessian_block(ctx, local, groups, gptq_fit(recipe.gptq), self.results)
        elif learned:
            act, opts = recipe.activations, recipe.autoround
            report.autoround[ctx.name] = autoround_block(ctx, local, targets, self.results, act,
                                                         opts, self.progress)  # fmt: skip
        elif recipe.algorithm.startswith("awq"):
            clipped_rtn_block(ctx, local, groups, recipe.awq, self.results)
        elif recipe.smoothquant is not None or recipe.lkd is not None:
            plain = dataclasses.replace(recipe.awq, clip=False)  # rtn / hqq: no clipping search
            clipped_rtn_block(ctx, local, groups, plain, self.results)
        else:  # data-free weights; the data serves activation ranges and diagnostics

            def one(n: str) -> QuantizedWeight:
                weight = ctx.linear(n).weight
                return data_free(self.recipe, weight, local[n], f"{ctx.name}.{n}", lorc=False)

            owned(ctx, list(local), one, self.results)
        if recipe.lkd is not None:
            act, opts = recipe.activations, recipe.lkd
            report.lkd[ctx.name] = lkd_block(ctx, targets, self.results, act, opts, self.progress)

    def wiring(self, ctx: BlockContext) -> Family:
        """The model's family mapping, or (for a family not listed) the wiring traced on the
        first calibration batch of the first block of each structure (a DeepSeek's dense
        first blocks and its mixtures of experts differ), kept for the later ones."""
        if self.family is not None:
            return self.family
        shape = tuple((n, type(m).__name__) for n, m in ctx.block.named_modules())
        if shape not in self.traced:
            family = derive_family(ctx.block, lambda: block_output(ctx.block, ctx.calls[0]))
            self.traced[shape] = family
            folds = [f"{g.prev} -> {'/'.join(g.linears)}" for g in family.scale_groups]
            more = f", ... ({len(folds)} in all)" if len(folds) > 8 else ""
            shown = ", ".join(folds[:8]) + more
            log.info("traced %s's wiring: scale groups %s", ctx.name, shown or "none")
        return self.traced[shape]

    def _check_finite(self, ctx: BlockContext, name: str) -> None:
        require_finite(ctx.linear(name).weight, f"{ctx.name}.{name}")

    def finish(self, ctx: BlockContext) -> dict[str, Any]:
        """Pack the block, calibrate its static ranges, measure its layers; the record."""
        if self.recipe.attention is not None:  # from here on its cache is rounded, as at run time
            set_attention(ctx.block, self.recipe.attention)
        packed: dict[str, QuantLinear] = {}
        for n in self.local(ctx):
            full = f"{ctx.name}.{n}"
            if full not in self.results:  # packed by the data-free handler already
                packed[full] = ctx.block.get_submodule(n)
                continue
            qw = self.results.pop(full)
            packed[full] = swap(self.model, full, ctx.linear(n), qw, self.originals[full],
                                self.report)  # fmt: skip
        attention = self.recipe.attention
        if ctx.calibrated and attention is not None and attention.center_keys:
            steps = _steps(ctx.block, ctx.calls, ctx.indices)
            calibrate_key_centers(attention_modules(ctx.block),
                                  lambda: [run() for _, run in steps], ctx.group.sum)  # fmt: skip
        if ctx.calibrated and packed:
            static = {n: m for n, m in packed.items() if m.act is not None and m.act.static}
            observe_ranges(static, _steps(ctx.block, ctx.calls, ctx.indices), group=ctx.group)
            first = ctx.calls[: ctx.first(ctx.batches_for(DIAGNOSTIC_WINDOWS))]
            originals = {n: self.originals[n] for n in packed}
            run = _steps(ctx.block, first, ctx.indices)
            for n, db in output_sqnr_during(packed, originals, run, ctx.group).items():
                self.report.layers[n].output_sqnr_db = db
        for n in packed:
            self.originals.pop(n, None)
        return self.record(ctx.name, list(packed))

    def record(self, block: str, layers: list[str]) -> dict[str, Any]:
        r = self.report
        mine = {k: v for k, v in r.smooth_alpha.items() if k.startswith(block + ".")}
        awq = {k: v for k, v in r.awq_alpha.items() if k.startswith(block + ".")}
        return {"layers": {n: r.layers[n].to_dict() for n in layers}, "smooth_alpha": mine,
                "awq_alpha": awq, "lkd": r.lkd.get(block),
                "autoround": r.autoround.get(block)}  # fmt: skip


def restore(report: QuantizeReport, record: dict[str, Any]) -> None:
    """Put a finished block's record (from a resumed run's store) back into ``report``."""
    for name, info in record.get("layers", {}).items():
        report.layers[name] = LayerReport.from_dict(info, name)
    report.smooth_alpha.update(record.get("smooth_alpha") or {})
    report.awq_alpha.update(record.get("awq_alpha") or {})
    block = record.get("block") or {}
    for key in ("lkd", "autoround"):
        if record.get(key) is not None:
            getattr(report, key)[block.get("block", "")] = record[key]


def _steps(block: nn.Module, calls: Sequence, indices: list[int]) -> list[Step]:
    """(batch index, run the block on that batch) for each of ``calls``."""
    mine = indices[: len(calls)]
    return [(i, functools.partial(_replay, block, calls, k)) for k, i in enumerate(mine)]


def _replay(block: nn.Module, calls: Sequence, k: int) -> None:
    block_output(block, calls[k])
