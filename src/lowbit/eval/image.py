"""Image quality and speed: PSNR and SSIM (torchmetrics) and images per second.

Images are (N, 3, H, W) float tensors in [0, 1] (the inputs of each model are prepared in
:mod:`lowbit.models.images.data`)."""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.models.images.run import to_unit

IDENTICAL_DB = 100.0  # the PSNR monitors record for identical images (JSON has no infinity)


def _functional():
    try:
        from torchmetrics.functional.image import (
            peak_signal_noise_ratio,
            structural_similarity_index_measure,
        )
    except ImportError:
        raise LowbitError("image metrics need torchmetrics: pip install 'lowbit[image]'") from None
    return peak_signal_noise_ratio, structural_similarity_index_measure


def _check(pred: Tensor, target: Tensor) -> None:
    if pred.shape != target.shape or pred.dim() != 4:
        raise LowbitError(f"images to compare must share one (N, C, H, W) shape, got "
                          f"{tuple(pred.shape)} and {tuple(target.shape)}")  # fmt: skip


def psnr(pred: Tensor, target: Tensor, per_image: bool = False) -> float:
    """Peak signal-to-noise ratio in dB (data range 1): over the whole batch, or with
    ``per_image`` the mean of each image's own PSNR (how sample sets are compared)."""
    _check(pred, target)
    if per_image:
        each = _functional()[0](pred.float(), target.float(), data_range=1.0,
                                reduction="none", dim=(1, 2, 3))  # fmt: skip
        return float(each.mean())
    return float(_functional()[0](pred.float(), target.float(), data_range=1.0))


def ssim(pred: Tensor, target: Tensor) -> float:
    """Mean structural similarity (Gaussian window 11, sigma 1.5; data range 1)."""
    _check(pred, target)
    return float(_functional()[1](pred.float(), target.float(), data_range=1.0))


@torch.inference_mode()
def images_per_second(model: nn.Module, x: Tensor, repeats: int = 3) -> float:
    """Images per second of ``model`` on the batch ``x`` (best of ``repeats`` after a warm-up)."""
    model(x)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        best = min(best, time.perf_counter() - start)
    return x.shape[0] / best


@torch.inference_mode()
def outputs(model: nn.Module, inputs: Tensor, output_range: tuple[float, float],
            batch: int = 16) -> Tensor:  # fmt: skip
    """The model's outputs on ``inputs`` in batches, mapped from ``output_range`` to [0, 1]."""
    out = torch.cat([model(inputs[i : i + batch]) for i in range(0, inputs.shape[0], batch)])
    return to_unit(out, output_range)


@torch.inference_mode()
def output_mse(model: nn.Module, inputs: Tensor, ref: Tensor, output_range: tuple[float, float],
               batch: int = 16) -> float:  # fmt: skip
    """Mean squared error of the model's outputs (mapped to [0, 1]) against ``ref``; NaN
    outputs (a broken scale) count as infinite damage."""
    err = float((outputs(model, inputs, output_range, batch) - ref).pow(2).mean())
    return err if err == err else float("inf")


def evaluate_image(model: nn.Module, inputs: Tensor, truth: Tensor | None,
                   ref: nn.Module | None, output_range: tuple[float, float]) -> dict:  # fmt: skip
    """``psnr``/``ssim`` against ``truth`` (if any), ``psnr_ref``/``ssim_ref`` against the
    outputs of ``ref`` on the same inputs (if given; PSNR averaged per image), ``ref``'s own
    ``ref_psnr``/``ref_ssim`` against ``truth`` (if both), ``images_per_s`` at batch 1 (and
    16 when there are as many inputs)."""
    result = {"images": inputs.shape[0], **_quality(model, inputs, truth, ref, output_range)}
    result["images_per_s"] = images_per_second(model, inputs[:1])
    if inputs.shape[0] >= 16:
        result["images_per_s_batch16"] = images_per_second(model, inputs[:16])
    return result


def evaluate_pairs(model: nn.Module, pairs: list[tuple[str, Tensor, Tensor]],
                   ref: nn.Module | None, output_range: tuple[float, float]) -> dict:  # fmt: skip
    """:func:`evaluate_image`'s figures on images of different sizes, ``pairs`` of (name,
    input (1, C, h, w), ground truth): each image's under ``per_image``, their means at the
    top; ``images_per_s`` on the first input."""
    if not pairs:
        raise LowbitError("no images to evaluate on")
    per_image = []
    for name, x, truth in pairs:
        try:
            per_image.append({"image": name, **_quality(model, x, truth, ref, output_range)})
        except LowbitError as exc:  # e.g. an image smaller than a .tflite's input
            raise LowbitError(f"{name}: {exc}") from None
    keys = [k for k in per_image[0] if k != "image"]
    result: dict = {"images": len(pairs)}
    result |= {k: sum(row[k] for row in per_image) / len(per_image) for k in keys}
    result["images_per_s"] = images_per_second(model, pairs[0][1])
    result["per_image"] = per_image
    return result


def _quality(model: nn.Module, inputs: Tensor, truth: Tensor | None, ref: nn.Module | None,
             output_range: tuple[float, float]) -> dict:  # fmt: skip
    got = outputs(model, inputs, output_range)
    result: dict = {}
    if truth is not None:
        result |= {"psnr": psnr(got, truth), "ssim": ssim(got, truth)}
    if ref is not None:
        want = outputs(ref, inputs, output_range)
        db = min(psnr(got, want, per_image=True), IDENTICAL_DB)  # identical: JSON has no inf
        result |= {"psnr_ref": db, "ssim_ref": ssim(got, want)}
        if truth is not None:
            result |= {"ref_psnr": psnr(want, truth), "ref_ssim": ssim(want, truth)}
    return result
