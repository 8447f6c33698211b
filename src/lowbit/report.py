"""``lowbit report``: several variants of one model side by side, as Markdown, JSON and plots.

Each variant is ``fp32`` (the model as loaded) or a recipe (preset or YAML). Every recipe variant
is quantized from the same float model, saved as a lowbit folder under ``OUT/variants/`` (its
disk size is that folder's), and loaded back as a user would load it (fast kernels on). Then all
variants are scored on the same evaluation windows against fp32 (ppl, KL, top-1) and timed side by
side (:mod:`lowbit.eval.bench`, alternating runs, medians). Orchestration only, over :mod:`api`.
"""

from __future__ import annotations

import copy
import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from lowbit import api
from lowbit.assets import PRODUCER, atomic_dir, prepare_out
from lowbit.data import disjoint_texts
from lowbit.errors import LowbitError
from lowbit.eval import model_size
from lowbit.eval.bench import bench_models
from lowbit.eval.report_render import report_markdown, write_plots
from lowbit.json_out import json_text
from lowbit.models.load import source_folder
from lowbit.models.zoo import zoo_caveat
from lowbit.recipes import Recipe

log = logging.getLogger(__name__)

FLOAT = "fp32"
DEFAULT_VARIANTS = ["fp32", "bf16", "w8a8-dynamic", "w4-rtn-g64", "w4-g64-down8"]


@dataclass
class ReportOptions:
    calib: str = "bbc"
    calib_samples: int = 128
    calib_seqlen: int = 512
    corpus: str = "wiki"
    seqlen: int = 2048
    tokens: int | None = 16384
    prompt_tokens: int = 512
    new_tokens: int = 128
    repeats: int = 3
    quality: bool = True
    seed: int = 0
    rss: bool = True  # peak RSS of each variant in a child process


