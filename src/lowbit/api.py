"""The Python API: load, quantize, evaluate, save. Orchestration only; no math here.

Typical use::

    import lowbit
    src = lowbit.load_model("smollm2-135m")
    ref = copy.deepcopy(src.model)
    report = lowbit.quantize(src.model, "w4-rtn-g64")
    results = lowbit.evaluate({"fp": ref, "w4": src.model}, src.tokenizer, ref=ref)
    lowbit.save(src.model, "out/w4", report=report, source=src)
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from lowbit.analysis import (
    Sensitivity,
    allocate,
    allocation_recipe,
    candidate_specs,
    check_candidates,
    measure_sensitivity,
)
from lowbit.assets import write_text_atomic
from lowbit.calibration import CalibrationSet, calibration_set
from lowbit.data import corpus_ids, eval_windows, load_corpus
from lowbit.errors import LowbitError
from lowbit.eval import EvalResult, model_size, score_models
from lowbit.eval.bench import BenchResult, bench_models
from lowbit.eval.canary import WINDOW_TOKENS as CANARY_TOKENS
from lowbit.eval.canary import WINDOWS as CANARY_WINDOWS
from lowbit.eval.size import held_bytes
from lowbit.models import LoadedModel, load_model, save_folder
from lowbit.models.checkpoint import MANIFEST, read_manifest
from lowbit.models.experts import experts_to_linears
from lowbit.models.load import source_folder
from lowbit.models.modules import context_limit, evaluating
from lowbit.models.normalize import conv1d_to_linear, fold_batchnorm
from lowbit.models.rotate import fitted_rotation, rotate_model
from lowbit.nn.attention import check_attention
from lowbit.pipeline import QuantizeReport, quantize_weights
from lowbit.pipeline.arguments import (
    check_float,
    check_model,
    check_qat_options,
    check_report,
    check_vocabulary,
    check_windows,
)
from lowbit.pipeline.estimate import estimate as estimate_run
from lowbit.pipeline.manifest import build_manifest
from lowbit.pipeline.plan import plan_model
from lowbit.pipeline.qat import QATOptions
from lowbit.pipeline.qat import qat as run_qat
from lowbit.pipeline.spin import learned_matrix
from lowbit.pipeline.to_folder import parse_hidden_dtype, quantize_to
from lowbit.pipeline.tune import check_tune, tune_model
from lowbit.pipeline.weights import check_calibration_given, quantized_whole
from lowbit.recipes import Recipe, as_recipe, load_recipe

__all__ = [
    "QATOptions",
    "add_metrics",
    "analyze",
    "bench",
    "calibration_set",
    "estimate",
    "evaluate",
    "load",
    "load_model",
    "load_recipe",
    "mixed_recipe",
    "model_size",
    "needs_calibration",
    "qat",
    "quantize",
    "quantize_to",
    "save",
]


def quantize(
    model: nn.Module,
    recipe: Recipe | str | Path,
    calibration: CalibrationSet | None = None,
    progress: bool = True,
    hidden_dtype: str = "float32",
) -> QuantizeReport:
    """Quantize ``model`` in place with a recipe (object, preset name, or YAML path).

    Calibrated algorithms (gptq, awq, awq+gptq, autoround, awq+autoround) need ``calibration``
    windows, e.g. ``lowbit.calibration_set(tokenizer, "bbc", samples=128, seqlen=512)``.
    Canary prompts (``lowbit monitor``) are recorded by :func:`quantize_to`, not here.
    """
    check_model(model)
    recipe = as_recipe(recipe)
    check_windows(calibration, "calibration", needed=False)
    check_float(model)
    check_calibration_given(recipe, calibration)  # before a rotation changes the model
    conv1d_to_linear(model)  # GPT-2's layers become the linears that the checks below plan
    experts_to_linears(model)
    recipe = dataclasses.replace(recipe, rotate=fitted_rotation(recipe.rotate, model))
    if recipe.tune is not None:  # checked before any work
        check_tune(recipe, plan_model(recipe, model, warn=False)[1], calibration)
    if recipe.attention is not None:  # not only per block, after a learned rotation trained
        check_attention(model, recipe.attention)
    with evaluating(model):  # (its BatchNorm statistics read, never updated)
        teacher = copy.deepcopy(model) if recipe.tune is not None else None
        if recipe.rotate is not None:  # folded into the float weights first (learned: trained)
            rotate_model(
                model, recipe.rotate, *(learned_matrix(model, recipe, calibration, progress) or ())
            )
        report = quantize_weights(model, recipe, calibration, progress=progress,
                                  hidden_dtype=parse_hidden_dtype(hidden_dtype))  # fmt: skip
        if teacher is not None:  # the scales, end to end, towards the float model
            report.tune = tune_model(model, teacher, recipe.tune, calibration, progress)
            report.seconds += report.tune["seconds"]
            report.peak_rss_mb = max(report.peak_rss_mb or 0.0, report.tune["peak_rss_mb"] or 0.0)
    return report


def qat(
    model: nn.Module,
    recipe: Recipe | str | Path,
    train: CalibrationSet,
    options: QATOptions | None = None,
    progress: bool = True,
) -> QuantizeReport:
    """Quantization-aware training of ``model`` (in place) on ``train`` windows, then packing;
    e.g. ``lowbit.qat(model, "w3-rtn-g64", lowbit.calibration_set(tok, "shakespeare", 400, 128),
    lowbit.QATOptions(steps=200))``. Train on text that is neither calibration nor evaluation."""
    check_model(model)
    recipe = as_recipe(recipe)
    experts_to_linears(model)  # (the same function; a layout it cannot split is an error here)
    check_windows(train, "train", needed=True)
    options = check_qat_options(options, train)  # before a rotation changes the model
    check_float(model)
    recipe = dataclasses.replace(recipe, rotate=fitted_rotation(recipe.rotate, model))
    if recipe.rotate is not None:  # trained in the rotated basis, as quantize would hold it
        rotate_model(model, recipe.rotate, *(learned_matrix(model, recipe, train, progress) or ()))
    return run_qat(model, recipe, train, options, progress)


def analyze(
    model: nn.Module,
    recipe: Recipe | str,
    calibration: CalibrationSet,
    candidates: Sequence[str] = ("2", "3", "4", "8", "float"),
    progress: bool = True,
    output_range: tuple[float, float] | None = None,
) -> Sensitivity:
    """Per-layer sensitivity of ``model`` to each candidate format (the recipe's grid and group
    size at each width, or ``float``): the damage of each alone (KL on text; for an image model,
    calibrated on images, the MSE of its outputs, which span ``output_range``) and the Hessian
    proxy, on ``calibration``. An image model's convolutions are measured as quantization will
    see them (BatchNorm folded first)."""
    check_model(model)
    recipe = as_recipe(recipe)
    check_windows(calibration, "calibration", needed=True)
    check_float(model)
    if recipe.weights is None:
        raise LowbitError("the recipe has no default weights to take the candidates' grid from")
    conv1d_to_linear(model)
    experts_to_linears(model)
    with evaluating(model):
        whole = quantized_whole(model)
        if whole:
            fold_batchnorm(model)
        layers, plan = plan_model(recipe, model, convs=whole)
        specs = candidate_specs(recipe.weights, list(candidates))
        chosen = {n: m for n, m in layers if n in plan}
        check_candidates(chosen, specs, recipe)
        return measure_sensitivity(model, chosen, specs, calibration.windows,
                                   progress=progress, output_range=output_range)  # fmt: skip


def check_budget_recipe(recipe: Recipe) -> None:
    """Refuse a recipe whose layers a bits or size budget cannot price: K-means layers keep a
    codebook per row that the candidates' costs (integer grids) leave out."""
    if "kmeans" in recipe.algorithm:
        raise LowbitError("--target-bits / --target-size price integer grids, and K-means layers "
                          "also store a codebook per row: budget an integer recipe (e.g. "
                          "w4-gptq-g64), or run K-means without a budget")  # fmt: skip


