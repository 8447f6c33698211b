"""Calibration data: seeded token windows from a named corpus, images, or the several tensors
of a multi-input forward, with their provenance."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from lowbit.data import ModelInputs, calibration_windows, corpus_ids, ids_sha256, load_corpus
from lowbit.errors import LowbitError


@dataclass
class CalibrationSet:
    """``windows`` (samples, seqlen) of token ids and where they came from; for an image
    model, (samples, C, H, W) float images (``seqlen`` 0, see :func:`image_calibration`); for
    a forward of several tensors, :class:`ModelInputs` (see :func:`input_calibration`)."""

    corpus: str
    samples: int
    seqlen: int
    seed: int
    windows: Tensor | ModelInputs
    text_sha256: str | None = None  # of the corpus the windows were drawn from

    @property
    def token_sha256(self) -> str:
        if isinstance(self.windows, ModelInputs):
            return self.windows.sha256()
        return ids_sha256(self.windows)

    def describe(self) -> dict[str, Any]:
        if isinstance(self.windows, ModelInputs):
            return {
                "corpus": self.corpus,
                "samples": self.samples,
                "inputs": self.windows.shapes(),
                "inputs_sha256": self.windows.sha256(),
            }
        if self.windows.is_floating_point():
            data = self.windows.float().contiguous().numpy().tobytes()
            return {"corpus": self.corpus, "samples": self.samples,
                    "shape": list(self.windows.shape[1:]),
                    "images_sha256": hashlib.sha256(data).hexdigest()}  # fmt: skip
        return {
            "corpus": self.corpus,
            "samples": self.samples,
            "seqlen": self.seqlen,
            "seed": self.seed,
            "tokens": self.samples * self.seqlen,
            "token_sha256": self.token_sha256,
            **({"text_sha256": self.text_sha256} if self.text_sha256 else {}),
        }


def calibration_set(
    tokenizer: Any,
    corpus: str = "bbc",
    samples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    options: str = "--calib-samples or --calib-seqlen",
) -> CalibrationSet:
    """``samples`` windows of ``seqlen`` tokens drawn from ``corpus`` with ``seed`` (``options``:
    what a corpus too short for them tells the user to lower).

    The defaults (128 x 512 = 65,536 tokens of BBC news) calibrate a 135M model in minutes on
    two CPU cores.
    """
    text = load_corpus(corpus)
    ids = corpus_ids(text, tokenizer)
    return CalibrationSet(corpus, samples, seqlen, seed,
                          calibration_windows(ids, samples, seqlen, seed, options),
                          text.sha256)  # fmt: skip


def image_calibration(images: Tensor, name: str) -> CalibrationSet:
    """Calibration inputs for an image model: ``images`` (N, C, H, W) in the model's input
    range, named ``name`` in manifests; never the images it is evaluated on."""
    if images.dim() != 4 or not images.is_floating_point():
        raise LowbitError(f"calibration images must be a float (N, C, H, W) tensor, got "
                          f"{images.dtype} of shape {tuple(images.shape)}")  # fmt: skip
    return CalibrationSet(name, images.shape[0], 0, 0, images)


def input_calibration(inputs: ModelInputs, name: str) -> CalibrationSet:
    """Calibration inputs for a model whose forward takes several tensors (a bare UNet's noisy
    sample, timestep and text embedding): each of ``inputs`` with the samples along dim 0, named
    ``name`` in manifests; never the inputs it is evaluated on."""
    if not isinstance(inputs, ModelInputs):
        raise LowbitError(f"input_calibration takes lowbit.data.ModelInputs(args=(...), "
                          f"kwargs={{...}}), got {type(inputs).__name__}")  # fmt: skip
    return CalibrationSet(name, len(inputs), 0, 0, inputs)