def build_report(
    source: str,
    variants: list[str],
    out: Path,
    options: ReportOptions,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Quantize, save, evaluate and time every variant; write ``out``/report.md, report.json and
    the plots; return the report's data. ``out`` appears complete or not at all."""
    recipes = recipe_variants(variants)
    source_folder(source)  # a quantized folder is refused before the texts are read
    if options.quality:
        disjoint_texts(options.calib, options.corpus, "--calib, --corpus")
    out = Path(out)
    prepare_out(out, overwrite)
    src = api.load_model(source)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        folders, models = quantize_variants(src, recipes, tmp, _text(src, options), progress,
                                            options.seed)  # fmt: skip
        data = _measure(src, models, folders, options, progress)
        data["model"] = source
        _write(tmp, data)
    return data


def recipe_variants(variants: list[str]) -> dict[str, Recipe | None]:
    """Each variant's recipe by its name (a YAML file's stem), ``fp32`` (None) first if not
    named: the reference every ratio is taken against."""
    if not variants:
        raise LowbitError("name at least one variant (fp32 or a recipe)")
    if len(set(variants)) != len(variants):
        raise LowbitError("a variant is named twice")
    out: dict[str, Recipe | None] = {}
    given: dict[str, str] = {}
    for name in variants:
        key = Path(name).stem if name.endswith((".yaml", ".yml")) else name
        if key == FLOAT and name != FLOAT:  # its row would pass for the float reference
            raise LowbitError(f"{name}: a recipe file may not be named {FLOAT!r}, the float "
                              f"model's row; rename the file")  # fmt: skip
        if key in given:  # (a variant's row, folder and grid are named by it)
            raise LowbitError(f"variants {given[key]} and {name} would both be named {key!r}; "
                              f"rename one of the files")  # fmt: skip
        given[key] = name
        out[key] = None if name == FLOAT else api.load_recipe(name)
    if FLOAT not in out:
        out = {FLOAT: None, **out}  # the reference every ratio and KL is taken against
    return out


def quantize_variants(src: Any, recipes: dict[str, Recipe | None], tmp: Path,
                      calibration: Callable[[str], Any], progress: bool,
                      seed: int = 0) -> tuple[dict[str, Path], dict[str, nn.Module]]:  # fmt: skip
    """Each recipe variant quantized from a copy of ``src``'s float model (``calibration(name)``
    where the recipe needs data), saved under ``tmp/variants/``, then every variant loaded back
    as a user loads it (``fp32``: the float model itself): (folders, models)."""
    folders = {}
    for name, recipe in recipes.items():
        if recipe is None:
            continue
        model = copy.deepcopy(src.model)
        log.info("quantizing variant %s", name)
        calib = calibration(name) if api.needs_calibration(recipe) else None
        report = api.quantize(model, recipe, calib, progress=progress)
        folders[name] = api.save(model, tmp / "variants" / name, report, source=src, seed=seed)
        del model
        gc.collect()
    models = {name: src.model if recipe is None else api.load(folders[name]).model
              for name, recipe in recipes.items()}  # fmt: skip
    return folders, models


def _text(src: Any, options: ReportOptions) -> Callable[[str], Any]:
    """The calibration windows of a language model's variant, by the variant's name."""

    def windows(name: str) -> Any:
        if src.tokenizer is None:
            raise LowbitError(f"{name} needs calibration text, and {src.source} has no "
                              f"tokenizer")  # fmt: skip
        return api.calibration_set(src.tokenizer, options.calib, options.calib_samples,
                                   options.calib_seqlen, options.seed)  # fmt: skip

    return windows


def _measure(src, models: dict[str, nn.Module], folders, options, progress) -> dict[str, Any]:
    rows = {name: {"variant": name, "weight_mb": model_size(m).total_bytes / 1e6}
            for name, m in models.items()}  # fmt: skip
    rows[FLOAT]["disk_mb"] = rows[FLOAT]["weight_mb"]  # fp32 safetensors of the same tensors
    for name, folder in folders.items():
        # the weight files, as fp32's figure (config, tokenizer and manifest left out)
        rows[name]["disk_mb"] = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e6
    notes = [f"{FLOAT} disk MB is the size of its float32 tensors (what a safetensors file holds)"]
    protocol = []
    if options.quality and src.tokenizer is not None:
        results = api.evaluate(models, src.tokenizer, options.corpus, options.seqlen,
                               options.tokens, ref=src.model, progress=progress)  # fmt: skip
        for name, r in results.items():
            rows[name] |= {"ppl": r.ppl, "kl": r.kl, "top1": r.top1}
        r = results[FLOAT]
        protocol.append(f"Quality: `{r.corpus}` (sha256 {r.corpus_sha256[:12]}), {r.windows} "
                        f"windows x {r.seqlen} tokens = {r.tokens} tokens, GPTQ protocol; KL "
                        "and top-1 against fp32 on the same windows.")  # fmt: skip
    else:
        notes.append("quality not measured (no tokenizer, or --no-quality)")
    sources = {FLOAT: src.source, **{n: str(f) for n, f in folders.items()}}
    speed, machine = bench_models(models, sources if options.rss else None,
                                  options.prompt_tokens, options.new_tokens,
                                  options.repeats, progress)  # fmt: skip
    for name, b in speed.items():
        s = b.speed
        rows[name] |= {"prefill_tps": s.prefill_tps, "decode_tps": s.decode_tps,
                       "ttft_s": s.ttft_s, "peak_rss_mb": b.peak_rss_mb,
                       "joules_per_token": s.joules_per_token,
                       "bound_fraction": b.bound_fraction}  # fmt: skip
    protocol.append(f"Speed: prompt {options.prompt_tokens} random tokens, greedy decode to "
                    f"{options.new_tokens} new tokens at batch 1, {options.repeats} alternating "
                    f"runs per variant, medians; {machine['torch_threads']} threads, "
                    f"{machine['cpu_capability']}, OMP_WAIT_POLICY={machine['omp_wait_policy']}, "
                    f"LOWBIT_SPIN_US={machine['lowbit_spin_us']}, decode threads: "
                    f"{machine.get('decode_threads', 'not recorded')}, kernels: "
                    f"{machine.get('kernels', 'not recorded')}, read bandwidth "
                    f"{machine['bandwidth_gbs']} GB/s.")  # fmt: skip
    caveat = zoo_caveat(src.source)
    if caveat:
        notes.append(caveat)
    return {"rows": list(rows.values()), "protocol": protocol, "notes": notes,
            "machine": machine}  # fmt: skip


def _write(folder: Path, data: dict[str, Any]) -> None:
    (folder / "report.json").write_text(
        json_text(PRODUCER | data, indent=1, default=str), encoding="utf-8"
    )
    (folder / "report.md").write_text(report_markdown(data["rows"], data), encoding="utf-8")
    write_plots(data["rows"], folder, f"lowbit report: {data['model']}")