def mixed_recipe(
    model: nn.Module,
    recipe: Recipe,
    sens: Sensitivity,
    target_bits: float | None = None,
    target_bytes: int | None = None,
) -> tuple[Recipe, dict[str, Any]]:
    """The recipe whose per-layer formats minimise the summed KL within an average of
    ``target_bits`` bits per weight (overhead included) over the analysed layers, or within
    ``target_bytes`` for the whole model in memory. Returns (recipe, summary)."""
    check_budget_recipe(recipe)
    weights = sum(sens.layers.values())
    if (target_bits is None) == (target_bytes is None):
        raise LowbitError("give one of --target-bits or --target-size")
    if target_bits is not None:
        budget = target_bits * weights
    else:
        budget = 8.0 * (target_bytes - _bytes_outside(model, set(sens.layers)))
        if budget <= 0:
            raise LowbitError(f"--target-size {target_bytes:,} B is smaller than the layers "
                              f"that stay as they are (embeddings, norms, ...)")  # fmt: skip
    choice = allocate(sens, budget)
    spent = sum(sens.bits[n][c] for n, c in choice.items())
    counts = {c: sum(1 for v in choice.values() if v == c) for c in sens.candidates}
    summary = {"budget_bits_per_weight": budget / weights, "bits_per_weight": spent / weights,
               f"predicted_{sens.metric}": sum(sens.damage[n][c] for n, c in choice.items()),
               "layers_per_candidate": counts, "rank_correlation": sens.rank_correlation(),
               "analysis_tokens": sens.tokens}  # fmt: skip
    return allocation_recipe(recipe, sens, choice), summary


