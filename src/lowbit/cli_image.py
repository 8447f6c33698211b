"""``lowbit quantize`` and ``lowbit eval`` for image models (``waifu2x-upconv7``,
``dcgan-faces``, ``cdcgan-eyes``): the model is held in memory, calibrated on its built-in
calibration inputs (or crops of ``--calib-images``) and scored on its built-in evaluation inputs
or, for super-resolution, on ``--images`` (PSNR / SSIM against ground truth where there is one
and against ``--ref``'s outputs, images per second)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from lowbit.cli_args import given
from lowbit.errors import LowbitError
from lowbit.json_out import json_text

log = logging.getLogger(__name__)
IMAGE_ANALYSIS_SAMPLES = 16  # calibration inputs the mixed-precision analysis runs on
DEFAULT_CROP = 512  # --images: each image's centre, at most this many pixels a side


def image_entry(model: str, exported: bool = False) -> Any:
    """The registry entry of ``model`` (an image zoo name or a quantized image folder; with
    ``exported``, also an image model's ``.tflite``), or None for any other model."""
    from lowbit.models.checkpoint import MANIFEST, read_manifest
    from lowbit.models.images import image_models

    images = image_models()
    if model in images:
        return images[model]
    path = Path(model).expanduser()
    if exported and path.suffix == ".tflite" and path.is_file():  # an image model's LiteRT file
        from lowbit.models.litert_image import image_info

        info = image_info(path)
        return None if info is None else images.get(info["model"])
    if path.is_dir() and (path / MANIFEST).is_file():
        source = read_manifest(path).get("source") or {}
        if source.get("kind") == "image":
            return images.get(source.get("model"))
    return None


def image_crop(crop: int | None, images: str | None) -> int:
    """``--crop`` checked: only with ``--images``, 32 or more pixels, or 0 for whole images."""
    if crop is None:
        return DEFAULT_CROP
    if images is None:
        raise LowbitError("--crop is for --images (the built-in evaluation image is scored as "
                          "it is)")  # fmt: skip
    if crop < 0 or 0 < crop < 32:
        raise LowbitError(f"--crop {crop}: give 32 or more pixels, or 0 for whole images")
    return crop


def text_only(command: str, *models: str) -> None:
    """A one-line error when a text-only command is given an image model."""
    for model in models:
        entry = image_entry(model)
        if entry is not None:
            raise LowbitError(
                f"`lowbit {command}` works on language models; {model} is an "
                f"image model (`lowbit eval` gives its quality and images/s)"
            )


def quantize_image(args: argparse.Namespace, entry: Any) -> int:
    from lowbit import api
    from lowbit.models.images.data import image_calibration_of, user_images

    refuse_text_options(args, entry, ("dry_run", "max_memory", "restart", "hidden_dtype",
                                      "spill_hidden", "calib_samples", "calib_seqlen",
                                      "eval_corpus", "eval_seqlen", "eval_tokens"),
                        "held in memory, calibrated on its inputs or --calib-images")  # fmt: skip
    float_model(entry, args.model, "quantize")
    from lowbit.calibration.group import Group

    if Group.current().distributed:  # every process would write --out
        raise LowbitError(f"{entry.name} is an image model: it is quantized in one process "
                          f"(run it without torchrun)")  # fmt: skip
    _no_text(args, entry)
    held = None  # --eval-images, read before anything is quantized or written
    if args.eval_images is not None:
        from lowbit.models.images.data import disjoint_images, named_images

        if entry.scoring_pair is None:
            raise LowbitError(f"--eval-images: {entry.name} takes no images (it is scored on "
                              f"its own inputs: --eval)")  # fmt: skip
        disjoint_images(args.calib_images, args.eval_images)
        held = named_images(args.eval_images, entry.channels, min_side=32)
    recipe = api.load_recipe(args.recipe)
    src = api.load_model(entry.name)
    mixed = args.target_bits is not None or args.target_size is not None
    calibration = None
    if api.needs_calibration(recipe) or mixed:
        calibration = image_calibration_of(entry, args.calib_images)
    elif args.calib_images is not None:
        user_images(entry, args.calib_images)  # checked all the same
        log.info("%s uses no calibration data; --calib-images is ignored", recipe.algorithm)
    analysis = None
    if mixed:
        recipe, analysis = _mixed(args, src.model, recipe, calibration, entry)
        calibration = calibration if api.needs_calibration(recipe) else None
    report = api.quantize(src.model, recipe, calibration, progress=not args.quiet)
    report.analysis = analysis  # recorded in the manifest, as for a language model
    out = api.save(src.model, args.out, report, source=src, overwrite=args.overwrite)
    metrics = {}
    if args.canary or args.eval or held is not None:
        # the folder as a user loads it, and the float model it is compared with (once each)
        saved, ref = api.load(out), api.load_model(entry.name)
        if args.canary:  # what `lowbit monitor` and `lowbit serve` check the folder against
            canary = api.add_image_canary(out, ref.model, saved.model, entry)
            log.info("canary: %d images, PSNR %.2f dB against float32 (tolerance %.2f)",
                     canary["images"], canary["psnr"], canary["tolerance_psnr"])  # fmt: skip
        if held is not None:  # held-out images, as `lowbit eval --images --ref`
            result = score_on_images(saved.model, ref.model, entry, held, DEFAULT_CROP)[0]
            metrics = {"eval": {**result, "images_path": args.eval_images}}
        elif args.eval:
            metrics = {"eval": _evaluate(saved.model, entry, ref)}
    if metrics:
        api.add_metrics(out, metrics)
    bits = sum(r.bits_per_weight * r.in_features * r.out_features for r in report.layers.values())
    weights = sum(r.in_features * r.out_features for r in report.layers.values())
    summary = {"out": str(out), "layers": len(report.layers), "bits_per_weight": bits / weights,
               "seconds": report.seconds, **metrics}  # fmt: skip
    if analysis is not None:
        summary["mixed_precision"] = analysis
    if args.json:
        print(json_text(summary))
    else:
        print(f"saved to {out}: {len(report.layers)} layers, {bits / weights:.3f} bits/weight, "
              f"{report.seconds:.1f} s")  # fmt: skip
        if metrics:
            for row in metrics["eval"].get("per_image", ()):
                print(f"{row['image']}: {_line(row)}")
            print(_line(metrics["eval"]))
    return 0


def _mixed(args: argparse.Namespace, model: Any, recipe: Any, calibration: Any,
           entry: Any) -> tuple[Any, dict]:  # fmt: skip
    """(recipe, summary) of ``--target-bits`` / ``--target-size``: each layer's format chosen
    from the candidates by the output MSE it causes alone on the first calibration inputs."""
    from lowbit import api
    from lowbit.cli_quantize import allocate_formats

    sens = _sensitivity(args, entry, model, recipe, calibration, args.analysis_samples)
    return allocate_formats(args, api, model, recipe, sens)


def analyze_image(args: argparse.Namespace, entry: Any) -> Any:
    """``lowbit analyze`` of an image model: each layer's damage (output MSE, outputs in
    [0, 1]) in each candidate format, on the first ``--calib-samples`` calibration inputs."""
    from lowbit import api
    from lowbit.models.images.data import image_calibration_of

    float_model(entry, args.model, "analyze")
    _no_text(args, entry)
    recipe = api.load_recipe(args.recipe)
    calibration = image_calibration_of(entry, args.calib_images)
    return _sensitivity(args, entry, entry.load(), recipe, calibration, args.calib_samples)


def _sensitivity(args: argparse.Namespace, entry: Any, model: Any, recipe: Any,
                 calibration: Any, samples: int | None) -> Any:  # fmt: skip
    """Each layer's output MSE in each ``--candidates`` format on the first ``samples``
    calibration inputs (default IMAGE_ANALYSIS_SAMPLES)."""
    from lowbit import api
    from lowbit.calibration import image_calibration

    n = samples or IMAGE_ANALYSIS_SAMPLES
    sample = image_calibration(calibration.windows[:n], calibration.corpus)
    return api.analyze(model, recipe, sample, args.candidates, progress=not args.quiet,
                       output_range=entry.output_range)  # fmt: skip


def refuse_text_options(args: argparse.Namespace, entry: Any, dests: tuple[str, ...],
                        how: str) -> None:  # fmt: skip
    """A one-line error when the command line set one of the language-model options ``dests``
    for the image model ``entry`` (``how``: what the command does with it instead)."""
    text = given(args, *dests)
    if text:
        raise LowbitError(f"{text[0]} is for language models; {entry.name} is an image model "
                          f"({how})")  # fmt: skip


def float_model(entry: Any, model: str, what: str) -> None:
    """A one-line error unless ``model`` is ``entry``'s float model (its zoo name)."""
    if model != entry.name:
        raise LowbitError(f"{model} is already quantized; {what} the float model "
                          f"({entry.name})")  # fmt: skip


def same_model(entry: Any, other: str, role: str) -> None:
    """A one-line error unless ``other`` is ``entry``'s model: its zoo name, or a folder or
    ``.tflite`` made from it."""
    found = image_entry(other, exported=True)
    if found is None or found.name != entry.name:
        what = "not an image model" if found is None else f"a {found.name} model"
        raise LowbitError(f"{role} {other} is {what}; it must be {entry.name} or a model "
                          f"quantized from it")  # fmt: skip


def _no_text(args: argparse.Namespace, entry: Any) -> None:
    if args.calib is not None:
        raise LowbitError(f"--calib names a text corpus; {entry.name} is an image model (give "
                          f"your images with --calib-images)")  # fmt: skip


def eval_image(args: argparse.Namespace, entry: Any) -> int:
    from lowbit import api

    refuse_text_options(args, entry, ("corpus", "seqlen", "tokens"),
                        "scored on its evaluation inputs, or --images")  # fmt: skip
    if args.ref is not None:
        same_model(entry, args.ref, "--ref")
    if (args.grid or args.fd) and not args.ref:
        raise LowbitError(f"--{'grid' if args.grid else 'fd'} compares the model with --ref's "
                          f"outputs: give --ref")  # fmt: skip
    crop = image_crop(args.crop, args.images)
    if args.images is not None:
        return _eval_on_images(args, entry, crop)
    inputs, truth = entry.evaluation()
    if args.fd and len(inputs) < 2:
        raise LowbitError(f"--fd compares sets of images; {entry.name} is scored on one image")
    src = api.load_model(args.model)
    ref = api.load_model(args.ref) if args.ref else None
    result = _evaluate(src.model, entry, ref, inputs, truth)
    grid = None
    if args.fd or args.grid:
        grid = _compare(args, src.model, ref.model, entry, inputs, result)
    _print_result(args, result, grid)
    return 0


def _eval_on_images(args: argparse.Namespace, entry: Any, crop: int) -> int:
    """``--images``: the super-resolution protocol on the user's images, each scored alone."""
    from lowbit import api
    from lowbit.eval.image import outputs

    if args.fd:
        raise LowbitError("--fd compares generators' sample sets; --images scores each "
                          "upscaled image against the image itself")  # fmt: skip
    from lowbit.models.images.data import named_images

    if entry.scoring_pair is None:
        raise LowbitError(f"--images: {entry.name} takes no images (it is scored on its own "
                          f"inputs)")  # fmt: skip
    images = named_images(args.images, entry.channels, min_side=32)
    model = api.load_model(args.model).model
    ref = api.load_model(args.ref).model if args.ref else None
    result, pairs, (model, ref) = score_on_images(model, ref, entry, images, crop)
    grid = None
    if args.grid:
        got, want = ([outputs(m, x, entry.output_range)[0] for _, x, _ in pairs[:4]]
                     for m in (model, ref))  # fmt: skip
        grid = save_grid_of(args, want, got)
    _print_result(args, result, grid)
    return 0


def score_on_images(model: Any, ref: Any, entry: Any, images: list, crop: int) -> tuple:
    """The super-resolution protocol on ``images`` (``UserImage``s): (result, the scored
    (name, input, truth) pairs, (model, ref) as run: a window at a time, as `lowbit generate`
    upscales: the same pixels, any image size)."""
    from lowbit.eval.image import evaluate_pairs
    from lowbit.models.images.tiles import upscaler

    pairs = [(image.name, *entry.scoring_pair(image.pixels, crop)) for image in images]
    model = upscaler(model, entry.halo)
    ref = upscaler(ref, entry.halo) if ref is not None else None
    return evaluate_pairs(model, pairs, ref, entry.output_range), pairs, (model, ref)


def save_grid_of(args: argparse.Namespace, want: Any, got: Any) -> Path:
    """``--grid``: ``--ref``'s outputs | the model's | their difference, the first four."""
    from lowbit.eval.image_grid import save_grid

    return save_grid(args.grid, want[:4], got[:4], f"{args.model} vs {args.ref}")


def _print_result(args: argparse.Namespace, result: dict, grid: Path | None) -> None:
    if args.json:
        extra = {"ref": args.ref} if args.ref else {}
        extra |= {"grid": str(grid)} if grid else {}
        print(json_text({"model": args.model, **extra, **result}))
        return
    for row in result.get("per_image", ()):
        print(f"{row['image']}: {_line(row)}")
    print(_line(result))
    if grid:
        print(f"grid saved to {grid}")


def _evaluate(model: Any, entry: Any, ref: Any, inputs: Any = None, truth: Any = None) -> dict:
    from lowbit.eval.image import evaluate_image

    if inputs is None:
        inputs, truth = entry.evaluation()
    return evaluate_image(model, inputs, truth, None if ref is None else ref.model,
                          entry.output_range)  # fmt: skip


def _compare(args: argparse.Namespace, model: Any, ref: Any, entry: Any, inputs: Any,
             result: dict) -> Path | None:  # fmt: skip
    """``--fd`` (into ``result``: FD-Inception between the two sample sets) and ``--grid`` (the
    first four outputs side by side; its path is returned)."""
    from lowbit.eval.image import outputs

    count = len(inputs) if args.fd else 4
    got, want = (outputs(m, inputs[:count], entry.output_range) for m in (model, ref))
    if args.fd:
        from lowbit.eval.frechet import frechet_distance
        from lowbit.models.images.inception import inception_extractor, inception_features

        extractor = inception_extractor()
        ref_features, features = (inception_features(extractor, x) for x in (want, got))
        result["fd_inception_ref"] = frechet_distance(ref_features, features)
    if not args.grid:
        return None
    return save_grid_of(args, want, got)


def _line(result: dict) -> str:
    """One result (the mean, or one image's under ``per_image``) in words."""
    parts = [f"{result['images']} images"] if "images" in result else []
    if "psnr" in result:
        drop = ""
        if "ref_psnr" in result:
            drop = f" (ref {result['ref_psnr']:.2f} dB, {result['psnr'] - result['ref_psnr']:+.2f})"
        parts.append(f"PSNR {result['psnr']:.2f} dB{drop}, SSIM {result['ssim']:.4f} vs ground "
                     f"truth")  # fmt: skip
    if "psnr_ref" in result:
        parts.append(f"PSNR {result['psnr_ref']:.2f} dB, SSIM {result['ssim_ref']:.4f} vs ref")
    if "fd_inception_ref" in result:
        parts.append(f"FD-Inception {result['fd_inception_ref']:.3f} vs ref")
    if "images_per_s" in result:
        parts.append(f"{result['images_per_s']:.2f} images/s at batch 1")
    return "; ".join(parts)
