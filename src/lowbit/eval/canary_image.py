"""The canary of an image model's lowbit folder: does the deployed model still draw (or
upscale) what it did when it was quantized?

At quantize time a few fixed inputs (a generator's seeded latents or noise, a
super-resolution model's first calibration crops) go through the *float* model, and the inputs
and its outputs (in [0, 1]) are stored beside the quantized weights (``canary.safetensors``,
the file a language model's canary uses). The quantized folder, loaded as a user loads it, is
then scored on them: PSNR against the float outputs (of the mean squared error). Its tolerance,
recorded in the manifest, is the PSNR of :data:`MARGIN` times that measured squared error plus
:data:`FLOOR` (1.5x the error is 1.76 dB lower). Later, ``lowbit monitor`` and ``lowbit serve``
score the deployed model again; a PSNR below the tolerance means it no longer computes what was
validated (damaged weights, another kernel path, a broken runtime).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lowbit.assets import sha256_file
from lowbit.assets.atomic import atomic_file
from lowbit.errors import LowbitError
from lowbit.eval.image import IDENTICAL_DB, outputs

FILE = "canary.safetensors"
SAMPLES = 4  # a generator's canary images
CROPS = 2  # a super-resolution model's (calibration crops)
SEED = 7
MARGIN = 1.5  # tolerated squared error = MARGIN * the one measured at quantize time + FLOOR
FLOOR = 1e-8  # 80 dB: well above float reassociation between kernels, far below damage


def canary_inputs(entry: Any) -> Tensor:
    """The fixed inputs of the image model ``entry`` (a ``lowbit.models.images.ImageModel``)."""
    if entry.sample is not None:
        return entry.sample(SAMPLES, SEED)
    return entry.calibration()[:CROPS]


def _db(mse: float) -> float:
    return math.inf if mse <= 0 else -10 * math.log10(mse)


def _psnr(got: Tensor, want: Tensor) -> float:
    """PSNR (data range 1) of the mean squared error over all images; identical images count
    as :data:`~lowbit.eval.image.IDENTICAL_DB`."""
    return min(_db(float((got.float() - want.float()).pow(2).mean())), IDENTICAL_DB)


def record(float_model: nn.Module, quantized: nn.Module, entry: Any, folder: Path) -> dict:
    """Write the canary of ``quantized`` (loaded from ``folder``) into ``folder``; returns the
    manifest's ``canary`` entry."""
    inputs = canary_inputs(entry)
    want = outputs(float_model, inputs, entry.output_range)
    got = outputs(quantized, inputs, entry.output_range)
    mse = float((got.float() - want.float()).pow(2).mean())
    with atomic_file(folder / FILE) as tmp:
        save_file({"inputs": inputs.float().contiguous(), "outputs": want.contiguous()},
                  str(tmp))  # fmt: skip
    limit = MARGIN * mse + FLOOR
    return {"file": FILE, "sha256": sha256_file(folder / FILE), "kind": "image",
            "images": len(inputs), "output_range": list(entry.output_range),
            "psnr": _psnr(got, want), "tolerance_psnr": _db(limit),
            "rule": f"psnr of {MARGIN} * mse + {FLOOR}"}  # fmt: skip


@dataclass
class ImageCanaryCheck:
    """One check of an image model against its canary: measured now vs the recorded
    tolerance (both PSNR in dB against the float model's outputs)."""

    psnr: float
    tolerance: float
    recorded_psnr: float | None

    @property
    def ok(self) -> bool:
        return self.psnr >= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {"status": "ok" if self.ok else "degraded", "psnr": self.psnr,
                "tolerance_psnr": self.tolerance, "recorded_psnr": self.recorded_psnr}  # fmt: skip

    def line(self) -> str:
        recorded = ("" if self.recorded_psnr is None
                    else f", {self.recorded_psnr:.2f} when quantized")  # fmt: skip
        verdict = "ok" if self.ok else "DEGRADED"
        return (f"canary: PSNR {self.psnr:.2f} dB against the float outputs (at least "
                f"{self.tolerance:.2f}{recorded}): {verdict}")  # fmt: skip


def check_image(model: nn.Module, path: Path, entry: dict[str, Any],
                tolerance: float | None = None) -> ImageCanaryCheck:  # fmt: skip
    """Score ``model`` against the image canary at ``path`` (its manifest ``entry``);
    ``tolerance``: the least PSNR accepted, in dB (default: the recorded one)."""
    try:
        tensors = load_file(str(path))
        inputs, want = tensors["inputs"], tensors["outputs"]
        low, high = entry["output_range"]
    except (OSError, KeyError, ValueError, RuntimeError, SafetensorError) as exc:
        raise LowbitError(f"{path}: not a lowbit image canary ({exc})") from None
    got = outputs(model, inputs, (float(low), float(high)))
    if got.shape != want.shape:
        raise LowbitError(f"{path}: the model's outputs {tuple(got.shape)} differ in shape from "
                          f"the canary's {tuple(want.shape)}")  # fmt: skip
    limit = float(entry["tolerance_psnr"]) if tolerance is None else tolerance
    return ImageCanaryCheck(_psnr(got, want), limit, entry.get("psnr"))