def _bytes_outside(model: nn.Module, layers: set[str]) -> int:
    """Bytes of everything but the weights of ``layers`` (tied tensors counted once). A weight
    another module also holds stays counted: a quantized head tied to the input embedding is
    untied, and the embedding keeps its float table in the output."""
    owners: dict[int, set[str]] = {}
    for n, m in model.named_modules():
        weight = getattr(m, "weight", None)
        if isinstance(weight, nn.Parameter):
            owners.setdefault(id(weight), set()).add(n)
    return held_bytes(model, {key for key, names in owners.items() if names <= layers})


def needs_calibration(recipe: Recipe) -> bool:
    """Whether the CLI draws calibration windows (calibrated algorithms, SmoothQuant, LKD and
    static activation ranges need them; K-means uses them as importance weights)."""
    return recipe.needs_calibration or recipe.algorithm == "kmeans"


def evaluate(
    models: nn.Module | dict[str, nn.Module],
    tokenizer: Any,
    corpus: str = "wiki",
    seqlen: int = 2048,
    tokens: int | None = 16384,
    ref: nn.Module | None = None,
    progress: bool = True,
) -> dict[str, EvalResult]:
    """Perplexity of each model on the first ``tokens`` tokens of ``corpus`` (None: all), and
    with ``ref`` also KL(ref ‖ model) and top-1 agreement, on the same windows."""
    if isinstance(models, nn.Module):
        models = {"model": models}
    if not isinstance(models, dict):
        raise LowbitError(f"models: expected a model or a mapping name -> model, got "
                          f"{type(models).__name__}")  # fmt: skip
    for name, model in models.items():
        check_model(model, f"models[{name!r}]")
    if ref is not None:
        check_model(ref, "ref")
    if not callable(tokenizer):
        raise LowbitError(f"tokenizer: expected the model's tokenizer (LoadedModel.tokenizer), "
                          f"got {type(tokenizer).__name__}")  # fmt: skip
    for name, model in [*models.items(), *([("--ref", ref)] if ref is not None else [])]:
        limit = context_limit(getattr(model, "config", None))
        if limit is not None and seqlen > limit:  # positions past it: meaningless figures
            raise LowbitError(f"windows of {seqlen} tokens exceed {name}'s context of {limit} "
                              f"positions; lower --seqlen")  # fmt: skip
    text = load_corpus(corpus)
    windows = eval_windows(corpus_ids(text, tokenizer), seqlen, tokens)
    check_vocabulary(models, windows)
    with evaluating(*models.values(), ref):  # (dropout off: the model's own figures)
        scores, seconds = score_models(models, windows, ref, progress)
    n, length = windows.shape
    return {
        name: EvalResult(
            model=name, corpus=corpus, corpus_sha256=text.sha256, seqlen=length, windows=n,
            tokens=n * length, predicted=s.count, ppl=s.ppl,
            kl=s.mean_kl if _compared(models[name], ref) else None,
            top1=s.top1_rate if _compared(models[name], ref) else None,
            seconds=seconds[name],
        )
        for name, s in scores.items()
    }  # fmt: skip


def _compared(model: nn.Module, ref: nn.Module | None) -> bool:
    """KL and top-1 mean something only for a model other than the reference itself."""
    return ref is not None and model is not ref


