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

import datetime as dt
import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit import __version__
from lowbit.calibration import CalibrationSet, calibration_set
from lowbit.data import corpus_ids, eval_windows, load_corpus
from lowbit.eval import EvalResult, model_size, score_models
from lowbit.eval.bench import BenchResult, bench_models
from lowbit.models import LoadedModel, load_model, save_folder
from lowbit.pipeline import CALIBRATED, QuantizeReport, quantize_weights
from lowbit.pipeline.qat import QATOptions
from lowbit.pipeline.qat import qat as run_qat
from lowbit.recipes import Recipe, load_recipe

__all__ = [
    "QATOptions",
    "bench",
    "calibration_set",
    "evaluate",
    "load",
    "load_model",
    "load_recipe",
    "model_size",
    "needs_calibration",
    "qat",
    "quantize",
    "save",
]


def quantize(
    model: nn.Module,
    recipe: Recipe | str | Path,
    calibration: CalibrationSet | None = None,
    progress: bool = True,
) -> QuantizeReport:
    """Quantize ``model`` in place with a recipe (object, preset name, or YAML path).

    Calibrated algorithms (gptq, awq, awq+gptq) need ``calibration`` windows, e.g.
    ``lowbit.calibration_set(tokenizer, "bbc", samples=128, seqlen=512)``.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    return quantize_weights(model, recipe, calibration, progress=progress)


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
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    return run_qat(model, recipe, train, options or QATOptions(), progress)


def needs_calibration(recipe: Recipe) -> bool:
    """Whether the CLI draws calibration windows (K-means uses them, as importance weights)."""
    return recipe.algorithm in (*CALIBRATED, "kmeans")


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
    text = load_corpus(corpus)
    windows = eval_windows(corpus_ids(text, tokenizer), seqlen, tokens)
    scores, seconds = score_models(models, windows, ref, progress)
    n, length = windows.shape
    return {
        name: EvalResult(
            model=name, corpus=corpus, corpus_sha256=text.sha256, seqlen=length, windows=n,
            tokens=n * length, predicted=s.count, ppl=s.ppl,
            kl=s.mean_kl if _compared(models[name], ref) else None,
            top1=s.top1_rate if _compared(models[name], ref) else None, seconds=seconds,
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
    size = model_size(model)
    manifest = {
        "lowbit_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": _transformers_version(),
        "python_version": platform.python_version(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {"model": source.source, "kind": source.kind} if source else None,
        "recipe": report.recipe.to_dict(),
        "calibration": report.calibration.describe() if report.calibration else None,
        "qat": report.qat,
        "seed": seed,
        "quantize_seconds": round(report.seconds, 3),
        "quantize_peak_rss_mb": round(report.peak_rss_mb or 0, 1) or None,
        "blocks": [b.to_dict() for b in report.blocks],
        "awq_alpha": report.awq_alpha or None,
        "size": size.to_dict(),
        "metrics": metrics or {},
        "layers": {name: layer.to_dict() for name, layer in report.layers.items()},
    }
    tokenizer = source.tokenizer if source else None
    return save_folder(model, Path(folder), manifest, tokenizer, overwrite)


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


def _transformers_version() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__
