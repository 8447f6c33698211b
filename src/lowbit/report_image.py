"""``lowbit report`` of an image model: fp32 and each recipe variant side by side (size on
disk and in RAM, PSNR / SSIM against the ground truth where there is one and against fp32's
outputs, images per second), each variant's outputs beside fp32's as a grid PNG.

As :mod:`lowbit.report` does for language models: every recipe variant is quantized from the
same float model (calibrated on the model's own calibration inputs or crops of the user's
images), saved under ``OUT/variants/``, loaded back as a user loads it (fast kernels on) and
scored on the same inputs. Orchestration only, over :mod:`api`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowbit import api
from lowbit.assets import PRODUCER, atomic_dir, prepare_out
from lowbit.errors import LowbitError
from lowbit.eval import model_size
from lowbit.eval.image import evaluate_image, evaluate_pairs, outputs
from lowbit.eval.image_grid import save_grid
from lowbit.eval.machine import thread_settings
from lowbit.eval.report_render import IMAGE_COLUMNS, IMAGE_PANELS, report_markdown, write_plots
from lowbit.json_out import json_text
from lowbit.models.images.data import image_calibration_of, named_images
from lowbit.models.images.tiles import upscaler
from lowbit.report import FLOAT, quantize_variants, recipe_variants

log = logging.getLogger(__name__)
DEFAULT_IMAGE_VARIANTS = ["fp32", "conv-w8a8-static", "conv-w8a8-best", "conv-w8-gptq"]


@dataclass
class ImageReportOptions:
    calib_images: str | None = None  # crops of these instead of the model's own inputs
    images: str | None = None  # super-resolution: scored on these instead of the built-in one
    crop: int = 512  # with ``images``: each one's centre, at most this many pixels a side


def build_image_report(entry: Any, variants: list[str], out: Path,
                       options: ImageReportOptions, overwrite: bool = False,
                       progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Quantize, save, score and time every variant of the image model ``entry``; write
    ``out``/report.md, report.json, the plots and one grid per quantized variant; return the
    report's data. ``out`` appears complete or not at all."""
    recipes = recipe_variants(variants)
    out = Path(out)
    prepare_out(out, overwrite)
    calibration = None
    if any(r is not None and api.needs_calibration(r) for r in recipes.values()):
        calibration = image_calibration_of(entry, options.calib_images)
    inputs = _inputs(entry, options)
    src = api.load_model(entry.name)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        folders, models = quantize_variants(src, recipes, tmp, lambda _: calibration, progress)
        data = _measure(entry, models, folders, inputs, tmp)
        data |= {"model": entry.name, "notes": _notes(calibration)}
        _write(tmp, data)
    return data


def _inputs(entry: Any, options: ImageReportOptions) -> Any:
    """The built-in (inputs, truth), or the (name, input, truth) of each of ``images``."""
    if options.images is None:
        return entry.evaluation()
    if entry.scoring_pair is None:
        raise LowbitError(f"--images: {entry.name} takes no images (it is scored on its own "
                          f"inputs)")  # fmt: skip
    images = named_images(options.images, entry.channels, min_side=32)
    return [(image.name, *entry.scoring_pair(image.pixels, options.crop)) for image in images]


def _measure(entry: Any, models: dict, folders: dict, inputs: Any, tmp: Path) -> dict[str, Any]:
    ref = models[FLOAT]
    rows = []
    for name, model in models.items():
        row = {"variant": name, "weight_mb": model_size(model).total_bytes / 1e6}
        row["disk_mb"] = (sum(f.stat().st_size for f in folders[name].iterdir()) / 1e6
                          if name in folders else row["weight_mb"])  # fmt: skip
        against = None if name == FLOAT else ref
        if isinstance(inputs, list):  # the user's images, a window at a time
            run = upscaler(model, entry.halo)
            row |= evaluate_pairs(run, inputs, against and upscaler(ref, entry.halo),
                                  entry.output_range)  # fmt: skip
        else:
            row |= evaluate_image(model, inputs[0], inputs[1], against, entry.output_range)
        row["ms_per_image"] = 1000 / row["images_per_s"]
        if name != FLOAT:
            row["grid"] = _grid(entry, tmp, name, ref, model, inputs)
        rows.append(row)
    machine = thread_settings()
    return {"rows": rows, "protocol": [_protocol(entry, inputs, rows[0], machine)],
            "machine": machine}  # fmt: skip


def _grid(entry: Any, tmp: Path, name: str, ref: Any, model: Any, inputs: Any) -> str:
    """fp32 | the variant | the difference on the first four inputs; the file's name."""
    if isinstance(inputs, list):
        want, got = ([outputs(upscaler(m, entry.halo), x, entry.output_range)[0]
                      for _, x, _ in inputs[:4]] for m in (ref, model))  # fmt: skip
    else:
        want, got = (outputs(m, inputs[0][:4], entry.output_range) for m in (ref, model))
    path = save_grid(tmp / f"grid_{name}.png", want, got, f"{entry.name}: fp32 | {name}")
    return path.name


def _protocol(entry: Any, inputs: Any, first: dict, machine: dict) -> str:
    what = (f"{len(inputs)} of the user's images (each one's centre, downscaled 2x, upscaled; "
            f"PSNR / SSIM per image, then their mean)" if isinstance(inputs, list)
            else entry.description)  # fmt: skip
    speed = "images/s at batch 1 (best of 3 after a warm-up)"
    if "images_per_s_batch16" in first:
        speed += " and at batch 16"
    return (f"Quality: {what}; against the ground truth where there is one and against fp32's "
            f"outputs on the same inputs. Speed: {speed}, each variant as loaded from its "
            f"folder; {machine['torch_threads']} threads, {machine['cpu_capability']}, "
            f"lowbit kernels: {machine['kernels']}.")  # fmt: skip


def _notes(calibration: Any) -> list[str]:
    notes = ["fp32 disk MB is the size of its float32 tensors (what a safetensors file holds)"]
    if calibration is not None:
        notes.append(f"calibrated on {calibration.corpus} ({calibration.samples} inputs)")
    return notes


def _write(folder: Path, data: dict[str, Any]) -> None:
    (folder / "report.json").write_text(
        json_text(PRODUCER | data, indent=1, default=str), encoding="utf-8"
    )
    md = report_markdown(data["rows"], data, IMAGE_COLUMNS, IMAGE_PANELS)
    grids = [f"![{r['variant']}]({r['grid']})" for r in data["rows"] if "grid" in r]
    (folder / "report.md").write_text(md + "\n" + "\n\n".join(grids) + "\n", encoding="utf-8")
    write_plots(data["rows"], folder, f"lowbit report: {data['model']}", IMAGE_PANELS)