def save(
    model: nn.Module,
    folder: str | Path,
    report: QuantizeReport,
    source: LoadedModel | None = None,
    metrics: dict[str, Any] | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the quantized model, its tokenizer and a provenance manifest to ``folder``."""
    check_model(model)
    check_report(model, report)
    if source is not None and not isinstance(source, LoadedModel):
        raise LowbitError(f"source: expected the LoadedModel lowbit.load_model returned, got "
                          f"{type(source).__name__}")  # fmt: skip
    src = {"model": source.source, "kind": source.kind} if source else None
    manifest = build_manifest(report, src, model_size(model), metrics, seed)
    tokenizer = source.tokenizer if source else None
    return save_folder(model, Path(folder), manifest, tokenizer, overwrite)


def estimate(
    source: str,
    recipe: Recipe | str | Path,
    calibration: CalibrationSet | None = None,
    progress: bool = True,
    hidden_dtype: str = "float32",
    spill: bool = False,
    canary: bool = True,
) -> dict[str, Any]:
    """What ``quantize_to(source, recipe, ...)`` would need: the per-layer plan, output bytes,
    estimated peak RSS (MB) and wall time (s), from the shapes and a timed probe of one block."""
    recipe = as_recipe(recipe)
    folder, _ = source_folder(source)
    windows = (CANARY_WINDOWS, CANARY_TOKENS) if canary else None
    dtype = parse_hidden_dtype(hidden_dtype)
    return estimate_run(folder, source, recipe, calibration, dtype, spill, windows)


def add_metrics(folder: str | Path, metrics: dict[str, Any]) -> None:
    """Record evaluation results in a lowbit folder's manifest (rewritten atomically)."""
    manifest = read_manifest(Path(folder))
    _rewrite_manifest(folder, {"metrics": {**manifest.get("metrics", {}), **metrics}})


def add_image_canary(folder: str | Path, float_model: nn.Module, saved: nn.Module,
                     entry: Any) -> dict[str, Any]:  # fmt: skip
    """Record the canary of the image model ``saved`` (loaded from ``folder`` as a user loads
    it; quantized from ``float_model``, the image model ``entry``); returns the manifest's
    ``canary`` entry (:mod:`lowbit.eval.canary_image`)."""
    from lowbit.eval.canary_image import record

    canary = record(float_model, saved, entry, Path(folder))
    _rewrite_manifest(folder, {"canary": canary})
    return canary


def text_canary(model: nn.Module, tokenizer: Any) -> Any:
    """The float language model's answers on the canary windows (:mod:`lowbit.eval.canary`),
    to record with :func:`add_text_canary` once the model is quantized in place."""
    from lowbit.eval.canary import Canary, model_canary_tokens, model_logits

    tokens = model_canary_tokens(model, tokenizer)
    return Canary.from_logits(tokens, model_logits(model, tokens))


def add_text_canary(folder: str | Path, canary: Any, quantized: nn.Module) -> dict[str, Any]:
    """Record ``canary`` (:func:`text_canary` of the float model) and the ``quantized`` model's
    score on it in the saved ``folder`` (what ``lowbit quantize`` records; ``lowbit monitor``
    and ``lowbit serve`` check it); returns the manifest's ``canary`` entry."""
    from lowbit.eval.canary import measure, model_logits, write

    entry = measure(canary, model_logits(quantized, canary.tokens))
    entry = write(canary, entry, Path(folder))
    _rewrite_manifest(folder, {"canary": entry})
    return entry


def _rewrite_manifest(folder: str | Path, fields: dict[str, Any]) -> None:
    manifest = {**read_manifest(Path(folder)), **fields}
    write_text_atomic(Path(folder) / MANIFEST, json.dumps(manifest, indent=1, default=str))


def load(folder: str | Path, kernels: bool = True) -> LoadedModel:
    """A saved lowbit folder (or any model source) with its tokenizer and manifest; with
    ``kernels``, quantized layers run on the fast kernels (inference only: do not re-save)."""
    return load_model(str(folder), kernels)


def bench(
    sources: dict[str, str],
    prompt_tokens: int = 512,
    new_tokens: int = 128,
    repeats: int = 3,
    rss: bool = True,
    progress: bool = True,
) -> tuple[dict[str, BenchResult], dict[str, Any]]:
    """Load each source (name -> model source; lowbit folders on their fast kernels) and time
    them side by side; with ``rss``, also each one's peak RSS alone in a child process."""
    models = {name: load_model(src).model for name, src in sources.items()}
    return bench_models(models, sources if rss else None, prompt_tokens, new_tokens, repeats,
                        progress)  # fmt: skip
